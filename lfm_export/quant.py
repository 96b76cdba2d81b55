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
or per role (`{"linears": ..., "experts": ...}`, `ROLES`) where a runtime treats MoE experts differently:
- `ACT_FLOAT`: none (what MatMulNBits computes at accuracy_level 0, QDQ + MatMul, and every float recipe).
- `ACT_INT8_BLOCK`: onnxruntime's MatMulNBits at accuracy_level 4 on CPU (MLAS `QuantizeARow_CompInt8`,
  read from its AVX2 kernel): per row, per block of `block_size` along K, symmetric int8 with
  `scale = amax / 127` and codes `rint(a * (127 / amax))` (the reciprocal is taken first, in float32);
  the integer block dot products are scaled by `scale_a * scale_w` and summed in float32. One op at a time,
  fed the inputs `tiny` computes on text, this is onnxruntime 1.32's result to float32 summation order (6.7e-7
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
- `ACT_GGML_K`: the input of a K-quant matmul (Q4_K / Q5_K / Q6_K, rows a multiple of 256) goes to Q8_K blocks
  (`fake_quant_q8_k`); the 32-value types a K-quant mix falls back to where a row is not a multiple of 256
  (Q5_0, Q8_0) take Q8_0 blocks. A K-quant mix holds a linear as a K-quant exactly when its row is a
  multiple of 256, so the linear's input width decides.
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
from lfm_export.precision import ROUTER, held_as, rule_for
from lfm_export.recipes import (
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
    4: tuple(round(1.0 - 0.015 * i, 4) for i in range(21)),
    8: tuple(round(1.0 - 0.0015 * i, 4) for i in range(21)),
}
"""Shrink factors of the block's extremes tried by `rounding="mse"`, 21 per bit width: int4 1.00 ... 0.70, int8
1.00 ... 0.97 (a 1.5% shrink already clips an int8 extreme by two steps, more than the rounding it saves).
Measured on Student-t (4 dof) weights `[1024, 1024]`, block 64, weight squared error against plain rounding:
int4 -9.0% (symmetric) / -6.4% (asymmetric), int8 -1.9% / -1.6%."""


FLOAT_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16}
ROLES = ("linears", "experts")
"""Roles of `simulate`'s per-role activation modes: MoE expert linears (`.experts.` in the name), every other."""
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
) -> Quantized:
    """Block-wise quantize `w [N, K]` along K (float16/bfloat16/float32 in, float32 scales out).

    Rows are independent, so row chunks run on `threads` threads (numpy releases the GIL) and the result does
    not depend on the thread count or the chunking."""
    if rounding not in ROUNDINGS or rounding in CALIBRATED_ROUNDINGS:
        raise ValueError(f"rounding {rounding!r}; expected nearest or mse (calibrated ones: quantize_weight)")
    n, k = w.shape
    if k % block_size:
        raise ValueError(f"block size {block_size} does not divide {k}")
    nb = k // block_size
    codes = np.empty((n, k), np.uint8)
    scales = np.empty((n, nb), np.float32)
    zps = None if symmetric else np.empty((n, nb), np.uint8)
    grid = MSE_GRIDS[bits] if rounding == "mse" else (1.0,)
    step = max(1, (MSE_CHUNK_ELEMENTS if rounding == "mse" else CHUNK_ELEMENTS) // k)

    def work(r0: int) -> None:
        r1 = min(n, r0 + step)
        blocks = np.asarray(w[r0:r1], dtype=np.float32).reshape(r1 - r0, nb, block_size)
        c, s, z = _search(blocks, bits, symmetric, grid)
        codes[r0:r1] = c.reshape(r1 - r0, k)
        scales[r0:r1] = s
        if zps is not None:
            zps[r0:r1] = z

    starts = range(0, n, step)
    if threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(min(threads, len(starts))) as pool:
            list(pool.map(work, starts))
    else:
        for r0 in starts:
            work(r0)
    return Quantized(codes, scales, zps, bits, block_size)


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
    w: np.ndarray, recipe: Recipe, bits: int | None = None, threads: int = DEFAULT_THREADS
) -> Quantized:
    """`quantize_block` with the recipe's block size, symmetry and rounding (`bits` defaults to the recipe's):
    the call every backend packs from and `simulate` dequantizes. A calibrated rounding
    (`CALIBRATED_ROUNDINGS`) reads its codes and scales from the active `lfm_export.calibrated` table; rows the
    table does not hold are rounded plainly."""
    chosen = recipe.bits if bits is None else bits
    if chosen is None:
        raise ValueError(f"recipe {recipe.name} quantizes no weights")
    block = recipe.block_for(int(np.shape(w)[-1]))
    if recipe.rounding not in CALIBRATED_ROUNDINGS:
        return quantize_block(w, chosen, block, recipe.symmetric, recipe.rounding, threads)
    plain = quantize_block(w, chosen, block, recipe.symmetric, "nearest", threads)
    hit = calibrated.lookup(np.asarray(w), chosen, block, recipe.rounding)
    if hit is not None:
        codes, scales, found = hit
        plain.codes[found], plain.scales[found] = codes[found], scales[found]
    return plain


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


