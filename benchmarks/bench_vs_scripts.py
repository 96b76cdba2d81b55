"""`lfm-export bench`'s prefill and decode against the benchmark scripts' own timing of the same artifact, in
turns in one process (so both see the same load):

    .venv/bin/python benchmarks/bench_vs_scripts.py --out benchmarks/results/bench_vs_scripts.json

1. exports `--model` (default `tiny`) twice with `--no-parity`: ExecuTorch 8da4w (`--max-prefill` =
   `--prompt-len`, so both harnesses prefill the prompt in one call) and MLX int4 (its default chunks);
2. for `--rounds` rounds, alternating: `lfm_export.bench.bench_artifact` and the script's function on the same
   folder with the same thread count: `executorch_vs_own.run_program` (the same seeded prompt as `bench`, its
   first `--new-tokens` + 1 ids fed as decode tokens) and `mlx_vs_mlx_lm.run_ours` (its own seeded prompt of the
   same length; its `prefill_last` figure is the one compared);
3. writes the median of each figure and the ratios bench / script with every run, the date, the machine, the
   commit and the load average before and after.

The scripts measure prefill without a warm-up call and `bench` after one, so the first rounds may differ more
than later ones: compare medians.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from provenance import provenance

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def export(backend: str, model: str, out: Path, quant: str, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "lfm_export.cli", backend, model, "-o", str(out), "--quant", quant]
    subprocess.run([*cmd, *extra, "--no-parity", "--force"], check=True, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", type=Path, default=None, help="export folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import numpy as np

    from lfm_export.bench import bench_artifact

    et_script, mlx_script = _script("executorch_vs_own"), _script("mlx_vs_mlx_lm")
    context = str(args.prompt_len + args.new_tokens + 16)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        et, mlx = work / "et-8da4w", work / "mlx-int4"
        if not (et / "manifest.json").is_file():
            export(
                "executorch",
                args.model,
                et,
                "8da4w",
                ["--max-seq-len", context, "--max-prefill", str(args.prompt_len)],
            )
        if not (mlx / "manifest.json").is_file():
            export("mlx", args.model, mlx, "int4", ["--max-seq-len", context])
        vocab = json.loads((et / "manifest.json").read_text())["config"]["vocab_size"]
        prompt = np.random.default_rng(0).integers(16, vocab, size=(1, args.prompt_len), dtype=np.int64)
        runs: dict[str, list[dict[str, float]]] = {
            k: [] for k in ("et_bench", "et_script", "mlx_bench", "mlx_script")
        }
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
            b = bench_artifact(et, args.prompt_len, args.new_tokens, args.threads)
            runs["et_bench"].append({"prefill_tok_s": b["prefill_tok_s"], "decode_tok_s": b["decode_tok_s"]})
            s = et_script.run_program(
                et / "model.pte", prompt[0].tolist(), prompt[0, : args.new_tokens + 1].tolist(), args.threads
            )
            runs["et_script"].append({"prefill_tok_s": s["prefill_tok_s"], "decode_tok_s": s["decode_tok_s"]})
            b = bench_artifact(mlx, args.prompt_len, args.new_tokens, args.threads)
            runs["mlx_bench"].append({"prefill_tok_s": b["prefill_tok_s"], "decode_tok_s": b["decode_tok_s"]})
            s = mlx_script.run_ours(mlx, args.prompt_len, args.new_tokens, 0)
            runs["mlx_script"].append(
                {"prefill_tok_s": s["prefill_tok_s"], "decode_tok_s": s["decode_tok_s"]}
            )
    medians = {
        k: {f: round(statistics.median(x[f] for x in v), 2) for f in ("prefill_tok_s", "decode_tok_s")}
        for k, v in runs.items()
    }
    ratios = {
        f"{backend}_{f}_bench_over_script": round(
            medians[f"{backend}_bench"][f] / medians[f"{backend}_script"][f], 3
        )
        for backend in ("et", "mlx")
        for f in ("prefill_tok_s", "decode_tok_s")
    }
    result = {
        **provenance(),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "model": args.model,
        "artifacts": {"executorch": "8da4w", "mlx": "int4"},
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "medians": medians,
        "ratios": ratios,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"medians": medians, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
