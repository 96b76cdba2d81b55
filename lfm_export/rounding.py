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
  search (GGUF `-gptq`: ggml's blocks and K-quant super-blocks, `lfm_export.ggml_blocks`,
  `lfm_export.ggml_kquants`), so only the codes change. `gptq_on_blocks`: the same sweep with each block's grid
  fitted by the caller's search when the sweep reaches it, on the block's columns as GPTQ has updated them
  (GPTQ with groups); `refit_scales` fits a format's scales to chosen codes by least squares on the
  Hessian-weighted error. Those two serve `benchmarks/gguf_rounding_sim.py`'s `gptq-blocks` / `gptq-nols`
  (`lfm_export.ggml_blocks.GPTQ`), which no recipe names. Given an `OrderedFactor`
  (`cholesky_factor(act_order=True)`), `gptq_on_grid` rounds the columns in descending order of the Hessian's
  diagonal on the same fixed grid (act-order with static groups: `benchmarks/gguf_rounding_sim.py`'s
  `gptq-act`; GGUF `-gptq` keeps the column order, `lfm_export.calibrate.KEPT_ACT_ORDER`).
- `gptq` (`-gptq`): GPTQ (Frantar et al., 2022). Columns are rounded left to right; each column's rounding
  error is passed on to the columns not yet rounded, weighted by the Hessian `H = E[x x^T]` (damped), so later
  columns absorb it where the inputs are correlated. A block's scale is chosen when its first column is reached,
  by `weighted_search` on the block as it then stands; its extreme element keeps the most negative code, so
  dequantized values quantize plainly to the same codes and scales (a format that requantizes the values, e.g.
  one with other scale rules, starts from these values).

Both GPTQ forms work from the upper Cholesky factor `A` of the damped Hessian (`H = A A^T`, `cholesky_factor`):
column `m` is rounded after adding `sum_{i<m} d_i A_im / A_mm`, `d_i = w_i - q_i` the final error of column `i`,
which equals GPTQ's update through the inverse Hessian's factor `A^-1` (the paper's form) without forming that
inverse. What the columns of earlier blocks pass on to a block is one matrix product when the block is
reached; inside a block the columns run one at a time, on row slices in parallel (`threads`; rows are
independent there, so the codes do not depend on the thread count). `gptq` holds a block by columns
(`[block, rows]`, tasks of `BLOCK_CHUNK_ROWS` rows) and sums its search's errors in numpy's own order
(`_pairwise_sum`), so its codes are, bit for bit, those of the same loop on a block held by rows; its products
run on one BLAS thread (`one_blas_thread`). The products' values still depend on the BLAS library and on how it
was started (`OMP_NUM_THREADS` at import: at LFM2-350M's FFN `w2` shape, 1024 x 4608, 0.6% of the codes differ
between 1 and 2, before this form as after), as GPTQ passes any difference on to later columns; the output error
does not move (`benchmarks/gptq_forms.py`, 12 seeds).

The error both minimise is the Hessian-weighted one, `trace((W - Q) H (W - Q)^T)` (`hessian_error`): the
expected squared error of the layer's output over the calibration inputs.

Both are written here in numpy (no library call): the maths is a few lines, and a library's output (e.g.
`optimum`, `auto-gptq`) would come in its own packing, which would have to be read back into codes and scales.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

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


@dataclass(frozen=True)
class OrderedFactor:
    """The factor of GPTQ with act-order (`cholesky_factor(act_order=True)`): `upper` is the upper Cholesky
    factor of the damped Hessian with its inputs in `order` (`H[order][:, order]`), `order` the input channels
    by descending `diag(H)` (a stable sort: ties and dead channels keep their index order, dead ones last).
    `gptq_on_grid` given one rounds the columns in that order."""

    upper: np.ndarray
    order: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.upper.shape

    @property
    def nbytes(self) -> int:
        return self.upper.nbytes + self.order.nbytes


Factor = np.ndarray | OrderedFactor
"""What GPTQ rounds with: the plain upper factor (columns left to right) or an `OrderedFactor` (act-order)."""


