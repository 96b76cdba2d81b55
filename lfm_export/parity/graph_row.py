"""The graph row: the artifact's own graph, run as written on a reference runtime, against the simulation.

Where the artifact's runtime computes in a way no simulation follows exactly (QNN's HTP: integer codes with its
own requantization, tens to hundreds of 16-bit steps off the fake-quantized program in every state), the
scenario rows can only hold it to statistical limits, under which a matrix a few percent off passes. The graph
the artifact ships is deterministic, though: a backend that can run it as written on a reference runtime and
compare it with the simulation op by op names the check in `Backend.exact_row` (QNN:
`lfm_export.backends.onnx_qnn.graph_check`). This module holds the row it returns (an `ExactRow`); the
metrics, their limits and what they were measured at are the backend's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lfm_export.parity.report import Check, ExactRow, _num

SCENARIO = "graph_prefill"
"""The report row of this check."""


@dataclass
class GraphRow(ExactRow):
    """`values[m] <= limits[m]` for each metric over `positions` positions of the graph on `runtime` against the
    simulation; `where`: where the largest difference sits; `counts`: what else the backend counted. The first
    metric of `limits` is the headline one (`metric`, `worst`, `limit`)."""

    name: ClassVar[str] = SCENARIO
    summary_keys: ClassVar[tuple[str, ...]] = ("passed", "positions", "values")
    runtime: str
    limits: dict[str, float]
    values: dict[str, float] = field(default_factory=dict)
    positions: int = 0
    where: str = ""
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def metric(self) -> str:
        return next(iter(self.limits))

    @property
    def runs(self) -> str:
        return f"the artifact's graph run as written on {self.runtime} against the simulation"

    @property
    def worst(self) -> float | None:
        return self.values.get(self.metric)

    @property
    def limit(self) -> float:
        return self.limits[self.metric]

    @property
    def passed(self) -> bool:
        return self.positions > 0 and all(self._ok(m) for m in self.limits)

    @property
    def first_failure(self) -> str | None:
        if self.passed:
            return None
        return self.where or ("no position compared" if self.positions == 0 else "no difference located")

    def _ok(self, metric: str) -> bool:
        value = self.values.get(metric)
        return value is not None and value <= self.limits[metric]

    def describe(self) -> str:
        values = ", ".join(
            f"{m} {self.values.get(m, float('nan')):.3g} (limit {v:g})" for m, v in self.limits.items()
        )
        where = f"; largest at {self.where}" if self.where else ""
        counts = "".join(f", {k.replace('_', ' ')} {v}" for k, v in self.counts.items())
        return f"{self.positions} positions of the graph on {self.runtime}: {values}{where}{counts}"

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "runtime": self.runtime,
            "positions": self.positions,
            "values": {m: v if math.isfinite(v) else None for m, v in self.values.items()},  # JSON has no inf
            "limits": dict(self.limits),
            "where": self.where,
            **self.counts,
        }

    def note(self) -> str:
        shown = self.to_json()["values"]  # as parity.json holds them: a non-finite value is n/a
        values = ", ".join(f"{m} {_num(shown.get(m))} (limit {_num(v)})" for m, v in self.limits.items())
        where = f"; largest at {self.where}" if self.where else ""
        return (
            f"Graph prefill {self.verdict}: {self.runs}, one token at a time over {self.positions} positions: "
            f"{values}{where}."
        )

    def checks(self) -> list[Check]:
        """One check per metric (all with the row's note); none compared is one failing `error` check."""
        if self.positions == 0:
            return [Check(SCENARIO, "error", None, "", None, False, note="no position compared")]
        note = self.describe()
        return [
            Check(SCENARIO, m, self.values.get(m), "<=", limit, self._ok(m), note=note)
            for m, limit in self.limits.items()
        ]
