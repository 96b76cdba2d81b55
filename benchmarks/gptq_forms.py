"""GPTQ as `lfm_export.rounding` writes it (the Hessian's Cholesky factor `A`, `H = A A^T`; earlier blocks' share
formed when a block is reached; row slices on threads) against the paper's form written out here (the inverse
Hessian's upper Cholesky factor `U`, `H^-1 = U^T U`, formed by a triangular inverse; each column's error pushed
right through `U`, the columns right of a block updated once per block): the same maths in another float order.

    .venv/bin/python benchmarks/gptq_forms.py --seeds 12 --threads 2 --json benchmarks/results/gptq_forms.json

Per seed, a random weight (Student-t) and the second-moment matrix of correlated inputs whose channels differ
in scale (as `tests/core/test_rounding.py`'s), both forms' output error `trace((W - Q) H (W - Q)^T)` for the
core's `gptq` (int4, blocks of 32) and for `gptq_on_grid` (on the plain scales), their ratio and the share of
equal codes. Then, on inputs with outlier channels (mean squares spanning ~400x), the codes `gptq_on_grid`
chooses from `cholesky_factor` (float32) against a float64 factor. `--shapes` adds timings at LFM2-1.2B's shapes (`N x K`: the FFN's `w1` 8192 x 2048 and `w2` 2048 x
8192): factor, core `gptq` and `gptq_on_grid`, each form, one call each.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from provenance import provenance

from lfm_export.quant import Quantized, _symmetric_scale, quantize_block
from lfm_export.rounding import (
    DAMP,
    _importance,
    _search_blocks,
    cholesky_factor,
    gptq,
    gptq_on_grid,
    hessian_error,
)


def paper_factor(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """`U` upper with `(H + damp * mean(diag H) I)^-1 = U^T U`, dead channels set to 1 (float64)."""
    h = np.array(h, np.float64)
    dead = np.diag(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    h[np.diag_indices_from(h)] += damp * np.diag(h).mean()
    inv = np.linalg.inv(h)
    return np.linalg.cholesky(inv).T  # lower L with inv = L L^T; U = L^T


def paper_grid(
    w: np.ndarray, step: np.ndarray, lo: int, hi: int, u: np.ndarray, batch: int = 32
) -> np.ndarray:
    """The paper's column loop on a fixed grid `step * q` (the earlier `gptq_on_grid`)."""
    n, k = w.shape
    u = u.astype(np.float32)
    work = np.array(w, np.float32)
    codes = np.empty((n, k), np.int16)
    for c0 in range(0, k, batch):
        c1 = min(k, c0 + batch)
        err = np.empty((n, c1 - c0), np.float32)
        for j in range(c0, c1):
            q = np.clip(np.rint(work[:, j] / step[:, j]), lo, hi)
            codes[:, j] = q
            e = (work[:, j] - q * step[:, j]) / u[j, j]
            err[:, j - c0] = e
            work[:, j + 1 : c1] -= np.outer(e, u[j, j + 1 : c1])
        work[:, c1:] -= err @ u[c0:c1, c1:]
    return codes


