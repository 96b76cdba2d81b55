"""The attention the QNN programs trace (a module swap, `lfm_export.trace.apply_swaps`): the static KV form with the
causal mask applied after the softmax (probabilities of masked keys set to 0, the rest renormalised) instead of
`-inf` scores before it. The same numbers in fp32. Quantized, `QnnQuantizer` replaces a `-inf` fill by minus its
16-bit range (65535), so the scores' 16-bit grid spans 65535 and its step is about 1. Measured on `tiny` at 16a8w,
fake-quantized program against fp32, prefill KL mean per parity prompt: 0.067 / 0.043 / 0.015 with this swap,
0.074 / 0.046 / 0.016 with the `-inf` form (a small gain; the `-inf` form was not run on the HTP)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lfm_export.model import STATIC, Attention, apply_rope
from lfm_export.trace import rebind


class MaskedProbsAttention(Attention):
    """`Attention` with its weights (shared, not copied), static form only."""

    @classmethod
    def swap(cls, module: nn.Module) -> nn.Module | None:
        if type(module) is not Attention:
            return None
        return rebind(module, cls)

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
        if form != STATIC or key_mask is not None:
            raise ValueError("MaskedProbsAttention traces the static KV form only")
        bsz, t, _ = x.shape
        q, k, v = (a.transpose(1, 2) for a in self.project(x))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_all, v_all = k_cache.index_copy(2, positions, k), v_cache.index_copy(2, positions, v)
        key_pos = torch.arange(k_all.shape[2], device=x.device)
        allowed = (key_pos[None, :] <= positions[:, None]).to(q.dtype)[None, None]  # [1, 1, T, S]
        groups = self.n_heads // self.n_kv
        kk = k_all.repeat_interleave(groups, dim=1)
        vv = v_all.repeat_interleave(groups, dim=1)
        scores = (q @ kk.transpose(-1, -2)) * self.head_dim**-0.5
        probs = torch.softmax(scores, dim=-1) * allowed
        probs = probs / probs.sum(-1, keepdim=True)
        out = (probs @ vv).transpose(1, 2).reshape(bsz, t, self.n_heads * self.head_dim)
        return self.out_proj(out), k_all, v_all
