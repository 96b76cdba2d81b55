"""Calibrated rounding (`lfm_export.rounding`), its codes by row content (`lfm_export.calibrated`) and the recipe
names that select it: on small random matrices with correlated, unevenly scaled inputs."""

from __future__ import annotations

import numpy as np
import pytest

from lfm_export import calibrated
from lfm_export.contract.errors import UnsupportedError
from lfm_export.quant import quantize_block, quantize_weight
from lfm_export.recipes import parse_recipe
from lfm_export.rounding import gptq, hessian_error, weighted_search

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def layer() -> tuple[np.ndarray, np.ndarray]:
    """A weight `[48, 128]` (Student-t, as trained weights' tails) and the second-moment matrix of inputs whose
    channels are correlated and differ in scale by up to ~20x."""
    rng = np.random.default_rng(7)
    k, tokens = 128, 1024
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = (rng.standard_normal((tokens, k)) @ mix) * np.exp(rng.standard_normal(k))
    w = (rng.standard_t(4, (48, k)) * 0.02).astype(np.float32)
    return w, x.T @ x / tokens


@pytest.mark.parametrize("bits,block", [(4, 32), (4, 128), (8, 64)])
def test_gptq_lowers_the_output_error_of_plain_rounding(layer, bits: int, block: int) -> None:
    w, h = layer
    plain = hessian_error(w, quantize_block(w, bits, block).dequantize(), h)
    ours = hessian_error(w, gptq(w, bits, block, h).dequantize(), h)
    assert ours < 0.7 * plain, (ours, plain)


def test_importance_search_lowers_the_weighted_error_in_every_block(layer) -> None:
    w, h = layer
    d = np.diag(h).astype(np.float32)

    def per_block(q) -> np.ndarray:
        return (((w - q.dequantize()) ** 2 * d).reshape(48, -1, 32)).sum(-1)

    plain, ours = per_block(quantize_block(w, 4, 32)), per_block(weighted_search(w, 4, 32, d))
    assert (ours <= plain * (1 + 1e-6)).all()
    assert ours.sum() < 0.9 * plain.sum()


@pytest.mark.parametrize("method", ["imat", "gptq"])
def test_calibrated_values_requantize_to_the_same_codes(layer, method: str) -> None:
    """Each block's extreme keeps the most negative code: plain rounding of the dequantized values gives back
    the same codes and scales, so a format that requantizes values holds them as they are."""
    w, h = layer
    q = gptq(w, 4, 32, h) if method == "gptq" else weighted_search(w, 4, 32, np.diag(h))
    again = quantize_block(q.dequantize(), 4, 32)
    assert np.array_equal(again.codes, q.codes)
    assert np.array_equal(again.scales, q.scales)


def test_quantize_weight_reads_the_active_table_by_row_content(layer) -> None:
    w, h = layer
    recipe = parse_recipe("int4-b32-gptq")
    with pytest.raises(calibrated.CalibrationMissing, match="calibration"):
        quantize_weight(w, recipe)
    q = gptq(w, 4, 32, h)
    table = calibrated.Table()
    table.add(w, 4, 32, q.codes, q.scales)
    other = np.random.default_rng(1).standard_normal((8, 128)).astype(np.float32)
    mixed = np.concatenate([w[::2], other, w[1::2]])  # rows reordered and interleaved with unknown ones
    with calibrated.active(table):
        got = quantize_weight(mixed, recipe)
        head = quantize_weight(w, recipe, bits=8)  # other bits: not in the table, plain rounding
    n = len(w[::2])
    assert np.array_equal(got.codes[:n], q.codes[::2])
    assert np.array_equal(got.codes[n + 8 :], q.codes[1::2])
    assert np.array_equal(got.codes[n : n + 8], quantize_block(other, 4, 32).codes)
    assert np.array_equal(head.codes, quantize_block(w, 8, 32).codes)
    assert not np.array_equal(q.codes, quantize_block(w, 4, 32).codes)


