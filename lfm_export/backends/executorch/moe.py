"""MoE layers of an ExecuTorch program in the core's sparse form: each expert runs only on the rows routed to it.
`lfm-export executorch` uses it for fp32 exports of MoE models; quantized exports use `composed_moe.py`
(experts as XNNPACK delegates under `torch.cond`), because no form below is fast at int4 (measured below).

What ExecuTorch 1.5.1 can lower (`tiny-moe` and one LFM2-8B-A1B-sized layer):

- The sparse form (`nonzero` -> `index_select` -> expert -> `index_add`) exports; the per-expert row count is
  an unbacked symbol bounded by the token count, and the program keeps it as a dynamic size.
- XNNPACK's partitioner refuses every node with an unbacked size ("XNNPACK does not support empty tensors",
  `xnnpack_config.py`), so the experts stay outside the delegate. With plain `nn.Linear` experts it still
  delegates the weight transposes (every expert's weight permuted on every call: all experts read), so the
  weight is stored transposed and multiplied by the portable `mm`, which reads nothing for zero rows.
- torchao's 8da4w tensor does not trace on an unbacked row count (`_get_reduction_params` guards on
  `rows != 1`, `quantize_affine` on `zero_point.numel() > 0`); inside `torch.cond` branches the partitioner
  delegates nothing (`aten.linear` "was not decomposed or delegated": in a branch the weights are branch
  inputs, not program constants), but experts lowered to XNNPACK beforehand and called inside the branches do
  run there (`composed_moe.py`: exact, decode runs the selected experts only; the exporter's quantized form);
  `torch.scan` over stacked experts failed in export (fake-tensor call of `scan`); ExecuTorch's fused `llama::quantized_moe_ffn` needs torchao's
  packing op `_pack_8bit_act_4bit_weight`, absent from this torchao wheel.
- An int4 sparse expert is therefore expressed in portable ops (`bits=4` here: packed codes and bf16 scales
  dequantized per call, inputs rounded per token). It computes the simulation exactly (tested), but the
  dequantization does not depend on the rows, so every expert's weights are unpacked on every call: one
  8B-sized layer decodes one token in 1985 ms with 8 experts and 3696 ms with 16 (grows with the expert count;
  `benchmarks/executorch_moe_decode.py`). Not used by the exporter; kept for that benchmark and its test.

Routing (gate, sigmoid, expert bias, top-k, normalisation) is the core `MoE`'s own code, in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lfm_export.model import MoE
from lfm_export.quant import fake_quant_int8_token
from lfm_export.trace import Swap

from .embedding import pack_int4, unpack_int4
from .quantize import xnnpack_weight


class SparseLinear(nn.Module):
    """`y = x @ W^T` as `mm(x, W^T)` with `W^T` stored transposed: no tensor with an unbacked size is ever
    transposed (ExecuTorch's `dim_order_from_stride` guards on such a stride, `u < 1`, and export fails) and the
    portable `mm` reads the weight as stored. With `bits`, `W^T` is held as int8 codes and per-block scales
    (`quantize.xnnpack_weight`, transposed; int4 two per byte, `embedding.pack_int4`), dequantized per call, and `x` is rounded per token to int8 first.
    A float weight is copied once, transposed (float exports only)."""

    def __init__(self, weight: Tensor, bits: int | None, block_size: int) -> None:
        super().__init__()
        self.bits = bits
        if bits is None:
            self.register_buffer("weight_t", weight.detach().t().contiguous())
            self.group = 0
            return
        codes, scale, group = xnnpack_weight(weight.detach(), bits, block_size)
        codes_t = codes.t().contiguous()  # [K, N]
        self.register_buffer("codes_t", pack_int4(codes_t) if bits == 4 else codes_t)
        # int4 scales are bfloat16 values (`quantize.xnnpack_int4`): held as bfloat16, exactly
        scale_t = scale.t().contiguous()  # [K / group, N]
        self.register_buffer("scale_t", scale_t.to(torch.bfloat16) if bits == 4 else scale_t)
        self.group = group

    def dequantized_t(self) -> Tensor:
        """`W^T` `[K, N]` in float32."""
        if self.bits is None:
            return self.weight_t
        codes = unpack_int4(self.codes_t) if self.bits == 4 else self.codes_t
        k, n = codes.shape
        blocks = codes.reshape(k // self.group, self.group, n).to(torch.float32)
        return (blocks * self.scale_t.to(torch.float32).unsqueeze(1)).reshape(k, n)

    def forward(self, x: Tensor, rounded: bool = False) -> Tensor:
        """`rounded`: `x` was already rounded per token (w1 and w3 share one rounding of their input)."""
        if self.bits is not None and not rounded:
            x = token_rounded(x)
        return torch.mm(x, self.dequantized_t())


def token_rounded(rows: Tensor) -> Tensor:
    """`lfm_export.quant.fake_quant_int8_token` of `rows [n, K]`, n possibly 0: ExecuTorch's portable
    `amin` / `amax` abort the process on an empty input ("Input tensor must be nonempty", measured), so a zero
    row goes first and is dropped after (each row is rounded on its own: the others are unchanged)."""
    padded = torch.cat([rows.new_zeros(1, rows.shape[1]), rows])
    return fake_quant_int8_token(padded)[1:]


class SparseExpert(nn.Module):
    """One expert's SwiGLU over `SparseLinear`s."""

    def __init__(self, weights: list[Tensor], bits: int | None, block_size: int) -> None:
        """`weights`: w1, w3, w2."""
        super().__init__()
        self.w1, self.w3, self.w2 = (SparseLinear(w, bits, block_size) for w in weights)

    def forward(self, x: Tensor) -> Tensor:
        if self.w1.bits is not None:
            x = token_rounded(x)
        return self.w2(torch.nn.functional.silu(self.w1(x, rounded=True)) * self.w3(x, rounded=True))


def take_routing(module: nn.Module, moe: MoE) -> None:
    """Give `module` what `MoE._route` reads (top-k, normalisation, scale, gate, expert bias), the same
    tensors as `moe`'s: the forms of this backend route with the core's own code."""
    module.top_k, module.norm_topk_prob, module.scale = moe.top_k, moe.norm_topk_prob, moe.scale
    module.use_expert_bias = moe.use_expert_bias
    module.gate = moe.gate
    if moe.use_expert_bias:
        module.register_buffer("expert_bias", moe.expert_bias)


class SparseMoE(nn.Module):
    """The core `MoE` in its sparse form, experts as `SparseExpert`. `nonzero(...).reshape(-1)` instead of the
    core's `squeeze(-1)`: ExecuTorch's portable `squeeze_copy` rejected `nonzero`'s output ("2 input tensors
    have different dim orders", measured)."""

    def __init__(self, moe: MoE, bits: int | None, block_size: int) -> None:
        super().__init__()
        take_routing(self, moe)
        self.experts = nn.ModuleList(
            SparseExpert([getattr(e, w).weight for w in ("w1", "w3", "w2")], bits, block_size)
            for e in moe.experts
        )

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        _, idx, w = MoE._route(self, flat)  # type: ignore[arg-type]  # the same attributes as a MoE
        w = w.to(flat.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            hit = idx == e
            rows = hit.any(-1).nonzero().reshape(-1)
            row_w = (w * hit).sum(-1, keepdim=True).index_select(0, rows)
            out = out.index_add(0, rows, row_w * expert(flat.index_select(0, rows)))
        return out.reshape(shape)


def sparse_moe_swap(bits: int | None, block_size: int, counts: dict[str, int]) -> Swap:
    """Swap for `lfm_export.trace.apply_swaps`: every `MoE` becomes a `SparseMoE` (experts at `bits`, None for
    float), counted in `counts["experts"]`."""

    def swap(module: nn.Module) -> nn.Module | None:
        if not isinstance(module, MoE):
            return None
        counts["experts"] = counts.get("experts", 0) + len(module.experts)
        return SparseMoE(module, bits, block_size)

    return swap
