"""Numerical parity of any runtime `Session` against the canonical PyTorch model.

Torch-free except `ReferenceSession` (imported lazily), so the checks also run where only a runtime shim and
recorded reference outputs exist.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lfm_export.parity.prompts import default_prompts, random_prompts, tokenizer_prompts
from lfm_export.parity.report import (
    EXACTNESS,
    EXIT_FAIL,
    EXIT_PASS,
    QUALITY,
    SCHEMA_VERSION,
    Check,
    ParityResult,
    ScenarioResult,
    exit_code,
    to_json,
    to_markdown,
    write_reports,
)
from lfm_export.parity.scenarios import SCENARIOS, ScenarioOptions, run_parity
from lfm_export.parity.thresholds import (
    GATES,
    Gate,
    Limit,
    gate_for,
    gates_markdown,
    quality_gate,
    sanity_gate,
)

if TYPE_CHECKING:
    from lfm_export.parity.reference import ReferenceSession

__all__ = [
    "EXACTNESS",
    "EXIT_FAIL",
    "EXIT_PASS",
    "GATES",
    "SCENARIOS",
    "SCHEMA_VERSION",
    "Check",
    "Gate",
    "Limit",
    "QUALITY",
    "ParityResult",
    "ReferenceSession",
    "ScenarioOptions",
    "ScenarioResult",
    "default_prompts",
    "exit_code",
    "gate_for",
    "gates_markdown",
    "quality_gate",
    "sanity_gate",
    "random_prompts",
    "run_parity",
    "to_json",
    "to_markdown",
    "tokenizer_prompts",
    "write_reports",
]


def __getattr__(name: str) -> Any:
    if name == "ReferenceSession":
        from lfm_export.parity.reference import ReferenceSession

        return ReferenceSession
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
