"""Parity gates: for each quantization recipe, which metrics are checked and against which limits.

One table (`GATES`) so the README can list it (`gates_markdown()`). A backend's recipe name maps to a gate by
prefix: `int4-b32` -> `int4`, `fp16-gqa` -> `fp16`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from lfm_export.errors import UnsupportedError, UserError

LE = "<="
GE = ">="
POOLED = "pooled"
"""The pseudo-scenario holding every compared position of every scenario: where the statistical limits of the
quantized gates apply, since a single short scenario gives noisy tails and top-1 shares."""


@dataclass(frozen=True)
class Limit:
    """`metric op value`, checked on every scenario that reports the metric (or only on `scenarios`).

    `POOLED` is checked only by limits that name it."""

    metric: str
    op: str
    value: float
    scenarios: tuple[str, ...] | None = None

    def applies_to(self, scenario: str) -> bool:
        if self.scenarios is None:
            return scenario != POOLED
        return scenario in self.scenarios

    def holds(self, value: float | None) -> bool:
        """False for a missing or non-finite value: NaN logits never pass."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        return value <= self.value if self.op == LE else value >= self.value

    def describe(self) -> str:
        where = f" ({', '.join(self.scenarios)})" if self.scenarios else " (every scenario)"
        return f"{self.metric} {self.op} {self.value:g}{where}"


@dataclass(frozen=True)
class Gate:
    name: str
    limits: tuple[Limit, ...]
    note: str = ""


# Checked by every gate: finite logits, and the session counts positions like the reference.
UNIVERSAL = (Limit("finite", GE, 1.0), Limit("position_match", GE, 1.0))


def _exact_gate(
    name: str, *, logit_max_rel: float, kl_max: float, top1_decisive: float, state_max_rel: float, note: str
) -> Gate:
    return Gate(
        name,
        UNIVERSAL
        + (
            Limit("logit_max_rel", LE, logit_max_rel),
            Limit("kl_max", LE, kl_max),
            Limit("state_max_rel", LE, state_max_rel),
            Limit("top1_decisive", GE, top1_decisive, (POOLED,)),
        ),
        note,
    )


GATES: dict[str, Gate] = {
    # Part (a), exactness: the artifact against its recipe simulated in torch (`lfm_export.quant.simulate`).
    "fp32": Gate(
        "fp32",
        UNIVERSAL
        + (
            Limit("logit_max_abs", LE, 1e-4),
            Limit("top1_agreement", GE, 1.0),
            Limit("state_max_abs", LE, 1e-3),
        ),
        "same math as the reference; only op-ordering rounding allowed",
    ),
    "fp16": _exact_gate(
        "fp16",
        logit_max_rel=3e-2,
        kl_max=1e-2,
        top1_decisive=0.99,
        state_max_rel=3e-2,
        note="CALIBRATION PENDING",
    ),
    "int8": _exact_gate(
        "int8",
        logit_max_rel=3e-2,
        kl_max=1e-2,
        top1_decisive=0.99,
        state_max_rel=3e-2,
        note="CALIBRATION PENDING",
    ),
    "int4": _exact_gate(
        "int4",
        logit_max_rel=3e-2,
        kl_max=1e-2,
        top1_decisive=0.99,
        state_max_rel=3e-2,
        note="CALIBRATION PENDING",
    ),
}

SANITY_KL_MEAN: dict[str, float] = {"fp32": 1e-3, "fp16": 1e-2, "int8": 0.2, "int4": 1.0}
"""Part (b) by default: pooled KL(fp32 reference || artifact) mean at most this. CALIBRATION PENDING."""


def gate_for(recipe: str) -> Gate:
    """The exactness gate for `recipe`, matched exactly or by the longest gate name it starts with."""
    return GATES[_family(recipe)]


def _family(recipe: str) -> str:
    key = recipe.strip().lower()
    if key in GATES:
        return key
    matches = [name for name in GATES if key.startswith(name)]
    if not matches:
        raise UnsupportedError(
            f"no parity gate for recipe {recipe!r}; known recipe prefixes: {', '.join(GATES)}"
        )
    return max(matches, key=len)


