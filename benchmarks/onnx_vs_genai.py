"""Our ONNX int4 export against onnxruntime-genai's model builder, on the same checkpoint, by the same harness.

    .venv/bin/python benchmarks/onnx_vs_genai.py --model random:lfm2-1.2b
    .venv/bin/python benchmarks/onnx_vs_genai.py --model tiny --prompt-len 256 --new-tokens 64

Both exports run as subprocesses (wall time and peak RSS of each), both artifacts are then run by our ONNX runtime
shim with the same thread count (speed: `lfm-export bench` in a fresh process each), and both are compared with the
fp32 reference model by the parity core (KL divergence, top-1 agreement). Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from collections import Counter
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MEASURE = (
    "import json, resource, subprocess, sys, time; t = time.perf_counter(); "
    "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "print(json.dumps({'rc': r.returncode, 'wall_s': time.perf_counter() - t, "
    "'peak_rss_bytes': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "
    "'stdout': r.stdout[-4000:], 'stderr': r.stderr[-4000:]}))"
)


def measured(cmd: list[str]) -> dict:
    """Run `cmd` in a fresh wrapper process so its peak RSS is its own."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout)
    if res["rc"] != 0:
        raise SystemExit(f"command failed ({res['rc']}): {' '.join(cmd)}\n{res['stderr']}")
    return res


def checkpoint_folder(model: str, work: Path) -> Path:
    """A Hugging Face folder both exporters can read (random presets are written once and cached)."""
    from lfm_export.loading import BUNDLED, random_model, save_checkpoint

    if model in BUNDLED:
        return BUNDLED[model]
    if not model.startswith("random:"):
        return Path(model)
    folder = work / f"ckpt-{model.split(':', 1)[1]}"
    if not (folder / "config.json").is_file():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_checkpoint(random_model(model.split(":", 1)[1]).model, tmp)
        # the builder insists on a tokenizer; the bundled one serves (ids are random anyway)
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (BUNDLED["tiny"] / f).is_file():
                shutil.copy(BUNDLED["tiny"] / f, tmp / f)
        tmp.rename(folder)
    return folder


def describe_builder_output(folder: Path, ckpt: Path) -> None:
    """Give the builder's folder a manifest so our shim can run it (its I/O names are the same genai convention)."""
    import onnx

    from lfm_export.config import Lfm2Config
    from lfm_export.manifest import build_manifest, write_manifest
    from lfm_export.signature import build_signature

    cfg = Lfm2Config.from_file(ckpt / "config.json")
    context = json.loads((folder / "genai_config.json").read_text())["model"]["context_length"]
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    op_types = Counter(f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in graph.node)
    manifest = build_manifest(
        model_identity={"source": str(ckpt), "note": "written by onnxruntime-genai's model builder"},
        config=cfg.to_dict(),
        backend="onnx",
        recipe={"name": "int4-genai-builder"},
        signature=build_signature(cfg, max_seq_len=context).to_dict(),
        folder=folder,
        # the op inventory lets our shim treat it like ours (shared KV buffers for GroupQueryAttention)
        extra={"ops": {"op_types": dict(sorted(op_types.items()))}},
    )
    write_manifest(folder, manifest)


def bench_once(folder: Path, args: argparse.Namespace) -> dict:
    cmd = [
        str(BIN / "lfm-export"),
        "bench",
        str(folder),
        "--prompt-len",
        str(args.prompt_len),
        "--new-tokens",
        str(args.new_tokens),
        "--threads",
        str(args.threads),
        "--json",
    ]
    return json.loads(measured(cmd)["stdout"])


def bench(folders: dict[str, Path], args: argparse.Namespace) -> dict[str, dict]:
    """`repeats` rounds, each running every artifact once in turn (so a slow spell on a shared machine
    hits both alike); the best decode and the best prefill of each artifact are kept."""
    runs: dict[str, list[dict]] = {name: [] for name in folders}
    for i in range(args.repeats):
        for name, folder in folders.items():
            print(f"benchmarking {name} ({i + 1}/{args.repeats})", file=sys.stderr)
            runs[name].append(bench_once(folder, args))
    out = {}
    for name, rs in runs.items():
        best = dict(max(rs, key=lambda r: r["decode_tok_s"]))
        best["prefill_tok_s"] = max(r["prefill_tok_s"] for r in rs)
        best["decode_tok_s_runs"] = [r["decode_tok_s"] for r in rs]
        out[name] = best
    return out


