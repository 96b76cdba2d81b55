"""Check that two revisions write the same GGUF bytes: the quantizer's speed work must not change a file.

    .venv/bin/python benchmarks/gguf_same_bytes.py --base c3e182e --out benchmarks/results/gguf_same_bytes.json

Each revision (`--base`, and the working tree this script runs from) exports, in a process of its own with
`--threads 2`, `tiny`, `tiny-moe` and a transformers-written hidden-256 checkpoint (every linear a real K-quant)
at q4_k_m, q4_k_m-nearest, q6_k, q4_0, q8_0 (and q4_k_m-imat on the bundled models, q5_k_m on the hidden-256
one), and quantizes Student-t, normal, zero-holding and -0.0-holding matrices (37 x 512 up to 1100 x 1024,
several row chunks) to Q4_K / Q5_K / Q6_K / Q5_0 / Q4_0 / Q8_0 with every rounding on 1 and 2 threads. Every
`model.gguf` and every byte array is hashed (sha256); a row per case says whether the two revisions agree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from provenance import provenance

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import hashlib, json, sys
from pathlib import Path
import numpy as np
import torch
from lfm_export import ggml_blocks as B, ggml_kquants as K
from lfm_export.backends.gguf.recipes import make_recipe
from lfm_export.check import save_random_transformers
from lfm_export.pipeline import export_artifact
from lfm_export.progress import Progress

work = Path(sys.argv[1])
out = {}
rng = np.random.default_rng(0)
for n, k in [(37, 512), (64, 2048), (5, 256), (1100, 1024)]:
    for dist in ("t",) if n > 1000 else ("t", "normal", "zeros", "negzero"):
        if dist == "t":
            w = rng.standard_t(4, (n, k)).astype(np.float32) * 0.02
        elif dist == "normal":
            w = rng.normal(0, 1, (n, k)).astype(np.float32)
        elif dist == "negzero":
            w = np.abs(rng.normal(0, 1, (n, k))).astype(np.float32)
            w[:, ::7] = -0.0; w[1, :] = -0.0; w[3, :256] = -0.0; w[::2, 32:64] = -0.0; w[4, 64:96] = 0.0
        else:
            w = rng.normal(0, 1, (n, k)).astype(np.float32)
            w[::3, :64] = 0; w[1::4, 100:300] = 0; w[2, :] = 0; w[4, 5:200] = np.abs(w[4, 5:200])
        imp = rng.uniform(0.1, 2, k).astype(np.float32)
        for rounding in ("fit", "imat", "nearest", "mse"):
            importance = imp if rounding == "imat" else None
            for kind in ("Q4_K", "Q5_K", "Q6_K", "Q5_0"):
                if rounding == "mse" and kind in ("Q5_K", "Q5_0"):
                    continue
                for threads in (1, 2):
                    b = K.quantize(w, K.K_TYPES[kind], rounding, threads, importance)
                    out[f"{n}x{k}-{dist}-{rounding}-{kind}-t{threads}"] = hashlib.sha256(b.tobytes()).hexdigest()
            for bits in (4, 8):
                b = B.quantize(w, bits, rounding, 2, importance)
                out[f"{n}x{k}-{dist}-{rounding}-Q{bits}_0"] = hashlib.sha256(b.tobytes()).hexdigest()
shape = dict(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, layer_types=["conv", "full_attention", "conv", "full_attention"])
hf = save_random_transformers(work / "hf256", shape, torch.float32, seed=20)
for model in ("tiny", "tiny-moe", str(hf)):
    label = Path(model).name
    for quant in ("q4_k_m", "q4_k_m-nearest", "q6_k", "q4_0", "q8_0", "q4_k_m-imat", "q5_k_m"):
        if quant == "q5_k_m" and model != str(hf):
            continue  # rows that are multiples of 256 only
        if quant == "q4_k_m-imat" and model == str(hf):
            continue  # no tokenizer to read the calibration text
        folder = work / f"{label}-{quant}"
        export_artifact("gguf", model, folder, make_recipe(quant, 64), parity=False, threads=2,
                        progress=Progress(quiet=True))
        out[f"export {label} {quant}"] = hashlib.sha256((folder / "model.gguf").read_bytes()).hexdigest()
print(json.dumps(out))
"""


def hashes(tree: Path, work: Path) -> dict[str, str]:
    """Run the worker with `tree` first on the import path; its hashes."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "2"}
    r = subprocess.run(
        [sys.executable, "-c", WORKER, str(work)], env=env, cwd=tree, capture_output=True, text=True
    )
    if r.returncode:
        raise SystemExit(f"{tree}: {r.stderr.strip().splitlines()[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="git revision to compare the working tree with")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        archive = subprocess.run(["git", "archive", args.base], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        theirs = hashes(base, Path(tmp) / "work-base")
        ours = hashes(ROOT, Path(tmp) / "work-head")
    rows = [{"case": k, "same": ours.get(k) == v} for k, v in theirs.items()]
    same = sum(r["same"] for r in rows)
    print(f"{same} of {len(rows)} cases write the same bytes", flush=True)
    base_commit = subprocess.run(["git", "rev-parse", args.base], cwd=ROOT, capture_output=True, text=True)
    result = {
        **provenance(),
        "base": base_commit.stdout.strip(),
        "same": same,
        "cases": len(rows),
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
