"""Fused projections for quantized exports: q/k/v as one linear and the dense MLP's w1/w3 as one, so each
runs as one XNNPACK int4 GEMM with one quantization of its input per token instead of three (two).

The fused weight is the row-wise concatenation of the quantized weights (codes, bf16 scales and zero points
along the output dim): each output row keeps its own blocks, so the values multiplied are exactly those of the
separate linears and the simulation in torch needs no change. The outputs are sliced along the last dim,
which XNNPACK takes (`slice_copy`). Only quantized linears are fused: a float fused weight would be a second
copy of those weights. MoE experts are left as they are (`backends/executorch/moe.py` owns their form).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfm_export.model import MLP, MoE

from .attention import CustomOpAttention


def concat_linears(linears: list[nn.Linear]) -> nn.Linear | None:
    """One linear computing `linears`' outputs side by side, or None unless every one is a bias-free linear
    over a torchao `IntxUnpackedToInt8Tensor` of the same bits, block and activation quantization."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
    )

    weights = [lin.weight for lin in linears]
    if any(
        not isinstance(w, IntxUnpackedToInt8Tensor) or lin.bias is not None
        for w, lin in zip(weights, linears)
    ):
        return None
    first = weights[0]
    same = ("target_dtype", "block_size", "dtype", "activation_quantization")
    if any(getattr(w, a) != getattr(first, a) for w in weights[1:] for a in same):
        return None
    fused = IntxUnpackedToInt8Tensor(
        qdata=torch.cat([w.qdata for w in weights]),
        scale=torch.cat([w.scale for w in weights]),
        zero_point=torch.cat([w.zero_point for w in weights]),
        target_dtype=first.target_dtype,
        block_size=first.block_size,
        dtype=first.dtype,
        activation_quantization=first.activation_quantization,
    )
    out = nn.Linear(linears[0].in_features, fused.shape[0], bias=False, device="meta")
    out.weight = nn.Parameter(fused, requires_grad=False)
    return out


class FusedQKVAttention(CustomOpAttention):
    """`CustomOpAttention` with q, k and v from one linear (`qkv`)."""

    def __init__(self, attn: CustomOpAttention, qkv: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.n_heads, self.n_kv, self.head_dim = attn.n_heads, attn.n_kv, attn.head_dim
        self.qkv, self.out_proj = qkv, attn.out_proj
        self.q_layernorm, self.k_layernorm = attn.q_layernorm, attn.k_layernorm

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        bsz, t, _ = x.shape
        p = self.qkv(x)
        nq, nkv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        q = self.q_layernorm(p[..., :nq].reshape(bsz, t, self.n_heads, self.head_dim))
        k = self.k_layernorm(p[..., nq : nq + nkv].reshape(bsz, t, self.n_kv, self.head_dim))
        v = p[..., nq + nkv :].reshape(bsz, t, self.n_kv, self.head_dim)
        return q, k, v


class FusedMLP(nn.Module):
    """The dense `MLP` with w1 and w3 as one linear (`w13`): `w2(silu(a) * b)`."""

    def __init__(self, w13: nn.Linear, w2: nn.Linear) -> None:
        super().__init__()
        self.w13, self.w2 = w13, w2

    def forward(self, x: Tensor) -> Tensor:
        p = self.w13(x)
        ff = p.shape[-1] // 2
        return self.w2(F.silu(p[..., :ff]) * p[..., ff:])


def fused_projections(module: nn.Module) -> nn.Module | None:
    """Swap for `lfm_export.trace.apply_swaps`, after the linears are quantized and the attention swapped:
    `CustomOpAttention` -> `FusedQKVAttention`, a dense `MLP` -> `FusedMLP` (an `MoE` is kept whole)."""
    if isinstance(module, MoE):
        return module
    if type(module) is CustomOpAttention:
        qkv = concat_linears([module.q_proj, module.k_proj, module.v_proj])
        return None if qkv is None else FusedQKVAttention(module, qkv)
    if isinstance(module, MLP):
        w13 = concat_linears([module.w1, module.w3])
        return None if w13 is None else FusedMLP(w13, module.w2)
    return None
