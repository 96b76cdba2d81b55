"""`lfm-export parity OUT --corpus` on the bundled held-out corpus, per backend, with the date, machine and commit:

    .venv/bin/python benchmarks/corpus_kl.py --out benchmarks/results/corpus_kl.json --threads 1

Exports `--model` (default `tiny`) with `--no-parity` once per `--runs` entry (`backend:recipe`, context
`--ctx`; reused from `--work` when there) and runs `lfm_export.corpus_check.run_corpus` on
`lfm_export/assets/corpus/heldout.txt` in chunks of `--ctx` tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import provenance

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "lfm_export" / "assets" / "corpus" / "heldout.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=["onnx:int4", "executorch:8da4w", "mlx:int4"])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from lfm_export.corpus_check import run_corpus

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for run in args.runs:
            backend, quant = run.split(":")
            folder = work / f"{backend}-{quant}-{args.model}"
            if not (folder / "manifest.json").is_file():
                cmd = [sys.executable, "-m", "lfm_export.cli", backend, args.model, "-o", str(folder)]
                cmd += ["--quant", quant, "--max-seq-len", str(args.ctx), "--no-parity", "--force"]
                subprocess.run(cmd, check=True, capture_output=True)
            start = time.perf_counter()
            r = run_corpus(folder, CORPUS, args.ctx, threads=args.threads)
            r["seconds"] = round(time.perf_counter() - start, 1)
            r["artifact"] = folder.name
            r["corpus"] = str(CORPUS.relative_to(ROOT))
            rows.append(r)
            print(
                json.dumps({k: r[k] for k in ("backend", "recipe", "kl_mean", "kl_se", "seconds")}),
                flush=True,
            )
    result = {
        **provenance(),
        "model": args.model,
        "threads": args.threads,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
