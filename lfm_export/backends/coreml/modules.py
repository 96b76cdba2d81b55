"""The pieces the Core ML conversion swaps in, because coremltools 9.0's torch frontend refuses what the canonical
model and `lfm_export.stateful` trace to (both measured with torch 2.13, `torch.jit.trace`): an in-place write
into a state must be slice or select assignment. `k_cache[:, :, positions] = k` (an `index_put_` with a tensor
index) and `buf.copy_(new)` (a whole-buffer copy) both fail with "No matching select or slice." So the KV cache
is written as `cache[:, :, start : start + T] = k` (`SliceWriteKV`, the attention's `kv_update`) and the conv
state as `buf[:] = new` (`CoreMLStatefulModule.write_back`): `slice_update` + `coreml_update_state` in the
program. The rest of the attention is the canonical one; the parity gate checks it.

`StackedMoE` is the sparse MoE form the Core ML program takes (its docstring).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfm_export.model import STATEFUL, KVUpdate, MoE
from lfm_export.stateful import StatefulModule
from lfm_export.trace import rebind


class SliceWriteKV(KVUpdate):
    """`KVUpdate` of the stateful form writing the `t` new positions by slice assignment, from `positions[0]`."""

    def forward(
        self, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, positions: Tensor, t: int, form: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        if form != STATEFUL:
            raise ValueError("SliceWriteKV writes the stateful form only")
        start = positions[0]
        k_cache[:, :, start : start + t] = k
        v_cache[:, :, start : start + t] = v
        return k_cache, v_cache, positions


def slice_write_attention(module: nn.Module) -> nn.Module | None:
    """Swap (`lfm_export.trace.apply_swaps`): each attention's `KVUpdate` becomes a `SliceWriteKV`."""
    if type(module) is not KVUpdate:
        return None
    return SliceWriteKV()


class CoreMLStatefulModule(StatefulModule):
    """`StatefulModule` whose conv state is written back by slice assignment (`buf[:] = new`)."""

    def write_back(self, buf: Tensor, new: Tensor) -> None:
        buf[:] = new


class StackedMoE(MoE):
    """The sparse MoE form of the Core ML program: each expert matrix of a layer is one stacked constant
    (`w1`, `w3` `[E, F, H]`, `w2` `[E, H, F]`), and every token gathers the rows of its top-k experts
    (`index_select` -> `gather`) and runs them as batched matmuls, so a decode step reads k of the E
    experts' weights. coremltools 9.0 converts no `index_add` (the canonical sparse form), which is why this
    form gathers weights instead of tokens. Prefill runs the same program: T tokens read T * k expert
    matrices (more than the E of the dense form once T * k > E); the routing is the canonical `_route`."""

    w1: nn.Parameter
    w2: nn.Parameter
    w3: nn.Parameter

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        _, idx, w = self._route(flat)
        k = idx.shape[-1]
        pick = idx.reshape(-1)
        xi = flat[:, None, :, None]
        w1 = self.w1.index_select(0, pick).reshape(-1, k, self.w1.shape[1], self.w1.shape[2])
        w3 = self.w3.index_select(0, pick).reshape(-1, k, self.w3.shape[1], self.w3.shape[2])
        w2 = self.w2.index_select(0, pick).reshape(-1, k, self.w2.shape[1], self.w2.shape[2])
        h = F.silu((w1 @ xi).squeeze(-1)) * (w3 @ xi).squeeze(-1)
        y = (w2 @ h[..., None]).squeeze(-1)
        return (w.to(x.dtype)[..., None] * y).sum(1).reshape(shape)


STACKED = ("w1", "w3", "w2")


def stacked_moe(module: nn.Module, cls: type[StackedMoE] = StackedMoE) -> nn.Module | None:
    """Swap (`lfm_export.trace.apply_swaps`): a `MoE` becomes a `StackedMoE` with its experts' weights stacked
    (`torch.stack`: a copy; the placeholder model's experts are 4-byte views, so it costs nothing there)."""
    if not isinstance(module, MoE) or isinstance(module, StackedMoE):
        return None
    new = rebind(module, cls)
    del new._modules["experts"]
    for attr in STACKED:
        stacked = torch.stack([getattr(e, attr).weight for e in module.experts])
        new._parameters[attr] = nn.Parameter(stacked, requires_grad=False)
    return new
