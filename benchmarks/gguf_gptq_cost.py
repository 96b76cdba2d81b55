"""Cost of GGUF `-gptq`'s forms on one matrix at LFM2-1.2B's FFN shapes (`N x K`: `w1` 8192 x 2048, `w2`
2048 x 8192): `gptq` (`-gptq`: the codes on the `-imat` scales of the original weights, `gptq_on_grid`),
`gptq-nols` (each block's scales fitted on the columns GPTQ has updated, `gptq_on_blocks`) and `gptq-blocks`
(that, then `refit_scales`; `lfm_export.ggml_blocks.GPTQ`), each one call of `lfm_export.ggml_kquants.quantize` / `ggml_blocks.quantize` with
the Hessian Cholesky factor given (the factor itself, which the calibration forms once per input, is timed
apart; `benchmarks/results/gguf_gptq_cost.json`, of commit c50b913, names them `gptq-fixed`, `gptq-nols`,
`gptq`). Weights Student-t, inputs correlated Gaussian (`--tokens` rows); wall and process CPU seconds.

    .venv/bin/python benchmarks/gguf_gptq_cost.py --threads 2 --out benchmarks/results/gguf_gptq_cost.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from provenance import provenance

from lfm_export import ggml_blocks, ggml_kquants
from lfm_export.rounding import cholesky_factor

SHAPES = {"w1": (8192, 2048), "w2": (2048, 8192)}
ROUNDINGS = ("gptq", "gptq-nols", "gptq-blocks")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--types", default="Q4_K,Q4_0")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    for name, (n, k) in SHAPES.items():
        rng = np.random.default_rng(0)
        w = (rng.standard_t(4, (n, k)) * 0.02).astype(np.float32)
        x = rng.standard_normal((args.tokens, k)).astype(np.float32)
        x[:, 1:] += 0.5 * x[:, :-1]
        h = (x.T.astype(np.float64) @ x) / args.tokens
        imp = np.diag(h).astype(np.float32)
        t0, c0 = time.perf_counter(), time.process_time()
        factor = cholesky_factor(h)
        print(f"{name} factor {time.perf_counter() - t0:.2f} s", flush=True)
        rows.append({"shape": name, "n": n, "k": k, "what": "factor", "wall_s": time.perf_counter() - t0})
        for kind in args.types.split(","):
            for rounding in ROUNDINGS:
                t0, c0 = time.perf_counter(), time.process_time()
                if kind == "Q4_0":
                    ggml_blocks.quantize(w, 4, rounding, args.threads, imp, factor)
                else:
                    ggml_kquants.quantize(w, ggml_kquants.K_TYPES[kind], rounding, args.threads, imp, factor)
                row = {
                    "shape": name,
                    "n": n,
                    "k": k,
                    "type": kind,
                    "rounding": rounding,
                    "wall_s": round(time.perf_counter() - t0, 2),
                    "cpu_s": round(time.process_time() - c0, 2),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(
            json.dumps({**provenance(), "threads": args.threads, "rows": rows}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
