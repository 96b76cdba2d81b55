"""MoE experts as one traced op, so the MLX lowering can read only the selected experts.

The canonical model's `dense` MoE form runs every expert on every token, and its `sparse` form gathers rows
with `nonzero`, a data-dependent shape that MLX (no `nonzero`, static shapes in exported functions) cannot
express. Before tracing, `swap` replaces each `MoE` with `GatheredMoE`, which routes exactly as the canonical
model (`MoE._route`: sigmoid, expert bias for selection only, top-k, normalisation, scaling) and then calls
`lfm_mlx::switch_glu(x, idx, w, w1s, w3s, w2s)` with the experts' own weights (no copies: the same
parameters, so their names and bindings do not change). The lowering maps that op to `mx.gather_qmm`
(quantized) / `mx.gather_mm` (float) over the stacked expert tensors of mlx-lm's `switch_mlp`: each token
reads its k experts' weights only.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfm_export.model import MoE


@torch.library.custom_op("lfm_mlx::switch_glu", mutates_args=())
def switch_glu(
    x: Tensor, idx: Tensor, w: Tensor, w1s: list[Tensor], w3s: list[Tensor], w2s: list[Tensor]
) -> Tensor:
    """`sum_j w[:, j] * expert_{idx[:, j]}(x)` for `x [N, H]`, `idx` / `w` `[N, k]` (eager: for reference)."""
    out = torch.zeros_like(x)
    for e in range(len(w1s)):
        weight = (w * (idx == e)).sum(-1, keepdim=True).to(x.dtype)
        out = out + weight * F.linear(F.silu(F.linear(x, w1s[e])) * F.linear(x, w3s[e]), w2s[e])
    return out


@switch_glu.register_fake
def _(x: Tensor, idx: Tensor, w: Tensor, w1s: list[Tensor], w3s: list[Tensor], w2s: list[Tensor]) -> Tensor:
    return torch.empty_like(x)


class GatheredMoE(MoE):
    """`MoE` whose experts run through `lfm_mlx::switch_glu` (same routing, same weights)."""

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        _, idx, w = self._route(flat)
        experts = list(self.experts)
        out = switch_glu(
            flat,
            idx,
            w.to(flat.dtype),
            [e.w1.weight for e in experts],
            [e.w3.weight for e in experts],
            [e.w2.weight for e in experts],
        )
        return out.reshape(shape)


def swap(module: nn.Module) -> nn.Module | None:
    """For `lfm_export.trace.export_program(..., swaps=[swap])`: each `MoE` becomes a `GatheredMoE`."""
    if isinstance(module, MoE):
        new = copy.copy(module)
        new.__class__ = GatheredMoE
        return new
    return None
