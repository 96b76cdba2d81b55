"""Parity gates: for each quantization recipe, which metrics are checked and against which limits.

One table (`GATES`) so the README can list it (`gates_markdown()`). A backend's recipe name maps to a gate by
prefix: `int4-b32` -> `int4`, `fp16-gqa` -> `fp16`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lfm_export.errors import UnsupportedError

LE = "<="
GE = ">="


@dataclass(frozen=True)
class Limit:
    """`metric op value`, checked on every scenario that reports the metric (or only on `scenarios`)."""

    metric: str
    op: str
    value: float
    scenarios: tuple[str, ...] | None = None

    def applies_to(self, scenario: str) -> bool:
        return self.scenarios is None or scenario in self.scenarios

    def holds(self, value: float | None) -> bool:
        """False for a missing or non-finite value: NaN logits never pass."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        return value <= self.value if self.op == LE else value >= self.value

    def describe(self) -> str:
        where = f" ({', '.join(self.scenarios)})" if self.scenarios else ""
        return f"{self.metric} {self.op} {self.value:g}{where}"


@dataclass(frozen=True)
class Gate:
    name: str
    limits: tuple[Limit, ...]
    note: str = ""


# Checked by every gate: finite logits, and the session counts positions like the reference.
UNIVERSAL = (Limit("finite", GE, 1.0), Limit("position_match", GE, 1.0))

GATES: dict[str, Gate] = {
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
    # The limits below are placeholders, calibrated on the bundled tiny model, see README.
    "fp16": Gate(
        "fp16",
        UNIVERSAL
        + (
            Limit("kl_mean", LE, 1e-3),
            Limit("kl_p99", LE, 1e-2),
            Limit("top1_agreement", GE, 0.98),
        ),
        "placeholder, calibrated on the bundled tiny model, see README",
    ),
    "int8": Gate(
        "int8",
        UNIVERSAL
        + (
            Limit("kl_mean", LE, 5e-3),
            Limit("kl_p99", LE, 5e-2),
            Limit("top1_agreement", GE, 0.95),
        ),
        "placeholder, calibrated on the bundled tiny model, see README",
    ),
    "int4": Gate(
        "int4",
        UNIVERSAL
        + (
            Limit("kl_mean", LE, 5e-2),
            Limit("kl_p99", LE, 0.5),
            Limit("top1_agreement", GE, 0.85),
        ),
        "placeholder, calibrated on the bundled tiny model, see README",
    ),
}


def gate_for(recipe: str) -> Gate:
    """The gate for `recipe`, matched exactly or by the longest gate name it starts with."""
    key = recipe.strip().lower()
    if key in GATES:
        return GATES[key]
    matches = [name for name in GATES if key.startswith(name)]
    if not matches:
        raise UnsupportedError(
            f"no parity gate for recipe {recipe!r}; known recipe prefixes: {', '.join(GATES)}"
        )
    return GATES[max(matches, key=len)]


def gates_markdown() -> str:
    """The gate table as markdown (for the README)."""
    lines = ["| recipe | checks | note |", "|---|---|---|"]
    for gate in GATES.values():
        checks = "; ".join(f"`{lim.describe()}`" for lim in gate.limits)
        lines.append(f"| {gate.name} | {checks} | {gate.note} |")
    return "\n".join(lines)