def paper_gptq(w: np.ndarray, bits: int, block: int, h: np.ndarray, u: np.ndarray) -> Quantized:
    """The paper's GPTQ with the core's per-block `-imat` scale search (the earlier `gptq`)."""
    n, k = w.shape
    half = 2 ** (bits - 1)
    u = u.astype(np.float32)
    diag_h = np.diag(h)
    work = np.array(w, np.float32)
    codes = np.empty((n, k), np.uint8)
    scales = np.empty((n, k // block), np.float32)
    for b in range(k // block):
        c0, c1 = b * block, (b + 1) * block
        blk = work[:, c0:c1]
        imp = _importance(diag_h[c0:c1], block)[None, :]
        best, _, extremes = _search_blocks(blk[:, None, :], bits, imp)
        scale, safe = _symmetric_scale(blk[:, None, :], bits, best, extremes)
        scale, safe = scale[:, 0], safe[:, 0]
        anchor = np.where(scale != 0, np.abs(blk).argmax(-1), -1)
        err = np.empty((n, block), np.float32)
        for j in range(block):
            col = blk[:, j]
            q = np.clip(np.rint(col / safe), -half, half - 1)
            q[anchor == j] = -half
            codes[:, c0 + j] = (q + half).astype(np.uint8)
            e = (col - q * scale) / u[c0 + j, c0 + j]
            err[:, j] = e
            blk[:, j + 1 :] -= np.outer(e, u[c0 + j, c0 + j + 1 : c1])
        scales[:, b] = scale
        work[:, c1:] -= err @ u[c0:c1, c1:]
    return Quantized(codes, scales, None, bits, block)


def layer(seed: int, n: int, k: int, tokens: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)).astype(np.float32) * np.float32(0.3 / np.sqrt(k)) + np.eye(
        k, dtype=np.float32
    )
    x = (rng.standard_normal((tokens, k)).astype(np.float32) @ mix) * np.exp(rng.standard_normal(k)).astype(
        np.float32
    )
    w = (rng.standard_t(4, (n, k)) * 0.02).astype(np.float32)
    return w, (x.T @ x).astype(np.float64) / tokens


def timed(f, *a, **kw):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    r = f(*a, **kw)
    return r, round(time.perf_counter() - t, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", nargs="*", default=[], help="N x K, e.g. 8192x2048 2048x8192")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for seed in range(args.seeds):
        w, h = layer(seed, args.n, args.k)
        u, a = paper_factor(h), cholesky_factor(h)
        old, new = paper_gptq(w, 4, 32, h, u), gptq(w, 4, 32, h, factor=a, threads=args.threads)
        step = np.repeat(quantize_block(w, 4, 32).scales, 32, -1)
        g_old, g_new = paper_grid(w, step, -8, 7, u), gptq_on_grid(w, step, None, -8, 7, a, args.threads)
        plain = hessian_error(w, quantize_block(w, 4, 32).dequantize(), h)
        e_old, e_new = hessian_error(w, old.dequantize(), h), hessian_error(w, new.dequantize(), h)
        ge_old, ge_new = hessian_error(w, g_old * step, h), hessian_error(w, g_new * step, h)
        row = {
            "seed": seed,
            "gptq_error_vs_plain": {"paper": round(e_old / plain, 5), "ours": round(e_new / plain, 5)},
            "gptq_ours_over_paper": round(e_new / e_old, 5),
            "gptq_equal_codes": round(float((old.codes == new.codes).mean()), 5),
            "grid_ours_over_paper": round(ge_new / ge_old, 6),
            "grid_equal_codes": round(float((g_old == g_new).mean()), 6),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    precision = []
    for seed, spread in ((0, 1.0), (1, 2.0), (2, 3.0)):
        rng = np.random.default_rng(seed)
        k, n, tokens = 1024, 512, 4096
        mix = rng.standard_normal((k, k)).astype(np.float32) * np.float32(0.5 / np.sqrt(k))
        scale = np.exp(spread * rng.standard_normal(k)).astype(np.float32)
        scale[:4] *= 100  # a few outlier channels, as trained models' activations have
        x = (
            rng.standard_normal((tokens, k)).astype(np.float32) @ (mix + np.eye(k, dtype=np.float32))
        ) * scale
        h = (x.T @ x).astype(np.float64) / tokens
        w = (rng.standard_t(4, (n, k)) * 0.02).astype(np.float32)
        step = np.repeat(quantize_block(w, 4, 32).scales, 32, -1)
        a32 = cholesky_factor(h)
        damped = torch.tensor(h)
        damped.diagonal().add_(DAMP * float(damped.diagonal().mean()))
        a64 = torch.linalg.cholesky(damped.flip(0, 1)).flip(0, 1).numpy()
        c32, c64 = (gptq_on_grid(w, step, None, -8, 7, f) for f in (a32, a64))
        row = {
            "k": k,
            "channel_mean_square_max_over_mean": round(float(np.diag(h).max() / np.diag(h).mean()), 1),
            "equal_codes_float32_vs_float64_factor": float((c32 == c64).mean()),
            "error_ratio": hessian_error(w, c32 * step, h) / hessian_error(w, c64 * step, h),
        }
        precision.append(row)
        print(json.dumps(row), flush=True)
    timings = []
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        w, h = layer(0, n, k)
        u, t_u = timed(paper_factor, h)
        a, t_a = timed(cholesky_factor, h)
        _, t_old = timed(paper_gptq, w, 4, 32, h, u)
        _, t_new = timed(gptq, w, 4, 32, h, factor=a, threads=args.threads)
        step = np.repeat(quantize_block(w, 4, 32).scales, 32, -1)
        _, tg_old = timed(paper_grid, w, step, -8, 7, u)
        _, tg_new = timed(gptq_on_grid, w, step, None, -8, 7, a, args.threads)
        t = {
            "shape": shape,
            "factor_s": {"paper (numpy inv + cholesky)": t_u, "ours": t_a},
            "gptq_s": {"paper": t_old, "ours": t_new},
            "gptq_on_grid_s": {"paper": tg_old, "ours": tg_new},
        }
        timings.append(t)
        print(json.dumps(t), flush=True)
    ratios = [r["gptq_ours_over_paper"] for r in rows]
    result = {
        **provenance(),
        "threads": args.threads,
        "layer": f"{args.n}x{args.k}",
        "gptq_ours_over_paper": {
            "mean": round(float(np.mean(ratios)), 5),
            "min": min(ratios),
            "max": max(ratios),
        },
        "grid_ours_over_paper_max": max(r["grid_ours_over_paper"] for r in rows),
        "rows": rows,
        "factor_float32_vs_float64": precision,
        "timings": timings,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
