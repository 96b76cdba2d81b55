"""Attention through ExecuTorch's LLM custom ops, as swaps of the canonical attention's pieces: `llama::update_cache`
writes the new keys and values in place into the held cache (`CustomOpKVUpdate`), `llama::custom_sdpa` attends over
the filled positions only (`start_pos + T`), with GQA handled by the kernel (no `repeat_interleave` copy of the
cache; `CustomSDPA`), and RoPE keeps the projections seq-first (`SeqFirstRope`).

The ops take the cache as `[batch, seq, kv_heads, head_dim]`, so an artifact using them holds its KV state in
that layout (`seq_first_signature`), and the manifest's `held` says so.

A program with these ops needs `executorch.extension.llm.custom_ops.custom_ops` imported before it is loaded
(in the export process, in `runtime/executorch.py`, and in the process running ExecuTorch's `TextLLMRunner`):
it registers the kernels with the runtime.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from lfm_export.contract.signature import KEY, VALUE, IOSignature
from lfm_export.model import SDPA, STATEFUL, KVUpdate, Rope
from lfm_export.trace import rebind


def load_custom_ops() -> None:
    """Register `llama::custom_sdpa` / `llama::update_cache` (torch side and ExecuTorch kernels)."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


def seq_first_signature(signature: IOSignature) -> IOSignature:
    """`signature` with every held KV buffer `[1, kv_heads, S, head_dim]` laid out as `[1, S, kv_heads,
    head_dim]`, the custom ops' layout."""
    held = tuple(
        replace(s, shape=(s.shape[0], s.shape[2], s.shape[1], s.shape[3])) if s.role in (KEY, VALUE) else s
        for s in signature.held
    )
    return replace(signature, held=held)


class SeqFirstRope(Rope):
    """`Rope` leaving q, k, v seq-first `[B, T, heads, head_dim]`, the custom ops' layout: cos/sin `[T, head_dim]`
    are viewed as `[T, 1, head_dim]` and cast to the projections' dtype once for q and k, as the canonical
    `apply_rope` casts them."""

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        cos, sin = cos[:, None, :].to(q.dtype), sin[:, None, :].to(q.dtype)
        return _rotate(q, cos, sin, self.half), _rotate(k, cos, sin, self.half), v


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, half: int) -> Tensor:
    """`apply_rope` with cos/sin cast already, in its own op order (`x * cos` before the rotation): the order
    the ExecuTorch programs are built with; `apply_rope`'s order reorders the program and changes the `.pte`."""
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class CustomOpKVUpdate(KVUpdate):
    """`KVUpdate` of the stateful form through `llama::update_cache`, in place into the held seq-first caches;
    the query positions it returns are the first one as an int, which `custom_sdpa` takes."""

    def forward(
        self, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, positions: Tensor, t: int, form: str
    ) -> tuple[Tensor, Tensor, int]:
        if form != STATEFUL:
            raise ValueError("CustomOpKVUpdate writes the stateful form only")
        start = positions[0].item()
        torch._check(start >= 0)
        torch._check(start + t <= k_cache.shape[1])
        torch.ops.llama.update_cache(k, k_cache, start)
        torch.ops.llama.update_cache(v, v_cache, start)
        return k_cache, v_cache, start


class CustomSDPA(SDPA):
    """`SDPA` through `llama::custom_sdpa`: causal attention of the queries at `start + arange(T)` over the
    cache positions up to `start + T`, GQA in the kernel; no key mask (the stateful form has none)."""

    def forward(self, q: Tensor, k_all: Tensor, v_all: Tensor, start: int, key_mask: Tensor | None) -> Tensor:
        bsz, t = q.shape[0], q.shape[1]
        out = torch.ops.llama.custom_sdpa(q, k_all, v_all, start, None, 0.0, True)
        return out.reshape(bsz, t, self.n_heads * self.head_dim)


def custom_op_attention(module: nn.Module) -> nn.Module | None:
    """Swap for `lfm_export.trace.apply_swaps`: each attention's `Rope`, `KVUpdate` and `SDPA` become their
    custom-op forms above (the same weightless settings, so nothing is copied)."""
    if type(module) is Rope:
        return rebind(module, SeqFirstRope)
    if type(module) is KVUpdate:
        return rebind(module, CustomOpKVUpdate)
    if type(module) is SDPA:
        return rebind(module, CustomSDPA)
    return None