def cholesky_factor(
    hessian: np.ndarray, damp: float = DAMP, overwrite: bool = False, act_order: bool = False
) -> Factor:
    """Upper triangular `A` (float32) with `A A^T = H + damp * mean(diag H) I`, dead channels (zero variance) set
    to 1 before damping: the factor `gptq` and `gptq_on_grid` round with. `act_order`: the factor of
    `P^T H P` instead, `P` the input channels by descending `diag(H)`, as an `OrderedFactor` (GPTQ's act-order:
    the channels with the largest inputs are rounded first, so their errors are the ones later columns
    absorb); the permutation is applied while the float32 copy below is formed, so it costs neither a second
    factorisation nor a `K^2` float64 copy.

    With `J` the reversal permutation and `J H J = M M^T` (lower Cholesky), `A = J M J`: one Cholesky (torch, on
    the set thread count), `K^3 / 3` multiply-adds, in float32 (the damping bounds the condition number; float64
    where float32 finds the matrix not positive definite): on inputs whose channels' mean squares span 185-413x the
    codes `gptq_on_grid` chooses were those of the float64 factor (`benchmarks/gptq_forms.py`). The inverse-Hessian factor of GPTQ's paper,
    `U` upper with `H^-1 = U^T U`, is `A^-1`; its update of column `m` after column `i` is rounded,
    `-e_i U_im / U_ii` with `e_i` the column's error at that time, equals `d_i A_im / A_mm` with `d_i` the
    column's final error `w_i - q_i` (`gptq`'s module doc), so `U` (a triangular inverse more, `K^3`) is never
    formed.

    `overwrite` (a float64 `hessian` the caller no longer needs): its buffer is damped in place instead of a
    copy, so the caller's float64 array and two float32 ones are alive at once (LFM2-1.2B's FFN input, K = 8192:
    1.1 GB)."""
    import torch

    h = torch.from_numpy(hessian) if overwrite else torch.tensor(np.asarray(hessian, np.float64))
    k = h.shape[0]
    order = None
    if act_order:  # descending diagonal; dead channels (<= 0) last, in index order
        order = torch.sort(-torch.diagonal(h).clamp_min(0), stable=True).indices
    dead = torch.diagonal(h) <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    mean = float(torch.diagonal(h).mean())
    h.diagonal().add_(damp * (mean if mean > 0 else 1.0))
    step = max(1, (1 << 22) // max(k, 1))
    flipped = torch.empty((k, k), dtype=torch.float32)
    rev = None if order is None else order.flip(0)
    # J H J (act-order: J P^T H P J) in float32, a row block at a time (no K^2 float64 copy)
    for r0 in range(0, k, step):
        r1 = min(k, r0 + step)
        if rev is None:
            flipped[r0:r1] = h[k - r1 : k - r0].flip(0, 1)
        else:
            flipped[r0:r1] = h[rev[r0:r1]][:, rev]
    low, info = torch.linalg.cholesky_ex(flipped)
    if int(info):  # not positive definite in float32: factor in float64
        low = torch.linalg.cholesky(h.flip(0, 1) if rev is None else h[rev][:, rev]).float()
    del h, flipped
    upper = low.flip(0, 1).numpy()
    return upper if order is None else OrderedFactor(upper, order.numpy().astype(np.int64))


ROUND_CHUNK_ROWS = 256
"""At least this many rows per task of `gptq_on_grid`'s within-batch loop (rows are independent there: the codes
do not depend on it)."""


BLOCK_CHUNK_ROWS = 2048
"""Rows per task of `gptq`'s block work (search and column loop): a block's columns for these rows,
`[block, rows]` float32, and the search's scratch stay in a core's L2 cache (codes do not depend on it)."""


def _row_chunks(n: int, rows: int) -> list[slice]:
    """`n` rows in slices of at most `rows`, as even as that allows (tasks for the pool)."""
    parts = max(1, -(-n // rows))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _row_tasks(n: int, threads: int) -> list[slice]:
    """Row slices of `n` rows for `threads` workers (at least `ROUND_CHUNK_ROWS` rows each)."""
    parts = max(1, min(threads, n // ROUND_CHUNK_ROWS))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _prior(resid: np.ndarray, a: np.ndarray, inv_diag: np.ndarray, c0: int, c1: int) -> np.ndarray | None:
    """`(resid[:, :c0] @ A[:c0, c0:c1]) / diag(A)[c0:c1]`: what the columns before `c0` pass on to `c0:c1`."""
    if c0 == 0:
        return None
    return (resid[:, :c0] @ a[:c0, c0:c1]) * inv_diag[c0:c1]


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS on one thread while the block runs (`threadpoolctl`): each block's product is thin
    (`[N, c0] x [c0, block]`), and on two threads its synchronisation and the BLAS threads left spinning after
    it cost more than the split gains (LFM2-350M's linear shapes, each timed once and weighted by its count,
    2 cores with another job beside: 59 s for all of `gptq` with two BLAS threads, 31 s with one)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        yield


@contextmanager
def _workers(tasks: int, threads: int) -> Iterator[Callable[[Callable[[slice], None], list[slice]], None]]:
    """A `run(work, row_slices)` that calls `work` on every slice, on a pool of `threads` threads kept for the
    whole matrix (numpy releases the GIL in the elementwise work of a slice)."""
    if tasks < 2 or threads < 2:

        def serial(work: Callable[[slice], None], slices: list[slice]) -> None:
            for r in slices:
                work(r)

        yield serial
        return
    with ThreadPoolExecutor(min(threads, tasks)) as pool:

        def parallel(work: Callable[[slice], None], slices: list[slice]) -> None:
            list(pool.map(work, slices))

        yield parallel


def _pairwise_sum(t: np.ndarray, start: int = 0, n: int | None = None) -> np.ndarray:
    """The sum over rows `start:start + n` of `t [rows, R]` (float32), in the order numpy's `sum` adds a
    contiguous axis (its pairwise sum: eight running sums in blocks of up to 128, halves above), so a search
    working on columns `[block, R]` gets, bit for bit, the errors `_search_blocks` gets from `[R, block]`."""
    n = t.shape[0] - start if n is None else n
    if n < 8:
        res = t[start].copy()
        for i in range(start + 1, start + n):
            res += t[i]
        return res
    if n <= 128:
        whole = n - n % 8
        r = t[start : start + 8] + t[start + 8 : start + 16] if whole >= 16 else t[start : start + 8].copy()
        for i in range(start + 16, start + whole, 8):
            r += t[i : i + 8]
        pairs = r[0::2] + r[1::2]  # (r0 + r1), (r2 + r3), (r4 + r5), (r6 + r7)
        res = (pairs[0] + pairs[1]) + (pairs[2] + pairs[3])
        for i in range(start + whole, start + n):
            res += t[i]
        return res
    half = n // 2
    half -= half % 8
    return _pairwise_sum(t, start, half) + _pairwise_sum(t, start + half, n - half)


def _search_columns(
    cols: np.ndarray, bits: int, imp: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_search_blocks` on one block held by columns, `cols [block, R]` (`imp [block, R]`, each row the
    channel's weight): the best shrink factor per row, the block's extreme and its index, the same values as
    `_search_blocks` gives for `cols.T` (the same operations per element; the error summed in numpy's order)."""
    half = 2 ** (bits - 1)
    r = cols.shape[1]
    idx = np.abs(cols).argmax(0)
    extreme = cols[idx, np.arange(r)]
    best = np.ones(r, np.float32)
    best_err: np.ndarray | None = None
    t = np.empty_like(cols)
    for f in MSE_GRIDS[bits]:
        shrink = np.float32(f)
        scale, safe = _symmetric_scale(cols, bits, shrink, (extreme,))
        np.divide(cols, safe, out=t)
        np.rint(t, out=t)
        np.clip(t, -half, half - 1, out=t)
        t *= scale
        t -= cols
        np.square(t, out=t)
        t *= imp
        err = _pairwise_sum(t)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        np.copyto(best_err, err, where=better)
        best[better] = shrink
    return best, extreme, idx


def _gptq_block(
    rows: slice,
    x: np.ndarray,
    prior: np.ndarray | None,
    c0: int,
    c1: int,
    within: np.ndarray,
    bits: int,
    imp: np.ndarray,
    out: tuple[np.ndarray, np.ndarray, np.ndarray],
    b: int,
) -> None:
    """`gptq`'s block `c0:c1` on `rows`, held by columns (`[block, rows]`, each column contiguous): the scale
    search, then the columns one at a time, each passing its error `d` on to the block's later columns
    (`within[j, m] = A_jm / A_mm`); codes (`out[0]`, `[K, N]`), residuals, scales to `out`."""
    codes, resid, scales = out
    half = 2 ** (bits - 1)
    m = c1 - c0
    orig = _columns(x, rows, c0, c1)
    cols = orig.copy() if prior is None else orig + prior[rows].T
    best, extreme, idx = _search_columns(cols, bits, np.broadcast_to(imp[:, None], cols.shape).copy())
    scale, safe = _symmetric_scale(cols, bits, best, (extreme,))
    anchor = np.where(scale != 0, idx, -1)
    # the rows whose extreme is column j: by_col[starts[j] : starts[j + 1]]
    by_col = np.argsort(anchor, kind="stable")
    starts = np.searchsorted(anchor, np.arange(m + 1), sorter=by_col)
    out_c = np.empty(cols.shape, np.uint8)
    out_r = np.empty_like(cols)
    q = np.empty_like(safe)
    step = np.empty_like(cols)
    for j in range(m):
        np.divide(cols[j], safe, out=q)
        np.rint(q, out=q)
        np.clip(q, -half, half - 1, out=q)
        q[by_col[starts[j] : starts[j + 1]]] = -half
        out_c[j] = q + half
        np.multiply(q, scale, out=q)
        d = np.subtract(orig[j], q, out=out_r[j])
        if j + 1 < m:
            upd = np.multiply(within[j, j + 1 :, None], d, out=step[: m - j - 1])
            cols[j + 1 :] += upd
    codes[rows, c0:c1] = out_c.T
    resid[rows, c0:c1] = out_r.T
    scales[rows, b] = scale


TILE_ROWS = 256
"""Rows per tile of `_columns`' transposing copy (numpy's own reads a strided source far slower)."""


def _columns(x: np.ndarray, rows: slice, c0: int, c1: int) -> np.ndarray:
    """`x[rows, c0:c1].T` as a contiguous `[c1 - c0, rows]` float32 array, copied a tile of rows at a time."""
    r0, r1, _ = rows.indices(x.shape[0])
    out = np.empty((c1 - c0, r1 - r0), np.float32)
    for t in range(r0, r1, TILE_ROWS):
        np.copyto(out[:, t - r0 : min(r1, t + TILE_ROWS) - r0], x[t : min(r1, t + TILE_ROWS), c0:c1].T)
    return out


def gptq(
    w: np.ndarray,
    bits: int,
    block_size: int,
    hessian: np.ndarray,
    damp: float = DAMP,
    factor: np.ndarray | None = None,
    threads: int = 1,
) -> Quantized:
    """GPTQ-rounded symmetric block quantization of `w [N, K]` given the inputs' second-moment matrix
    `hessian [K, K]` (see the module doc). `factor`: `cholesky_factor(hessian, damp)` when the caller already
    has it (linears that share one input share it). `threads`: workers for the within-block work (row tasks;
    the codes do not depend on it)."""
    n, k = w.shape
    if k % block_size:
        raise ValueError(f"block size {block_size} does not divide {k}")
    if hessian.shape != (k, k):
        raise ValueError(f"hessian {hessian.shape} for a weight of input dimension {k}")
    nb = k // block_size
    a = np.asarray(cholesky_factor(hessian, damp) if factor is None else factor, np.float32)
    inv_diag = (np.float32(1) / np.diag(a)).astype(np.float32)
    diag_h = np.diag(np.asarray(hessian, np.float64))
    x = np.asarray(w, np.float32)
    out = (np.empty((n, k), np.uint8), np.empty((n, k), np.float32), np.empty((n, nb), np.float32))
    tasks = _row_chunks(n, BLOCK_CHUNK_ROWS)
    with _workers(len(tasks), threads) as run, one_blas_thread():
        for b in range(nb):
            c0, c1 = b * block_size, (b + 1) * block_size
            prior = _prior(out[1], a, inv_diag, c0, c1)
            imp = _importance(diag_h[c0:c1], block_size)
            within = a[c0:c1, c0:c1] * inv_diag[None, c0:c1]
            run(
                partial(
                    _gptq_block,
                    x=x,
                    prior=prior,
                    c0=c0,
                    c1=c1,
                    within=within,
                    bits=bits,
                    imp=imp,
                    out=out,
                    b=b,
                ),
                tasks,
            )
    return Quantized(out[0], out[2], None, bits, block_size)


GRID_BATCH = 32
"""Columns `gptq_on_grid` rounds before the next block's share of their error is formed (one product)."""

BlockGrid = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray | None]]
"""`fit(cols, c0) -> (step, offset)`: the grid of one block of columns `c0 : c0 + width` (`step`, `offset`
`[N, width]` float32, offset None for 0) fitted to `cols [N, width]`, the block's columns as the errors of every
earlier column have updated them (`gptq_on_blocks`)."""


def gptq_on_grid(
    w: np.ndarray,
    step: np.ndarray,
    offset: np.ndarray | None,
    lo: int,
    hi: int,
    factor: Factor,
    threads: int = 1,
) -> np.ndarray:
    """Integer codes `[N, K]` (int16) of `w [N, K]` on the grid `step * q - offset` (`step`, `offset`: `[N, K]`
    float32, per value; `q` in `[lo, hi]`; a zero step gives code 0) chosen left to right by GPTQ: column `m`
    is rounded after adding `sum_{i<m} d_i A_im / A_mm`, `d_i` the final error of column `i` and `A` the
    `factor` (`cholesky_factor(H)`), so correlated inputs absorb it (GPTQ's update, see `cholesky_factor`).
    The values a format holds are its own dequantization of these codes; `step * q - offset` here only guides
    the choice. `threads`: workers for the within-batch loop (row slices; the codes do not depend on it).

    The grid is fixed before the sweep (fitted to the original weights): GGUF `-gptq`'s form (`gptq_on_blocks`
    fits each block's grid during the sweep instead). An `OrderedFactor` (act-order with static groups): the
    columns are rounded in its `order`, each on its own value of the grid (so on its own block's scales, fitted
    before the sweep), and the codes returned in the original column order."""
    st = np.asarray(step, np.float32)
    off = None if offset is None else np.asarray(offset, np.float32)
    if isinstance(factor, OrderedFactor):
        o = factor.order
        x = np.asarray(w, np.float32)[:, o]
        codes = gptq_on_grid(x, st[:, o], None if off is None else off[:, o], lo, hi, factor.upper, threads)
        out = np.empty_like(codes)
        out[:, o] = codes
        return out

    def fixed(_cols: np.ndarray, c0: int) -> tuple[np.ndarray, np.ndarray | None]:
        c1 = c0 + _cols.shape[1]
        return st[:, c0:c1], None if off is None else off[:, c0:c1]

    return _sweep(w, GRID_BATCH, fixed, lo, hi, factor, threads, fixed_grid=True)


def gptq_on_blocks(
    w: np.ndarray,
    block: int,
    fit: BlockGrid,
    lo: int,
    hi: int,
    factor: np.ndarray,
    threads: int = 1,
) -> np.ndarray:
    """Integer codes `[N, K]` (int16) of `w [N, K]` chosen by GPTQ as `gptq_on_grid`, with each block's grid
    fitted when the sweep reaches it: `fit(cols, c0)` gets the block's columns `c0 : c0 + block` as updated by
    the errors of every column before `c0` (GPTQ with groups: the scale sees the compensated values, not the
    original ones) and returns its grid, which the block's columns are then rounded on, `GRID_BATCH` at a
    time. `fit` keeps whatever the format stores (its scales); the caller packs those with these codes, so the
    file holds the grid the codes were chosen on. `block` a multiple of `GRID_BATCH` dividing `K`. The products
    run on one BLAS thread (`one_blas_thread`)."""
    k = w.shape[1]
    if isinstance(factor, OrderedFactor):
        raise ValueError("gptq_on_blocks fits blocks in column order; it takes no act-order factor")
    if block % GRID_BATCH or k % block:
        raise ValueError(f"block {block}: a multiple of {GRID_BATCH} dividing {k} expected")
    return _sweep(w, block, fit, lo, hi, factor, threads, fixed_grid=False)


def _sweep(
    w: np.ndarray,
    block: int,
    fit: BlockGrid,
    lo: int,
    hi: int,
    factor: np.ndarray,
    threads: int,
    fixed_grid: bool,
) -> np.ndarray:
    """The GPTQ sweep of `gptq_on_grid` / `gptq_on_blocks`: per block of `block` columns, what earlier blocks
    pass on (one product), the block's grid from `fit`, then its columns in batches of `GRID_BATCH` (a batch's
    share from the block's earlier batches: one product more), each column on row slices in parallel.

    The block's columns `fit` gets are GPTQ's working weights once every earlier column is rounded (the paper's
    form: `W[:, b0:b1]` after the updates through the inverse Hessian's factor `U = A^-1`), which are not the
    partial sums the sweep rounds with (`w_m + sum_{i<b0} d_i A_im / A_mm` holds only for `m = b0`): with
    `P = d[:, :b0] A[:b0, b0:b1]`, `W[:, b0:b1] = w[:, b0:b1] + P A[b0:b1, b0:b1]^-1` (the top right block of the
    inverse of the triangular `A` is `-A11^-1 A12 A22^-1`, and `e_i / U_ii = (d A)_i`). `fixed_grid`: `fit`
    reads no columns (`gptq_on_grid`), so none are formed and the products run on the BLAS threads numpy was
    started with (its codes as before `gptq_on_blocks`); else on one (`one_blas_thread`)."""
    n, k = w.shape
    a = np.asarray(factor, np.float32)
    inv_diag = (np.float32(1) / np.diag(a)).astype(np.float32)
    x = np.ascontiguousarray(w, np.float32)  # row-major: `_grid_block`'s transposed copies must be copies
    resid = np.empty((n, k), np.float32)
    codes = np.empty((n, k), np.int16)
    tasks = _row_tasks(n, threads)
    blas = nullcontext() if fixed_grid else one_blas_thread()
    with _workers(len(tasks), threads) as run, blas:
        for b0 in range(0, k, block):
            b1 = min(k, b0 + block)
            passed = None if b0 == 0 else resid[:, :b0] @ a[:b0, b0:b1]
            before = None if passed is None else passed * inv_diag[b0:b1]
            if fixed_grid or passed is None:
                st, off = fit(x[:, b0:b1], b0)
            else:
                inv = np.linalg.inv(a[b0:b1, b0:b1].astype(np.float64)).astype(np.float32)
                st, off = fit(x[:, b0:b1] + passed @ inv, b0)
            for c0 in range(b0, b1, GRID_BATCH):
                c1 = min(b1, c0 + GRID_BATCH)
                s0, s1 = c0 - b0, c1 - b0
                prior = None if before is None else before[:, s0:s1]
                if c0 > b0:
                    inner = (resid[:, b0:c0] @ a[b0:c0, c0:c1]) * inv_diag[c0:c1]
                    prior = inner if prior is None else prior + inner
                within = a[c0:c1, c0:c1] * inv_diag[None, c0:c1]
                run(
                    partial(
                        _grid_block,
                        x=x,
                        prior=prior,
                        c0=c0,
                        c1=c1,
                        within=within,
                        grid=(st[:, s0:s1], None if off is None else off[:, s0:s1], lo, hi),
                        out=(codes, resid),
                    ),
                    tasks,
                )
    return codes


def _grid_block(
    rows: slice,
    x: np.ndarray,
    prior: np.ndarray | None,
    c0: int,
    c1: int,
    within: np.ndarray,
    grid: tuple[np.ndarray, np.ndarray | None, int, int],
    out: tuple[np.ndarray, np.ndarray],
) -> None:
    """The sweep's columns `c0:c1` on `rows`, one at a time (see `_gptq_block`); `grid`'s step and offset are
    the batch's columns (`[N, c1 - c0]`)."""
    st, off, lo, hi = grid
    codes, resid = out
    cols = np.ascontiguousarray((x[rows, c0:c1] if prior is None else x[rows, c0:c1] + prior[rows]).T)
    orig = np.ascontiguousarray(x[rows, c0:c1].T)
    s = np.ascontiguousarray(st[rows].T)
    o = np.zeros_like(s) if off is None else np.ascontiguousarray(off[rows].T)
    safe = np.where(s == 0, np.float32(1), s)
    out_c = np.empty(cols.shape, np.int16)
    out_r = np.empty_like(cols)
    for j in range(c1 - c0):
        q = np.clip(np.rint((cols[j] + o[j]) / safe[j]), lo, hi)
        q[s[j] == 0] = 0
        out_c[j] = q
        d = orig[j] - (q * s[j] - o[j])
        out_r[j] = d
        if j + 1 < c1 - c0:
            cols[j + 1 :] += within[j, j + 1 :, None] * d
    codes[rows, c0:c1] = out_c.T
    resid[rows, c0:c1] = out_r.T


def refit_scales(
    w: np.ndarray, bases: list[np.ndarray], block: int, scales: np.ndarray, factor: np.ndarray
) -> np.ndarray:
    """Scales `[N, K / block, m]` for values `v = sum_t bases[t] * s[:, j // block, t]` (`bases`: `m` arrays
    `[N, K]`, the codes fixed: a block's codes, or its scale codes times codes and its min codes), each row's
    chosen by least squares on the Hessian-weighted error `(w - v) H (w - v)^T` (`H = A A^T`, `A` the `factor`,
    damped as GPTQ rounds with), rounded to fp16 (what the file stores); a row keeps `scales` (same shape) where
    that error is not lower. GPTQ chooses the codes for the scales it was given; this second pass fits the
    scales to the codes it chose. `N K^2 m` multiply-adds for the normal equations, `N (K / block)^3 m^3` for
    solving them."""
    n, k = w.shape
    nb, m = k // block, len(bases)
    a = np.asarray(factor, np.float32)
    h = a @ a.T
    x = np.asarray(w, np.float32)
    hw = x @ h
    nu = nb * m
    gram = np.empty((n, nu, nu), np.float64)
    rhs = np.empty((n, nu), np.float64)
    for t in range(m):
        rhs[:, t::m] = (bases[t] * hw).reshape(n, nb, block).sum(-1)
    for c in range(nb):
        cs = slice(c * block, (c + 1) * block)
        for u in range(m):
            g = bases[u][:, cs] @ h[cs, :]
            for t in range(m):
                gram[:, t::m, c * m + u] = (bases[t] * g).reshape(n, nb, block).sum(-1)
    ridge = 1e-9 * np.maximum(np.trace(gram, axis1=1, axis2=2) / nu, 1e-30)
    gram[:, np.arange(nu), np.arange(nu)] += ridge[:, None]
    fitted = np.linalg.solve(gram, rhs[..., None])[..., 0].reshape(n, nb, m)
    fitted = np.where(np.isfinite(fitted), fitted, scales).astype(np.float16).astype(np.float32)

    def errors(s: np.ndarray) -> np.ndarray:
        v = sum(bases[t] * np.repeat(s[..., t], block, -1) for t in range(m))
        d = x - v
        return ((d @ h) * d).sum(-1)

    better = errors(fitted) < errors(scales)
    return np.where(better[:, None, None], fitted, scales)
