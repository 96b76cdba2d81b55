"""The attention the QNN programs trace (a module swap, `lfm_export.trace.apply_swaps`): the canonical attention
with its attend step replaced, the causal mask applied after the softmax (probabilities of masked keys set to 0,
the rest renormalised) instead of `-inf` scores before it. The same numbers in fp32. Quantized, `QnnQuantizer`
replaces a `-inf` fill by minus its 16-bit range (65535), so the scores' 16-bit grid spans 65535 and its step is
about 1. Measured on `tiny` at 16a8w, fake-quantized program against fp32, prefill KL mean per parity prompt:
0.067 / 0.043 / 0.015 with this swap, 0.074 / 0.046 / 0.016 with the `-inf` form (a small gain; the `-inf` form
was not run on the HTP)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lfm_export.model import SDPA
from lfm_export.trace import rebind


class MaskedProbsSDPA(SDPA):
    """`SDPA` with the causal mask applied to the probabilities; no key mask (the QNN programs are static-form)."""

    @classmethod
    def swap(cls, module: nn.Module) -> nn.Module | None:
        if type(module) is not SDPA:
            return None
        return rebind(module, cls)

    def forward(
        self, q: Tensor, k_all: Tensor, v_all: Tensor, positions: Tensor, key_mask: Tensor | None
    ) -> Tensor:
        if key_mask is not None:
            raise ValueError("MaskedProbsSDPA attends in the static KV form only, which has no key mask")
        bsz, _, t, _ = q.shape
        key_pos = torch.arange(k_all.shape[2], device=q.device)
        allowed = (key_pos[None, :] <= positions[:, None]).to(q.dtype)[None, None]  # [1, 1, T, S]
        groups = self.n_heads // self.n_kv
        kk = k_all.repeat_interleave(groups, dim=1)
        vv = v_all.repeat_interleave(groups, dim=1)
        scores = (q @ kk.transpose(-1, -2)) * self.head_dim**-0.5
        probs = torch.softmax(scores, dim=-1) * allowed
        probs = probs / probs.sum(-1, keepdim=True)
        return (probs @ vv).transpose(1, 2).reshape(bsz, t, self.n_heads * self.head_dim)
