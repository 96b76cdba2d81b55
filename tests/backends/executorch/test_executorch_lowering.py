"""`backends/executorch/lowering.py`: the cheaper decomposition path, and its fallback when XNNPACK refuses an
op it asked to keep whole. Small modules, lowered and run by the real ExecuTorch runtime (seconds)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("executorch")

from lfm_export.backends.executorch.lowering import kept_whole, left_outside, lower  # noqa: E402


class _TwoLinears(nn.Module):
    """One linear XNNPACK takes (a constant weight), one it refuses (the weight is an input)."""

    def __init__(self, refused: bool) -> None:
        super().__init__()
        self.refused = refused
        self.a = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return F.linear(y, w) if self.refused else y * w.sum()


def _run(edge: Any, path: Path, *args: torch.Tensor) -> torch.Tensor:
    from executorch.runtime import Runtime

    with open(path, "wb") as f:
        edge.to_executorch().write_to_file(f)
    return Runtime.get().load_program(str(path)).load_method("forward").execute(list(args))[0]


def _delegate_calls(edge: Any) -> int:
    nodes = edge.exported_program("forward").graph.nodes
    return sum(1 for n in nodes if n.op == "call_function" and "call_delegate" in str(n.target))


@pytest.mark.parametrize("refused", [False, True])
def test_lowering_keeps_what_xnnpack_takes_and_falls_back_when_it_refuses(
    refused: bool, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = _TwoLinears(refused).eval()
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    program = torch.export.export(model, (x, w), strict=False)
    assert torch.ops.aten.linear.default in kept_whole(program)
    with caplog.at_level(logging.WARNING, logger="lfm_export.backends.executorch.lowering"):
        edge = lower({"forward": program}, xnnpack=True)
    fell_back = any("lowering again" in r.getMessage() for r in caplog.records)
    assert fell_back == refused
    assert left_outside(edge, kept_whole(program)) == []
    assert _delegate_calls(edge) >= 1
    torch.testing.assert_close(_run(edge, tmp_path / "m.pte", x, w), model(x, w), rtol=1e-5, atol=1e-5)
