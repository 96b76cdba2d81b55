"""The graph row: the artifact's own graph, run as written on a reference runtime, against the simulation.

Where the artifact's runtime computes in a way no simulation follows exactly (QNN's HTP: integer codes with its
own requantization, tens of 16-bit steps off the fake-quantized program in every state), the scenario rows can
only hold it to statistical limits, under which a matrix a few percent off passes. The graph the artifact ships
is deterministic, though: a backend that can run it as written on a reference runtime and compare it with the
simulation op by op names the check in `Backend.graph_check` (QNN:
`lfm_export.backends.onnx_qnn.graph_check`). This module holds the row it returns and the row's check; the
metric, its limit and what it was measured at are the backend's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lfm_export.parity.report import Check

SCENARIO = "graph_prefill"
"""The report row of this check."""


@dataclass
class GraphRow:
    """`metric` over `positions` positions of the graph on `runtime` against the simulation, checked `<= limit`;
    `where`: where the largest value sits; `counts`: what else the backend counted (e.g. codes one step apart)."""

    runtime: str
    metric: str
    limit: float
    positions: int = 0
    value: float = 0.0
    where: str = ""
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.positions > 0 and self.value <= self.limit

    def describe(self) -> str:
        counts = "".join(f", {k.replace('_', ' ')} {v}" for k, v in self.counts.items())
        where = f" (largest at {self.where})" if self.where else ""
        return (
            f"{self.positions} positions of the graph on {self.runtime}: {self.metric} {self.value:g}{where}, "
            f"limit {self.limit:g}{counts}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "runtime": self.runtime,
            "positions": self.positions,
            "metric": self.metric,
            "value": self.value,
            "limit": self.limit,
            "where": self.where,
            **self.counts,
        }


def checks(row: GraphRow) -> list[Check]:
    """The report's exactness check (one row, `graph_prefill`)."""
    if row.positions == 0:
        return [Check(SCENARIO, "error", None, "", None, False, note="no position compared")]
    return [Check(SCENARIO, row.metric, row.value, "<=", row.limit, row.passed, note=row.describe())]
