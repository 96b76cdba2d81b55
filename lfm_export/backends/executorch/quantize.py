"""The int4 weights an ExecuTorch XNNPACK artifact holds, computed once for the export and for the simulation.

Why not the core quantizer's codes and scales: its symmetric form maps each block's signed extreme to code -8,
so half the scales are negative; XNNPACK refuses a blockwise int4 weight with a negative scale at load time
("Failed to define tensor ... xnn_status_invalid_parameter", measured on ExecuTorch 1.5.1), and it holds every
scale as bfloat16 (a 64x48 int4 linear, blocks of 32: the XNNPACK output matches int8-token activations times
`q * bf16(scale)` within 3.6e-7 and `q * scale` only within 2.2e-3, logit scale 1.9). A core code of -8 under a
negative scale would be +8 under the positive one, outside int4, so the core codes cannot be carried over.

So the weights are torchao's symmetric int4 (`choose_qparams_affine`, MappingType.SYMMETRIC: `scale =
amax / 7.5`, zero point 0, codes in -8..7), the scale rounded to bfloat16 first and the codes computed against
that rounded scale (`quantize_affine`), so the float32 values `q * scale` are exactly what XNNPACK multiplies.
`lfm_export.quant.simulate(..., weights=weight_values(recipe))` builds the simulation from the same function,
so parity's exactness half compares against what the artifact holds.

How far these are from the core quantizer's (int4-b32, every linear but the lm_head and the router, relative
RMS over all weights): `tiny` fp32 -> core 0.0861, fp32 -> these 0.0950, core <-> these 0.1083;
`tiny-moe` 0.0857 / 0.0945 / 0.1081. The core's code -8 buys one more level per block, so its error is about
9% lower. On `tiny`, 8da4w through the pipeline: pooled KL mean 0.0417 against fp32 (p99 0.501, top-1
decisive 0.963), the ONNX int4-b32 export's 0.042 (whose lm_head is int8; here it is float).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

ROWS_PER_CHUNK = 256
"""Rows quantized at once: the block's statistics, scale and codes are computed while the rows are in cache."""


