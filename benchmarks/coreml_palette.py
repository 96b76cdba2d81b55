"""Palettization tables: our 1-D k-means (`backends/coreml/palette.py`) against coremltools' scikit-learn
k-means on one group of 16 x 2048 fp16 weights (normal and Laplace, std-like scale 0.02), 4 and 6 bits: time
per group and mean squared error. `python benchmarks/coreml_palette.py [--repeat N]` (needs the coreml extra,
scikit-learn for the comparison)."""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()

    from coremltools.optimize.coreml._quantization_passes import palettize_weights

    from lfm_export.backends.coreml.palette import kmeans_1d

    rng = np.random.default_rng(0)
    groups = {
        "normal": rng.standard_normal((16, 2048)) * 0.02,
        "laplace": rng.laplace(size=(16, 2048)) * 0.02,
    }
    print("| group | bits | ours ms | ours MSE | scikit-learn ms | scikit-learn MSE | MSE ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, values in groups.items():
        group = values.astype(np.float16)
        x = group.reshape(-1).astype(np.float64)
        for bits in (4, 6):
            start = time.perf_counter()
            for _ in range(args.repeat):
                lut, idx = kmeans_1d(group, bits)
            ours_ms = (time.perf_counter() - start) / args.repeat * 1e3
            ours = ((x - lut.astype(np.float64)[idx]) ** 2).mean()
            start = time.perf_counter()
            params = palettize_weights.blockwise_compress(group, "KMEANS", bits, [16, 0])
            theirs_ms = (time.perf_counter() - start) * 1e3
            dense = np.asarray(palettize_weights.decompress(params), dtype=np.float64).reshape(-1)
            theirs = ((x - dense) ** 2).mean()
            print(
                f"| {name} | {bits} | {ours_ms:.1f} | {ours:.3e} | {theirs_ms:.1f} | {theirs:.3e} | "
                f"{ours / theirs:.3f} |"
            )


if __name__ == "__main__":
    main()
