"""Parity results and their reports: `parity.md` for people, `parity.json` for machines (CI, the CLI)."""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lfm_export.parity.expert_ties import apart_note
from lfm_export.parity.thresholds import POOLED, Gate

SCHEMA_VERSION = 1
EXIT_PASS = 0
EXIT_FAIL = 1

EXACTNESS = "exactness"
"""Part (a): the artifact against its recipe simulated in torch. A failure means the export is wrong."""
QUALITY = "quality"
"""Part (b): the artifact (and the simulation) against the fp32 reference. A failure means the recipe is lossier
than asked for."""

EXACT_ROWS = ("resolved_prefill", "graph_prefill", "fp16_program_prefill")
"""The exact rows' names (`ExactRow.name`): their keys under `exactness` in
`parity.json` and the manifest's summary, in this order, each present and null where the run has no such row."""

POOLED_SUMMARY = ("positions", "decisive", "kl_mean", "kl_p99", "top1_agreement", "top1_decisive")
EXACT_SUMMARY = ("logit_max_rel", "logit_median_rel", "kl_mean", "kl_max", "top1_decisive", "state_max_rel")

# (metric, column title, format)
COLUMNS = (
    ("positions", "positions", "d"),
    ("logit_max_abs", "logit max abs", ".2e"),
    ("logit_max_rel", "max rel", ".2e"),
    ("cosine_mean", "cosine mean", ".6f"),
    ("kl_mean", "KL mean", ".2e"),
    ("kl_p99", "KL p99", ".2e"),
    ("kl_max", "KL max", ".2e"),
    ("top1_agreement", "top-1", ".4f"),
    ("top1_decisive", "top-1 decisive", ".4f"),
    ("greedy_match", "greedy match", "greedy"),
    ("state_max_abs", "state max abs", ".2e"),
    ("state_max_rel", "state max rel", ".2e"),
    ("state_p99_rel", "state p99 rel", ".2e"),
    ("state_p99_steps", "state p99 steps", ".1f"),
)


@dataclass(frozen=True)
class Check:
    scenario: str
    metric: str
    value: float | None
    op: str
    limit: float | None
    passed: bool
    note: str = ""
    part: str = EXACTNESS

    def describe(self) -> str:
        if self.metric == "error":
            return f"{self.scenario}: error ({self.note})"
        verdict = "ok" if self.passed else "FAIL"
        value = self.note if self.value is None and self.note else _num(self.value)
        return f"{self.scenario}: {self.metric} = {value} (limit {self.op} {_num(self.limit)}) {verdict}"


@dataclass
class ScenarioResult:
    name: str
    status: str
    """`ok`, `skipped` or `error`."""
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)


class ExactRow(ABC):
    """One exact row's result (`lfm_export.parity.exact_row`): `name` is its report row and its key under `exactness` in `parity.json` (one of
    `EXACT_ROWS`, whose keys the reports keep null where a run has no such row);
    `runs` says what it runs against what; `positions` how many positions it compared; `worst` the largest
    value of its headline `metric` and `limit` that metric's limit; `first_failure` where it first failed (a
    position or an op), None where it passed; `to_json` its `parity.json` entry, `summary_keys` what of it the
    manifest's summary keeps; `describe` its checks' note and `note` its paragraph in `parity.md`."""

    name: ClassVar[str]
    summary_keys: ClassVar[tuple[str, ...]]
    positions: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuses a row the reports do not name: its key would be missing from every other run's JSON."""
        super().__init_subclass__(**kwargs)
        if "name" in vars(cls) and cls.name not in EXACT_ROWS:  # a shared base names none
            raise TypeError(f"exact row {cls.name!r} is not one of lfm_export.parity.report.EXACT_ROWS")

    @property
    @abstractmethod
    def metric(self) -> str: ...

    @property
    @abstractmethod
    def runs(self) -> str: ...

    @property
    @abstractmethod
    def worst(self) -> float | None: ...

    @property
    @abstractmethod
    def limit(self) -> float: ...

    @property
    @abstractmethod
    def passed(self) -> bool: ...

    @property
    @abstractmethod
    def first_failure(self) -> str | None: ...

    @abstractmethod
    def describe(self) -> str: ...

    @abstractmethod
    def to_json(self) -> dict[str, Any]: ...

    @abstractmethod
    def note(self) -> str: ...

    @property
    def verdict(self) -> str:
        """`ok`, or `**FAIL**` (markdown), as the notes say it."""
        return "ok" if self.passed else "**FAIL**"

    def checks(self) -> list[Check]:
        """The row's checks in the report: one, its headline metric against its limit."""
        return [
            Check(self.name, self.metric, self.worst, "<=", self.limit, self.passed, note=self.describe())
        ]

    def summary(self) -> dict[str, Any]:
        """What the manifest's parity summary keeps of the row (`summary_keys` of `to_json`)."""
        full = self.to_json()
        return {k: full[k] for k in self.summary_keys}