def test_recipe_names() -> None:
    assert parse_recipe("int4-b64-gptq").name == "int4-b64-gptq"
    assert parse_recipe("int4-imat").rounding == "imat"
    assert parse_recipe("int8-pc-gptq").name == "int8-pc-gptq"
    with pytest.raises(UnsupportedError, match="symmetric only"):
        parse_recipe("int4-b32-asym-gptq")
    with pytest.raises(UnsupportedError, match="unknown"):
        parse_recipe("int4-gptq-imat")


def test_gptq_on_grid_matches_the_papers_form(layer) -> None:
    """`gptq_on_grid` works from the Hessian's Cholesky factor; the paper's form, written out here in float64
    (the inverse Hessian's upper Cholesky factor `U`, each column's error pushed right through `U`), chooses the
    same codes on the same grid."""
    from lfm_export.rounding import DAMP, cholesky_factor, gptq_on_grid

    w, h = layer
    n, k = w.shape
    step = np.repeat(quantize_block(w, 4, 32).scales, 32, -1).astype(np.float64)
    damped = h + DAMP * np.diag(h).mean() * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(damped)).T
    work = w.astype(np.float64)
    theirs = np.empty((n, k), np.int16)
    for j in range(k):
        q = np.clip(np.rint(work[:, j] / step[:, j]), -8, 7)
        theirs[:, j] = q
        work[:, j + 1 :] -= np.outer((work[:, j] - q * step[:, j]) / u[j, j], u[j, j + 1 :])
    ours = gptq_on_grid(w, step.astype(np.float32), None, -8, 7, cholesky_factor(h))
    assert (ours == theirs).mean() > 0.999
    err_ours, err_theirs = (hessian_error(w, c * step, h) for c in (ours, theirs))
    assert abs(err_ours / err_theirs - 1) < 1e-3


def test_gptq_on_grid_with_act_order_is_the_papers_form_in_descending_hessian_order(layer) -> None:
    """Act-order with static groups: `cholesky_factor(act_order=True)` orders the inputs by descending
    `diag(H)` and factors the permuted Hessian; `gptq_on_grid` then rounds the columns in that order, each on
    its own block's fixed grid, and returns the codes in the original order. The paper's form on the permuted
    weight, grid and Hessian (float64) chooses the same codes; and here, where the inputs' scales differ by up
    to ~20x, the output error is lower than in the original column order."""
    from lfm_export.rounding import DAMP, OrderedFactor, cholesky_factor, gptq_on_grid

    w, h = layer
    n, k = w.shape
    f = cholesky_factor(h, act_order=True)
    assert isinstance(f, OrderedFactor) and sorted(f.order) == list(range(k))
    assert (np.diff(np.diag(h)[f.order]) <= 0).all()
    step = np.repeat(quantize_block(w, 4, 32).scales, 32, -1).astype(np.float32)
    o = f.order
    hp = h[o][:, o]
    u = np.linalg.cholesky(np.linalg.inv(hp + DAMP * np.diag(hp).mean() * np.eye(k))).T
    work, sp = w[:, o].astype(np.float64), step[:, o].astype(np.float64)
    theirs = np.empty((n, k), np.int16)
    for j in range(k):
        q = np.clip(np.rint(work[:, j] / sp[:, j]), -8, 7)
        theirs[:, o[j]] = q
        work[:, j + 1 :] -= np.outer((work[:, j] - q * sp[:, j]) / u[j, j], u[j, j + 1 :])
    ours = gptq_on_grid(w, step, None, -8, 7, f)
    assert (ours == theirs).mean() > 0.999
    in_order = gptq_on_grid(w, step, None, -8, 7, cholesky_factor(h))
    assert hessian_error(w, ours * step, h) < 0.8 * hessian_error(w, in_order * step, h)


