"""The exact rows: one interface for the checks that hold an artifact to its recipe within float32 rounding.

Where a runtime orders or rounds its sums in a way the simulation cannot follow value for value, the scenario
rows can only hold it to limits that allow for that, under which a matrix a few percent off passes. An exact row
removes what the simulation cannot follow and compares what is left at (close to) float32 rounding:

- `resolved_prefill` (`lfm_export.parity.boundary`): int8 activation codes and fp16 block scales that sit on a
  rounding boundary resolved to the side the artifact took (onnxruntime accuracy level 4, ExecuTorch QD8,
  llama.cpp's Q8 blocks);
- `graph_prefill` (`lfm_export.parity.graph_row`): the artifact's own graph run as written on a reference
  runtime, activation code by activation code (QNN's QDQ graph on onnxruntime's CPU provider);
- `fp16_program_prefill` (`lfm_export.parity.fp16_program`): the simulation rounded op by op as the Core ML
  interpreter runs the program.

Each row is an `ExactRow` (`lfm_export.parity.report`, with the other result types the reports render); this
module holds what a row is computed from (`ExactInputs`) and what the rows share. A backend's record names the function that computes its row (`Backend.exact_row`,
`(ExactInputs) -> ExactRow | None`, None where the row does not apply to the artifact); the pipeline calls it
once per parity run, and `run_parity` adds the row's checks to exactness and its JSON, summary and note to the
reports, the same way for every row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lfm_export.parity.report import ExactRow

if TYPE_CHECKING:
    from lfm_export.contract.session import Session


@dataclass(frozen=True)
class ExactInputs:
    """What a backend's exact row is computed from; the pipeline fills it once per parity run.

    `session`: the artifact's; `simulation`: the session exactness compares it with (the core simulation's, or
    the backend's own `simulation_session`); `simulated`: the core simulation's torch module (`lfm_export.quant
    .simulate`), None where the backend's own session simulates; `reference`: the float32 torch model the
    simulation was made from (`-awq` scales folded); `prompts`: the parity prompts cut to the rows' positions
    (`lfm_export.parity.boundary.prompts_for`)."""

    folder: Path
    manifest: dict[str, Any]
    session: Session
    activations: Any
    simulation: Session | None
    simulated: Any
    reference: Any
    prompts: list[np.ndarray]
    threads: int


@dataclass
class PositionRow(ExactRow):
    """A row that measures one relative error per position compared (`relative_error`): how many, the largest
    and the median."""

    positions: int = 0
    max_rel: float = 0.0
    median_rel: float = 0.0

    def take(self, errors: Sequence[float]) -> None:
        """`positions`, `max_rel` and `median_rel` of one error per position compared."""
        self.positions = len(errors)
        self.max_rel = float(max(errors, default=0.0))
        self.median_rel = float(np.median(errors)) if errors else 0.0


def relative_error(test: np.ndarray, ref: np.ndarray) -> float:
    """`max |test - ref|` (in float64) over `max |ref|`: 0 where both are all zero, inf where only `ref` is."""
    scale = float(np.abs(ref).max())
    err = float(np.abs(test.astype(np.float64) - ref.astype(np.float64)).max())
    return err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))


def first_position(row: ExactRow, where: list[tuple[int, int, float]]) -> str | None:
    """`first_failure` of a row that lists the (prompt, position, error) it failed at: the first of `where`,
    `no position compared` where none was; None where it passed, or failed by a measure `where` does not list
    (the caller names that one)."""
    if row.passed:
        return None
    if where:
        return f"prompt {where[0][0]} position {where[0][1]}"
    return "no position compared" if row.positions == 0 else None