@dataclass
class ParityResult:
    """Both parts of a parity run. `scenarios` are the exactness rows (the artifact against the simulation, or
    against the reference when the recipe is the reference's own math), `quality` the artifact against the
    fp32 reference, `recipe_loss` the simulation against the fp32 reference (empty without a simulation)."""

    recipe: str
    gate: Gate
    test_name: str
    reference_name: str
    scenarios: list[ScenarioResult]
    checks: list[Check]
    metadata: dict[str, Any] = field(default_factory=dict)
    prompt_lengths: list[int] = field(default_factory=list)
    simulation_name: str | None = None
    quality_gate: Gate | None = None
    quality: list[ScenarioResult] = field(default_factory=list)
    recipe_loss: list[ScenarioResult] = field(default_factory=list)
    activation_rounding: dict[str, float | None] | None = None
    """What int8 activation rounding itself does to the exactness metrics (the simulation with against without
    it, worst over the run), where the gate allows for it; None where activations stay float."""
    stored_weights: dict[str, Any] | None = None
    """The weights part of exactness (`lfm_export.parity.stored_weights.StoredWeights.to_json`); None where the
    backend reads no stored weights or the recipe quantizes none."""
    exact_rows: list[ExactRow] = field(default_factory=list)
    """The exact rows of the run (`lfm_export.parity.exact_row`): at most one per backend's gate, none where it
    names none or none applies (a streaming reference runs none)."""

    streaming: dict[str, Any] | None = None
    """The reference (and simulation) was streamed one layer at a time (`lfm_export.parity.streaming.
    StreamingReference.describe`): what it covers; None for the in-memory reference."""

    def exact_row(self, name: str) -> ExactRow | None:
        """The exact row `name` (one of `EXACT_ROWS`), None where the run has none."""
        return next((row for row in self.exact_rows if row.name == name), None)

    def exact(self, name: str) -> dict[str, Any] | None:
        """The `parity.json` entry of the exact row `name`, None where the run has none."""
        row = self.exact_row(name)
        return None if row is None else row.to_json()

    def reference_json(self) -> dict[str, Any]:
        """How the reference was computed and which scenarios ran against it (skipped is not passed)."""
        form = self.streaming or {"form": "in-memory"}
        rows = [s for s in self.scenarios if s.name != POOLED]
        return {
            **form,
            "ran": [s.name for s in rows if s.status == "ok"],
            "skipped": {s.name: s.reason for s in rows if s.status == "skipped"},
            "errors": [s.name for s in rows if s.status == "error"],
        }

    @property
    def passed(self) -> bool:
        """All checks passed, and at least one was made (all scenarios skipped is not a pass)."""
        return bool(self.checks) and all(c.passed for c in self.checks)

    def part_passed(self, part: str) -> bool:
        mine = [c for c in self.checks if c.part == part]
        return bool(mine) and all(c.passed for c in mine)

    @property
    def exact_name(self) -> str:
        """What part (a) compares the artifact with."""
        return self.simulation_name or self.reference_name

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def scenario(self, name: str) -> ScenarioResult:
        return next(s for s in self.scenarios if s.name == name)

    def quality_row(self, name: str) -> ScenarioResult:
        return next(s for s in self.quality if s.name == name)

    def failed_scenarios(self, part: str | None = None) -> list[str]:
        return sorted({c.scenario for c in self.failures if part is None or c.part == part})

    def worst(
        self, metric: str, largest: bool = True, rows: list[ScenarioResult] | None = None
    ) -> float | None:
        """The worst value of `metric` over the scenarios (the pooled row excluded) of `rows` (default: the
        exactness rows)."""
        vals = [
            s.metrics[metric]
            for s in (self.scenarios if rows is None else rows)
            if s.status == "ok" and s.name != POOLED and s.metrics.get(metric) is not None
        ]
        if not vals:
            return None
        return max(vals) if largest else min(vals)

    def pooled(self, rows: list[ScenarioResult] | None = None) -> dict[str, Any]:
        """Metrics over every compared position of every scenario of `rows` (default: the quality rows, the
        artifact against the fp32 reference); empty if no scenario ran."""
        return next((s.metrics for s in (self.quality if rows is None else rows) if s.name == POOLED), {})

    def judged_apart(self) -> dict[str, Any] | None:
        """Positions judged apart (`Gate.router_margin`, `lfm_export.parity.expert_ties`): the margin, the
        count over the compared positions and each scenario's `[sequence, position]` pairs; None where the gate
        judges none apart or no margins were recorded (no MoE layer, no torch simulation)."""
        rows = {s.name: s.details["judged_apart"] for s in self.scenarios if "judged_apart" in s.details}
        if self.gate.router_margin is None or not rows:
            return None
        return {
            "margin": self.gate.router_margin,
            "count": sum(len(v) for v in rows.values()),
            "scenarios": rows,
        }

    def verdict(self) -> str:
        """Which part failed, in words: what a reader must do differs (fix the export / choose a recipe)."""
        if not self.checks:
            return "FAILED: no scenario could be compared"
        exact_ok, quality_ok = self.part_passed(EXACTNESS), self.part_passed(QUALITY)
        q = self.quality_gate.name if self.quality_gate else "quality"
        parts = [
            "exactness passed" if exact_ok else "exactness FAILED: the artifact does not compute its recipe",
            f"quality passed ({q})" if quality_ok else f"quality FAILED: the recipe is too lossy for {q}",
        ]
        return ("PASSED: " if self.passed else "FAILED: ") + "; ".join(parts)

    def verdict_line(self) -> str:
        """One line for a terminal or a CI log: verdict, recipe, the headline numbers, what failed."""
        quality = self.pooled()
        nums = (
            f"vs {self.exact_name}: logit max rel {_num(self.worst('logit_max_rel'))}, "
            f"KL max {_num(self.worst('kl_max'))}; vs {self.reference_name}: KL mean "
            f"{_num(quality.get('kl_mean'))} (p99 {_num(quality.get('kl_p99'))}), top-1 decisive "
            f"{_decisive(quality)}"
        )
        fails = "; ".join(c.describe() for c in self.failures[:3])
        streamed = ", streaming reference" if self.streaming else ""
        head = f"parity {self.verdict()} ({self.recipe}, {self.test_name}{streamed})"
        return f"{head}: {nums}" + (f"; failed: {fails}" if fails else "")

    def summary(self) -> dict[str, Any]:
        """The compact form kept in an artifact's manifest (the full report sits beside it)."""
        return {
            "passed": self.passed,
            "recipe": self.recipe,
            "verdict": self.verdict(),
            "gate": self.gate.name,
            "scenarios": {s.name: s.status for s in self.scenarios},
            EXACTNESS: {
                "passed": self.part_passed(EXACTNESS),
                "against": self.exact_name,
                "gate": self.gate.name,
                "worst": {k: _json_num(self.worst(k, largest=k != "top1_decisive")) for k in EXACT_SUMMARY},
                "pooled": {
                    k: _json_num(v) for k, v in self.pooled(self.scenarios).items() if k in EXACT_SUMMARY
                },
                "stored_weights": None
                if self.stored_weights is None
                else {k: self.stored_weights[k] for k in ("passed", "artifact_rows", "rows_unmatched")},
                **{n: None if (row := self.exact_row(n)) is None else row.summary() for n in EXACT_ROWS},
                "judged_apart": None if (apart := self.judged_apart()) is None else apart["count"],
            },
            QUALITY: {
                "passed": self.part_passed(QUALITY),
                "against": self.reference_name,
                "gate": self.quality_gate.name if self.quality_gate else None,
                "pooled": {k: _json_num(v) for k, v in self.pooled().items() if k in POOLED_SUMMARY},
                "simulation_pooled": {
                    k: _json_num(v) for k, v in self.pooled(self.recipe_loss).items() if k in POOLED_SUMMARY
                },
            },
            "failures": [f"{c.part}: {c.describe()}" for c in self.failures],
            "reference": self.reference_json(),
        }

    def to_json(self) -> dict[str, Any]:
        return to_json(self)