def test_gptq_on_blocks_fits_each_block_on_the_updated_columns_as_the_papers_form(layer) -> None:
    """`gptq_on_blocks` (GPTQ with groups): each block's grid is fitted when the sweep reaches it, on the block's
    columns as the earlier columns' errors have updated them. The paper's form written out here in float64,
    with the block's absmax scale taken from its updated columns at its first column, chooses the same codes;
    and the blocks' scales differ from those of the original weights (the grid is not fixed beforehand)."""
    from lfm_export.rounding import DAMP, cholesky_factor, gptq_on_blocks

    w, h = layer
    n, k = w.shape
    block = 64  # two of gptq_on_blocks' batches of 32: the block's later batch gets its earlier batch's share

    def absmax(cols: np.ndarray) -> np.ndarray:
        return np.abs(cols).max(-1, keepdims=True) / 7

    seen: list[np.ndarray] = []

    def fit(cols: np.ndarray, c0: int) -> tuple[np.ndarray, None]:
        step = absmax(cols).astype(np.float32)
        seen.append(step)
        return np.repeat(step, cols.shape[1], -1), None

    ours = gptq_on_blocks(w, block, fit, -8, 7, cholesky_factor(h))
    damped = h + DAMP * np.diag(h).mean() * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(damped)).T
    work = w.astype(np.float64)
    theirs = np.empty((n, k), np.int16)
    steps = []
    for j in range(k):
        if j % block == 0:
            steps.append(absmax(work[:, j : j + block]))
        step = steps[-1][:, 0]
        q = np.clip(np.rint(work[:, j] / step), -8, 7)
        theirs[:, j] = q
        work[:, j + 1 :] -= np.outer((work[:, j] - q * step) / u[j, j], u[j, j + 1 :])
    assert (ours == theirs).mean() > 0.999
    np.testing.assert_allclose(np.concatenate(seen, 1), np.concatenate(steps, 1), rtol=1e-4)
    original = np.concatenate([absmax(w[:, c : c + block]) for c in range(0, k, block)], 1)
    assert not np.allclose(original[:, 1:], np.concatenate(steps, 1)[:, 1:], rtol=1e-3)


