"""Quality per byte on the ONNX backend: size, decode speed and KL against fp32 of lfm-export's int4 recipes
(plain rounding and the calibrated `-imat` / `-gptq`, blocks of 32 / 64 / 128) next to onnxruntime-genai's
model builder (`-p int4 -e cpu`) on the same checkpoint.

    .venv/bin/python benchmarks/quality_per_byte.py --models tiny tiny-moe --threads 1 \\
        --json benchmarks/results/quality_per_byte.json

Per artifact: `bytes` (model.onnx + model.onnx.data), decode and prefill tok/s (`lfm-export bench`, a fresh
process per run, `--repeats` rounds alternating the artifacts, best run kept), pooled KL (the parity scenarios
prefill, decode, chunked_prefill, batch2, quality part only: the artifact against fp32, the same code for every
tool) and corpus KL: the mean KL per position over held-out text of the bundled models' corpus
(`examples/make_corpus.py`'s held-out seed, `--corpus-tokens` tokens in rows of 256, each row prefilled from an
empty state), through each artifact's runtime shim against the fp32 model. The calibration text
(`lfm_export/assets/calibration.txt`) is drawn with another seed than both.

Calibrated and plain recipes of one block size have the same format and kernels, so they have the same size
and speed; the speed rows are measured anyway, in the same rounds.

A recipe point `NAME@BUDGET` exports `--quant NAME --budget BUDGET` (a precision mix chosen to `size=MB` or
`kl=X`, `lfm_export.budget`); `-awq` recipes fold activation-aware scales into the norms (`lfm_export.awq`).
`--skip-builder` leaves the onnxruntime-genai builder's point out (e.g. when it is measured in another run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "examples"))

from onnx_vs_genai import (  # noqa: E402
    BIN,
    accuracy,
    bench,
    checkpoint_folder,
    describe_builder_output,
    measured,
)

RECIPES = (
    "int4-b32",
    "int4-b32-gptq",
    "int4-b64",
    "int4-b64-imat",
    "int4-b64-gptq",
    "int4-b128",
    "int4-b128-gptq",
)
BUILDER = "genai-builder-int4"
SEQ = 256


def heldout_ids(tokenizer_file: Path, tokens: int) -> np.ndarray:
    """`[rows, SEQ]` ids of held-out documents of the bundled corpus."""
    from make_corpus import HELDOUT_SEED, generate_documents
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    ids: list[int] = []
    n = 40
    while len(ids) < tokens:
        ids = tok.encode("\n".join(generate_documents(HELDOUT_SEED, n))).ids
        n *= 2
    return np.asarray(ids[:tokens], np.int64).reshape(-1, SEQ)


def corpus_kl(folder: Path, ckpt: Path, ids: np.ndarray, threads: int) -> float:
    """Mean KL(fp32 || artifact) per position over `ids`, through the artifact's runtime shim."""
    import torch

    from lfm_export.loading import load_model
    from lfm_export.parity import ReferenceSession
    from lfm_export.runtime.onnx import OnnxSession

    torch.set_num_threads(threads)
    loaded = load_model(ckpt)
    session = OnnxSession(folder, threads=threads)
    ref = ReferenceSession(loaded.model, max_seq_len=session.max_seq_len)
    total, count = 0.0, 0
    for row in ids:
        session.reset()
        ref.reset()
        a = session.prefill(row[None]).astype(np.float64)[0]
        b = ref.prefill(row[None]).astype(np.float64)[0]
        la = a - a.max(-1, keepdims=True)
        la -= np.log(np.exp(la).sum(-1, keepdims=True))
        lb = b - b.max(-1, keepdims=True)
        lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
        total += float((np.exp(lb) * (lb - la)).sum())
        count += row.size
    return total / count