def exit_code(result: ParityResult) -> int:
    """CLI convention: 0 when parity passed, 1 when it failed (2 is reserved for user errors)."""
    return EXIT_PASS if result.passed else EXIT_FAIL


# ---- JSON ---------------------------------------------------------------------------------------------
def _json_num(v: Any) -> Any:
    """Non-finite floats become null (JSON has no NaN); the check's `passed` still tells the story."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _limits_json(gate: Gate | None) -> list[dict[str, Any]]:
    if gate is None:
        return []
    return [
        {
            "metric": lim.metric,
            "op": lim.op,
            "limit": lim.value,
            "scenarios": list(lim.scenarios) if lim.scenarios else None,
        }
        for lim in gate.limits
    ]


def _rows_json(rows: list[ScenarioResult]) -> list[dict[str, Any]]:
    return [
        {
            "name": s.name,
            "status": s.status,
            "reason": s.reason,
            "metrics": {k: _json_num(v) for k, v in s.metrics.items()},
            "details": s.details,
        }
        for s in rows
    ]


def to_json(result: ParityResult) -> dict[str, Any]:
    """`scenarios` / `thresholds` / `checks` keep their schema-1 meaning (the exactness rows and gate, every
    check); `quality` and `recipe_loss` add part (b)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "passed": result.passed,
        "verdict": result.verdict(),
        "recipe": result.recipe,
        "gate": result.gate.name,
        "test": result.test_name,
        "reference": result.reference_name,
        "simulation": result.simulation_name,
        "thresholds": _limits_json(result.gate),
        "scenarios": _rows_json(result.scenarios),
        EXACTNESS: {
            "passed": result.part_passed(EXACTNESS),
            "against": result.exact_name,
            "detection_limit": result.gate.detection or None,
            "activation_rounding": (
                None
                if result.activation_rounding is None
                else {k: _json_num(v) for k, v in result.activation_rounding.items()}
            ),
            "stored_weights": result.stored_weights,
            **{n: result.exact(n) for n in EXACT_ROWS},
            "judged_apart": result.judged_apart(),
        },
        QUALITY: {
            "passed": result.part_passed(QUALITY),
            "against": result.reference_name,
            "gate": result.quality_gate.name if result.quality_gate else None,
            "thresholds": _limits_json(result.quality_gate),
            "scenarios": _rows_json(result.quality),
            "simulation": _rows_json(result.recipe_loss),
        },
        "checks": [
            {
                "part": c.part,
                "scenario": c.scenario,
                "metric": c.metric,
                "value": _json_num(c.value),
                "op": c.op,
                "limit": c.limit,
                "passed": c.passed,
                **({"note": c.note} if c.note else {}),
            }
            for c in result.checks
        ],
        "prompt_lengths": result.prompt_lengths,
        "metadata": result.metadata,
        "reference_form": result.reference_json(),
    }


