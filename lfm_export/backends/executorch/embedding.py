"""The embedding table held quantized, weight-only (`--embedding-quant 8|4`): the rows of the tokens are
gathered from the int8 (or packed int4) table and scaled, in plain ops (`embedding`, a multiply, floor
division to unpack int4) that ExecuTorch's portable kernels run; only the T gathered rows are dequantized per call.

The values are `quantize.xnnpack_weight`'s (int8 per row, int4 in blocks with bf16 scales), the same function
`quantize.weight_values` gives the simulation, so a table tied to an int8 lm_head holds the same values in
both places.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .quantize import xnnpack_weight


class QuantizedEmbedding(nn.Module):
    """`nn.Embedding` over `weight [V, H]` held at `bits` (8: one scale per row; 4: two codes per byte, one
    scale per `block_size` columns)."""

    def __init__(self, weight: Tensor, bits: int, block_size: int, rounding: str = "nearest") -> None:
        super().__init__()
        codes, scale, group = xnnpack_weight(weight.detach(), bits, block_size, rounding)
        self.bits, self.group = bits, group
        self.hidden = int(codes.shape[1])
        if bits == 4:
            codes = pack_int4(codes)
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scales", scale.contiguous())

    def forward(self, ids: Tensor) -> Tensor:
        rows = nn.functional.embedding(ids, self.codes)
        if self.bits == 4:
            rows = unpack_int4(rows)
        scales = nn.functional.embedding(ids, self.scales)  # [B, T, H / group]
        grouped = rows.float().reshape(*ids.shape, self.hidden // self.group, self.group)
        return (grouped * scales[..., None]).reshape(*ids.shape, self.hidden)


def pack_int4(codes: Tensor) -> Tensor:
    """int4 codes `[..., 2n]` (-8..7, int8) -> `[..., n]` uint8, two codes per byte (even column low)."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)  # 0..15
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """`pack_int4` undone in core ATen ops (shifts are not core ATen: floor division unpacks): int32 codes."""
    p = packed.to(torch.int32)
    hi = torch.div(p, 16, rounding_mode="floor")
    return torch.stack([p - hi * 16, hi], dim=-1).reshape(*p.shape[:-1], 2 * p.shape[-1]) - 8


def quantized_embedding(bits: int, block_size: int, rounding: str = "nearest"):  # noqa: ANN201 (a swap)
    """Swap for `lfm_export.trace.apply_swaps`: the model's `nn.Embedding` becomes a `QuantizedEmbedding`."""

    def swap(module: nn.Module) -> nn.Module | None:
        return (
            QuantizedEmbedding(module.weight, bits, block_size, rounding)
            if isinstance(module, nn.Embedding)
            else None
        )

    return swap
