"""GPTQ's output error in column order and in act-order (descending `diag(H)`, static groups) on a model's
calibrated linears: each linear's `trace((W - Q) H (W - Q)^T)` with the codes chosen by
`lfm_export.rounding.gptq_on_grid` on the `-imat` scales of ggml's Q4_0 blocks (fp16, as the file stores them),
from the calibration's Hessian (bundled text, `--tokens`), plus the inputs' largest mean square over their median.

    .venv/bin/python benchmarks/gptq_act_order_error.py --model tiny --tokens 512 \
        --out benchmarks/results/gptq_act_order_error_tiny.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from provenance import provenance


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from lfm_export.calibrate import calibrate
    from lfm_export.loading import load_model
    from lfm_export.quant import quantize_block
    from lfm_export.rounding import cholesky_factor, gptq_on_grid, hessian_error

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, lazy=True)
    rows = []

    def done(_idx: int, stats: dict) -> None:
        for name, s in stats.items():
            if s.hessian is None or not s.tokens:
                continue
            w = loaded.weights.get(name).float().numpy()
            if w.shape[1] % 32:
                continue
            h = s.hessian
            q = quantize_block(w, 4, 32, True, "fit", args.threads, s.mean_square)
            step = np.repeat(q.scales.astype(np.float16).astype(np.float32), 32, -1)
            err = {}
            for label, act in (("column_order", False), ("act_order", True)):
                codes = gptq_on_grid(w, step, None, -8, 7, cholesky_factor(h, act_order=act), args.threads)
                err[label] = hessian_error(w, codes * step, h)
            d = np.diag(h)
            rows.append(
                {
                    "name": name,
                    "shape": list(w.shape),
                    "max_over_median_mean_square": round(float(d.max() / np.median(d)), 1),
                    **err,
                    "act_over_column_order": round(err["act_order"] / err["column_order"], 4),
                }
            )
            print(json.dumps(rows[-1]), flush=True)

    calibrate(loaded, tokens=args.tokens, hessian=True, layer_done=done)
    ratios = [r["act_over_column_order"] for r in rows]
    result = {
        **provenance(),
        "model": args.model,
        "tokens": args.tokens,
        "act_over_column_order_min": min(ratios),
        "act_over_column_order_max": max(ratios),
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"act-order / column order: {min(ratios):.3f}-{max(ratios):.3f} over {len(rows)} linears")


if __name__ == "__main__":
    main()