# ---- markdown ------------------------------------------------------------------------------------------
def detection_line(gate: Gate) -> str:
    """What the applied gate is measured to catch (docs/parity.md, Detection limits)."""
    if gate.detection:
        return f"Measured detection limit of the `{gate.name}` gate: {gate.detection}."
    return f"The `{gate.name}` gate's detection limit is not measured (docs/parity.md, Detection limits)."


def _num(v: float | None, fmt: str = ".3g") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if fmt == "d":
        return str(int(v))
    return format(v, fmt)


def _decisive(metrics: dict[str, Any]) -> str:
    if metrics.get("top1_decisive") is None and metrics.get("decisive") == 0:
        return "n/a (no decisive positions)"
    return _num(metrics.get("top1_decisive"), ".4f")


def _cell(s: ScenarioResult, metric: str, fmt: str, failed: set[tuple[str, str]]) -> str:
    if metric not in s.metrics:
        return ""
    if fmt == "greedy":
        text = f"{int(s.metrics[metric])}/{int(s.metrics.get('greedy_steps', 0))}"
    elif metric == "top1_decisive":
        text = _decisive(s.metrics)
    else:
        text = _num(s.metrics[metric], fmt)
    return f"**{text}** ✗" if (s.name, metric) in failed else text


def _table(rows: list[ScenarioResult], checks: list[Check], label: str = "") -> list[str]:
    failed = {(c.scenario, c.metric) for c in checks if not c.passed}
    failed_scen = {c.scenario for c in checks if not c.passed}
    lines = ["| scenario | status | " + " | ".join(title for _, title, _ in COLUMNS) + " |"]
    lines.append("|---|---|" + "---|" * len(COLUMNS))
    for s in rows:
        status = "ERROR" if s.status == "error" else "FAIL" if s.name in failed_scen else s.status
        cells = [_cell(s, m, fmt, failed) for m, _, fmt in COLUMNS]
        lines.append(f"| {label}{s.name} | {status} | " + " | ".join(cells) + " |")
    return lines