def _symmetric(
    w: torch.Tensor, block: int, qmax: int, bf16_scale: bool, grid: tuple[float, ...] = (1.0,)
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's symmetric affine quantization of `w [N, K]` in row blocks of `block` (`choose_qparams_affine`
    with MappingType.SYMMETRIC: `scale = max(amax / ((qmax - qmin) / 2), smallest normal float)`, zero point
    0, then `quantize_affine`: `clamp(round(w * (1 / scale)), qmin, qmax)`), the scale rounded to bfloat16
    first when `bf16_scale`. Written here over row chunks, in place: the same codes and scales as torchao's
    functions (tested against them, `tests/test_executorch_quantize.py`) in a sixth of the time (one 8192 x
    2048 weight, blocks of 32, one thread: 0.071 s against 0.477 s; the quantization was most of
    the 16.6 s "Preparing weights" stage of an LFM2-1.2B export).

    With a `grid` of shrink factors (`-mse`: `lfm_export.quant.MSE_GRIDS`, the core quantizer's), each block
    takes the factor `f` whose scale `f * amax / 7.5` (rounded as above) gives the smallest squared error;
    `f = 1` is tried first and only a strictly smaller error replaces it, so no block is worse than plain
    rounding."""
    t = torch.as_tensor(w, dtype=torch.float32)
    n, k = t.shape
    qmin = -qmax - 1
    half_range = (qmax - qmin) / 2
    eps = torch.finfo(torch.float32).smallest_normal

    def scale_for(amax: torch.Tensor, f: float) -> torch.Tensor:
        scale = (amax * f / half_range).clamp_(min=eps)  # x * 1.0 is x exactly: f = 1 is torchao
        return scale.to(torch.bfloat16).float() if bf16_scale else scale

    codes = torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n, k // block)
    for i in range(0, n, ROWS_PER_CHUNK):
        rows = t[i : i + ROWS_PER_CHUNK].reshape(-1, k // block, block)
        amax = rows.abs().amax(-1)
        scale = scale_for(amax, grid[0])
        if len(grid) > 1:
            best = _squared_error(rows, scale, qmin, qmax)
            for f in grid[1:]:
                candidate = scale_for(amax, f)
                err = _squared_error(rows, candidate, qmin, qmax)
                better = err < best
                scale = torch.where(better, candidate, scale)
                best = torch.where(better, err, best)
        scales[i : i + ROWS_PER_CHUNK] = scale
        q = rows * (1.0 / scale)[..., None]
        codes[i : i + ROWS_PER_CHUNK] = q.round_().clamp_(qmin, qmax).reshape(-1, k)
    return codes, scales


def _squared_error(rows: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    q = (rows * (1.0 / scale)[..., None]).round_().clamp_(qmin, qmax)
    return q.mul_(scale[..., None]).sub_(rows).square_().sum(-1)


def _grid(bits: int, rounding: str) -> tuple[float, ...]:
    from lfm_export.quant import MSE_GRIDS

    return MSE_GRIDS[bits] if rounding == "mse" else (1.0,)


def xnnpack_int4(
    w: np.ndarray | torch.Tensor, block_size: int, rounding: str = "nearest"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`w [N, K]` -> (codes int8 `[N, K]` in -8..7, scales float32 `[N, K / block_size]`, each a bfloat16
    value): the int4 weight XNNPACK holds (module doc); `rounding="mse"` searches each block's scale."""
    return _symmetric(torch.as_tensor(w), block_size, 7, bf16_scale=True, grid=_grid(4, rounding))


def xnnpack_int8(
    w: np.ndarray | torch.Tensor, rounding: str = "nearest"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`w [N, K]` -> (codes int8 `[N, K]` in -128..127, float32 scales `[N, 1]`): torchao's symmetric int8 per
    output channel (`amax / 127.5`), what XNNPACK's dynamically quantized int8 linear (`qd8-f32-qc8w`) holds
    with float32 scales, and the per-row int8 embedding table (`embedding.QuantizedEmbedding`)."""
    t = torch.as_tensor(w)
    return _symmetric(t, t.shape[1], 127, bf16_scale=False, grid=_grid(8, rounding))


def xnnpack_weight(
    w: np.ndarray | torch.Tensor, bits: int, block_size: int, rounding: str = "nearest"
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(codes, scales, group) for a weight this backend holds at `bits`: int4 in blocks of `block_size`
    (`xnnpack_int4`), int8 per output channel (`xnnpack_int8`, group = the whole row)."""
    if bits == 4:
        return (*xnnpack_int4(w, block_size, rounding), block_size)
    if bits == 8:
        codes, scale = xnnpack_int8(w, rounding)
        return codes, scale, int(codes.shape[1])
    raise ValueError(f"the ExecuTorch backend holds int4 or int8 weights, not int{bits}")


def dequantize(codes: torch.Tensor, scale: torch.Tensor, block_size: int) -> torch.Tensor:
    n, k = codes.shape
    return (codes.reshape(n, k // block_size, block_size).float() * scale[..., None]).reshape(n, k)


def weight_values(recipe: dict[str, Any]) -> Any:
    """`lfm_export.quant.WeightValues` for an artifact of `recipe` (a manifest's): None for float recipes.
    int4 (linears, an int4 embedding table) in blocks of the recipe's size, or of the block its precision mix
    gives the tensor (`lfm_export.precision.block_as`), int8 (the lm_head, an int8 embedding table) per row: a
    tied table quantized at the same bits is the same values in both places."""
    if not recipe.get("bits"):
        return None
    from lfm_export.precision import block_as
    from lfm_export.recipes import Recipe

    core = Recipe.from_dict(recipe)
    rounding = recipe.get("rounding", "nearest")

    def values(w: np.ndarray, bits: int, name: str = "") -> np.ndarray:
        block = block_as(name, core, int(w.shape[-1])) if name else core.block_size
        codes, scale, group = xnnpack_weight(w, bits, block, rounding)
        return dequantize(codes, scale, group).numpy()

    return values


def quantized_linear(linear: nn.Linear, bits: int, block_size: int, rounding: str = "nearest") -> nn.Linear:
    """A new linear (the input keeps its weight) whose weight is a torchao `IntxUnpackedToInt8Tensor` holding
    `quantize.xnnpack_weight`'s codes and scales (int4 in blocks, int8 per channel), with int8 per-token
    asymmetric activations: torchao's 8da4w / 8da8w form, which XNNPACK's partitioner lowers."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    codes, scale, group = xnnpack_weight(linear.weight.detach(), bits, block_size, rounding)
    weight = IntxUnpackedToInt8Tensor(
        qdata=codes,
        scale=scale,
        zero_point=torch.zeros_like(scale, dtype=torch.int8),
        target_dtype=torch.int4 if bits == 4 else torch.int8,
        block_size=(1, group),
        dtype=torch.float32,
        activation_quantization=IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN,
    )
    new = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=False)
    new.bias = linear.bias
    return new
