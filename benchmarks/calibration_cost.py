"""Cost of the calibration pass and calibrated rounding on one model: wall time and peak RSS of
`lfm_export.calibrate.calibrated_table` (calibration over the token budget, layer by layer from the lazy
weights, plus the rounding of every linear), one fresh process per recipe.

    .venv/bin/python benchmarks/calibration_cost.py --model random:lfm2-350m --recipes int4-b32-imat \\
        int4-b32-gptq --threads 1 --json benchmarks/results/calibration_cost.json

A random-weight model without a tokenizer calibrates on pseudo-random ids (`lfm_export.calibrate.RANDOM_IDS`):
the cost is the same as on text.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ONE = """
import cProfile, json, pstats, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
from lfm_export.calibrate import calibrated_table
from lfm_export.loading import load_model
from lfm_export.recipes import parse_recipe
profile = cProfile.Profile() if sys.argv[5] == "1" else None
t0 = time.perf_counter()
if profile:
    profile.enable()
loaded = load_model(sys.argv[1], lazy=True)
table, entry = calibrated_table(loaded, parse_recipe(sys.argv[2]), tokens=int(sys.argv[4]))
if profile:
    profile.disable()
entry.pop("expert_routing_frequency", None)
row = {"wall_s": round(time.perf_counter() - t0, 1), "table_bytes": table.nbytes,
       "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **entry}
if profile:
    parts = {"hook": "hessian_and_mean_square_hooks_s", "_layer": "layer_weights_s", "cholesky_factor": "factor_s",
             "gptq": "gptq_s", "weighted_search": "imat_search_s", "_output_errors": "output_error_tally_s",
             "quantize_block": "plain_rounding_for_tally_s", "calibration_steps": "calibration_forward_total_s"}
    stats = pstats.Stats(profile).stats
    got = {}
    for (_, _, fn), (_, _, _, cum, _) in stats.items():
        if fn in parts:
            got[parts[fn]] = round(got.get(parts[fn], 0.0) + cum, 1)
    row["profile_cumulative"] = got
print(json.dumps(row))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:lfm2-350m")
    ap.add_argument("--recipes", nargs="+", default=["int4-b32-imat", "int4-b32-gptq"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the run: cumulative seconds of the calibration forward, its hooks, the factor, the rounding",
    )
    args = ap.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    results = {
        "date": date.today().isoformat(),
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m_at_start": os.getloadavg()[0],
        "commit": commit,
        "model": args.model,
        "threads": args.threads,
        "tokens": args.tokens,
        "runs": {},
    }
    results["profiled"] = args.profile
    for recipe in args.recipes:
        print(f"calibrating {args.model} for {recipe}", file=sys.stderr)
        cmd = [sys.executable, "-c", ONE, args.model, recipe, str(args.threads), str(args.tokens)]
        cmd.append("1" if args.profile else "0")
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results["runs"][recipe] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results["runs"][recipe]), file=sys.stderr)
    results["load_avg_1m_at_end"] = os.getloadavg()[0]
    results["command"] = " ".join(["benchmarks/calibration_cost.py", *sys.argv[1:]])
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