def export_ours(ckpt: Path, out: Path, recipe: str, threads: int) -> dict:
    name, _, budget = recipe.partition("@")
    cmd = [str(BIN / "lfm-export"), "onnx", str(ckpt), "-o", str(out), "--quant", name]
    cmd += ["--threads", str(threads), "--no-parity", "--force", "--json"]
    cmd += ["--budget", budget] if budget else []
    res = measured(cmd)
    manifest = json.loads((out / "manifest.json").read_text())
    extra = {}
    if budget:
        b = manifest["budget"]
        extra["budget"] = {k: b[k] for k in ("request", "estimated_kl", "estimated_bytes")}
        extra["budget"]["mix"] = {g["group"]: g["chosen"] for g in b["groups"]}
    if "awq" in manifest:
        extra["awq_alpha"] = manifest["awq"]["alpha"]
    return {
        "wall_s": res["wall_s"],
        "peak_rss_bytes": res["peak_rss_bytes"],
        "calibration": manifest.get("calibration"),
        **extra,
    }


def export_builder(ckpt: Path, out: Path, work: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(out)]
    cmd += ["-p", "int4", "-e", "cpu", "-c", str(work / "builder-cache")]
    try:
        res = measured(cmd)
    except (SystemExit, subprocess.CalledProcessError) as e:
        return {"error": str(e)[-400:]}
    describe_builder_output(out, ckpt)
    return {"wall_s": res["wall_s"], "peak_rss_bytes": res["peak_rss_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "tiny-moe"])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--corpus-tokens", type=int, default=2048)
    ap.add_argument("--work", type=Path, default=ROOT / ".work" / "quality_per_byte")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip-builder", action="store_true", help="leave the genai builder's point out")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    results: dict = {
        "date": date.today().isoformat(),
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m_at_start": os.getloadavg()[0],
        "commit": commit,
        "threads": args.threads,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "corpus_tokens": args.corpus_tokens,
        "models": {},
    }
    from provenance import provenance

    results["provenance"] = provenance()
    for model in args.models:
        ckpt = checkpoint_folder(model, args.work)
        ids = heldout_ids(ckpt / "tokenizer.json", args.corpus_tokens)
        points: dict[str, dict] = {}
        folders: dict[str, Path] = {}
        for recipe in args.recipes:
            print(f"{model}: exporting {recipe}", file=sys.stderr)
            folders[recipe] = args.work / f"{Path(model).name}-{recipe}"  # a checkpoint path: its folder name
            points[recipe] = {
                "tool": "lfm-export",
                "export": export_ours(ckpt, folders[recipe], recipe, args.threads),
            }
        if not args.skip_builder:
            print(f"{model}: exporting with onnxruntime-genai's builder", file=sys.stderr)
            built = export_builder(ckpt, args.work / f"{Path(model).name}-{BUILDER}", args.work)
            points[BUILDER] = {"tool": "onnxruntime-genai builder", "export": built}
            if "error" not in built:
                folders[BUILDER] = args.work / f"{Path(model).name}-{BUILDER}"
        speeds = bench(folders, args)
        for name, folder in folders.items():
            print(f"{model}: accuracy of {name}", file=sys.stderr)
            p = points[name]
            p["bytes"] = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".onnx", ".data"))
            p["decode_tok_s"] = speeds[name]["decode_tok_s"]
            p["decode_tok_s_runs"] = speeds[name]["decode_tok_s_runs"]
            p["prefill_tok_s"] = speeds[name]["prefill_tok_s"]
            p["pooled"] = accuracy(folder, ckpt, args.threads)
            p["corpus_kl"] = corpus_kl(folder, ckpt, ids, args.threads)
        results["models"][model] = points
        out = args.json or args.work / "results.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        results["load_avg_1m_at_last_write"] = os.getloadavg()[0]
        out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(results: dict) -> str:
    """The results as a Markdown table (docs/benchmarks.md)."""
    lines = [
        "| model | tool | recipe | bytes | decode tok/s | KL pooled | KL corpus | top-1 decisive |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, points in results["models"].items():
        for name, p in points.items():
            if "bytes" not in p:
                lines.append(
                    f"| `{model}` | {p['tool']} | {name} | failed: {p['export'].get('error', '')[:80]} |"
                )
                continue
            lines.append(
                f"| `{model}` | {p['tool']} | {name} | {p['bytes']:,} | {p['decode_tok_s']:.0f} | "
                f"{p['pooled']['kl_mean']:.4f} | {p['corpus_kl']:.4f} | {p['pooled']['top1_decisive']:.3f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