def _thresholds(gate: Gate | None) -> list[str]:
    if gate is None:
        return []
    lines = [f"Thresholds (`{gate.name}`):", ""]
    if gate.note:
        lines += [f"_{gate.note}_", ""]
    return lines + [f"- `{lim.describe()}`" for lim in gate.limits]


def _snapshot_note(result: ParityResult) -> list[str]:
    row = next((s for s in result.scenarios if s.name == "snapshots" and s.status == "ok"), None)
    if row is None:
        return []
    values = ", ".join(f"{k} {_num(v)}" for k, v in row.metrics.items())
    return [
        f"`snapshots`: the artifact's own session, restored from a snapshot, continues as it did ({values}; "
        "max |a - b| / max |b|, the same calls on the same state). A restore that keeps a later conv state or "
        "KV fails here.",
        "",
    ]


def _rounding_note(result: ParityResult) -> list[str]:
    if result.activation_rounding is None:
        return []
    effect = ", ".join(f"{k} {_num(v)}" for k, v in result.activation_rounding.items())
    mode = str(result.metadata.get("simulation", {}).get("activations", ""))
    if mode == "native":
        return [
            "The runtime computes in half precision, rounding its own ops its own way (approximated "
            "element-wise functions, other summation orders): limits that allow for it widen to a multiple of "
            f"what computing in that type does to the model ({effect}; the simulation against the fp32 "
            "reference, worst over the run). The limit column of `parity.json`'s checks holds the bound applied.",
            "",
        ]
    what = "computes in fp16" if "fp16" in mode else "rounds activations to int8"
    return [
        f"The runtime {what}: which values a float-rounding difference flips cannot be simulated, so limits "
        f"that allow for it widen to a multiple of what that rounding itself does ({effect}; the simulation with "
        "against without activation rounding, worst over the run). The limit column of `parity.json`'s checks "
        "holds the bound applied.",
        "",
    ]


def _apart_lines(result: ParityResult) -> list[str]:
    apart = result.judged_apart()
    if apart is None:
        return []
    where = "; ".join(
        f"{name}: " + (", ".join(f"sequence {q} position {p}" for q, p in pairs) if pairs else "none")
        for name, pairs in apart["scenarios"].items()
    )
    return [f"{apart_note(apart['count'], apart['margin'])} ({where}).", ""]


def _stored_weights_note(result: ParityResult) -> list[str]:
    sw = result.stored_weights
    if sw is None:
        return []
    verdict = "ok" if sw["passed"] else "**FAIL**"
    head = (
        f"Stored weights {verdict}: {sw['artifact_rows']} rows of {sw['artifact_tensors']} quantized artifact "
        f"tensors, dequantized in numpy, against {sw['simulation_rows']} rows of the simulation's "
        f"{sw['simulation_tensors']} quantized weights, bit for bit"
    )
    if sw["unmatched"]:
        bad = ", ".join(
            f"`{n}`"
            + (f" (nearest simulated weight `{u['nearest']}`)" if "nearest" in u else "")
            + f" ({u['rows']}/{u['of']} rows)"
            for n, u in sw["unmatched"].items()
        )
        head += f"; {sw['rows_unmatched']} rows found nowhere in the simulation: {bad}"
    return [f"{head}. Detects {sw['detection_limit']}.", ""]


def _exact_notes(result: ParityResult) -> list[str]:
    return [line for row in result.exact_rows for line in (row.note(), "")]


def _greedy_note(result: ParityResult) -> str:
    """Greedy match against the fp32 reference, said so it cannot be misread as a failure."""
    decode = next((s for s in result.quality if s.name == "decode" and "greedy_match" in s.metrics), None)
    if decode is None:
        return ""
    k, n = int(decode.metrics["greedy_match"]), int(decode.metrics["greedy_steps"])
    if k == n:
        return f"Greedy decoding matches the fp32 reference on all {n} decode positions."
    return (
        f"Greedy decoding first diverges from the fp32 reference at decode position {k} of {n} (greedy match "
        f"{k}/{n}); expected for lossy recipes: one flipped argmax is enough, and the KL and top-1 columns "
        "measure how far the distributions moved. Exactness checks the argmax against the simulation."
    )


