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
    # Quantized gates were calibrated on the bundled trained `tiny` model (worst scenario per metric, 2026-11-23):
    #   int4: lfm-export KL mean 0.050 / p99 0.507 / top-1 decisive 0.979; onnxruntime-genai's builder int4
    #         (same accuracy level) 0.104 / 0.925 / 0.865 -> the int4 gate is stricter than the builder reaches.
    #   int8: lfm-export 1.3e-3 / 9.9e-3 / 1.0.   fp16: lfm-export 2.7e-6 / 2.0e-5 / 1.0.
    # Limits leave about 20% (int4) to 2x (int8, fp16) headroom over our own export. Top-1 is counted on
    # decisive positions only (reference top-1 beats top-2 by >= 0.1 probability); see metrics.top1_decisive.
    "fp16": Gate(
        "fp16",
        UNIVERSAL + (Limit("kl_mean", LE, 1e-4), Limit("kl_p99", LE, 1e-3), Limit("top1_decisive", GE, 0.99)),
        "calibrated on the bundled tiny model (worst scenario: KL mean 2.7e-6, p99 2.0e-5)",
    ),
    "int8": Gate(
        "int8",
        UNIVERSAL
        + (Limit("kl_mean", LE, 2.5e-3), Limit("kl_p99", LE, 2e-2), Limit("top1_decisive", GE, 0.98)),
        "calibrated on the bundled tiny model (worst scenario: KL mean 1.3e-3, p99 9.9e-3)",
    ),
    "int4": Gate(
        "int4",
        UNIVERSAL + (Limit("kl_mean", LE, 6e-2), Limit("kl_p99", LE, 0.6), Limit("top1_decisive", GE, 0.95)),
        "calibrated on the bundled tiny model; stricter than onnxruntime-genai's builder int4 reaches there",
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
