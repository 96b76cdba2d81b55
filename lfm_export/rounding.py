"""Calibrated rounding: codes and scales of one weight from statistics of its inputs, in the core quantizer's
format (symmetric blocks along K, `lfm_export.quant.Quantized`), so every format that holds the core
quantizer's codes holds these.

Each entry point is a function of (weight `[N, K]`, bits, block size, calibration statistics) returning a
`Quantized`; nothing here knows a backend or a weight's name.

- `weighted_search` (`-imat`): the `-mse` search over the shrink factors of `lfm_export.quant.MSE_GRIDS`,
  each block's error weighted by its input channels' mean square `d_j = E[x_j^2]`:
  `sum_j d_j (w_j - deq_j)^2`, the expected squared error of the block's share of the output. llama.cpp's
  importance matrix weighs its K-quant scale search the same way.
- `gptq_on_grid`: GPTQ's column-by-column error compensation on a grid fixed beforehand (each value
  `step * q - offset`, `q` integer in `[lo, hi]`): the codes of a format whose scales are chosen by its own
  search (ggml's K-quant super-blocks, `lfm_export.ggml_kquants`), so only the codes change.
- `gptq` (`-gptq`): GPTQ (Frantar et al., 2022). Columns are rounded left to right; each column's rounding
  error, divided by the Cholesky factor of the damped inverse Hessian `H = E[x x^T]`, is subtracted from the
  columns not yet rounded, so later columns absorb it where the inputs are correlated. A block's scale is
  chosen when its first column is reached, by `weighted_search` on the block as it then stands; its extreme
  element keeps the most negative code, so dequantized values quantize plainly to the same codes and scales
  (a format that requantizes the values, e.g. one with other scale rules, starts from these values).
  Column updates are batched per block (one matrix product per block for the columns to its right).

The error both minimise is the Hessian-weighted one, `trace((W - Q) H (W - Q)^T)` (`hessian_error`): the
expected squared error of the layer's output over the calibration inputs.

Both are written here in numpy (no library call): the maths is a few lines, and a library's output (e.g.
`optimum`, `auto-gptq`) would come in its own packing, which would have to be read back into codes and scales.
"""

from __future__ import annotations

import numpy as np

from lfm_export.quant import MSE_GRIDS, Quantized, _extremes, _symmetric, _symmetric_scale

DAMP = 0.01
"""GPTQ's damping: `DAMP * mean(diag(H))` added to the diagonal before inverting (the paper's default)."""
SEARCH_CHUNK_ELEMENTS = 1 << 20


def hessian_error(w: np.ndarray, q: np.ndarray, hessian: np.ndarray) -> float:
    """`trace((w - q) H (w - q)^T)`: the squared output error over inputs of second-moment matrix `H`."""
    d = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    return float(((d @ np.asarray(hessian, np.float64)) * d).sum())


def _importance(importance: np.ndarray | None, k: int) -> np.ndarray:
    """Per-channel weights, floored at 1e-6 of their mean so a channel never seen still counts a little."""
    if importance is None:
        return np.ones(k, np.float32)
    imp = np.asarray(importance, np.float64).reshape(k)
    mean = imp.mean()
    if not np.isfinite(mean) or mean <= 0:
        return np.ones(k, np.float32)
    return (imp + 1e-6 * mean).astype(np.float32)