def fake_quant_ggml_k(x: Tensor) -> Tensor:
    """`ACT_GGML_K`: Q8_K blocks into a linear whose input width is a multiple of 256, Q8_0 blocks otherwise."""
    return fake_quant_q8_k(x) if x.shape[-1] % 256 == 0 else fake_quant_q8_0(x)


def fake_quant_int8_token(x: Tensor) -> Tensor:
    """`ACT_INT8_TOKEN`: dynamic per-token asymmetric int8 (see the module doc)."""
    xf = x.float()
    lo = xf.amin(-1, keepdim=True).clamp(max=0.0)
    hi = xf.amax(-1, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / 255.0).clamp(min=torch.finfo(torch.float32).eps)
    zp = (-128 - torch.round(lo / scale)).clamp(-128, 127)
    q = (torch.round(xf / scale) + zp).clamp(-128, 127)
    return ((q - zp) * scale).to(x.dtype)


def activation_modes(spec: ActivationSpec) -> dict[str, str]:
    """`spec` as a mode per role (a plain mode applies to every role)."""
    modes = dict.fromkeys(ROLES, spec) if isinstance(spec, str) else dict(spec)
    if set(modes) != set(ROLES) or not set(modes.values()) <= set(ACTIVATION_MODES):
        raise ValueError(f"activations {spec!r}; expected one of {ACTIVATION_MODES}, or one per role {ROLES}")
    return modes


BOUNDARY_MARGIN = 1e-5
"""`BoundaryCodes` lists an int8 activation code as undecided when its scaled value lies within this distance of
the point halfway between two codes, measured in the input's own units over the largest magnitude of the
input's row (the float32 differences between a runtime's inputs and the simulation's are relative to that: 2e-7
to 7e-7 for onnxruntime 1.32's MatMulNBits inputs against the simulation's, tiny int8-b32, traced by hand;
every honest flip resolved in benchmarks/results/a8_exactness.json sat within this margin)."""


@dataclass(frozen=True)
class Boundary:
    """One undecided activation code: `margin` (distance from the halfway point in the input's units over the
    row's largest magnitude), the linear's module name, the index into its flattened codes and the code on the
    other side."""

    margin: float
    linear: str
    index: int
    code: float


class BoundaryCodes:
    """Which way the int8 activation codes on a rounding boundary round, shared by a simulation's linears.

    A runtime that rounds activations to int8 computes every op's input in its own float32 order, 1e-7
    relative from the simulation's; where a scaled value sits that close to the halfway point between two codes,
    the runtime's code and the simulation's can differ by one. One such flip changes the op's output by one
    code step, the next layers' inputs by 1e-5 relative, which flips further codes there: within two or three
    layers the whole position, and through the KV cache every later one, differs by the size of the
    activation rounding itself (onnxruntime int8-b32 on tiny: the median position 2.6e-3 of the logit scale
    off). The simulation is exact op by op (6.7e-7); only these undecided codes are not given
    (benchmarks/results/a8_exactness.json).

    With `found` a list, every quantized linear appends the `Boundary` of each code within `margin` of the
    halfway point; `flips` (module name -> `{flat index: code}`) sets codes to their other side. Both apply
    to the next forward only as the caller arranges (`lfm_export.parity.boundary` steps one position at a
    time). Linears fed the same tensor (q/k/v, w1/w3) share one rounded input, as a runtime that fuses them
    does: a forward with `found` set names each by the first of them (`group`), and a flip applies to all."""

    def __init__(self, margin: float = BOUNDARY_MARGIN) -> None:
        self.margin = margin
        self.found: list[Boundary] | None = None
        self.flips: dict[str, dict[int, float]] = {}
        self.group: dict[str, str] = {}
        self._inputs: list[tuple[Tensor, str]] = []

    def start(self, found: list[Boundary] | None, flips: dict[str, dict[int, float]]) -> None:
        """Set up the next forward: list undecided codes into `found` (None: do not), apply `flips`."""
        self.found, self.flips, self._inputs = found, flips, []

    def stop(self) -> None:
        self.found, self.flips, self._inputs = None, {}, []

    @property
    def active(self) -> bool:
        return self.found is not None or bool(self.flips)