def sanity_gate(recipe: str) -> Gate:
    """The default quality gate: the loose sanity bound of the recipe's family."""
    family = _family(recipe)
    return Gate(
        f"{family} sanity bound",
        (Limit("kl_mean", LE, SANITY_KL_MEAN[family], (POOLED,)),),
        "loose by design: catches a recipe gone badly wrong, not a lossy one",
    )


QUALITY_METRICS: dict[str, str] = {
    "kl_mean": LE,
    "kl_p99": LE,
    "kl_max": LE,
    "top1_agreement": GE,
    "top1_decisive": GE,
    "cosine_mean": GE,
}
"""Metrics a gates file may limit (on the pooled positions, artifact against the fp32 reference)."""


def quality_gate(recipe: str, max_kl: float | None = None, gates_file: Path | None = None) -> Gate:
    """The quality gate for `recipe`: the sanity bound, replaced by `max_kl` (pooled KL mean of the artifact
    against fp32) and / or the recipe's entry in `gates_file` when given. Raises `UserError` on a bad value or
    file, so callers can validate before any export work.

    Gates file (JSON): `{"gates": {"int4-b32": {"kl_mean": 0.06, "top1_decisive": 0.93}, "int8": {...}}}`;
    a recipe takes the entry named exactly as it, else the longest entry name it starts with."""
    limits: list[Limit] = []
    names: list[str] = []
    if max_kl is not None:
        if (
            isinstance(max_kl, bool)
            or not isinstance(max_kl, int | float)
            or not math.isfinite(max_kl)
            or max_kl <= 0
        ):
            raise UserError(f"--max-kl must be a positive number, got {max_kl!r}")
        limits.append(Limit("kl_mean", LE, float(max_kl), (POOLED,)))
        names.append(f"--max-kl {max_kl:g}")
    if gates_file is not None:
        entry, key = _gates_file_entry(Path(gates_file), recipe)
        limits += [Limit(m, QUALITY_METRICS[m], v, (POOLED,)) for m, v in entry.items()]
        names.append(f"{Path(gates_file).name}[{key}]")
    if not limits:
        return sanity_gate(recipe)
    return Gate(" and ".join(names), UNIVERSAL[:1] + tuple(limits), "asked for by the user")


def _gates_file_entry(path: Path, recipe: str) -> tuple[dict[str, float], str]:
    def bad(why: str) -> UserError:
        return UserError(f"{path}: {why}")

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise bad("gates file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"not a JSON gates file ({e})") from None
    gates = data.get("gates") if isinstance(data, dict) else None
    if not isinstance(gates, dict) or not gates:
        raise bad('expected {"gates": {"<recipe>": {"<metric>": <limit>, ...}, ...}}')
    for name, entry in gates.items():
        if not isinstance(entry, dict) or not entry:
            raise bad(f"gates[{name!r}] must be an object of metric limits")
        for metric, value in entry.items():
            if metric not in QUALITY_METRICS:
                raise bad(
                    f"gates[{name!r}]: unknown metric {metric!r}; expected {', '.join(QUALITY_METRICS)}"
                )
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise bad(f"gates[{name!r}][{metric!r}] must be a number, got {value!r}")
    key = recipe.strip().lower()
    matches = [n for n in gates if key == n.lower() or key.startswith(n.lower())]
    if not matches:
        raise bad(f"no gate for recipe {recipe!r} (entries: {', '.join(gates)})")
    chosen = max(matches, key=len)
    return {m: float(v) for m, v in gates[chosen].items()}, chosen


def gates_markdown() -> str:
    """The gate table as markdown (for the README): exactness limits per recipe family, and the default
    quality bound."""
    lines = [
        "| recipe | exactness: artifact vs simulated recipe | quality by default: artifact vs fp32 | note |",
        "|---|---|---|---|",
    ]
    for gate in GATES.values():
        checks = "; ".join(f"`{lim.describe()}`" for lim in gate.limits)
        sanity = "; ".join(f"`{lim.describe()}`" for lim in sanity_gate(gate.name).limits)
        lines.append(f"| {gate.name} | {checks} | {sanity} | {gate.note} |")
    return "\n".join(lines)
