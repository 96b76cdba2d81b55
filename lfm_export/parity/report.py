"""Parity results and their reports: `parity.md` for people, `parity.json` for machines (CI, the CLI)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lfm_export.parity.thresholds import POOLED, Gate

SCHEMA_VERSION = 1
EXIT_PASS = 0
EXIT_FAIL = 1

POOLED_SUMMARY = ("positions", "kl_mean", "kl_p99", "top1_agreement", "top1_decisive")

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

    def describe(self) -> str:
        if self.metric == "error":
            return f"{self.scenario}: error ({self.note})"
        verdict = "ok" if self.passed else "FAIL"
        return f"{self.scenario}: {self.metric} = {_num(self.value)} (limit {self.op} {_num(self.limit)}) {verdict}"


@dataclass
class ScenarioResult:
    name: str
    status: str
    """`ok`, `skipped` or `error`."""
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParityResult:
    recipe: str
    gate: Gate
    test_name: str
    reference_name: str
    scenarios: list[ScenarioResult]
    checks: list[Check]
    metadata: dict[str, Any] = field(default_factory=dict)
    prompt_lengths: list[int] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """All checks passed, and at least one was made (all scenarios skipped is not a pass)."""
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def scenario(self, name: str) -> ScenarioResult:
        return next(s for s in self.scenarios if s.name == name)

    def failed_scenarios(self) -> list[str]:
        return sorted({c.scenario for c in self.failures})

    def worst(self, metric: str, largest: bool = True) -> float | None:
        """The worst value of `metric` over the scenarios (the pooled row excluded)."""
        vals = [
            s.metrics[metric]
            for s in self.scenarios
            if s.status == "ok" and s.name != POOLED and s.metrics.get(metric) is not None
        ]
        if not vals:
            return None
        return max(vals) if largest else min(vals)

    def verdict_line(self) -> str:
        """One line for a terminal or a CI log: verdict, recipe, the headline numbers, what failed."""
        head = f"parity {'PASSED' if self.passed else 'FAILED'} ({self.recipe} gate, {self.test_name} vs {self.reference_name})"
        pooled = self.pooled()
        nums = (
            f"logit max abs {_num(self.worst('logit_max_abs'))}, KL mean {_num(pooled.get('kl_mean'))} "
            f"(worst scenario {_num(self.worst('kl_mean'))}), top-1 {_num(pooled.get('top1_agreement'), '.4f')}"
        )
        fails = "; ".join(c.describe() for c in self.failures[:3])
        return f"{head}: {nums}" + (f"; failed: {fails}" if fails else "")

    def summary(self) -> dict[str, Any]:
        """The compact form kept in an artifact's manifest (the full report sits beside it): the worst value
        of each headline metric over the scenarios, and the pooled values the quantized gates check."""
        return {
            "passed": self.passed,
            "recipe": self.recipe,
            "gate": self.gate.name,
            "scenarios": {s.name: s.status for s in self.scenarios},
            "logit_max_abs": _json_num(self.worst("logit_max_abs")),
            "kl_mean": _json_num(self.worst("kl_mean")),
            "kl_p99": _json_num(self.worst("kl_p99")),
            "top1_agreement": _json_num(self.worst("top1_agreement", largest=False)),
            "top1_decisive": _json_num(self.worst("top1_decisive", largest=False)),
            "pooled": {k: _json_num(v) for k, v in self.pooled().items() if k in POOLED_SUMMARY},
            "failures": [c.describe() for c in self.failures],
        }

    def pooled(self) -> dict[str, float]:
        """Metrics over every compared position of every scenario (empty if no scenario ran)."""
        return next((s.metrics for s in self.scenarios if s.name == POOLED), {})

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


def to_json(result: ParityResult) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "passed": result.passed,
        "recipe": result.recipe,
        "gate": result.gate.name,
        "test": result.test_name,
        "reference": result.reference_name,
        "thresholds": [
            {
                "metric": lim.metric,
                "op": lim.op,
                "limit": lim.value,
                "scenarios": list(lim.scenarios) if lim.scenarios else None,
            }
            for lim in result.gate.limits
        ],
        "scenarios": [
            {
                "name": s.name,
                "status": s.status,
                "reason": s.reason,
                "metrics": {k: _json_num(v) for k, v in s.metrics.items()},
                "details": s.details,
            }
            for s in result.scenarios
        ],
        "checks": [
            {
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
    }


# ---- markdown ------------------------------------------------------------------------------------------
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


def _cell(s: ScenarioResult, metric: str, fmt: str, failed: set[tuple[str, str]]) -> str:
    if metric not in s.metrics:
        return ""
    if fmt == "greedy":
        text = f"{int(s.metrics[metric])}/{int(s.metrics.get('greedy_steps', 0))}"
    else:
        text = _num(s.metrics[metric], fmt)
    return f"**{text}** ✗" if (s.name, metric) in failed else text


def to_markdown(result: ParityResult) -> str:
    n_ok = sum(c.passed for c in result.checks)
    verdict = "**PASS**" if result.passed else "**FAIL**"
    lines = [
        f"{verdict} parity of `{result.test_name}` against `{result.reference_name}`, recipe `{result.recipe}` "
        f"(gate `{result.gate.name}`): {n_ok}/{len(result.checks)} checks passed.",
        "",
    ]
    failed = {(c.scenario, c.metric) for c in result.failures}
    failed_scen = set(result.failed_scenarios())
    lines.append("| scenario | status | " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    lines.append("|---|---|" + "---|" * len(COLUMNS))
    for s in result.scenarios:
        status = "ERROR" if s.status == "error" else "FAIL" if s.name in failed_scen else s.status
        cells = [_cell(s, m, fmt, failed) for m, _, fmt in COLUMNS]
        lines.append(f"| {s.name} | {status} | " + " | ".join(cells) + " |")
    if result.failures:
        lines += ["", "### Failed checks", ""]
        lines += [f"- {c.describe()}" for c in result.failures]
    skipped = [s for s in result.scenarios if s.status == "skipped"]
    if skipped:
        lines += ["", "### Skipped scenarios", ""]
        lines += [f"- {s.name}: {s.reason}" for s in skipped]
    lines += ["", f"### Thresholds (gate `{result.gate.name}`)", ""]
    if result.gate.note:
        lines += [f"_{result.gate.note}_", ""]
    lines += [f"- `{lim.describe()}`" for lim in result.gate.limits]
    lines += [
        "",
        "Metrics: logits compared per position in float64; KL is KL(reference || test) of the softmax; "
        f"`{POOLED}` holds every compared position of every scenario; "
        "top-1 is the share of positions with the same argmax; top-1 decisive counts only positions where "
        "the reference's top-1 beats its top-2 by at least 0.1 in probability; greedy match is the number of leading decode "
        "steps with the same argmax (inputs are the reference's greedy tokens).",
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