def _int8_codes(
    x: Tensor, mode: str, block_size: int
) -> tuple[Tensor, Tensor, Tensor, Callable[[Tensor], Tensor]]:
    """(scaled values, codes, each value's code step over its row's largest magnitude, codes -> dequantized
    input) of `ACT_INT8_BLOCK` / `ACT_INT8_TOKEN`: the float32 arithmetic of `fake_quant_int8_block` /
    `fake_quant_int8_token`."""
    shape = x.shape
    xf = x.float()
    row = xf.abs().amax(-1, keepdim=True)
    row = torch.where(row == 0, torch.ones_like(row), row)
    if mode == ACT_INT8_BLOCK:
        blocks = xf.reshape(*shape[:-1], shape[-1] // block_size, block_size)
        amax = blocks.abs().amax(-1, keepdim=True)
        inv = torch.where(amax == 0, torch.zeros_like(amax), torch.full_like(amax, 127.0) / amax)
        scale = amax / 127.0
        scaled = blocks * inv
        step = (scale / row.unsqueeze(-1)).expand_as(blocks)
        return scaled, torch.round(scaled), step, lambda q: (q * scale).reshape(shape).to(x.dtype)
    lo = xf.amin(-1, keepdim=True).clamp(max=0.0)
    hi = xf.amax(-1, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / 255.0).clamp(min=torch.finfo(torch.float32).eps)
    zp = (-128 - torch.round(lo / scale)).clamp(-128, 127)
    scaled = xf / scale
    codes = (torch.round(scaled) + zp).clamp(-128, 127)
    step = (scale / row).expand_as(xf)
    return scaled + zp, codes, step, lambda q: ((q - zp) * scale).to(x.dtype)


def _rounded_resolving(linear: SimulatedLinear, x: Tensor, codes_of: BoundaryCodes) -> Tensor:
    """`x` rounded as `linear.activations` says, with `codes_of.flips` applied and undecided codes listed."""
    scaled, codes, step, dequantize = _int8_codes(x, linear.activations, linear.block_size)
    if codes_of.found is not None:
        leader = next((name for seen, name in codes_of._inputs if seen is x), linear.name)
        codes_of._inputs.append((x, linear.name))  # held, so no other tensor reuses its memory meanwhile
        codes_of.group[linear.name] = leader
    leader = codes_of.group.get(linear.name, linear.name)
    flat = codes.reshape(-1)
    for index, code in codes_of.flips.get(leader, {}).items():
        flat[index] = code
    if codes_of.found is not None and leader == linear.name:
        s = scaled.reshape(-1)
        margin = ((s - torch.floor(s)) - 0.5).abs() * step.reshape(-1)
        lo, hi = (-127.0, 127.0) if linear.activations == ACT_INT8_BLOCK else (-128.0, 127.0)
        for i in torch.nonzero(margin < codes_of.margin).flatten().tolist():
            other = float(flat[i] + 1 if s[i] > flat[i] else flat[i] - 1)
            if lo <= other <= hi:
                codes_of.found.append(Boundary(float(margin[i]), linear.name, i, other))
    return dequantize(codes)


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
            x = fake_quant_ggml_k(x)
        elif self.activations in (ACT_FP16, ACT_FP16_ROUTED):
            x = x.half().float()
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
    """
    native = activations == ACT_NATIVE
    if native and (recipe.quantized or recipe.dtype not in FLOAT_TORCH):
        raise ValueError(f"activations {ACT_NATIVE!r} is for fp16 / bf16 recipes, not {recipe.name}")
    modes = activation_modes(ACT_FLOAT if native else activations)
    keep = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    sim = copy.deepcopy(model, memo=dict(keep))
    done: dict[tuple[int, int | None], Tensor] = {}
    boundary = BoundaryCodes()

    def replaced(w: Tensor, bits: int | None, name: str = "") -> Tensor:
        """The value the artifact holds for `w` (once per tensor and bit width: a tied table is shared)."""
        key = (id(w), bits)
        if key not in done:
            if recipe.quantized and bits is not None and weights is not None:
                done[key] = torch.from_numpy(weights(w.detach().float().numpy(), bits, name))
            elif recipe.quantized and bits is not None:
                deq = quantize_weight(w.detach().float().numpy(), recipe, bits, threads).dequantize()
                done[key] = torch.from_numpy(deq)
            elif recipe.dtype != "fp32":
                half = w.detach().to(FLOAT_TORCH[recipe.dtype])
                done[key] = half if native else half.float()
            else:
                done[key] = w.detach()
        return done[key]

    with torch.no_grad():
        embed = sim.model.embed_tokens
        embed.weight = nn.Parameter(
            replaced(embed.weight, held_as("model.embed_tokens.weight", recipe), "model.embed_tokens.weight"),
            requires_grad=False,
        )
        for name, mod in list(sim.named_modules()):
            if not isinstance(mod, nn.Linear):
                continue
            bits = held_as(f"{name}.weight", recipe)
            weight = replaced(mod.weight, bits, f"{name}.weight")
            mode = modes["experts" if ".experts." in name else "linears"]
            router = rule_for(f"{name}.weight") is ROUTER  # computes in float32 whatever the recipe
            fp16_input = mode in (ACT_FP16, ACT_FP16_ROUTED) and not router  # float recipes too
            if bits is None and not fp16_input:
                mod.weight = nn.Parameter(weight, requires_grad=False)
                continue
            parent, _, child = name.rpartition(".")
            owner = sim.get_submodule(parent) if parent else sim
            simulated = SimulatedLinear(mod, weight, mode, recipe.block_size, name)
            if mode in (ACT_INT8_BLOCK, ACT_INT8_TOKEN):
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
