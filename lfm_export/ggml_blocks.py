"""ggml's block formats (GGUF tensor types) packed from the core quantizer's codes and scales.

The core quantizer (`lfm_export.quant.quantize_weight`) chooses the codes, so its rounding search (`-mse`) and
whatever improves it later apply to GGUF as to every other backend. This module only lays the codes out as
ggml reads them (facts from llama.cpp's `ggml-common.h` / gguf-py's `quants.py`; blocks run along each row,
the weight's input dimension):

- `Q8_0`: blocks of 32, each an fp16 scale `d` then 32 int8 values `q`; value = `d * q`. The core's symmetric
  int8 codes `c` (unsigned, zero point 128) are `q = c - 128`, `d` the core's scale rounded to fp16.
- `Q4_0`: blocks of 32, each an fp16 `d` then 16 bytes: byte `j` holds element `j` in its low nibble and
  element `j + 16` in its high nibble; value = `d * (q - 8)`. The core's symmetric int4 codes (zero point 8)
  are these nibbles as they are.

A stored scale is the core's float32 scale rounded to fp16, so the values an artifact holds (`dequantize`)
differ from `Quantized.dequantize()` by that rounding (at most 2^-11 of a block's scale); the GGUF backend's
`weight_values` gives the simulation these values. The activation rounding llama.cpp's CPU kernels apply to the
input of a Q8_0 / Q4_0 matmul is `lfm_export.quant`'s `ACT_GGML_Q8_0`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lfm_export.contract.session import DEFAULT_THREADS
from lfm_export.quant import Quantized, _f16, quantize_block
from lfm_export.rounding import Factor, gptq_on_blocks, gptq_on_grid, refit_scales

QK = 32
"""Values per Q8_0 / Q4_0 block."""


@dataclass(frozen=True)
class BlockType:
    """One ggml block type: `name` (gguf's `GGMLQuantizationType` member), bits of the core codes it holds,
    values and bytes per block."""

    name: str
    bits: int
    block: int
    block_bytes: int


Q8_0 = BlockType("Q8_0", 8, QK, 2 + QK)
Q4_0 = BlockType("Q4_0", 4, QK, 2 + QK // 2)
BLOCK_TYPES = {t.name: t for t in (Q8_0, Q4_0)}
BY_BITS = {8: Q8_0, 4: Q4_0}


def pack(q: Quantized) -> np.ndarray:
    """The ggml bytes `[N, K / 32 * block_bytes]` (uint8) of core-quantized `q` (symmetric, blocks of 32)."""
    if q.zero_points is not None or q.block_size != QK or q.bits not in BY_BITS:
        raise ValueError(
            f"ggml Q8_0 / Q4_0 hold symmetric blocks of {QK}; got {q.bits}-bit blocks of {q.block_size}"
        )
    n, k = q.codes.shape
    nb = k // QK
    d = q.scales.astype(np.float16).view(np.uint8).reshape(n, nb, 2)
    codes = q.codes.reshape(n, nb, QK)
    if q.bits == 8:
        body = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    else:
        body = (codes[..., : QK // 2] | (codes[..., QK // 2 :] << 4)).astype(np.uint8)
    return np.concatenate([d, body], axis=-1).reshape(n, -1)


def dequantize(data: np.ndarray, kind: BlockType) -> np.ndarray:
    """The float32 values ggml reads from `data` `[N, bytes per row]` of type `kind` (`[N, K]`)."""
    n = data.shape[0]
    blocks = data.reshape(n, -1, kind.block_bytes)
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16).astype(np.float32)
    body = blocks[..., 2:]
    if kind is Q8_0:
        q = body.view(np.int8).astype(np.float32)
    else:
        q = np.concatenate([body & 0x0F, body >> 4], axis=-1).astype(np.float32) - 8.0
    return (d * q).reshape(n, -1)


def on_block_grid(w: np.ndarray, q: Quantized, factor: Factor, threads: int = 1) -> Quantized:
    """Symmetric blocks `q` of `w` with their scales rounded to fp16 (as the file holds them) and the codes
    chosen on those scales by `gptq_on_grid` (`factor`: the inputs' Hessian Cholesky factor): the scales fitted
    to the original weights before the sweep (`-gptq`)."""
    half = 2 ** (q.bits - 1)
    scales = q.scales.astype(np.float16).astype(np.float32)
    step = np.repeat(scales, q.block_size, -1)
    codes = gptq_on_grid(w, step, None, -half, half - 1, factor, threads) + half
    return Quantized(codes.astype(np.uint8), scales, None, q.bits, q.block_size)


def gptq_blocks(
    w: np.ndarray,
    bits: int,
    importance: np.ndarray | None,
    factor: np.ndarray,
    threads: int = 1,
    refit: bool = True,
) -> Quantized:
    """Symmetric `bits`-wide blocks of 32 of `w [N, K]` by GPTQ with each block's scale fitted when the sweep
    reaches it (`gptq_on_blocks`): the core's `fit` weighted by `importance [K]` (as `-imat`) on the block's
    columns as the errors of every earlier column have updated them, rounded to fp16 (the stored scale), then
    the block's codes chosen on it by GPTQ (`factor`: the inputs' Hessian Cholesky factor). `refit`: then each
    row's scales refitted to those codes (`lfm_export.rounding.refit_scales`)."""
    n, k = w.shape
    half = 2 ** (bits - 1)
    scales = np.empty((n, k // QK), np.float32)
    imp = None if importance is None else np.asarray(importance, np.float32).reshape(k)

    def fit(cols: np.ndarray, c0: int) -> tuple[np.ndarray, None]:
        weights = None if imp is None else imp[c0 : c0 + QK]
        s = _f16(quantize_block(cols, bits, QK, True, "fit", threads, weights).scales)
        scales[:, c0 // QK] = s[:, 0]
        return np.repeat(s, QK, -1), None

    codes = gptq_on_blocks(w, QK, fit, -half, half - 1, factor, threads)
    if refit:
        scales = refit_scales(w, [codes.astype(np.float32)], QK, scales[..., None], factor)[..., 0]
    return Quantized((codes + half).astype(np.uint8), scales, None, bits, QK)


GPTQ = ("gptq", "gptq-blocks", "gptq-nols")
"""GPTQ roundings on ggml's blocks: `gptq` (the recipe suffix `-gptq`) chooses the codes on the `-imat` scales
fitted to the original weights beforehand (`on_block_grid`, `lfm_export.rounding.gptq_on_grid`). Two forms
that `benchmarks/gguf_rounding_sim.py` compares it with and no recipe names: `gptq-blocks` fits each block's
scales on the columns as the sweep has updated them, then refits each row's scales to the codes the sweep chose
(`gptq_blocks`); `gptq-nols` without that refit. Their KL against llama.cpp's was not lower than `gptq`'s
beyond what a 20% change of GPTQ's damping moves it (docs/backends/gguf.md), and the refit costs several
times the sweep at LFM2-1.2B's shapes, so `-gptq` keeps the fixed grid."""


def quantize(
    w: np.ndarray,
    bits: int,
    rounding: str = "nearest",
    threads: int = DEFAULT_THREADS,
    importance: np.ndarray | None = None,
    factor: Factor | None = None,
) -> np.ndarray:
    """`w [N, K]` as ggml bytes: the core quantizer's symmetric codes in blocks of 32 (`rounding` its search;
    `imat` is the core's `fit` weighted by `importance [K]`, the calibrated inputs' mean square; `gptq` the
    `imat` scales with the codes chosen on them by GPTQ (`on_block_grid`),
    `factor` the inputs' Hessian Cholesky factor, None for a weight the calibration did not see (its `-imat`
    blocks); `gptq-blocks`, `gptq-nols`: see `GPTQ`), packed as Q8_0 (`bits` 8) or Q4_0 (4)."""
    if rounding in ("gptq-blocks", "gptq-nols") and factor is not None:
        return pack(gptq_blocks(w, bits, importance, factor, threads, rounding == "gptq-blocks"))
    if rounding in ("fit", "imat", *GPTQ):
        q = quantize_block(w, bits, QK, True, "fit", threads, importance)
        if rounding == "gptq" and factor is not None:
            q = on_block_grid(w, q, factor, threads)
        return pack(q)
    return pack(quantize_block(w, bits, QK, True, rounding, threads))


def held_values(
    w: np.ndarray,
    bits: int,
    rounding: str = "nearest",
    threads: int = DEFAULT_THREADS,
    importance: np.ndarray | None = None,
    factor: Factor | None = None,
) -> np.ndarray:
    """The float32 values a GGUF artifact holds for `w` at `bits`: `quantize` then ggml's dequantization."""
    return dequantize(quantize(w, bits, rounding, threads, importance, factor), BY_BITS[bits])
