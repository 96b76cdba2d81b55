"""Look-up tables for palettization: a deterministic weighted 1-D k-means over a group's distinct fp16 values.

Why our own: coremltools' `mode="kmeans"` runs scikit-learn's k-means on every group of 16 output channels;
`--quant palettize6` of `random:lfm2-1.2b` ran 18 minutes on one core without finishing (2026-11-29). A group
holds fp16 values, so it has at most 65536 distinct values (in practice a few thousand); sorted, with their
counts, one Lloyd iteration is a binary search of the cluster boundaries and two prefix-sum differences.
It starts from the weighted quantiles, so the same weights always give the same table (no random start).

`lut_function(nbits)` is what coremltools' `palettize_weights` calls per group (`mode="CUSTOM"`); the Core
ML export (`compress.py`) and the parity simulation use that same function.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

MAX_ITERATIONS = 300
"""Lloyd iterations at most; they stop as soon as no value changes cluster (on `random:lfm2-1.2b` groups,
typically well under 100 at 6 bits)."""
NAME = "kmeans-1d (weighted, quantile start)"
"""How the tables are made, recorded in the recipe (packages written with scikit-learn's k-means differ)."""


def _initial(cum: np.ndarray, k: int) -> np.ndarray:
    """Indices into the sorted distinct values at the weighted quantiles (j + 1/2) / k, made strictly
    increasing (a value holding more than 1/k of the mass would otherwise start several clusters)."""
    n = len(cum)
    idx = np.searchsorted(cum, (np.arange(k) + 0.5) / k * cum[-1])
    for j in range(1, k):
        idx[j] = max(idx[j], idx[j - 1] + 1)
    return np.minimum(idx, n - k + np.arange(k))


def kmeans_1d(values: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """`(lut [2^nbits] in values' dtype, sorted; indices uint8 [values.size])` minimising the squared error
    of `values` (flattened) against their table entries. Fewer distinct values than entries: each its own
    entry, the rest padded with the largest."""
    k = 1 << nbits
    flat = np.asarray(values).reshape(-1)
    distinct, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    if len(distinct) <= k:
        lut = np.full(k, distinct[-1], dtype=flat.dtype)
        lut[: len(distinct)] = distinct
        return lut, inverse.astype(np.uint8).reshape(-1)
    x = distinct.astype(np.float64)
    w = counts.astype(np.float64)
    cum_w = np.concatenate([[0.0], np.cumsum(w)])
    cum_wx = np.concatenate([[0.0], np.cumsum(w * x)])
    centres = x[_initial(cum_w[1:], k)]
    cuts = None
    for _ in range(MAX_ITERATIONS):
        new_cuts = np.searchsorted(x, (centres[:-1] + centres[1:]) / 2, side="right")
        if cuts is not None and np.array_equal(new_cuts, cuts):
            break
        cuts = new_cuts
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [len(x)]])
        mass = cum_w[ends] - cum_w[starts]
        total = cum_wx[ends] - cum_wx[starts]
        centres = np.where(mass > 0, total / np.where(mass > 0, mass, 1.0), centres)
    lut = np.sort(centres.astype(flat.dtype))
    table = lut.astype(np.float64)
    nearest = np.searchsorted((table[:-1] + table[1:]) / 2, x, side="left")
    return lut, nearest[inverse].astype(np.uint8).reshape(-1)


def lut_function(nbits: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The per-group function coremltools' palettization takes (`OpPalettizerConfig(mode="custom",
    lut_function=...)`, `palettize_weights.blockwise_compress(..., "CUSTOM", ...)`)."""
    return partial(kmeans_1d, nbits=nbits)