def _streaming_note(result: ParityResult) -> list[str]:
    if result.streaming is None:
        return []
    ref = result.reference_json()
    skipped = "; ".join(f"`{k}` ({v})" for k, v in ref["skipped"].items()) or "none"
    return [
        f"Streaming reference (the fp32 copies do not fit in memory, or `--stream-reference`): the reference "
        f"and the simulation are computed {ref['coverage']}. Scenarios run: {', '.join(f'`{n}`' for n in ref['ran']) or 'none'}; "
        f"skipped (not passed): {skipped}.",
        "",
    ]


def to_markdown(result: ParityResult) -> str:
    n_ok = sum(c.passed for c in result.checks)
    verdict = "**PASS**" if result.passed else "**FAIL**"
    exact_checks = [c for c in result.checks if c.part == EXACTNESS]
    quality_checks = [c for c in result.checks if c.part == QUALITY]
    lines = [
        f"{verdict} parity of `{result.test_name}`, recipe `{result.recipe}`: {result.verdict()} "
        f"({n_ok}/{len(result.checks)} checks passed).",
        "",
        *_streaming_note(result),
        f"## (a) Exactness: `{result.test_name}` against `{result.exact_name}`"
        + (
            " (the recipe simulated in torch)"
            if result.simulation_name
            else " (fp32: the recipe is the reference's own math)"
        ),
        "",
        "A failure here means the artifact does not compute its recipe (an export or runtime bug), whatever "
        "the recipe's loss. " + detection_line(result.gate),
        "",
        *_table(result.scenarios, exact_checks),
        "",
        *_snapshot_note(result),
        *_apart_lines(result),
        *_rounding_note(result),
        *_stored_weights_note(result),
        *_exact_notes(result),
        *_thresholds(result.gate),
        "",
        f"## (b) Quality: `{result.test_name}` against `{result.reference_name}` (fp32)",
        "",
        "What the recipe costs. Gated by "
        + (f"`{result.quality_gate.name}`" if result.quality_gate else "nothing")
        + "; pass `--max-kl` or `--gates FILE` for a strict limit.",
        "",
        *_table(result.quality, quality_checks),
    ]
    if result.recipe_loss:
        pooled = next((s for s in result.recipe_loss if s.name == POOLED), None)
        if pooled is not None:
            lines.append(
                _table([pooled], [], label=f"{result.simulation_name} vs {result.reference_name}: ")[-1]
            )
    note = _greedy_note(result)
    lines += ["", *([note, ""] if note else []), *_thresholds(result.quality_gate)]
    if result.failures:
        lines += ["", "### Failed checks", ""]
        lines += [f"- {c.part}: {c.describe()}" for c in result.failures]
    skipped = [s for s in result.scenarios if s.status == "skipped"]
    if skipped:
        lines += ["", "### Skipped scenarios", ""]
        lines += [f"- {s.name}: {s.reason}" for s in skipped]
    lines += [
        "",
        "Metrics: logits compared per position in float64; KL is KL(first || second) of the softmax; max rel is "
        "the logit max abs error over the first session's largest logit magnitude; state max rel is the worst "
        f"state tensor's max abs error over its largest magnitude; `{POOLED}` holds every compared position of "
        "every scenario; top-1 is the share of positions with the same argmax; top-1 decisive counts only "
        "positions where the first session's top-1 beats its top-2 by at least 0.1 in probability; greedy match "
        "is the number of leading decode steps with the same argmax (every session is fed the same tokens: the "
        f"greedy choices of `{result.test_name if result.streaming else result.exact_name}`).",
    ]
    if result.metadata or result.prompt_lengths:
        lines += ["", "### Run", ""]
        if result.prompt_lengths:
            lines.append(f"- prompts: {len(result.prompt_lengths)} (lengths {result.prompt_lengths})")
        for k, v in result.metadata.items():
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            lines.append(f"- {k}: {text}")
    return "\n".join(lines) + "\n"


def write_reports(result: ParityResult, folder: str | Path) -> tuple[Path, Path]:
    """Write `parity.md` and `parity.json` into `folder` (created if needed); return their paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "parity.md", out / "parity.json"
    md.write_text(to_markdown(result))
    js.write_text(json.dumps(to_json(result), indent=2, default=str, allow_nan=False) + "\n")
    return md, js