def accuracy(folder: Path, ckpt: Path, threads: int) -> dict:
    import torch

    from lfm_export.loading import load_model
    from lfm_export.parity import ReferenceSession, run_parity
    from lfm_export.runtime.onnx import OnnxSession

    torch.set_num_threads(threads)
    loaded = load_model(ckpt)
    session = OnnxSession(folder, threads=threads)
    tok = folder / "tokenizer.json"
    result = run_parity(
        session,
        ReferenceSession(loaded.model, max_seq_len=session.max_seq_len),
        "int4",
        # every scenario but the fill to max_seq_len, which at a 32k context would dominate the run
        scenarios=["prefill", "decode", "chunked_prefill", "batch2"],
        tokenizer_file=tok if tok.is_file() and not loaded.random else None,
    )
    # Quality only (the artifact against fp32): the builder's artifact has its own quantizer, so the exactness
    # half, which compares an artifact with our quantizer's simulation, says nothing about it.
    pooled = result.pooled()
    return {
        "kl_mean": pooled["kl_mean"],
        "kl_p99": pooled["kl_p99"],
        "top1_agreement": pooled["top1_agreement"],
        "top1_decisive": pooled["top1_decisive"],
        "worst_scenario_kl_mean": result.worst("kl_mean", rows=result.quality),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:lfm2-1.2b")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / ".work" / "bench")
    ap.add_argument("--json", type=Path, default=None, help="write results here (default: WORK/results.json)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    ckpt = checkpoint_folder(args.model, args.work)
    ours, theirs = args.work / "lfm-export-int4", args.work / "genai-builder-int4"
    results: dict = {
        "model": args.model,
        "date": date.today().isoformat(),
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
    }

    print(f"exporting with lfm-export ({ckpt})", file=sys.stderr)
    results["lfm-export"] = {
        "export": measured(
            [
                str(BIN / "lfm-export"),
                "onnx",
                str(ckpt),
                "-o",
                str(ours),
                "--quant",
                "int4",
                "--block-size",
                str(args.block_size),
                "--no-parity",
                "--force",
                "--json",
            ]
        )
    }
    print("exporting with onnxruntime-genai's builder", file=sys.stderr)
    shutil.rmtree(theirs, ignore_errors=True)
    results["genai-builder"] = {
        "export": measured(
            [
                sys.executable,
                "-m",
                "onnxruntime_genai.models.builder",
                "-i",
                str(ckpt),
                "-o",
                str(theirs),
                "-p",
                "int4",
                "-e",
                "cpu",
                "-c",
                str(args.work / "builder-cache"),
            ]
        )
    }
    describe_builder_output(theirs, ckpt)

    folders = {"lfm-export": ours, "genai-builder": theirs}
    speeds = bench(folders, args)
    for name, folder in folders.items():
        r = results[name]
        for k in ("stdout", "stderr", "rc"):
            r["export"].pop(k, None)
        r["bench"] = speeds[name]
        print(f"accuracy of {name}", file=sys.stderr)
        r["accuracy"] = accuracy(folder, ckpt, args.threads)
        r["bytes"] = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data"))

    a, b = results["lfm-export"], results["genai-builder"]
    results["decode_ratio"] = round(a["bench"]["decode_tok_s"] / b["bench"]["decode_tok_s"], 3)
    results["prefill_ratio"] = round(a["bench"]["prefill_tok_s"] / b["bench"]["prefill_tok_s"], 3)
    out = args.json or args.work / "results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")

    print(
        f"\n{args.model}, {args.threads} threads, prompt {args.prompt_len}, {args.new_tokens} new tokens "
        f"({results['date']}, {results['machine']}, {results['cpu_count']} cores)\n"
    )
    print(
        "| exporter | export s | export peak RSS GB | size MB | prefill tok/s | decode tok/s | KL mean | top-1 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in ("lfm-export", "genai-builder"):
        r = results[name]
        print(
            f"| {name} | {r['export']['wall_s']:.1f} | {r['export']['peak_rss_bytes'] / 1e9:.2f} | "
            f"{r['bytes'] / 1e6:.0f} | {r['bench']['prefill_tok_s']:.1f} | {r['bench']['decode_tok_s']:.1f} | "
            f"{r['accuracy']['kl_mean']:.2e} | {r['accuracy']['top1_agreement']:.3f} |"
        )
    print(
        f"\ndecode ratio {results['decode_ratio']}x, prefill ratio {results['prefill_ratio']}x; JSON: {out}"
    )


if __name__ == "__main__":
    main()
