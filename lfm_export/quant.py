"""The one block quantizer, and a torch model that computes what a quantized artifact computes.

Every backend packs its weights from `quantize_block`, and `simulate` builds its reference from the same call, so
an artifact can be checked for *exactness* (same weights, same activation rounding) as well as for closeness to
the float model.

Rounding choices, all of them (numpy, float32 arithmetic, `np.rint` = round half to even):
- Blocks run along each weight's input dimension K (`w [N, K]`, `K / block_size` blocks per row).
- symmetric (default): the value of largest magnitude `m` in the block maps to the most negative code:
  `scale = m / -2^(bits-1)` (negative when `m` is positive), `q = clip(rint(w / scale), -2^(bits-1),
  2^(bits-1) - 1)`, stored unsigned as `q + 2^(bits-1)` (the implicit zero point of MatMulNBits /
  GatherBlockQuantized). All 2^bits codes are used; the opposite extreme can clip by at most one step.
  An all-zero block gets scale 0 and code 2^(bits-1).
- asymmetric: the block's range `[min(lo, 0), max(hi, 0)]`, `scale = (hi - lo) / (2^bits - 1)`,
  `zero_point = clip(rint(-lo / scale), 0, 2^bits - 1)`, `q = clip(rint(w / scale) + zero_point, 0,
  2^bits - 1)`.
- `rounding="mse"`: the same formulas with the block's extremes shrunk by a factor `f` from `MSE_GRIDS`
  (int4 0.70 ... 1.00, int8 0.97 ... 1.00), `f` chosen per block to minimise the block's squared error
  `sum((w - deq)^2)`. `f = 1` (plain rounding) is tried first and only a strictly smaller error replaces it,
  so the search is never worse than `nearest` on any block. It is not the default: on the bundled models
  it helps as often as it hurts (ONNX int4, accuracy_level 4, the parity gate's pooled KL mean / top-1
  decisive over 444 positions): tiny b32 0.042 / 0.987 -> 0.029 / 0.968, b64 0.046 / 0.981 ->
  0.062 / 0.977, b128 0.077 / 0.939 -> 0.067 / 0.958; tiny-moe b32 0.045 / 0.953 -> 0.049 / 0.963, b64
  0.100 / 0.922 -> 0.055 / 0.956, b128 0.067 / 0.956 -> 0.066 / 0.946. Weighting the error by the
  activations' second moments (tried, not kept) was mixed as well. It costs 16 s on LFM2-350M's weights
  (int4-b32) against 2.5 s for plain rounding.
- calibrated roundings (`-imat`, `-gptq`, `lfm_export.recipes.CALIBRATED_ROUNDINGS`): `quantize_weight`
  reads their codes and scales, made by `lfm_export.rounding` from a calibration pass, from the active
  `lfm_export.calibrated` table (by row content); rows it does not hold are rounded plainly.
- `dequantize()`: `(code - zero_point) * scale` in float32.

Activation rounding (`simulate(..., activations=...)`), the inputs of every quantized linear; one mode for all,
or per role (`{"linears": ..., "experts": ...}`, `ROLES`) where a runtime treats MoE experts differently
(`"head"`, the lm_head, may be given too: a runtime that holds it in another type, e.g. llama.cpp's Q6_K output
in a Q4_0 file; without it the lm_head takes the `"linears"` mode), and per tensor (a checkpoint weight name as
a key, over its role's mode) where a runtime's rounding follows each tensor's own type (GGUF: Q8_0 blocks into
a Q8_0 `attn_k`, Q8_K into the Q4_K linears beside it):
- `ACT_FLOAT`: none (what MatMulNBits computes at accuracy_level 0, QDQ + MatMul, and every float recipe).
- `ACT_INT8_BLOCK`: onnxruntime's MatMulNBits at accuracy_level 4 on CPU (MLAS `QuantizeARow_CompInt8`,
  read from its AVX2 kernel): per row, per block of `block_size` along K, symmetric int8 with
  `scale = amax / 127` and codes `rint(a * (127 / amax))` (the reciprocal is taken first, in float32);
  the integer block dot products are scaled by `scale_a * scale_w` and summed in float32. One op at a time,
  fed the inputs `tiny` computes on text, this is onnxruntime 1.32's result to float32 summation order (7.3e-7
  of the output scale at 4 and 8 bits, blocks 32 to 128; `benchmarks/a8_exactness.py`), measured with MLAS's
  AVX2 kernel (`vpmaddubsw`, u8 x s8 pairs summed in int16: no saturation showed) on a CPU with neither VNNI
  nor AVX-512; their kernels (`vpdpbusd`) form the same integers and sum the float partials in another order
  (not measured). Through a whole model the artifact's own float32 order flips a code that sits on a rounding
  boundary now and then, and the flip grows through the next layers' rounding, so run as usual the match is
  statistical (tiny int4-b32: KL 7e-6 against the artifact, 75x closer than the weight-only simulation);
  `BoundaryCodes` lets a caller resolve those codes, which makes it exact (`lfm_export.parity.boundary`).
- `ACT_INT8_TOKEN`: dynamic per-token asymmetric int8 (torchao's `8da4w` / ExecuTorch XNNPACK):
  per row, range `[min(lo, 0), max(hi, 0)]`, `scale = max(range / 255, eps)`,
  `zero_point = clip(-128 - rint(lo / scale), -128, 127)`, `q = clip(rint(a / scale) + zero_point,
  -128, 127)`. Written from torchao's description; one XNNPACK 8da4w linear run by ExecuTorch 1.5.1 matches
  it within 3.6e-7 (output scale 1.9) given the weights XNNPACK holds (`tests/test_executorch.py`). Through a
  whole model the same boundary flips cascade; resolved (`BoundaryCodes`), ExecuTorch 8da4w `tiny` is within
  4.4e-7 at every position.
- `ACT_FP16`: the input of every linear but the MoE router rounded to fp16, in float recipes too (Core ML
  programs compute in fp16; the rest of their fp16 rounding is left to the `-fp16` parity gates, which widen
  to twice what this rounding itself does, as the int8-activation gates do: on MoE models an expert whose
  score ties another's within fp16 rounding is chosen differently now and then (`ACT_FP16_ROUTED`, whose gate
  judges those positions apart by the simulation's router margin, `lfm_export.parity.expert_ties`):
  measured on `tiny-moe` int8, one position with logit error 5e-2 relative against this simulation, 1.2e-3
  against the same model run in fp16 by torch, which flips elsewhere itself).
- `ACT_GGML_Q8_0`: llama.cpp's CPU kernels quantize the input of a Q8_0 / Q4_0 matmul to Q8_0 blocks (32 values,
  codes `rint(a * (127 / amax))`, scale `amax / 127` stored as fp16): `fake_quant_q8_0`.
- `ACT_BF16`: llama.cpp's CPU rounds the input of a BF16 matmul to bf16 (ggml-cpu's type traits: `vec_dot_type`
  of `GGML_TYPE_BF16` is BF16, converted by `ggml_cpu_fp32_to_bf16`, round to nearest even), every linear but
  the MoE router (F32 in a GGUF file), as `ACT_FP16` does for fp16: `x.bfloat16()` (torch rounds to nearest
  even too). The products of two bf16 values are exact in float32, so only the summation order differs.
- `ACT_GGML_K`: the input of a K-quant matmul (Q4_K / Q5_K / Q6_K, rows a multiple of 256) goes to Q8_K blocks
  (`fake_quant_q8_k`). Which linear is a K-quant is its ggml type, which the GGUF backend gives per tensor
  (the 32-value types beside it, Q5_0 / Q8_0, take `ACT_GGML_Q8_0`).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfm_export import calibrated
from lfm_export.contract.session import DEFAULT_THREADS
from lfm_export.precision import LM_HEAD, ROUTER, block_as, held_as, rule_for
from lfm_export.recipes import (
    ACT_BF16,
    ACT_FLOAT,
    ACT_FP16,
    ACT_FP16_ROUTED,
    ACT_GGML_K,
    ACT_GGML_Q8_0,
    ACT_INT8_BLOCK,
    ACT_INT8_TOKEN,
    ACT_NATIVE,
    ACTIVATION_MODES,
    CALIBRATED_ROUNDINGS,
    ROUNDINGS,
    Recipe,
)

CHUNK_ELEMENTS = 1 << 23
"""Plain rounding works on row chunks of about this many weights (32 MiB of float32)."""
MSE_CHUNK_ELEMENTS = 1 << 20
"""The rounding search keeps a few chunk-sized temporaries per candidate, per thread: smaller chunks."""
MSE_GRIDS = {
    2: tuple(round(1.0 - 0.025 * i, 4) for i in range(21)),
    3: tuple(round(1.0 - 0.02 * i, 4) for i in range(21)),
    4: tuple(round(1.0 - 0.015 * i, 4) for i in range(21)),
    8: tuple(round(1.0 - 0.0015 * i, 4) for i in range(21)),
}
"""Shrink factors of the block's extremes tried by `rounding="mse"` (and the calibrated searches of
`lfm_export.rounding`), 21 per bit width: int2 and int3 (a precision mix's, `lfm_export.recipes.MIX_BITS`)
1.00 ... 0.50 and 1.00 ... 0.60 (not tuned: int4's range widened with the coarser step), int4 1.00 ... 0.70, int8 1.00 ... 0.97 (a 1.5% shrink already clips an int8 extreme by two steps, more than the rounding it saves).
Measured on Student-t (4 dof) weights `[1024, 1024]`, block 64, weight squared error against plain rounding:
int4 -9.0% (symmetric) / -6.4% (asymmetric), int8 -1.9% / -1.6%."""


FLOAT_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16}
ROLES = ("linears", "experts", "head")
"""Roles of `simulate`'s per-role activation modes: MoE expert linears (`.experts.` in the name), the lm_head
(the precision rules' `LM_HEAD`; optional in a per-role spec, default the `"linears"` mode), every other. Any
other key of a per-role spec is a checkpoint weight name whose mode it gives (`activation_mode`)."""
REQUIRED_ROLES = ROLES[:2]
ActivationSpec = str | dict[str, str]


# ---- numpy quantizer -------------------------------------------------------------------------------------------


@dataclass
class Quantized:
    """A `[N, K]` weight quantized along K: unsigned codes `[N, K]` (uint8), scales `[N, K/bs]` (float32), zero
    points `[N, K/bs]` (uint8) or None (symmetric: the implicit `2^(bits-1)`)."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int

    def dequantize(self) -> np.ndarray:
        n, k = self.codes.shape
        zp = (
            self.zero_points
            if self.zero_points is not None
            else np.full_like(self.scales, 2 ** (self.bits - 1))
        )
        blocks = self.codes.reshape(n, k // self.block_size, self.block_size).astype(np.float32)
        return ((blocks - zp[..., None].astype(np.float32)) * self.scales[..., None]).reshape(n, k)


def quantize_block(
    w: np.ndarray,
    bits: int,
    block_size: int,
    symmetric: bool = True,
    rounding: str = "nearest",
    threads: int = DEFAULT_THREADS,
    importance: np.ndarray | None = None,
) -> Quantized:
    """Block-wise quantize `w [N, K]` along K (float16/bfloat16/float32 in, float32 scales out).

    `importance [K]` (per input channel, e.g. the inputs' mean square) weighs the error `rounding="fit"`
    minimises; the other roundings take none. Rows are independent, so row chunks run on `threads` threads
    (numpy releases the GIL) and the result does not depend on the thread count or the chunking."""
    if rounding not in ROUNDINGS or rounding in CALIBRATED_ROUNDINGS:
        raise ValueError(f"rounding {rounding!r}; expected nearest or mse (calibrated ones: quantize_weight)")
    n, k = w.shape
    if k % block_size:
        raise ValueError(f"block size {block_size} does not divide {k}")
    nb = k // block_size
    codes = np.empty((n, k), np.uint8)
    scales = np.empty((n, nb), np.float32)
    zps = None if symmetric else np.empty((n, nb), np.uint8)
    if importance is not None and rounding != "fit":
        raise ValueError(f"rounding {rounding!r} takes no importance (fit does)")
    grid = MSE_GRIDS[bits] if rounding == "mse" else (1.0,)
    step = max(1, (CHUNK_ELEMENTS if rounding == "nearest" else MSE_CHUNK_ELEMENTS) // k)
    weights = None if importance is None else np.asarray(importance, np.float32).reshape(nb, block_size)

    def work(r0: int) -> None:
        r1 = min(n, r0 + step)
        blocks = np.asarray(w[r0:r1], dtype=np.float32).reshape(r1 - r0, nb, block_size)
        if rounding == "fit":
            c, s, z = _fit(blocks, bits, symmetric, weights)
        else:
            c, s, z = _search(blocks, bits, symmetric, grid)
        codes[r0:r1] = c.reshape(r1 - r0, k)
        scales[r0:r1] = s
        if zps is not None:
            zps[r0:r1] = z

    run_chunks(work, range(0, n, step), threads)
    return Quantized(codes, scales, zps, bits, block_size)


def run_chunks(work: Callable[[int], None], starts: range, threads: int) -> None:
    """`work(r0)` for every row chunk start, on `threads` threads where there is more than one chunk (numpy
    releases the GIL in the elementwise work of a chunk)."""
    if threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(min(threads, len(starts))) as pool:
            list(pool.map(work, starts))
    else:
        for r0 in starts:
            work(r0)


def _search(
    blocks: np.ndarray, bits: int, symmetric: bool, grid: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Codes, scales and zero points of `blocks [R, nb, bs]` for the best shrink factor in `grid` per block
    (the first factor, 1.0, wins ties)."""
    quantize = _symmetric if symmetric else _asymmetric
    if len(grid) == 1:
        return quantize(blocks, bits)
    best_err: np.ndarray | None = None
    best = np.empty(blocks.shape[:-1], np.float32)
    extremes = _extremes(blocks, symmetric)
    for f in grid:
        shrink = np.float32(f)
        err = _squared_error(blocks, bits, symmetric, shrink, extremes)
        if best_err is None:
            best_err, best[...] = err, shrink
            continue
        better = err < best_err
        np.copyto(best_err, err, where=better)
        best[better] = shrink
    return quantize(blocks, bits, best, extremes)


def _squared_error(
    blocks: np.ndarray, bits: int, symmetric: bool, shrink: np.float32, extremes: tuple[np.ndarray, ...]
) -> np.ndarray:
    """Per block `sum((w - dequantize(quantize(w)))^2)`, computed in place (one chunk-sized temporary)."""
    if symmetric:
        half = 2 ** (bits - 1)
        scale, safe = _symmetric_scale(blocks, bits, shrink, extremes)
        t = blocks / safe[..., None]
        np.rint(t, out=t)
        np.clip(t, -half, half - 1, out=t)
    else:
        scale, safe, zp = _asymmetric_scale(blocks, bits, shrink, extremes)
        t = blocks / safe[..., None]
        np.rint(t, out=t)
        t += zp[..., None]
        np.clip(t, 0, 2**bits - 1, out=t)
        t -= zp[..., None]
    t *= scale[..., None]
    t -= blocks
    np.square(t, out=t)
    return t.sum(-1)


def _extremes(blocks: np.ndarray, symmetric: bool) -> tuple[np.ndarray, ...]:
    """Symmetric: the value of largest magnitude per block; asymmetric: the range widened to include 0."""
    if symmetric:
        idx = np.abs(blocks).argmax(-1)
        return (np.take_along_axis(blocks, idx[..., None], -1)[..., 0],)
    return np.minimum(blocks.min(-1), 0.0), np.maximum(blocks.max(-1), 0.0)


def _symmetric_scale(
    blocks: np.ndarray, bits: int, shrink: np.ndarray | np.float32 | None = None, extremes: tuple = ()
) -> tuple[np.ndarray, np.ndarray]:
    (extreme,) = extremes or _extremes(blocks, True)
    if shrink is not None:
        extreme = extreme * shrink
    scale = (extreme / -(2 ** (bits - 1))).astype(np.float32)
    return scale, np.where(scale == 0, 1.0, scale).astype(np.float32)


def _asymmetric_scale(
    blocks: np.ndarray, bits: int, shrink: np.ndarray | np.float32 | None = None, extremes: tuple = ()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    top = 2**bits - 1
    lo, hi = extremes or _extremes(blocks, False)
    if shrink is not None:
        lo, hi = lo * shrink, hi * shrink
    scale = ((hi - lo) / top).astype(np.float32)
    safe = np.where(scale == 0, 1.0, scale).astype(np.float32)
    return scale, safe, np.clip(np.rint(-lo / safe), 0, top)


def _symmetric(
    blocks: np.ndarray, bits: int, shrink: np.ndarray | None = None, extremes: tuple = ()
) -> tuple[np.ndarray, np.ndarray, None]:
    half = 2 ** (bits - 1)
    scale, safe = _symmetric_scale(blocks, bits, shrink, extremes)
    q = np.clip(np.rint(blocks / safe[..., None]), -half, half - 1)
    return (q + half).astype(np.uint8), scale, None


def _asymmetric(
    blocks: np.ndarray, bits: int, shrink: np.ndarray | None = None, extremes: tuple = ()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    top = 2**bits - 1
    scale, safe, zp = _asymmetric_scale(blocks, bits, shrink, extremes)
    q = np.clip(np.rint(blocks / safe[..., None]) + zp[..., None], 0, top)
    return q.astype(np.uint8), scale, zp.astype(np.uint8)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """4-bit codes paired along the last axis, first in the low nibble (odd lengths padded with 0)."""
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), codes.dtype)], -1)
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)


def quantize_weight(
    w: np.ndarray,
    recipe: Recipe,
    bits: int | None = None,
    threads: int = DEFAULT_THREADS,
    block: int | None = None,
) -> Quantized:
    """`quantize_block` with the recipe's block size, symmetry and rounding (`bits` defaults to the recipe's,
    `block` to the recipe's block for the weight's K; a mix gives both per tensor: `precision.held_as` /
    `precision.block_as`): the call every backend packs from and `simulate` dequantizes. A calibrated rounding
    (`CALIBRATED_ROUNDINGS`) reads its codes and scales from the active `lfm_export.calibrated` table; rows the
    table does not hold are rounded plainly."""
    chosen = recipe.bits if bits is None else bits
    if chosen is None:
        raise ValueError(f"recipe {recipe.name} quantizes no weights")
    block = block or recipe.block_for(int(np.shape(w)[-1]))
    if recipe.rounding not in CALIBRATED_ROUNDINGS:
        return quantize_block(w, chosen, block, recipe.symmetric, recipe.rounding, threads)
    plain = quantize_block(w, chosen, block, recipe.symmetric, "nearest", threads)
    hit = calibrated.lookup(np.asarray(w), chosen, block, recipe.rounding)
    if hit is not None:
        codes, scales, found = hit
        plain.codes[found], plain.scales[found] = codes[found], scales[found]
    return plain


# ---- least-squares fit (`rounding="fit"`, and the format-aware searches built on it) ---------------------------

FIT_STEPS = tuple(round(-1.0 + 0.2 * i, 1) for i in range(11))
"""Offsets `t` of the candidate inverse scales the fit tries: symmetric `(-2^(bits-1) - t) / m` (`m` the value
of largest magnitude, with its sign), asymmetric `(2^bits - 1 + t) / (max - min)`. Chosen on Student-t (4 dof)
weights `[64, 512]` against llama.cpp's reference quantizers (`ggml_quantize_chunk`), squared error ours /
theirs: -1.0 ... 1.0 in 11 steps gives Q4_K 0.957, Q6_K 0.949, Q4_0 0.919; -0.6 ... 0.6 in 13 steps 0.962,
0.961, 0.920; -0.9 ... 0.9 in 19 steps 0.957, 0.951, 0.919."""
FIT_ITERATIONS = 2
"""Alternations (codes for the fitted scale, then the scale refitted to those codes) after the candidates."""


def _wsum(a: np.ndarray, w: np.ndarray | None) -> np.ndarray:
    return (a if w is None else a * w).sum(-1)


def _f16(x: np.ndarray) -> np.ndarray:
    """`x` rounded to the nearest fp16 value, as float32."""
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def _codes_for(x: np.ndarray, step: np.ndarray, low: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """`clip(rint((x - low) / step), lo, hi)` per block (`step`, `low` `[...]`, `x` `[..., bs]`), `lo` where
    the step is 0 (the block is `low` throughout). Float32, computed in one new array."""
    zero = step == 0
    q = np.subtract(x, low[..., None], dtype=np.float32)
    np.divide(q, np.where(zero, np.float32(1), step)[..., None], out=q)
    np.rint(q, out=q)
    np.clip(q, lo, hi, out=q)
    if zero.any():
        q[zero] = np.float32(lo)
    return q


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`sum(a * b)` over the last axis, without the product's temporary."""
    return np.einsum("...i,...i->...", a, b)


@dataclass
class _Moments:
    """Per-block sums of `fit_blocks` that do not depend on the codes: `xw = x * w`, `sum(w x^2)`, `sum(w)`,
    `sum(w x)`."""

    x: np.ndarray
    w: np.ndarray | None
    xw: np.ndarray
    sxx: np.ndarray
    sw: np.ndarray
    sx: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray, w: np.ndarray | None) -> _Moments:
        xw = x if w is None else x * w
        sw = (
            np.full(x.shape[:-1], x.shape[-1], np.float32)
            if w is None
            else np.broadcast_to(w, x.shape).sum(-1)
        )
        return cls(x, w, xw, _dot(x, xw), sw.astype(np.float32), xw.sum(-1))


def _ls(
    mo: _Moments, q: np.ndarray, affine: bool, out: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least squares of `x ~ s * q (+ low)`, `low <= 0` (refit with `low = 0` when the free fit is
    positive): (s, low, weighted squared error) per block, each a new array. `out`: room for `q * w`."""
    qw = q if mo.w is None else np.multiply(q, mo.w, out=out)
    sqq, sxq = _dot(qw, q), _dot(q, mo.xw)
    safe = np.where(sqq == 0, np.float32(1), sqq)
    s0 = np.where(sqq == 0, 0, sxq / safe).astype(np.float32)
    if not affine:
        return s0, np.zeros_like(s0), np.maximum(mo.sxx - s0 * sxq, 0)
    # unweighted, `sum(q)` sums integers far below 2^24: exact in any order, so a matrix-vector product (several
    # times faster than numpy's reduction over a short axis) gives the very same value
    sq = qw.sum(-1) if mo.w is not None else q @ np.ones(q.shape[-1], np.float32)
    sw, sx = mo.sw, mo.sx
    det = sw * sqq - sq * sq
    ok = det > 1e-12 * np.maximum(sw * sqq, 1e-30)
    safe_det = np.where(ok, det, np.float32(1))
    s = np.where(ok, (sw * sxq - sx * sq) / safe_det, s0)
    low = np.where(ok, (sqq * sx - sq * sxq) / safe_det, 0)
    pos = low > 0
    s, low = np.where(pos, s0, s).astype(np.float32), np.where(pos, 0, low).astype(np.float32)
    err = mo.sxx - 2 * s * sxq - 2 * low * sx + s * s * sqq + 2 * s * low * sq + low * low * sw
    return s, low, np.maximum(err, 0)


def fit_blocks(
    x: np.ndarray, bits: int, symmetric: bool, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes `q` (float32 integers), scales `s` and offsets `low` (`<= 0`; 0 when symmetric) of blocks `x
    [..., bs]` with `x ~ s * q + low`, chosen to minimise the weighted squared error `sum(weights * (x - s * q -
    low)^2)` (`weights` broadcast to `x`, None: 1). Codes: symmetric `-2^(bits-1) .. 2^(bits-1) - 1`,
    asymmetric `0 .. 2^bits - 1`.

    Each candidate inverse scale of `FIT_STEPS` rounds the block to codes, and the scale (and offset) is refitted
    to those codes by weighted least squares; the best fit is kept, then refined by `FIT_ITERATIONS` rounds of
    codes for the fitted scale and a refit (neither step raises the error). The scale is float (a format that
    stores it coarser quantizes it and refits, e.g. `fit_super_blocks`); the codes are the nearest for it."""
    x = np.asarray(x, np.float32)
    s, low = _fit_scales(x, bits, symmetric, weights)
    lo, hi = _code_range(bits, symmetric)
    return _codes_for(x, s, low, lo, hi), s, low


def _code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def _fit_scales(
    x: np.ndarray, bits: int, symmetric: bool, weights: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The scales and offsets of `fit_blocks` (callers that round the codes against stored scales of their own
    need no codes for the float ones)."""
    x = np.asarray(x, np.float32)
    w = None if weights is None else np.asarray(weights, np.float32)
    mo = _Moments.of(x, w)
    lo, hi = _code_range(bits, symmetric)
    if symmetric:
        idx = np.abs(x).argmax(-1)[..., None]
        m = np.take_along_axis(x, idx, -1)[..., 0]
        span, base, shifted = np.where(m == 0, np.float32(1), m), np.float32(lo), x
    else:
        start = np.minimum(x.min(-1), 0).astype(np.float32)
        width = x.max(-1) - start
        span, base, shifted = np.where(width == 0, np.float32(1), width), np.float32(hi), x - start[..., None]
    q = np.empty_like(x)
    qw = None if w is None else np.empty_like(x)
    best: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    for t in FIT_STEPS:
        inv = (base - np.float32(t) if symmetric else base + np.float32(t)) / span
        np.multiply(shifted, inv[..., None], out=q)
        np.rint(q, out=q)
        _clip_codes(q, t, symmetric, lo, hi)
        fit = _ls(mo, q, not symmetric, qw)
        if best is None:
            best = fit
            continue
        _keep_better(best, fit)
    assert best is not None
    for _ in range(FIT_ITERATIONS):
        q = _codes_for(x, best[0], best[1], lo, hi)
        _keep_better(best, _ls(mo, q, not symmetric, qw))
    return best[0], best[1]


def _clip_codes(q: np.ndarray, t: float, symmetric: bool, lo: int, hi: int) -> None:
    """`clip(q, lo, hi)` in place for the rounded codes of `FIT_STEPS` offset `t`, skipping the sides no code can
    pass: `|x| <= |m|` (symmetric) and `0 <= x - start <= width` (asymmetric) bound the scaled values by `|lo - t|`
    and `hi + t` (times 1 + 2^-23), so with `|t| <= 0.45` their rounding stays within the codes on that side
    (symmetric: below, and above too where `t <= -0.55`, `|lo| - 1` being `hi`). The result is `clip`'s (a
    code equal to -0.0 can stay -0.0, which changes no sum but an all-zero one, and those blocks' fits do not
    read it)."""
    if symmetric:
        if t <= -0.55:
            return
        if t <= 0.45:
            np.minimum(q, hi, out=q)
            return
    elif t <= 0.45:
        return
    np.clip(q, lo, hi, out=q)


def _keep_better(best: tuple[np.ndarray, ...], fit: tuple[np.ndarray, ...]) -> None:
    """`best[i] = where(fit's error < best's, fit[i], best[i])` in place (the error last)."""
    better = fit[-1] < best[-1]
    for a, b in zip(fit, best):
        np.copyto(b, a, where=better)


def _fit(
    blocks: np.ndarray, bits: int, symmetric: bool, weights: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`rounding="fit"` in the core's format: `fit_blocks`, the scale rounded to fp16 (every format here stores
    scales in fp16 or wider, so the stored scale is the one the codes are rounded against), asymmetric blocks
    their offset rounded to an integer zero point, then the scale refitted to the codes and the codes rounded
    again against it (kept where that lowers the error)."""
    s, low = _fit_scales(blocks, bits, symmetric, weights)
    if symmetric:
        half = 2 ** (bits - 1)
        s = _f16(s)
        q = _codes_for(blocks, s, np.zeros_like(s), -half, half - 1)
        return (q + half).astype(np.uint8), s, None
    top = 2**bits - 1
    s = _f16(s)
    zp = np.clip(np.rint(-low / np.where(s == 0, np.float32(1), s)), 0, top).astype(np.float32)
    moments = _Moments.of(blocks, weights)
    best: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    for _ in range(2):
        q = _codes_for(blocks, s, -zp * s, 0, top) - zp[..., None]
        r = q * s[..., None] - blocks
        err = _wsum(r * r, weights)
        if best is None:
            best = (q, s, err)
        else:
            b = err < best[2]
            best = (np.where(b[..., None], q, best[0]), np.where(b, s, best[1]), np.where(b, err, best[2]))
        refit, _, _ = _ls(moments, q, False)
        s = _f16(np.maximum(refit, 0))
    q, s, _ = best
    return (q + zp[..., None]).astype(np.uint8), s, zp.astype(np.uint8)


@dataclass
class SuperBlocks:
    """Two-level scales of `fit_super_blocks`: per super-block `d` (and `dmin`, asymmetric), fp16 values as
    float32 `[..., nsb]`; per sub-block integer scale codes `sc` (and min codes `mc`) `[..., nsb, nsub]`; codes
    `q` `[..., nsb, nsub, sub]`. Value: `d * sc * q - dmin * mc` (symmetric: `d * sc * q`)."""

    d: np.ndarray
    dmin: np.ndarray | None
    sc: np.ndarray
    mc: np.ndarray | None
    q: np.ndarray

    def values(self) -> np.ndarray:
        v = (self.d[..., None] * self.sc)[..., None] * self.q
        if self.dmin is not None and self.mc is not None:
            v = v - (self.dmin[..., None] * self.mc)[..., None]
        return v.astype(np.float32)


def fit_super_blocks(
    x: np.ndarray,
    bits: int,
    symmetric: bool,
    sub: int,
    weights: np.ndarray | None = None,
    rounds: int = 2,
    scale_bits: int = 8,
) -> SuperBlocks:
    """ggml's K-quant scales for super-blocks `x [..., nsb, 256]`: sub-blocks of `sub` values, each with an
    integer scale code against the super-block's fp16 `d` (asymmetric: unsigned 6-bit scale and min codes
    against `d` and `dmin`; symmetric: signed `scale_bits`-bit scale codes, 8 for Q6_K, 6 for Q3_K), the codes
    `bits` wide.

    The sub-blocks are fitted in float first (`fit_blocks`, weighted by `weights`), which sets `d` (`dmin`) from
    the largest scale (min) at the top code. Then, `rounds` times: each sub-block tries the stored scale
    (and min) codes either side of its float fit, its codes rounded against the values the file holds, and
    keeps the pair of least weighted error; `d` (and `dmin`) are refitted by least squares to those codes and
    rounded to fp16. The error is always measured on what the file holds, so the stored scale codes are the
    ones the search assumed; the best round per super-block is kept.

    Every temporary the size of `x` is computed in place (the arithmetic, and so every value, is that of the
    plain expressions in the comments): the K-quant export of a 1.2B model spends most of its time here."""
    x = np.asarray(x, np.float32)
    lead = x.shape[:-1]
    nsub = x.shape[-1] // sub
    xs = x.reshape(*lead, nsub, sub)
    ws = (
        None
        if weights is None
        else np.broadcast_to(np.asarray(weights, np.float32), x.shape).reshape(xs.shape)
    )
    s, low = _fit_scales(xs, bits, symmetric, ws)
    lo, hi = _code_range(bits, symmetric)
    if symmetric:
        c_lo, c_hi = -(2 ** (scale_bits - 1)), 2 ** (scale_bits - 1) - 1
        top = np.take_along_axis(s, np.abs(s).argmax(-1)[..., None], -1)[..., 0]
        d = _f16(top / np.float32(c_lo))
        dmin, m = None, None
    else:
        c_lo, c_hi = 0, 63
        d = _f16(s.max(-1) / np.float32(c_hi))
        m = -low
        dmin = _f16(m.max(-1) / np.float32(c_hi))
    room = np.empty_like(xs)

    def err_of(q: np.ndarray, step: np.ndarray, off: np.ndarray) -> np.ndarray:
        # _wsum(r * r, ws) of r = step * q - off - xs
        np.multiply(step[..., None], q, out=room)
        np.subtract(room, off[..., None], out=room)
        np.subtract(room, xs, out=room)
        np.square(room, out=room)
        if ws is not None:
            np.multiply(room, ws, out=room)
        return room.sum(-1)

    def neighbours(target: np.ndarray, unit: np.ndarray) -> list[np.ndarray]:
        safe = np.where(unit == 0, np.float32(1), unit)[..., None]
        c = np.floor(target / safe)
        return [np.clip(c + k, c_lo, c_hi).astype(np.float32) for k in (0, 1)]

    best: SuperBlocks | None = None
    best_err: np.ndarray | None = None
    rounds = max(1, rounds)
    for n_round in range(rounds):
        pick_err = pick_sc = pick_mc = pick_q = None
        mins = neighbours(m, dmin) if m is not None else [None]
        for sc in neighbours(s, d):
            for mc in mins:
                step = d[..., None] * sc
                off = np.zeros_like(step) if mc is None else dmin[..., None] * mc
                q = _codes_for(xs, step, -off, lo, hi)
                e = err_of(q, step, off)
                if pick_err is None:
                    pick_err, pick_sc, pick_mc, pick_q = e, sc, mc, q
                    continue
                b = e < pick_err
                pick_err = np.where(b, e, pick_err)
                pick_sc = np.where(b, sc, pick_sc)
                pick_mc = None if mc is None else np.where(b, mc, pick_mc)
                np.copyto(pick_q, q, where=b[..., None])
        assert pick_err is not None and pick_sc is not None and pick_q is not None
        total = pick_err.sum(-1)
        if best is None:
            best, best_err = SuperBlocks(d, dmin, pick_sc, pick_mc, pick_q), total
        else:
            b = total < best_err
            best = SuperBlocks(
                np.where(b, d, best.d),
                None if dmin is None else np.where(b, dmin, best.dmin),
                np.where(b[..., None], pick_sc, best.sc),
                None if pick_mc is None else np.where(b[..., None], pick_mc, best.mc),
                best.q,
            )
            np.copyto(best.q, pick_q, where=b[..., None, None])
            best_err = np.where(b, total, best_err)
        if n_round == rounds - 1:
            break  # no round left to use a refit
        d, dmin = _refit_super(x, lead, sub, ws, pick_sc, pick_mc, pick_q, d, dmin, room)
    assert best is not None
    return best


def _refit_super(
    x: np.ndarray,
    lead: tuple[int, ...],
    sub: int,
    ws: np.ndarray | None,
    sc: np.ndarray,
    mc: np.ndarray | None,
    q: np.ndarray,
    d: np.ndarray,
    dmin: np.ndarray | None,
    room: np.ndarray,
) -> tuple[np.ndarray, np.ndarray | None]:
    """`fit_super_blocks`' least-squares refit of `d` (and `dmin`) over each super-block to the codes `q` and
    scale codes `sc` (min codes `mc`), rounded to fp16; `room`: a scratch array the size of `x`."""
    a = np.multiply(sc[..., None], q).reshape(*lead, -1)  # sc * q
    wf = None if ws is None else ws.reshape(*lead, -1)
    t = room.reshape(*lead, -1)

    def wsum(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        # _wsum(u * v, wf)
        np.multiply(u, v, out=t)
        if wf is not None:
            np.multiply(t, wf, out=t)
        return t.sum(-1)

    saa, sxa = wsum(a, a), wsum(x, a)
    if mc is None:
        return _f16(np.where(saa == 0, d, sxa / np.where(saa == 0, 1, saa))), None
    assert dmin is not None
    bm = np.repeat(mc, sub, -1)
    sab, sbb, sxb = wsum(a, bm), wsum(bm, bm), wsum(x, bm)
    det = saa * sbb - sab * sab
    ok = det > 1e-12 * np.maximum(saa * sbb, 1e-30)
    sd = np.where(ok, det, 1)
    nd = (sxa * sbb - sxb * sab) / sd
    nm = (sxa * sab - sxb * saa) / sd
    ok &= (nd >= 0) & (nm >= 0)
    return _f16(np.where(ok, nd, d)), _f16(np.where(ok, nm, dmin))


# ---- torch simulation ------------------------------------------------------------------------------------------


def fake_quant_int8_block(x: Tensor, block_size: int) -> Tensor:
    """`ACT_INT8_BLOCK`: symmetric int8 per block of `block_size` along the last axis (see the module doc)."""
    shape = x.shape
    blocks = x.float().reshape(*shape[:-1], shape[-1] // block_size, block_size)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax == 0, torch.zeros_like(amax), torch.full_like(amax, 127.0) / amax)
    scale = amax / 127.0
    return (torch.round(blocks * inv) * scale).reshape(shape).to(x.dtype)


def fake_quant_q8_0(x: Tensor) -> Tensor:
    """`ACT_GGML_Q8_0`: llama.cpp's CPU rounding of a Q8_0 / Q4_0 matmul's input (ggml-cpu `quantize_row_q8_0`,
    AVX2 form): per block of 32 along the last axis, codes `rint(x * (127 / amax))` (the reciprocal first, in
    float32; 0 for an all-zero block) times the scale `amax / 127` stored as fp16."""
    shape = x.shape
    blocks = x.float().reshape(*shape[:-1], shape[-1] // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax == 0, torch.zeros_like(amax), torch.full_like(amax, 127.0) / amax)
    scale = (amax / 127.0).half().float()
    return (torch.round(blocks * inv) * scale).reshape(shape).to(x.dtype)


def fake_quant_q8_k(x: Tensor) -> Tensor:
    """llama.cpp's CPU rounding of a K-quant matmul's input (`quantize_row_q8_K_ref`, which the x86 build
    calls): per block of 256 along the last axis, `m` the first value of largest magnitude (with its sign),
    codes `min(127, rint(x * (-127 / m)))` (the factor first, in float32), times the float32 scale
    `1 / (-127 / m)`; an all-zero block stays zero."""
    shape = x.shape
    blocks = x.float().reshape(*shape[:-1], shape[-1] // 256, 256)
    m = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    factor = torch.where(m == 0, torch.zeros_like(m), torch.full_like(m, -127.0) / m)
    scale = torch.where(m == 0, torch.zeros_like(m), 1.0 / factor)
    return (torch.round(blocks * factor).clamp(max=127) * scale).reshape(shape).to(x.dtype)


def fake_quant_int8_token(x: Tensor) -> Tensor:
    """`ACT_INT8_TOKEN`: dynamic per-token asymmetric int8 (see the module doc)."""
    xf = x.float()
    lo = xf.amin(-1, keepdim=True).clamp(max=0.0)
    hi = xf.amax(-1, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / 255.0).clamp(min=torch.finfo(torch.float32).eps)
    zp = (-128 - torch.round(lo / scale)).clamp(-128, 127)
    q = (torch.round(xf / scale) + zp).clamp(-128, 127)
    return ((q - zp) * scale).to(x.dtype)


def _role(name: str) -> str:
    """The `ROLES` entry of linear weight `name` (checkpoint name)."""
    if ".experts." in name:
        return "experts"
    return "head" if rule_for(name) is LM_HEAD else "linears"


def activation_modes(spec: ActivationSpec) -> dict[str, str]:
    """`spec` as a mode per role (a plain mode applies to every role), with its per-tensor modes (keys that are
    weight names) as given."""
    modes = dict.fromkeys(ROLES, spec) if isinstance(spec, str) else dict(spec)
    if set(REQUIRED_ROLES) <= set(modes):
        modes.setdefault("head", modes["linears"])
    tensors = set(modes) - set(ROLES)
    if (
        not set(ROLES) <= set(modes)
        or not all(k.endswith(".weight") for k in tensors)
        or not set(modes.values()) <= set(ACTIVATION_MODES)
    ):
        raise ValueError(
            f"activations {spec!r}; expected one of {ACTIVATION_MODES}, or one per role {ROLES} (and per "
            "weight name)"
        )
    return modes


def activation_mode(modes: dict[str, str], name: str) -> str:
    """The mode of linear weight `name` (checkpoint name) in `activation_modes`' result: its own, else its
    role's."""
    return modes.get(name) or modes[_role(name)]


BOUNDARY_MARGIN = 1e-5
"""`BoundaryCodes` lists an int8 activation code as undecided when its scaled value lies within this distance of
the point halfway between two codes, measured in the input's own units over the largest magnitude of the
input's row (the float32 differences between a runtime's inputs and the simulation's are relative to that: 2e-7
to 7e-7 for onnxruntime 1.32's MatMulNBits inputs against the simulation's, tiny int8-b32, traced by hand;
every honest flip resolved in benchmarks/results/a8_exactness.json sat within this margin). A block scale the
runtime stores in fp16 (llama.cpp's Q8_0 activation blocks) is undecided by the same measure: the block's
largest magnitude within this distance of the value whose scale lies halfway between two fp16 numbers."""

RESOLVABLE_MODES = (ACT_INT8_BLOCK, ACT_INT8_TOKEN, ACT_GGML_Q8_0, ACT_GGML_K)
"""Activation modes whose undecided codes (and fp16 block scales) `BoundaryCodes` lists and flips: the rounding
`lfm_export.parity.boundary` resolves."""


@dataclass(frozen=True)
class Boundary:
    """One undecided activation decision: `margin` (distance from the halfway point in the input's units over
    the row's largest magnitude), the linear's module name, the index into its flattened codes (`scale`: into
    its flattened block scales) and the value on the other side (a code, or the other fp16 scale)."""

    margin: float
    linear: str
    index: int
    code: float
    scale: bool = False


class BoundaryCodes:
    """Which way the int8 activation codes on a rounding boundary round, shared by a simulation's linears.

    A runtime that rounds activations to int8 computes every op's input in its own float32 order, 1e-7
    relative from the simulation's; where a scaled value sits that close to the halfway point between two codes,
    the runtime's code and the simulation's can differ by one. One such flip changes the op's output by one
    code step, the next layers' inputs by 1e-5 relative, which flips further codes there: within two or three
    layers the whole position, and through the KV cache every later one, differs by the size of the
    activation rounding itself (onnxruntime int8-b32 on tiny: the median position 2.6e-3 of the logit scale
    off). The simulation is exact op by op (7.3e-7); only these undecided codes are not given
    (benchmarks/results/a8_exactness.json). llama.cpp's Q8_0 blocks add a second kind: the block scale
    `amax / 127` is stored in fp16, and where it sits that close to the halfway point between two fp16 numbers
    the runtime's scale and the simulation's differ by one fp16 step, every value of the block with it
    (benchmarks/gguf_exactness_trace.py: the cause of every honest GGUF position the code flips alone left off).

    With `found` a list, every quantized linear appends the `Boundary` of each code (and fp16 scale) within
    `margin` of the halfway point; `flips` (module name -> `{flat index: code}`) sets codes to their other side,
    `scales` (module name -> `{flat block index: scale}`) block scales. Both apply to the next forward only as
    the caller arranges (`lfm_export.parity.boundary` steps one position at a time). Linears fed the same tensor
    (q/k/v, w1/w3, the w1/w3 of every expert a token is routed to) share one rounded input, as a runtime that
    fuses them does: a forward with `found` set names each by the first of them (`group`), and a flip applies to
    all."""

    def __init__(self, margin: float = BOUNDARY_MARGIN) -> None:
        self.margin = margin
        self.found: list[Boundary] | None = None
        self.flips: dict[str, dict[int, float]] = {}
        self.scales: dict[str, dict[int, float]] = {}
        self.group: dict[str, str] = {}
        self._inputs: list[tuple[Tensor, str]] = []

    def start(
        self,
        found: list[Boundary] | None,
        flips: dict[str, dict[int, float]],
        scales: dict[str, dict[int, float]] | None = None,
    ) -> None:
        """Set up the next forward: list undecided codes into `found` (None: do not), apply `flips` (codes)
        and `scales` (fp16 block scales)."""
        self.found, self.flips, self.scales, self._inputs = found, flips, scales or {}, []

    def stop(self) -> None:
        self.found, self.flips, self.scales, self._inputs = None, {}, {}, []

    @property
    def active(self) -> bool:
        return self.found is not None or bool(self.flips) or bool(self.scales)


@dataclass
class _Rounding:
    """One input's activation rounding taken apart (`_int8_codes`): scaled values, codes, each value's code step
    over its row's largest magnitude, the code range, the block scales (`[..., blocks, 1]`), and for scales
    stored in fp16 the float32 value each was rounded from (None: float32 scales, nothing undecided)."""

    scaled: Tensor
    codes: Tensor
    step: Tensor
    lo: float
    hi: float
    scale: Tensor
    exact_scale: Tensor | None
    values: Callable[[Tensor, Tensor], Tensor]
    """(codes, scales) -> the rounded input in the input's shape and type."""


def _int8_codes(x: Tensor, mode: str, block_size: int) -> _Rounding:
    """The activation rounding of `mode` (`RESOLVABLE_MODES`) taken apart, in the float32 arithmetic of
    `fake_quant_int8_block`, `fake_quant_int8_token`, `fake_quant_q8_0` and `fake_quant_q8_k`."""
    shape = x.shape
    xf = x.float()
    row = xf.abs().amax(-1, keepdim=True)
    row = torch.where(row == 0, torch.ones_like(row), row)
    if mode == ACT_GGML_K:  # Q8_K: the signed extreme, float32 scale, codes <= 127
        blocks = xf.reshape(*shape[:-1], shape[-1] // 256, 256)
        m = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
        factor = torch.where(m == 0, torch.zeros_like(m), torch.full_like(m, -127.0) / m)
        scale = torch.where(m == 0, torch.zeros_like(m), 1.0 / factor)
        scaled = blocks * factor
        step = (scale.abs() / row.unsqueeze(-1)).expand_as(blocks)
        return _Rounding(
            scaled,
            torch.round(scaled).clamp(max=127),
            step,
            -127.0,
            127.0,
            scale,
            None,
            lambda q, s: (q * s).reshape(shape).to(x.dtype),
        )
    if mode in (ACT_INT8_BLOCK, ACT_GGML_Q8_0):
        size = block_size if mode == ACT_INT8_BLOCK else 32
        blocks = xf.reshape(*shape[:-1], shape[-1] // size, size)
        amax = blocks.abs().amax(-1, keepdim=True)
        inv = torch.where(amax == 0, torch.zeros_like(amax), torch.full_like(amax, 127.0) / amax)
        exact = amax / 127.0
        half = mode != ACT_INT8_BLOCK  # Q8_0 stores its scale in fp16
        scale = exact.half().float() if half else exact
        scaled = blocks * inv
        step = (scale / row.unsqueeze(-1)).expand_as(blocks)
        return _Rounding(
            scaled,
            torch.round(scaled),
            step,
            -127.0,
            127.0,
            scale,
            exact if half else None,
            lambda q, s: (q * s).reshape(shape).to(x.dtype),
        )
    lo = xf.amin(-1, keepdim=True).clamp(max=0.0)
    hi = xf.amax(-1, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / 255.0).clamp(min=torch.finfo(torch.float32).eps)
    zp = (-128 - torch.round(lo / scale)).clamp(-128, 127)
    scaled = xf / scale
    codes = (torch.round(scaled) + zp).clamp(-128, 127)
    step = (scale / row).expand_as(xf)
    return _Rounding(
        scaled + zp,
        codes,
        step,
        -128.0,
        127.0,
        scale,
        None,
        lambda q, s: ((q - zp) * s).to(x.dtype),
    )


def _fp16_boundaries(r: _Rounding, row: Tensor, limit: float) -> list[tuple[int, float, float]]:
    """(flat block index, margin, the other fp16 scale) of each fp16 block scale of `r` within `limit` of the
    halfway point between two fp16 numbers: the margin is the block's largest magnitude's distance from the
    value whose scale is that halfway point (127 times the scales'), over the row's largest magnitude (`row`,
    one per block)."""
    assert r.exact_scale is not None
    exact = r.exact_scale.reshape(-1).double().numpy()
    held = r.scale.reshape(-1).double().numpy()
    toward = np.where(held >= exact, -np.inf, np.inf).astype(np.float16)
    other = np.nextafter(held.astype(np.float16), toward).astype(np.float64)
    margin = np.abs(exact - (held + other) / 2) * 127.0 / row.reshape(-1).double().numpy()
    ok = (held > 0) & np.isfinite(other) & (other > 0)
    return [(int(i), float(margin[i]), float(other[i])) for i in np.nonzero(ok & (margin < limit))[0]]


def _same_input(seen: Tensor, x: Tensor) -> bool:
    """Whether two linears take one input: the same tensor, or equal values (the MoE experts a token is routed to,
    each fed its own copy of the token's row in the sparse form, take what a runtime quantizes once)."""
    return seen is x or (seen.shape == x.shape and seen.dtype == x.dtype and torch.equal(seen, x))


def _rounded_resolving(linear: SimulatedLinear, x: Tensor, codes_of: BoundaryCodes) -> Tensor:
    """`x` rounded as `linear.activations` says, with `codes_of.flips` / `scales` applied and undecided codes
    (and fp16 scales) listed."""
    r = _int8_codes(x, linear.activations, linear.block_size)
    if codes_of.found is not None:
        leader = next((name for seen, name in codes_of._inputs if _same_input(seen, x)), linear.name)
        codes_of._inputs.append((x, linear.name))  # held, so no other tensor reuses its memory meanwhile
        codes_of.group[linear.name] = leader
    leader = codes_of.group.get(linear.name, linear.name)
    flat = r.codes.reshape(-1)
    for index, code in codes_of.flips.get(leader, {}).items():
        flat[index] = code
    scale = r.scale
    if codes_of.scales.get(leader):
        scale = scale.clone()
        held = scale.reshape(-1)
        for index, value in codes_of.scales[leader].items():
            held[index] = value
    if codes_of.found is not None and leader == linear.name:
        s = r.scaled.reshape(-1)
        margin = ((s - torch.floor(s)) - 0.5).abs() * r.step.reshape(-1)
        for i in torch.nonzero(margin < codes_of.margin).flatten().tolist():
            other = float(flat[i] + 1 if s[i] > flat[i] else flat[i] - 1)
            if r.lo <= other <= r.hi:
                codes_of.found.append(Boundary(float(margin[i]), linear.name, i, other))
        if r.exact_scale is not None:
            row = x.float().abs().amax(-1, keepdim=True)
            row = torch.where(row == 0, torch.ones_like(row), row)
            per_block = row.unsqueeze(-1).expand_as(r.scale)
            for i, m, other in _fp16_boundaries(r, per_block, codes_of.margin):
                codes_of.found.append(Boundary(m, linear.name, i, other, scale=True))
    return r.values(r.codes, scale)


class SimulatedLinear(nn.Linear):
    """A linear whose weight is already the dequantized one and whose input is rounded as the runtime does.

    `boundary` (set by `simulate` on int8-activation linears): the model's `BoundaryCodes`, consulted only while
    active."""

    def __init__(
        self, linear: nn.Linear, weight: Tensor, activations: str, block_size: int, name: str = ""
    ) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = linear.bias
        self.activations = activations
        self.block_size = block_size
        self.name = name
        self.boundary: BoundaryCodes | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.boundary is not None and self.boundary.active:
            x = _rounded_resolving(self, x, self.boundary)
        elif self.activations == ACT_INT8_BLOCK:
            x = fake_quant_int8_block(x, self.block_size)
        elif self.activations == ACT_INT8_TOKEN:
            x = fake_quant_int8_token(x)
        elif self.activations == ACT_GGML_Q8_0:
            x = fake_quant_q8_0(x)
        elif self.activations == ACT_GGML_K:
            x = fake_quant_q8_k(x)
        elif self.activations in (ACT_FP16, ACT_FP16_ROUTED):
            x = x.half().float()
        elif self.activations == ACT_BF16:
            x = x.bfloat16().float()
        return super().forward(x)


class RoundedOnceLinear(nn.Linear):
    """A linear of a model computing in fp16 / bf16 (`ACT_NATIVE`), computed in float32 and rounded once to
    the input's type: the correctly rounded product, which is what MLX's half-precision matmul returns. Torch's
    own bf16 GEMM on the CPU sums in another order and rounds 2x as many outputs off the correctly rounded
    value (5.4e-5 against MLX's 2.7e-5 of a layer's outputs, 0.08-init weights), which kept an honest MLX bf16
    artifact one bf16 ulp of its largest logits (7e-3 of the logit scale) away from the simulation at most
    positions."""

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


WeightValues = Callable[[np.ndarray, int, str], np.ndarray]
"""`(w [N, K] float32, bits, checkpoint name) -> the float32 values a runtime computes with` for a backend
whose kernels cannot hold the core quantizer's codes and scales as they are (`simulate(..., weights=...)`); the
name is for a backend whose type differs per tensor (GGUF's K-quant mixes)."""


def simulate(
    model: nn.Module,
    recipe: Recipe,
    activations: ActivationSpec = ACT_FLOAT,
    threads: int = DEFAULT_THREADS,
    weights: WeightValues | None = None,
    prefix: str = "",
) -> nn.Module:
    """A copy of the canonical fp32 `model` that computes what an artifact of `recipe` computes.

    - quantized recipes: every linear's weight becomes `quantize_weight(...).dequantize()` (the call the backends
      pack from), at the bits `lfm_export.precision.held_as` gives each: linears at `recipe.bits`, the lm_head
      at `recipe.head_bits`, the embedding table at `recipe.embedding_bits` (a `None` keeps either float); the
      MoE router, norms, conv weights (3-D), biases and buffers stay float. Inputs of the quantized linears
      (lm_head included) are rounded as `activations` says: a mode of `ACTIVATION_MODES`, or one per `ROLES`.
    - float recipes: weights rounded to `recipe.dtype` and back (what the artifact stores); fp32 compute. With
      `activations=ACT_NATIVE`: every parameter in `recipe.dtype` and the model computing in it (buffers such
      as the MoE expert bias stay fp32); `ReferenceSession` feeds it state of that type and returns fp32.

    `weights` replaces the core quantizer for the quantized weights (lm_head and embedding included) where a
    backend's kernels hold other values (the backend's `weight_values`, e.g. ExecuTorch's XNNPACK, which
    takes only positive scales and rounds them to bf16): the simulation must hold what the artifact holds.

    Tensors that stay as they are are shared with `model`, not copied: the result costs only the memory of
    the weights it replaces, each built from one weight at a time.

    `prefix`: `model` is a part of the canonical model whose names start with it (`model.layers.3.`: one
    decoder layer, as the streaming reference simulates one layer at a time, `lfm_export.parity.streaming`);
    the precision rules read the canonical names.
    """
    native = activations == ACT_NATIVE
    if native and (recipe.quantized or recipe.dtype not in FLOAT_TORCH):
        raise ValueError(f"activations {ACT_NATIVE!r} is for fp16 / bf16 recipes, not {recipe.name}")
    modes = activation_modes(ACT_FLOAT if native else activations)
    keep = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    sim = copy.deepcopy(model, memo=dict(keep))
    done: dict[tuple[int, int | None, int], Tensor] = {}
    boundary = BoundaryCodes()

    def replaced(w: Tensor, bits: int | None, name: str = "") -> Tensor:
        """The value the artifact holds for `w` (once per tensor, bit width and block: a tied table is
        shared)."""
        block = block_as(name, recipe, int(w.shape[-1])) if recipe.quantized and w.dim() == 2 else 0
        key = (id(w), bits, block)
        if key not in done:
            if recipe.quantized and bits is not None and weights is not None:
                done[key] = torch.from_numpy(weights(w.detach().float().numpy(), bits, name))
            elif recipe.quantized and bits is not None:
                deq = quantize_weight(w.detach().float().numpy(), recipe, bits, threads, block).dequantize()
                done[key] = torch.from_numpy(deq)
            elif recipe.dtype != "fp32":
                half = w.detach().to(FLOAT_TORCH[recipe.dtype])
                done[key] = half if native else half.float()
            else:
                done[key] = w.detach()
        return done[key]

    with torch.no_grad():
        for name, mod in list(sim.named_modules()):
            if isinstance(mod, nn.Embedding):
                table = f"{prefix}{name}.weight"
                mod.weight = nn.Parameter(
                    replaced(mod.weight, held_as(table, recipe), table), requires_grad=False
                )
        for local, mod in list(sim.named_modules()):
            if not isinstance(mod, nn.Linear):
                continue
            name = prefix + local
            bits = held_as(f"{name}.weight", recipe)
            weight = replaced(mod.weight, bits, f"{name}.weight")
            mode = activation_mode(modes, f"{name}.weight")
            router = rule_for(f"{name}.weight") is ROUTER  # computes in float32 whatever the recipe
            half_input = mode in (ACT_FP16, ACT_FP16_ROUTED, ACT_BF16) and not router  # float recipes too
            if bits is None and not half_input:
                mod.weight = nn.Parameter(weight, requires_grad=False)
                continue
            parent, _, child = local.rpartition(".")
            owner = sim.get_submodule(parent) if parent else sim
            block = block_as(f"{name}.weight", recipe, mod.in_features) if recipe.mix else recipe.block_size
            simulated = SimulatedLinear(mod, weight, mode, block, name)
            if mode in RESOLVABLE_MODES:
                simulated.boundary = boundary
            setattr(owner, child, simulated)
        if native:  # norms and conv weights too (new tensors: `model`'s own are shared, never cast in place)
            dtype = FLOAT_TORCH[recipe.dtype]
            for mod in sim.modules():
                for pname, p in list(mod._parameters.items()):
                    if p is not None and p.dtype != dtype:
                        mod._parameters[pname] = nn.Parameter(replaced(p, None), requires_grad=False)
                if type(mod) is nn.Linear:  # a deep copy's module: the caller's model keeps its class
                    mod.__class__ = RoundedOnceLinear
            sim.compute_dtype = dtype  # `ReferenceSession` runs it with state of this type
        sim.boundary_codes = boundary
    done.clear()
    return sim.eval()


def with_activations(sim: nn.Module, activations: ActivationSpec) -> nn.Module:
    """A copy of a `simulate` result that shares every weight and rounds the inputs of its quantized linears
    as `activations` says (a mode of `ACTIVATION_MODES` but `ACT_NATIVE`, or one per `ROLES`): what
    `simulate(model, recipe, activations)` computes, without quantizing again. Parity's rounding-effect
    session is the simulation with `ACT_FLOAT` (a `SimulatedLinear` with float activations is a plain linear)."""
    modes = activation_modes(activations)
    keep = {id(t): t for t in itertools.chain(sim.parameters(), sim.buffers())}
    out = copy.deepcopy(sim, memo=dict(keep))
    for name, mod in out.named_modules():
        if isinstance(mod, SimulatedLinear):
            mod.activations = activation_mode(modes, f"{mod.name or name}.weight")
    return out