def _search_blocks(
    blocks: np.ndarray, bits: int, imp: np.ndarray
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """The best shrink factor per block of `blocks [R, nb, bs]` under channel weights `imp [nb, bs]` (1.0 first,
    kept on ties), and the block extremes."""
    half = 2 ** (bits - 1)
    extremes = _extremes(blocks, True)
    best = np.ones(blocks.shape[:-1], np.float32)
    best_err: np.ndarray | None = None
    for f in MSE_GRIDS[bits]:
        shrink = np.float32(f)
        scale, safe = _symmetric_scale(blocks, bits, shrink, extremes)
        t = blocks / safe[..., None]
        np.rint(t, out=t)
        np.clip(t, -half, half - 1, out=t)
        t *= scale[..., None]
        t -= blocks
        np.square(t, out=t)
        t *= imp
        err = t.sum(-1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        np.copyto(best_err, err, where=better)
        best[better] = shrink
    return best, extremes[0], extremes


def weighted_search(
    w: np.ndarray, bits: int, block_size: int, importance: np.ndarray | None = None
) -> Quantized:
    """Symmetric block quantization of `w [N, K]` with each block's scale searched to minimise the error
    weighted by `importance [K]` (the inputs' per-channel mean square; None: unweighted, i.e. `-mse`)."""
    n, k = w.shape
    if k % block_size:
        raise ValueError(f"block size {block_size} does not divide {k}")
    nb = k // block_size
    imp = _importance(importance, k).reshape(nb, block_size)
    codes = np.empty((n, k), np.uint8)
    scales = np.empty((n, nb), np.float32)
    step = max(1, SEARCH_CHUNK_ELEMENTS // k)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        blocks = np.asarray(w[r0:r1], np.float32).reshape(r1 - r0, nb, block_size)
        best, _, extremes = _search_blocks(blocks, bits, imp)
        c, s, _ = _symmetric(blocks, bits, best, extremes)
        codes[r0:r1] = c.reshape(r1 - r0, k)
        scales[r0:r1] = s
    return Quantized(codes, scales, None, bits, block_size)


def inverse_cholesky(hessian: np.ndarray, damp: float = DAMP, overwrite: bool = False) -> np.ndarray:
    """Upper Cholesky factor `U` of `(H + damp * mean(diag H) I)^-1` (so `H^-1 = U^T U`), dead channels (zero
    variance) set to 1.

    Computed without forming the inverse: with `J` the reversal permutation and `J H J = M M^T` (lower
    Cholesky), `H = (J M J)(J M J)^T` with `J M J` upper triangular, so `U = (J M J)^-1 = J M^-1 J`: one Cholesky
    and one triangular solve in float64 (torch, on the set thread count), about 4x fewer operations than
    Cholesky, inverse, and Cholesky again (K = 4608: the MLP down projection of LFM2-350M).

    `overwrite` (a float64 `hessian` the caller no longer needs): its buffer is used as scratch, so at most three
    `K^2` float64 arrays are alive at once, the caller's included (LFM2-1.2B's FFN input, K = 8192: 1.6 GB,
    against 3.2 GB with a copy); the result is the same to the bit."""
    import torch

    h = torch.from_numpy(hessian) if overwrite else torch.tensor(np.asarray(hessian, np.float64))
    dead = torch.diagonal(h) <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    mean = float(torch.diagonal(h).mean())
    h.diagonal().add_(damp * (mean if mean > 0 else 1.0))
    flipped = h.flip(0, 1)
    low = torch.linalg.cholesky(flipped)
    del flipped
    eye = h.zero_()  # the (damped) Hessian is no longer needed: its buffer holds the identity
    eye.diagonal().fill_(1.0)
    del h
    inv_low = torch.linalg.solve_triangular(low, eye, upper=False)
    del low, eye
    return inv_low.flip(0, 1).numpy()


def gptq(
    w: np.ndarray,
    bits: int,
    block_size: int,
    hessian: np.ndarray,
    damp: float = DAMP,
    factor: np.ndarray | None = None,
) -> Quantized:
    """GPTQ-rounded symmetric block quantization of `w [N, K]` given the inputs' second-moment matrix
    `hessian [K, K]` (see the module doc). `factor`: `inverse_cholesky(hessian, damp)` when the caller already
    has it (linears that share one input share it)."""
    n, k = w.shape
    if k % block_size:
        raise ValueError(f"block size {block_size} does not divide {k}")
    if hessian.shape != (k, k):
        raise ValueError(f"hessian {hessian.shape} for a weight of input dimension {k}")
    nb = k // block_size
    half = 2 ** (bits - 1)
    u = (inverse_cholesky(hessian, damp) if factor is None else factor).astype(np.float32)
    diag_h = np.diag(np.asarray(hessian, np.float64))
    work = np.array(w, np.float32)
    codes = np.empty((n, k), np.uint8)
    scales = np.empty((n, nb), np.float32)
    for b in range(nb):
        c0, c1 = b * block_size, (b + 1) * block_size
        blk = work[:, c0:c1]
        imp = _importance(diag_h[c0:c1], block_size)[None, :]
        best, _, extremes = _search_blocks(blk[:, None, :], bits, imp)
        scale, safe = _symmetric_scale(blk[:, None, :], bits, best, extremes)
        scale, safe = scale[:, 0], safe[:, 0]
        anchor = np.where(scale != 0, np.abs(blk).argmax(-1), -1)
        err = np.empty((n, block_size), np.float32)
        for j in range(block_size):
            col = blk[:, j]
            q = np.clip(np.rint(col / safe), -half, half - 1)
            q[anchor == j] = -half
            codes[:, c0 + j] = (q + half).astype(np.uint8)
            e = (col - q * scale) / u[c0 + j, c0 + j]
            err[:, j] = e
            blk[:, j + 1 :] -= np.outer(e, u[c0 + j, c0 + j + 1 : c1])
        scales[:, b] = scale
        if c1 < k:
            work[:, c1:] -= err @ u[c0:c1, c1:]
    return Quantized(codes, scales, None, bits, block_size)


GRID_BATCH = 32
"""Columns `gptq_on_grid` rounds before it passes their error on to the columns right of them (one product)."""


def gptq_on_grid(
    w: np.ndarray, step: np.ndarray, offset: np.ndarray | None, lo: int, hi: int, factor: np.ndarray
) -> np.ndarray:
    """Integer codes `[N, K]` (int16) of `w [N, K]` on the grid `step * q - offset` (`step`, `offset`: `[N, K]`
    float32, per value; `q` in `[lo, hi]`; a zero step gives code 0) chosen left to right by GPTQ: each
    column's rounding error, divided by the diagonal of `factor` (`inverse_cholesky(H)`), is subtracted from the
    columns not yet rounded along `factor`'s row, so correlated inputs absorb it. The values a format holds are
    its own dequantization of these codes; `step * q - offset` here only guides the choice."""
    n, k = w.shape
    u = np.asarray(factor, np.float32)
    work = np.array(w, np.float32)
    off = np.zeros((n, k), np.float32) if offset is None else np.asarray(offset, np.float32)
    st = np.asarray(step, np.float32)
    safe = np.where(st == 0, np.float32(1), st)
    codes = np.empty((n, k), np.int16)
    for c0 in range(0, k, GRID_BATCH):
        c1 = min(k, c0 + GRID_BATCH)
        err = np.empty((n, c1 - c0), np.float32)
        for j in range(c0, c1):
            col = work[:, j]
            q = np.clip(np.rint((col + off[:, j]) / safe[:, j]), lo, hi)
            q = np.where(st[:, j] == 0, 0, q)
            codes[:, j] = q
            e = (col - (q * st[:, j] - off[:, j])) / u[j, j]
            err[:, j - c0] = e
            if j + 1 < c1:
                work[:, j + 1 : c1] -= np.outer(e, u[j, j + 1 : c1])
        if c1 < k:
            work[:, c1:] -= err @ u[c0:c1, c1:]
    return codes
