"""The two modules the Core ML conversion swaps in, because coremltools 9.0's torch frontend refuses what the
canonical model and `lfm_export.stateful` trace to (both measured with torch 2.13, `torch.jit.trace`):

- an in-place write into a state must be slice or select assignment: `k_cache[:, :, positions] = k` (an
  `index_put_` with a tensor index) and `buf.copy_(new)` (a whole-buffer copy) both fail with "No matching
  select or slice." So the KV cache is written as `cache[:, :, start : start + T] = k` and the conv state as
  `buf[:] = new` (`slice_update` + `coreml_update_state` in the program).
- `x.shape[-1] // 2` inside `apply_rope` traces to a shape tensor that coremltools' `int` op cannot take
  ("only 0-dimensional arrays can be converted to Python scalars"); the half width is a Python int here.

The math is the canonical attention's, line for line (q/k RMSNorm before RoPE, rotate-half RoPE, GQA by
`repeat_interleave`, fp32 softmax over every cache position up to the query's); the parity gate checks it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfm_export.contract.signature import CONV, KEY, VALUE
from lfm_export.model import STATEFUL, Attention, MoE
from lfm_export.stateful import StatefulModule
from lfm_export.trace import rebind


class SliceWriteAttention(Attention):
    """`Attention` whose stateful form writes the KV cache by slice assignment (module docstring)."""

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        positions: Tensor,
        form: str,
        key_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        if form != STATEFUL:
            raise ValueError("SliceWriteAttention runs the stateful form only")
        t = x.shape[1]
        q, k, v = (a.transpose(1, 2) for a in self.project(x))
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        start = positions[0]
        k_cache[:, :, start : start + t] = k
        v_cache[:, :, start : start + t] = v
        return self.out_proj(self.attend(q, k_cache, v_cache, positions, None)), k_cache, v_cache

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = self.head_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def slice_write_attention(module: nn.Module) -> nn.Module | None:
    """Swap (`lfm_export.trace.apply_swaps`): an `Attention` becomes a `SliceWriteAttention` sharing its
    submodules and weights."""
    if not isinstance(module, Attention) or isinstance(module, SliceWriteAttention):
        return None
    return rebind(module, SliceWriteAttention)


class CoreMLStatefulModule(StatefulModule):
    """`StatefulModule` whose conv state is written back by slice assignment (`buf[:] = new`)."""

    def forward(self, input_ids: Tensor, input_pos: Tensor) -> Tensor:
        conv_bufs = [self.get_buffer(n) for n in self._names[CONV]]
        continuing = input_pos.reshape(1, 1, 1) > 0
        conv = [torch.where(continuing, c, torch.zeros_like(c)) for c in conv_bufs]
        keys = [self.get_buffer(n) for n in self._names[KEY]]
        values = [self.get_buffer(n) for n in self._names[VALUE]]
        logits, new_conv, _, _ = self.model(input_ids, conv, keys, values, input_pos=input_pos, form=STATEFUL)
        for buf, new in zip(conv_bufs, new_conv, strict=True):
            buf[:] = new
        return logits


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
