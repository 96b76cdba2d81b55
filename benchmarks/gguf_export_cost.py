"""Wall time and peak RSS of `lfm-export gguf` on big presets (random weights: the cost, not the quality).

    .venv/bin/python benchmarks/gguf_export_cost.py --models random:lfm2-1.2b --quant q4_0 \
        --out benchmarks/results/gguf_export_cost.json

Each export runs in its own process under GNU time (`%M`, peak RSS) with `--no-parity` and `--threads`.
With `--checkpoint-dir D` a `random:PRESET` is first written there as a checkpoint folder (fp32 safetensors,
`onnx_vs_genai.checkpoint_folder`, kept between runs) and exported from it: what a user's checkpoint costs,
the file's memory map included.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import provenance

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="random:lfm2-1.2b")
    ap.add_argument("--quant", default="q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf_export_cost"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--checkpoint-dir", type=Path, default=None, help="export random presets from a folder")
    args = ap.parse_args()
    rows = []
    for model in args.models.split(","):
        out = args.work / model.replace(":", "-")
        shutil.rmtree(out, ignore_errors=True)
        source = model
        if args.checkpoint_dir is not None:
            from onnx_vs_genai import checkpoint_folder

            source = str(checkpoint_folder(model, args.checkpoint_dir))
        cmd = [str(BIN / "lfm-export"), "gguf", source, "-o", str(out), "--quant", args.quant, "--no-parity"]
        cmd += ["--threads", str(args.threads)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
            t = time.perf_counter()
            r = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", rss.name, *cmd], env=env, text=True)
            wall = time.perf_counter() - t
            peak_kb, user, system = Path(rss.name).read_text().split()[-3:]
        if r.returncode:
            raise SystemExit(f"{model}: export failed")
        row = {
            "model": model,
            "from_checkpoint_folder": args.checkpoint_dir is not None,
            "quant": args.quant,
            "threads": args.threads,
            "wall_s": round(wall, 1),
            "cpu_s": round(float(user) + float(system), 1),
            "peak_rss_bytes": int(peak_kb) * 1024,
            "file_bytes": (out / "model.gguf").stat().st_size,
            "load_avg_1m_after": os.getloadavg()[0],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    result = {
        **provenance(),
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
