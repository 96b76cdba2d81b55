"""ggml's K-quant super-blocks (Q3_K, Q4_K, Q5_K, Q6_K) and the 32-value Q5_0 that llama.cpp's `_M` mixes fall back to,
packed from the core quantizer's sub-block scales.

Facts from llama.cpp's `ggml-common.h` / `ggml-quants.c` (dequantize_row_*); blocks run along each row (the
weight's input dimension), 256 values per super-block (`QK_K`):

- `Q4_K` (144 bytes): fp16 `d`, fp16 `dmin`, 12 bytes of packed 6-bit sub-block scales `sc[8]` and mins
  `m[8]`, then 128 bytes of nibbles. Sub-block `j` (32 values) reads `x = (d * sc[j]) * q - (dmin * m[j])`,
  `q` in 0..15. Scales layout: bytes 0-3 hold `sc[0..3]` in their low 6 bits and `sc[4..7] >> 4` in their top
  2; bytes 4-7 the same for the mins; bytes 8-11 hold `sc[4..7] & 15` low and `m[4..7] & 15` high. Nibbles: per
  64 values, byte `l` holds value `l` low and value `l + 32` high.
- `Q5_K` (176 bytes): as `Q4_K` with 5-bit `q` (0..31): `d`, `dmin`, the same 12 scale bytes, then `qh[32]`
  (bit `2c` of byte `l`: bit 4 of value `64c + l`; bit `2c + 1`: of value `64c + 32 + l`) and the low nibbles
  laid out as Q4_K's.
- `Q6_K` (210 bytes): `ql[128]`, `qh[64]`, int8 `sc[16]`, fp16 `d`; sub-block `j` (16 values) reads
  `x = (d * sc[j]) * (q - 32)`, `q` in 0..63. Per 128 values `n`: `ql[64n + l]` holds the low nibbles of values
  `l` and `l + 64`, `ql[64n + 32 + l]` of `l + 32` and `l + 96`; `qh[32n + l]` holds the top 2 bits of values
  `l`, `l + 32`, `l + 64`, `l + 96` at bit 0, 2, 4, 6.
- `Q3_K` (110 bytes): `hmask[32]`, `qs[64]`, 12 bytes of 16 packed 6-bit scales `s[16]`, fp16 `d`; sub-block
  `j` (16 values) reads `x = (d * (s[j] - 32)) * q`, `q` in -4..3 held as `u = q + 4`. Per 128 values `n`
  and 32 values `c` of it: `qs[32n + l]` holds bits 0-1 of `u` of value `128n + 32c + l` at bit `2c`, `hmask[l]`
  bit 2 at bit `4n + c`. Scales: byte `i` (0-3) holds `s[i] & 15` low and `s[8 + i] & 15` high, byte `4 + i`
  `s[4 + i] & 15` low and `s[12 + i] & 15` high, byte `8 + i` the top 2 bits of `s[i]`, `s[4 + i]`, `s[8 + i]`,
  `s[12 + i]` at bits 0, 2, 4, 6.
- `Q5_0` (22 bytes, 32 values): fp16 `d`, `qh` (uint32, bit `j` = bit 4 of value `j`), 16 bytes of nibbles
  as `Q4_0` (value `j` low, `j + 16` high); `x = d * (q - 16)`.

How the values are chosen: the core quantizer (`quantize_block`, its `rounding` search included where it has a
grid for the width) gives each sub-block its float scale (Q6_K: symmetric 6-bit, blocks of 16; Q4_K / Q5_K:
asymmetric 4- / 5-bit, blocks of 32, the min being `scale * zero_point >= 0`; Q3_K: symmetric 3-bit, blocks of
16, always by the fit: it has no other rounding here). The super-block then stores those scales in 6 (Q3_K, Q4_K)
or 8 (Q6_K) bits against an fp16 `d` (`dmin`): the largest maps to the top code, as ggml's
reference quantizer does. Rounding a small sub-block's scale to a few bits moves it by up to half a step of the
largest, so the codes are rounded again against the scales the file holds (ggml's quantizer does the same).
Q5_0 holds the core's symmetric 5-bit codes as they are, the scale rounded to fp16 (as `ggml_blocks` does for
Q4_0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lfm_export.contract.session import DEFAULT_THREADS
from lfm_export.ggml_blocks import GPTQ, gptq_blocks, on_block_grid
from lfm_export.quant import (
    MSE_CHUNK_ELEMENTS,
    MSE_GRIDS,
    SuperBlocks,
    fit_super_blocks,
    quantize_block,
    run_chunks,
)
from lfm_export.rounding import Factor, gptq_on_blocks, gptq_on_grid, refit_scales

QK_K = 256
"""Values per K-quant super-block."""


@dataclass(frozen=True)
class KType:
    """One ggml type packed here: `name` (gguf's `GGMLQuantizationType` member), values and bytes per block."""

    name: str
    block: int
    block_bytes: int


Q3_K = KType("Q3_K", QK_K, 110)
Q4_K = KType("Q4_K", QK_K, 144)
Q5_K = KType("Q5_K", QK_K, 176)
Q6_K = KType("Q6_K", QK_K, 210)
Q5_0 = KType("Q5_0", 32, 22)
K_TYPES = {t.name: t for t in (Q3_K, Q4_K, Q5_K, Q6_K, Q5_0)}


FITTED = ("fit", "imat", *GPTQ)
"""Roundings whose K-quant scales come from `lfm_export.quant.fit_super_blocks` (`imat`: weighted by the
calibrated importance the caller passes; `gptq`: the `imat` scales of the original weights, then the codes
chosen on them by `lfm_export.rounding.gptq_on_grid` with the Hessian Cholesky factor the caller passes;
`gptq-blocks` / `gptq-nols`, the benchmark's forms (`lfm_export.ggml_blocks.GPTQ`): each super-block's `imat`
scales fitted when the sweep reaches it, on its columns as the errors of every earlier column have updated them
(`lfm_export.rounding.gptq_on_blocks`), with / without each row's `d` / `dmin` then refitted to the codes
(`lfm_export.rounding.refit_scales`))."""


def _rounding(bits: int, rounding: str) -> str:
    """The core's rounding for a 32-value type: the fit (the calibrated one too, weighted by the importance
    passed along), the `-mse` search where the core has a grid for the width (int4, int8), else plain rounding."""
    if rounding in FITTED:
        return "fit"
    return rounding if bits in MSE_GRIDS else "nearest"


def magnitude_weights(x: np.ndarray) -> np.ndarray:
    """`sqrt(sigma2 + x^2)` per value of super-blocks `x [..., 256]`, `sigma2` twice the super-block's mean
    square: the weights llama.cpp's K-quant quantizers give each value's error (times the importance matrix when
    they have one). Q6_K's fit uses them: with plain squared error its Q6_K tensors gave a higher KL than
    llama.cpp's on the trained `small` checkpoint (q4_k_m, simulation: 1.08x with only the Q6_K tensors ours),
    with them 0.89x overall (Q4_K by `-imat`)."""
    sigma2 = 2 * np.mean(x * x, axis=-1, keepdims=True)
    return np.sqrt(sigma2 + x * x)


def _fitted(
    w: np.ndarray,
    kind: KType,
    importance: np.ndarray | None,
    threads: int,
    factor: Factor | None = None,
    form: str = "gptq",
) -> np.ndarray:
    """The bytes `[N, K / 256 * block_bytes]` of `w [N, K]` at K-quant `kind`, scales by `fit_super_blocks`
    (Q6_K: symmetric 6-bit sub-blocks of 16, the error weighed by `magnitude_weights` times `importance`;
    Q4_K / Q5_K: asymmetric sub-blocks of 32, weighed by `importance`). Row chunks are fitted and laid out on
    `threads` threads, each into its rows of the result (rows are independent: the bytes do not depend on the
    chunking or the thread count). With `factor` the codes are chosen by GPTQ over the whole matrix at once,
    on the scales fitted to the original weights (`_gptq_fixed`; `form` `gptq-blocks` / `gptq-nols`: each
    super-block's scales fitted on its columns as the sweep has updated them, `_gptq_fitted`, with / without
    `d` and `dmin` then refitted to the codes)."""
    if factor is not None and form in ("gptq-blocks", "gptq-nols"):
        return _gptq_fitted(w, kind, importance, threads, factor, form == "gptq-blocks")
    if factor is not None:
        return _gptq_fixed(w, kind, importance, threads, factor)
    n, k = w.shape
    nb = k // QK_K
    imp = None if importance is None else np.asarray(importance, np.float32).reshape(nb, QK_K)
    out = np.empty((n, nb * kind.block_bytes), np.uint8)
    step = max(1, MSE_CHUNK_ELEMENTS // k)

    def work(r0: int) -> None:
        x = np.asarray(w[r0 : r0 + step], np.float32).reshape(-1, nb, QK_K)
        rows = x.shape[0]
        if kind is Q3_K:
            weights = magnitude_weights(x) if imp is None else magnitude_weights(x) * imp
            fit = fit_super_blocks(x, 3, True, 16, weights, scale_bits=6)
            out[r0 : r0 + rows] = _layout_q3_k(fit.d[..., None].astype(np.float16), fit.sc, fit.q)
            return
        if kind is Q6_K:
            weights = magnitude_weights(x) if imp is None else magnitude_weights(x) * imp
            fit = fit_super_blocks(x, 6, True, 16, weights)
            q = (fit.q.astype(np.int16) + 32).astype(np.uint8).reshape(rows, nb, 2, 4, 32)
            out[r0 : r0 + rows] = _layout_q6_k(
                fit.d[..., None].astype(np.float16), fit.sc.astype(np.int16), q
            )
            return
        fit = fit_super_blocks(x, 5 if kind is Q5_K else 4, False, 32, imp)
        assert fit.dmin is not None and fit.mc is not None
        d16, m16 = fit.d[..., None].astype(np.float16), fit.dmin[..., None].astype(np.float16)
        head = _head_k_asym(d16, m16, fit.sc.astype(np.uint8), fit.mc.astype(np.uint8))
        q = fit.q.astype(np.uint8).reshape(rows, nb, 4, 2, 32)
        out[r0 : r0 + rows] = (_layout_q5_k if kind is Q5_K else _layout_q4_k)(head, q)

    run_chunks(work, range(0, n, step), threads)
    return out


def _gptq_codes(
    w: np.ndarray, fit: SuperBlocks, sub: int, lo: int, hi: int, factor: Factor, threads: int = 1
) -> np.ndarray:
    """`fit.q`'s shape of codes chosen by `gptq_on_grid` on `fit`'s grid (`d * sc * q - dmin * mc`, the
    products in float32 as ggml's dequantization forms them)."""
    n, k = w.shape
    step = np.repeat((fit.d[..., None] * fit.sc.astype(np.float32)).reshape(n, -1), sub, -1)
    offset = None
    if fit.dmin is not None and fit.mc is not None:
        offset = np.repeat((fit.dmin[..., None] * fit.mc.astype(np.float32)).reshape(n, -1), sub, -1)
    return gptq_on_grid(w, step, offset, lo, hi, factor, threads).reshape(fit.q.shape)


def _super_blocks(
    w: np.ndarray, bits: int, symmetric: bool, sub: int, importance: np.ndarray | None, threads: int
) -> SuperBlocks:
    """`fit_super_blocks` over the rows of `w [N, K]` in chunks (on `threads` threads): `[N, K / 256, ...]`;
    Q6_K (`sub` 16) weighs the error by `magnitude_weights` (times `importance`)."""
    n, k = w.shape
    nb = k // QK_K
    imp = None if importance is None else np.asarray(importance, np.float32).reshape(nb, QK_K)
    step = max(1, MSE_CHUNK_ELEMENTS // k)
    parts: dict[int, SuperBlocks] = {}

    def work(r0: int) -> None:
        x = np.asarray(w[r0 : r0 + step], np.float32).reshape(-1, nb, QK_K)
        weights = imp
        if sub == 16:
            weights = magnitude_weights(x) if imp is None else magnitude_weights(x) * imp
        parts[r0] = fit_super_blocks(x, bits, symmetric, sub, weights, scale_bits=6 if bits == 3 else 8)

    starts = range(0, n, step)
    run_chunks(work, starts, threads)
    chunks = [parts[r0] for r0 in starts]

    def cat(field: str) -> np.ndarray | None:
        got = [getattr(c, field) for c in chunks]
        return None if got[0] is None else np.concatenate(got)

    return SuperBlocks(cat("d"), cat("dmin"), cat("sc"), cat("mc"), cat("q"))  # type: ignore[arg-type]


def _kind_codes(kind: KType) -> tuple[int, bool, int, int, int]:
    """(bits, symmetric, sub-block size, lowest code, highest code) of K-quant `kind`'s fit."""
    if kind is Q6_K:
        return 6, True, 16, -32, 31
    if kind is Q3_K:
        return 3, True, 16, -4, 3
    bits = 5 if kind is Q5_K else 4
    return bits, False, 32, 0, 2**bits - 1


def _layout(kind: KType, fit: SuperBlocks, q: np.ndarray) -> np.ndarray:
    """The bytes of K-quant `kind` holding `fit`'s scales and the codes `q` (`fit.q`'s shape; signed for Q6_K)."""
    n, nb = fit.sc.shape[:2]
    if kind is Q3_K:
        return _layout_q3_k(fit.d[..., None].astype(np.float16), fit.sc, q)
    if kind is Q6_K:
        q6 = (q.astype(np.int16) + 32).astype(np.uint8).reshape(n, nb, 2, 4, 32)
        return _layout_q6_k(fit.d[..., None].astype(np.float16), fit.sc.astype(np.int16), q6)
    assert fit.dmin is not None and fit.mc is not None
    d16, m16 = fit.d[..., None].astype(np.float16), fit.dmin[..., None].astype(np.float16)
    head = _head_k_asym(d16, m16, fit.sc.astype(np.uint8), fit.mc.astype(np.uint8))
    qk = q.astype(np.uint8).reshape(n, nb, 4, 2, 32)
    return (_layout_q5_k if kind is Q5_K else _layout_q4_k)(head, qk)


def _gptq_fitted(
    w: np.ndarray,
    kind: KType,
    importance: np.ndarray | None,
    threads: int,
    factor: np.ndarray,
    refit: bool = True,
) -> np.ndarray:
    """`_fitted`'s bytes with GPTQ's codes, each super-block's scales fitted by `_super_blocks` (weighted as
    `-imat`) when the sweep reaches it, on its 256 columns as the errors of every earlier column have updated
    them (`gptq_on_blocks`); the codes are chosen on the grid those scales give (`d * sc * q - dmin * mc`, the
    products in float32 as ggml's dequantization forms them), and the file holds those scales. Over the whole
    matrix at once (the column updates run along every row together: no row chunking). `refit`: then each
    row's `d` (and `dmin`) refitted to the codes and scale codes (`lfm_export.rounding.refit_scales`)."""
    n, k = w.shape
    bits, symmetric, sub, lo, hi = _kind_codes(kind)
    imp = None if importance is None else np.asarray(importance, np.float32).reshape(k)
    parts: list[SuperBlocks] = []

    def fit(cols: np.ndarray, c0: int) -> tuple[np.ndarray, np.ndarray | None]:
        f = _super_blocks(cols, bits, symmetric, sub, None if imp is None else imp[c0 : c0 + QK_K], threads)
        parts.append(f)
        step = np.repeat((f.d[..., None] * f.sc.astype(np.float32)).reshape(n, -1), sub, -1)
        if f.dmin is None or f.mc is None:
            return step, None
        return step, np.repeat((f.dmin[..., None] * f.mc.astype(np.float32)).reshape(n, -1), sub, -1)

    q = gptq_on_blocks(np.asarray(w, np.float32), QK_K, fit, lo, hi, factor, threads)

    def cat(field: str) -> np.ndarray | None:
        got = [getattr(p, field) for p in parts]
        return None if got[0] is None else np.concatenate(got, 1)

    whole = SuperBlocks(cat("d"), cat("dmin"), cat("sc"), cat("mc"), q)  # type: ignore[arg-type]
    if refit:
        whole = _refit(np.asarray(w, np.float32), whole, q, sub, factor)
    return _layout(kind, whole, q.reshape(n, k // QK_K, -1, sub))


def _refit(w: np.ndarray, fit: SuperBlocks, q: np.ndarray, sub: int, factor: np.ndarray) -> SuperBlocks:
    """`fit` with each row's `d` (and `dmin`) refitted to the codes `q [N, K]` and the scale (min) codes by
    `refit_scales`."""
    n, k = w.shape
    bases = [np.repeat(fit.sc.astype(np.float32).reshape(n, -1), sub, -1) * q.astype(np.float32)]
    scales = [fit.d]
    if fit.dmin is not None and fit.mc is not None:
        bases.append(-np.repeat(fit.mc.astype(np.float32).reshape(n, -1), sub, -1))
        scales.append(fit.dmin)
    s = refit_scales(w, bases, QK_K, np.stack(scales, -1), factor)
    return SuperBlocks(s[..., 0], None if fit.dmin is None else s[..., 1], fit.sc, fit.mc, fit.q)


def _gptq_fixed(
    w: np.ndarray, kind: KType, importance: np.ndarray | None, threads: int, factor: Factor
) -> np.ndarray:
    """`_fitted`'s bytes with the codes chosen by GPTQ on the scales fitted to the original weights
    (`gptq_on_grid`; `-gptq`), over the whole matrix at once (its column updates run along every
    row together, so the codes do not depend on a row chunking)."""
    x = np.asarray(w, np.float32)
    bits, symmetric, sub, lo, hi = _kind_codes(kind)
    fit = _super_blocks(x, bits, symmetric, sub, importance, threads)
    return _layout(kind, fit, _gptq_codes(x, fit, sub, lo, hi, factor, threads))


def _f16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`x` rounded to fp16: (the fp16 array, its float32 value)."""
    h = x.astype(np.float16)
    return h, h.astype(np.float32)


def _codes(num: np.ndarray, step: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """`clip(rint(num / step), lo, hi)`, 0 where the step is 0."""
    safe = np.where(step == 0, np.float32(1), step)
    q = np.clip(np.rint(num / safe), lo, hi)
    return np.where(step == 0, 0, q).astype(np.int16)


def _layout_q6_k(d16: np.ndarray, sc: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q6_K bytes `[N, nb * 210]` of fp16 `d` `[N, nb, 1]`, scale codes `sc` `[N, nb, 16]` and unsigned codes `q`
    `[N, nb, 2, 4, 32]` (`q[..., half, quarter, l]` is value `128 * half + 32 * quarter + l`)."""
    n, nb = sc.shape[:2]
    ql = np.concatenate(
        [q[..., 0, :] & 0xF | (q[..., 2, :] & 0xF) << 4, q[..., 1, :] & 0xF | (q[..., 3, :] & 0xF) << 4], -1
    )  # [n, nb, 2, 64]
    qh = (q[..., 0, :] >> 4) | (q[..., 1, :] >> 4) << 2 | (q[..., 2, :] >> 4) << 4 | (q[..., 3, :] >> 4) << 6
    parts = [
        ql.reshape(n, nb, 128),
        qh.reshape(n, nb, 64),
        sc.astype(np.int8).view(np.uint8),
        d16.view(np.uint8).reshape(n, nb, 2),
    ]
    return np.concatenate(parts, -1).reshape(n, -1)


def _layout_q3_k(d16: np.ndarray, sc: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q3_K bytes `[N, nb * 110]` of fp16 `d` `[N, nb, 1]`, signed scale codes `sc` `[N, nb, 16]` (-32..31) and
    signed codes `q` (-4..3, 256 per super-block in any shape `[N, nb, ...]`)."""
    n, nb = sc.shape[:2]
    u = (np.asarray(q).reshape(n, nb, 2, 4, 32).astype(np.int16) + 4).astype(np.uint8)  # [.., half, c, l]
    shifts = (2 * np.arange(4, dtype=np.uint8))[:, None]
    qs = np.bitwise_or.reduce((u & 3) << shifts, axis=-2)  # [n, nb, 2, 32]
    hbits = ((u >> 2) & 1).reshape(n, nb, 8, 32) << np.arange(8, dtype=np.uint8)[:, None]  # bit 4n + c
    hmask = np.bitwise_or.reduce(hbits, axis=-2)  # [n, nb, 32]
    s = (np.asarray(sc).astype(np.int16) + 32).astype(np.uint8).reshape(n, nb, 4, 4)  # s[4g + i]
    scales = np.concatenate(
        [
            (s[..., 0, :] & 15) | (s[..., 2, :] & 15) << 4,
            (s[..., 1, :] & 15) | (s[..., 3, :] & 15) << 4,
            (s[..., 0, :] >> 4)
            | (s[..., 1, :] >> 4) << 2
            | (s[..., 2, :] >> 4) << 4
            | (s[..., 3, :] >> 4) << 6,
        ],
        -1,
    )
    parts = [hmask, qs.reshape(n, nb, 64), scales, d16.view(np.uint8).reshape(n, nb, 2)]
    return np.concatenate(parts, -1).reshape(n, -1)


def pack_q3_k(
    w: np.ndarray,
    rounding: str = "nearest",
    threads: int = DEFAULT_THREADS,
    importance: np.ndarray | None = None,
    factor: Factor | None = None,
) -> np.ndarray:
    """`w [N, K]` (K a multiple of 256) as Q3_K bytes `[N, K / 256 * 110]`: the fit whatever the rounding (the
    core has no 3-bit grid for `-mse`, and ggml's 6-bit sub-scales need the search; `-nearest` / `-mse` get the
    unweighted fit), GPTQ's codes on it with `factor`."""
    form = rounding if rounding in FITTED else "fit"
    return _fitted(w, Q3_K, importance, threads, factor, form)


def pack_q6_k(
    w: np.ndarray,
    rounding: str = "nearest",
    threads: int = DEFAULT_THREADS,
    importance: np.ndarray | None = None,
    factor: Factor | None = None,
) -> np.ndarray:
    """`w [N, K]` (K a multiple of 256) as Q6_K bytes `[N, K / 256 * 210]`."""
    if rounding in FITTED:
        return _fitted(w, Q6_K, importance, threads, factor, rounding)
    n, k = w.shape
    nb = k // QK_K
    core = quantize_block(w, 6, 16, True, _rounding(6, rounding), threads)
    s = core.scales.reshape(n, nb, 16)  # signed: the extreme maps to -32
    pick = np.abs(s).argmax(-1)[..., None]
    top = np.take_along_axis(s, pick, -1)  # the sub-scale of largest magnitude, with its sign
    d16, d = _f16(top / np.float32(-128))
    sc = _codes(s, np.broadcast_to(d, s.shape), -128, 127)
    step = d * sc.astype(np.float32)  # [n, nb, 16]
    x = w.astype(np.float32).reshape(n, nb, 16, 16)
    q = (_codes(x, step[..., None], -32, 31) + 32).astype(np.uint8).reshape(n, nb, 2, 4, 32)
    return _layout_q6_k(d16, sc, q)


def _head_k_asym(d16: np.ndarray, m16: np.ndarray, sc: np.ndarray, mc: np.ndarray) -> list[np.ndarray]:
    """The first 16 bytes of Q4_K / Q5_K super-blocks: fp16 `d`, fp16 `dmin` (`[N, nb, 1]`) and the 12 bytes of
    6-bit scale and min codes (`sc`, `mc` `[N, nb, 8]`, uint8)."""
    n, nb = sc.shape[:2]
    scales = np.concatenate(
        [
            sc[..., :4] | (sc[..., 4:] >> 4) << 6,
            mc[..., :4] | (mc[..., 4:] >> 4) << 6,
            (sc[..., 4:] & 0xF) | (mc[..., 4:] & 0xF) << 4,
        ],
        -1,
    )
    return [d16.view(np.uint8).reshape(n, nb, 2), m16.view(np.uint8).reshape(n, nb, 2), scales]


def _layout_q4_k(head: list[np.ndarray], q: np.ndarray) -> np.ndarray:
    """Q4_K bytes of `_head_k_asym`'s bytes and the codes `[N, nb, 4, 2, 32]` (chunk of 64, half, value)."""
    n = q.shape[0]
    qs = (q[..., 0, :] | q[..., 1, :] << 4).reshape(n, -1, 128)
    return np.concatenate([*head, qs], -1).reshape(n, -1)


def _layout_q5_k(head: list[np.ndarray], q: np.ndarray) -> np.ndarray:
    """Q5_K bytes of `_head_k_asym`'s bytes and the 5-bit codes `[N, nb, 4, 2, 32]`."""
    n = q.shape[0]
    qs = ((q[..., 0, :] & 0xF) | (q[..., 1, :] & 0xF) << 4).reshape(n, -1, 128)
    shifts = (2 * np.arange(4, dtype=np.uint8))[:, None]  # chunk c: bits 2c, 2c + 1
    high = ((q[..., 0, :] >> 4) << shifts) | ((q[..., 1, :] >> 4) << (shifts + 1))  # [n, nb, 4, 32]
    qh = np.bitwise_or.reduce(high, axis=-2).astype(np.uint8)
    return np.concatenate([*head, qh, qs], -1).reshape(n, -1)


def _pack_k_asym(w: np.ndarray, bits: int, rounding: str, threads: int) -> np.ndarray:
    """Q4_K / Q5_K (`bits` 4 / 5) bytes of `w [N, K]` by the core's asymmetric blocks of 32 (not fitted)."""
    n, k = w.shape
    nb = k // QK_K
    core = quantize_block(w, bits, 32, False, _rounding(bits, rounding), threads)
    assert core.zero_points is not None
    s = core.scales.reshape(n, nb, 8)
    mins = (core.scales * core.zero_points.astype(np.float32)).reshape(n, nb, 8)
    d16, d = _f16(s.max(-1, keepdims=True) / np.float32(63))
    m16, dmin = _f16(mins.max(-1, keepdims=True) / np.float32(63))
    sc = _codes(s, np.broadcast_to(d, s.shape), 0, 63).astype(np.uint8)
    mc = _codes(mins, np.broadcast_to(dmin, mins.shape), 0, 63).astype(np.uint8)
    step = d * sc.astype(np.float32)
    offset = dmin * mc.astype(np.float32)
    x = w.astype(np.float32).reshape(n, nb, 8, 32)
    top = 2**bits - 1
    q = _codes(x + offset[..., None], step[..., None], 0, top).astype(np.uint8).reshape(n, nb, 4, 2, 32)
    head = _head_k_asym(d16, m16, sc, mc)
    return (_layout_q5_k if bits == 5 else _layout_q4_k)(head, q)


def pack_q4_k(
    w: np.ndarray,
    rounding: str = "nearest",
    threads: int = DEFAULT_THREADS,
    importance: np.ndarray | None = None,
    factor: Factor | None = None,
) -> np.ndarray:
    """`w [N, K]` (K a multiple of 256) as Q4_K bytes `[N, K / 256 * 144]`."""
    if rounding in FITTED:
        return _fitted(w, Q4_K, importance, threads, factor, rounding)
    return _pack_k_asym(w, 4, rounding, threads)


def pack_q5_k(
    w: np.ndarray,
    rounding: str = "nearest",
    threads: int = DEFAULT_THREADS,
    importance: np.ndarray | None = None,
    factor: Factor | None = None,
) -> np.ndarray:
    """`w [N, K]` (K a multiple of 256) as Q5_K bytes `[N, K / 256 * 176]`."""
    if rounding in FITTED:
        return _fitted(w, Q5_K, importance, threads, factor, rounding)
    return _pack_k_asym(w, 5, rounding, threads)


def pack_q5_0(
    w: np.ndarray,
    rounding: str = "nearest",
    threads: int = DEFAULT_THREADS,
    importance: np.ndarray | None = None,
    factor: Factor | None = None,
) -> np.ndarray:
    """`w [N, K]` (K a multiple of 32) as Q5_0 bytes `[N, K / 32 * 22]`: the core's symmetric 5-bit codes."""
    n, k = w.shape
    nb = k // 32
    fitted = rounding in FITTED
    if rounding in ("gptq-blocks", "gptq-nols") and factor is not None:
        core = gptq_blocks(w, 5, importance, factor, threads, rounding == "gptq-blocks")
    else:
        core = quantize_block(w, 5, 32, True, _rounding(5, rounding), threads, importance if fitted else None)
        if factor is not None:
            core = on_block_grid(w, core, factor, threads)
    d16 = core.scales.astype(np.float16).view(np.uint8).reshape(n, nb, 2)
    q = core.codes.reshape(n, nb, 32)
    qs = (q[..., :16] & 0xF) | (q[..., 16:] & 0xF) << 4
    bits = (q >> 4).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    qh = np.bitwise_or.reduce(bits, axis=-1).astype("<u4")[..., None].view(np.uint8)
    return np.concatenate([d16, qh, qs.astype(np.uint8)], -1).reshape(n, -1)


PACK = {"Q3_K": pack_q3_k, "Q4_K": pack_q4_k, "Q5_K": pack_q5_k, "Q6_K": pack_q6_k, "Q5_0": pack_q5_0}


def dequantize(data: np.ndarray, kind: KType) -> np.ndarray:
    """The float32 values ggml reads from `data` `[N, bytes per row]` of type `kind` (`[N, K]`)."""
    n = data.shape[0]
    b = data.reshape(n, -1, kind.block_bytes)
    nb = b.shape[1]

    def f16(lo: int) -> np.ndarray:
        return np.ascontiguousarray(b[..., lo : lo + 2]).view(np.float16).astype(np.float32)

    if kind is Q3_K:
        hm = b[..., :32].reshape(n, nb, 1, 32)
        qs = b[..., 32:96].reshape(n, nb, 2, 1, 32)
        low = (qs >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3  # [n, nb, 2, 4, 32]
        high = ((hm >> np.arange(8, dtype=np.uint8)[:, None]) & 1).reshape(n, nb, 2, 4, 32)
        q = (low | high << 2).astype(np.float32) - 4
        r = b[..., 96:108]
        lo4 = np.concatenate([r[..., 0:4] & 15, r[..., 4:8] & 15, r[..., 0:4] >> 4, r[..., 4:8] >> 4], -1)
        hi2 = (r[..., 8:12, None] >> (2 * np.arange(4, dtype=np.uint8))) & 3  # [n, nb, i, g]
        s = lo4 | hi2.transpose(0, 1, 3, 2).reshape(n, nb, 16) << 4
        step = (f16(108) * (s.astype(np.float32) - 32)).reshape(n, nb, 16, 1)
        return (step * q.reshape(n, nb, 16, 16)).reshape(n, -1)
    if kind is Q6_K:
        ql = b[..., :128].reshape(n, nb, 2, 2, 32)
        qh = b[..., 128:192].reshape(n, nb, 2, 1, 32)
        low = np.stack([ql[..., 0, :] & 0xF, ql[..., 1, :] & 0xF, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4], 2)
        high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3  # [n, nb, 2, 4, 32]
        q = (low.transpose(0, 1, 3, 2, 4) | high << 4).astype(np.float32) - 32
        sc = b[..., 192:208].view(np.int8).astype(np.float32)
        step = (f16(208) * sc).reshape(n, nb, 16, 1)
        return (step * q.reshape(n, nb, 16, 16)).reshape(n, -1)
    if kind in (Q4_K, Q5_K):
        s = b[..., 4:16]
        sc = np.concatenate([s[..., :4] & 63, (s[..., 8:] & 0xF) | (s[..., :4] >> 6) << 4], -1)
        mc = np.concatenate([s[..., 4:8] & 63, (s[..., 8:] >> 4) | (s[..., 4:8] >> 6) << 4], -1)
        qs = b[..., -128:].reshape(n, nb, 4, 1, 32)
        q = np.concatenate([qs & 0xF, qs >> 4], 3)  # [n, nb, 4, 2, 32]
        if kind is Q5_K:
            qh = b[..., 16:48].reshape(n, nb, 1, 1, 32)
            bit = (2 * np.arange(4, dtype=np.uint8))[:, None, None] + np.arange(2, dtype=np.uint8)[:, None]
            q = q | ((qh >> bit) & 1) << 4
        q = q.astype(np.float32).reshape(n, nb, 8, 32)
        step = (f16(0) * sc.astype(np.float32))[..., None]
        offset = (f16(2) * mc.astype(np.float32))[..., None]
        return (step * q - offset).reshape(n, -1)
    qh = np.ascontiguousarray(b[..., 2:6]).view("<u4")  # [n, nb, 1]
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
    qs = b[..., 6:]
    q = (np.concatenate([qs & 0xF, qs >> 4], -1) | high).astype(np.float32) - 16
    return (f16(0) * q).reshape(n, -1)


def quantize(
    w: np.ndarray,
    kind: KType,
    rounding: str = "nearest",
    threads: int = DEFAULT_THREADS,
    importance: np.ndarray | None = None,
    factor: Factor | None = None,
) -> np.ndarray:
    """`w [N, K]` as ggml bytes of type `kind`; `importance [K]` weighs a fitted rounding's error (`FITTED`);
    `factor` (`GPTQ` roundings: `lfm_export.rounding.cholesky_factor` of the inputs' Hessian, None for a weight
    the calibration did not see) has the codes chosen by GPTQ (`FITTED`)."""
    fitted = rounding in FITTED
    codes = factor if rounding in GPTQ else None
    return PACK[kind.name](w, rounding, threads, importance if fitted else None, codes)


def held_values(
    w: np.ndarray,
    kind: KType,
    rounding: str = "nearest",
    threads: int = DEFAULT_THREADS,
    importance: np.ndarray | None = None,
    factor: Factor | None = None,
) -> np.ndarray:
    """The float32 values a GGUF artifact holds for `w` at type `kind`: `quantize` then ggml's dequantization."""
    return dequantize(quantize(w, kind, rounding, threads, importance, factor), kind)
