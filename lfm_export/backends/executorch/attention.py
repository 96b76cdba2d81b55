"""Attention through ExecuTorch's LLM custom ops: `llama::update_cache` writes the new keys and values in place
into the held cache, `llama::custom_sdpa` attends over the filled positions only (`start_pos + T`), with GQA
handled by the kernel (no `repeat_interleave` copy of the cache).

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
from lfm_export.model import Attention


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


class CustomOpAttention(nn.Module):
    """The canonical `Attention` (same submodules, so the same weights, quantized or not) in the stateful
    form, with the cache written by `update_cache` and read by `custom_sdpa` (module doc)."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = attn.n_heads, attn.n_kv, attn.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.out_proj,
        )
        self.q_layernorm, self.k_layernorm = attn.q_layernorm, attn.k_layernorm

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
        bsz, t, _ = x.shape
        q, k, v = Attention.project(self, x)  # type: ignore[arg-type]  # the same submodules
        # [T, 1, head_dim] against [B, T, heads, head_dim]; computed in fp32, cast as the canonical `apply_rope`
        cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        start = positions[0].item()
        torch._check(start >= 0)
        torch._check(start + t <= k_cache.shape[1])
        torch.ops.llama.update_cache(k, k_cache, start)
        torch.ops.llama.update_cache(v, v_cache, start)
        out = torch.ops.llama.custom_sdpa(q, k_cache, v_cache, start, None, 0.0, True)
        return self.out_proj(out.reshape(bsz, t, self.n_heads * self.head_dim)), k_cache, v_cache


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def custom_op_attention(module: nn.Module) -> nn.Module | None:
    """Swap for `lfm_export.trace.apply_swaps`: each canonical `Attention` becomes a `CustomOpAttention`."""
    return CustomOpAttention(module) if isinstance(module, Attention) else None