def test_refit_scales_recovers_the_scales_of_exact_codes(layer) -> None:
    """`refit_scales`: weights that are exactly `s * q` (fp16 scales `s`, integer codes `q`; blocks of 32) with
    the scales given 10% off come back with `s` (the Hessian-weighted error 0), and a row whose given scales are
    already its best keeps them."""
    from lfm_export.rounding import cholesky_factor, refit_scales

    _, h = layer
    rng = np.random.default_rng(5)
    n, k = 6, h.shape[0]
    q = rng.integers(-8, 8, (n, k)).astype(np.float32)
    s = rng.uniform(0.01, 0.05, (n, k // 32, 1)).astype(np.float16).astype(np.float32)
    w = q * np.repeat(s[..., 0], 32, -1)
    off = s * np.float32(1.1)
    off[0] = s[0]
    got = refit_scales(w, [q], 32, off, cholesky_factor(h))
    assert np.array_equal(got, s)


def _gptq_by_rows(w: np.ndarray, bits: int, block: int, h: np.ndarray, a: np.ndarray):
    """GPTQ from the factor `a` written out here with each block held by rows `[N, block]`, as `gptq` held it
    before it held a block by columns: the `-imat` search over `MSE_GRIDS` with numpy's own `sum` over each
    block's weighted squared errors, the block's extreme on the most negative code, the columns one at a time."""
    from lfm_export.quant import MSE_GRIDS

    n, k = w.shape
    half = 2 ** (bits - 1)
    inv = (np.float32(1) / np.diag(a)).astype(np.float32)
    resid = np.empty((n, k), np.float32)
    codes = np.empty((n, k), np.uint8)
    scales = np.empty((n, k // block), np.float32)
    for b in range(k // block):
        c0, c1 = b * block, (b + 1) * block
        blk = w[:, c0:c1].copy()
        if c0:
            blk += (resid[:, :c0] @ a[:c0, c0:c1]) * inv[c0:c1]
        d = np.diag(h)[c0:c1]
        imp = (d + 1e-6 * d.mean()).astype(np.float32)
        idx = np.abs(blk).argmax(-1)
        extreme = blk[np.arange(n), idx]
        best, best_err = np.ones(n, np.float32), None
        for f in MSE_GRIDS[bits]:
            scale = (extreme * np.float32(f) / -half).astype(np.float32)
            safe = np.where(scale == 0, 1.0, scale).astype(np.float32)
            t = np.clip(np.rint(blk / safe[:, None]), -half, half - 1) * scale[:, None] - blk
            err = (t * t * imp).sum(-1)
            if best_err is None:
                best_err = err
            else:
                better = err < best_err
                best_err[better], best[better] = err[better], np.float32(f)
        scale = (extreme * best / -half).astype(np.float32)
        safe = np.where(scale == 0, 1.0, scale).astype(np.float32)
        anchor = np.where(scale != 0, idx, -1)
        within = a[c0:c1, c0:c1] * inv[None, c0:c1]
        for j in range(block):
            q = np.clip(np.rint(blk[:, j] / safe), -half, half - 1)
            q[anchor == j] = -half
            codes[:, c0 + j] = q + half
            resid[:, c0 + j] = w[:, c0 + j] - q * scale
            blk[:, j + 1 :] += resid[:, c0 + j, None] * within[j, j + 1 :]
        scales[:, b] = scale
    return codes, scales


@pytest.mark.parametrize("bits,block", [(4, 8), (4, 32), (8, 64), (4, 256)])
def test_gptq_by_columns_chooses_the_codes_of_the_form_by_rows(
    layer, monkeypatch, bits: int, block: int
) -> None:
    """`gptq` holds a block by columns and sums the search's errors over them in numpy's own pairwise order
    (`_pairwise_sum`); the codes and scales are those of the form by rows, bit for bit, at every block size
    (below 8 columns, up to 128, above), with rows in several tasks on threads."""
    from lfm_export import rounding

    w, h = layer
    w = np.concatenate([w, w[:, ::-1] * 1.5, w * 0.5])  # 144 rows: tasks of 64 rows, the last one shorter
    h = np.kron(np.eye(2), h) + 0.1 * np.diag(np.diag(np.kron(np.ones((2, 2)), h)))  # K = 256
    w = np.concatenate([w, w[:, ::-1]], axis=1)
    a = rounding.cholesky_factor(h)
    monkeypatch.setattr(rounding, "BLOCK_CHUNK_ROWS", 64)
    ours = gptq(w, bits, block, h, factor=a, threads=2)
    codes, scales = _gptq_by_rows(w, bits, block, h, a)
    assert np.array_equal(ours.codes, codes)
    assert np.array_equal(ours.scales, scales)


@pytest.mark.parametrize("n", [1, 5, 8, 13, 32, 64, 100, 128, 136, 256, 300])
def test_pairwise_sum_adds_in_numpys_order(n: int) -> None:
    """The search's errors, summed over a block's columns, are numpy's own `sum` over the block's row, bit for
    bit, for every block length (values spanning 12 orders of magnitude, so the order shows)."""
    from lfm_export.rounding import _pairwise_sum

    rng = np.random.default_rng(n)
    t = (rng.standard_normal((n, 500)) * np.exp(rng.uniform(-14, 14, (n, 500)))).astype(np.float32)
    assert np.array_equal(_pairwise_sum(t), np.ascontiguousarray(t.T).sum(-1))
    if n >= 8:  # another order (float64, rounded once) gives other values: the test can tell orders apart
        exact = t.sum(0, dtype=np.float64).astype(np.float32)
        assert not np.array_equal(np.ascontiguousarray(t.T).sum(-1), exact)


def test_gptq_codes_do_not_depend_on_the_thread_count(layer, monkeypatch) -> None:
    """Rows run in slices on threads inside a block; the codes and scales are those of one thread."""
    from lfm_export import rounding
    from lfm_export.rounding import cholesky_factor, gptq_on_grid

    monkeypatch.setattr(rounding, "BLOCK_CHUNK_ROWS", 256)
    _, h = layer
    w = (np.random.default_rng(3).standard_t(4, (1100, 128)) * 0.02).astype(np.float32)
    a = cholesky_factor(h)
    one, two = gptq(w, 4, 32, h, factor=a), gptq(w, 4, 32, h, factor=a, threads=3)
    assert np.array_equal(one.codes, two.codes) and np.array_equal(one.scales, two.scales)
    step = np.repeat(one.scales, 32, -1)
    assert np.array_equal(gptq_on_grid(w, step, None, -8, 7, a), gptq_on_grid(w, step, None, -8, 7, a, 3))
