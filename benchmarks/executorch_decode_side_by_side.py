"""Decode speed of lfm-export's ExecuTorch programs against ExecuTorch's own `export_llm` q8da4w program of the
same weights, interleaved in one process so a slow spell of the shared machine hits every program alike.

    flock /tmp/lfm-heavy.lock .venv/bin/python benchmarks/executorch_decode_side_by_side.py \\
        --model random:lfm2-350m --threads 1 2 --rounds 9 \\
        --out benchmarks/results/executorch_decode_side_by_side_350m.json

1. The checkpoint folder (`random:PRESET`: written once under `--ckpt-dir` by `onnx_vs_genai.checkpoint_folder`;
   a path or a bundled name: used as it is).
2. Ours: `lfm-export executorch CKPT --quant Q --max-seq-len C --max-prefill P --no-parity` for each Q of
   `--ours` (`NAME+h4`: with `--head-bits 4`), a folder each under `--work`.
3. Theirs: `export_llm` with ExecuTorch's `lfm2_xnnpack_q8da4w.yaml` on the same weights, context C
   (`quality_per_byte.executorch_export_llm`: its checkpoint in a temporary folder whose path ExecuTorch does
   not read as pre-quantized).
4. Bytes: each `.pte` whole (what `quality_per_byte.py` counts as an ExecuTorch program's weight bytes).
5. Decode, per thread count of `--threads`, in one worker process holding every program (`executorch.runtime`,
   the threadpool set to that count with `_unsafe_reset_threadpool`, `OMP_NUM_THREADS` the same): each round
   prefills the same seeded `--prompt-len` random prompt into each program (untimed; in chunks of the
   program's `get_max_seq_len`), then times `--new-tokens` one-token `forward` calls fed the same seeded
   random tokens at the same positions; the program order rotates every round; one untimed warm-up round.
   Per program every round's tok/s and the median; per program of ours, the ratio of medians and the median,
   min and max of the per-round ratios against theirs. The 1-minute load average before and after each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from provenance import provenance  # noqa: E402

THEIRS = "export_llm-q8da4w"


def load_programs(paths: dict[str, str], threads: int) -> dict[str, Any]:
    """Each `.pte` loaded with `executorch.runtime` (its `forward` and its prefill chunk), the threadpool at
    `threads`."""
    import executorch.kernels.quantized  # noqa: F401
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    portable_lib._unsafe_reset_threadpool(threads)
    out = {}
    for name, path in paths.items():
        program = Runtime.get().load_program(path)
        chunk = int(program.load_method("get_max_seq_len").execute([])[0])
        out[name] = (program, program.load_method("forward"), chunk)
    return out


def decode_tok_s(entry: Any, prompt: list[int], feed: list[int]) -> float:
    """Prefill `prompt` from position 0 (untimed), then `len(feed)` timed one-token calls; tok/s."""
    import torch

    _, forward, chunk = entry
    for s in range(0, len(prompt), chunk):
        forward.execute([torch.tensor([prompt[s : s + chunk]]), torch.tensor([s])])
    calls = [(torch.tensor([[t]]), torch.tensor([len(prompt) + i])) for i, t in enumerate(feed)]
    t = time.perf_counter()
    for ids, pos in calls:
        forward.execute([ids, pos])
    return len(feed) / (time.perf_counter() - t)


def worker(paths: dict[str, str], threads: int, rounds: int, prompt_len: int, new: int, vocab: int) -> dict:
    programs = load_programs(paths, threads)
    rng = np.random.default_rng(0)
    prompt = [int(x) for x in rng.integers(16, vocab, prompt_len)]
    feed = [int(x) for x in rng.integers(16, vocab, new)]
    names = list(programs)
    runs: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 1):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            tok_s = decode_tok_s(programs[n], prompt, feed)
            if r:  # round 0 warms up
                runs[n].append(round(tok_s, 2))
    return runs


def export_ours(ckpt: Path, work: Path, spec: str, args: argparse.Namespace) -> tuple[Path, float | None]:
    """`lfm-export executorch` of `ckpt` at `spec` (`NAME` or `NAME+h4`); its folder and wall seconds (None:
    reused from an earlier run, `--reuse`)."""
    name, _, tables = spec.partition("+")
    folder = work / f"ours-{spec}"
    if args.reuse and (folder / "model.pte").is_file():
        return folder, None
    cmd = [
        sys.executable,
        "-m",
        "lfm_export.cli",
        "executorch",
        str(ckpt),
        "-o",
        str(folder),
        "--quant",
        name,
    ]
    cmd += ["--max-seq-len", str(args.context), "--max-prefill", str(args.prompt_len), "--no-parity"]
    cmd += ["--force", "--no-card", "--threads", str(max(args.threads))]
    if tables == "h4":
        cmd += ["--head-bits", "4"]
    elif tables:
        raise SystemExit(f"--ours {spec!r}: the only suffix is +h4")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(max(args.threads))}
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"lfm-export executorch --quant {name} failed:\n{r.stderr[-3000:]}")
    return folder, round(time.perf_counter() - t, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:lfm2-350m")
    ap.add_argument("--ours", nargs="+", default=["int4-b128-a8", "int4-b32-a8"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ckpt-dir", type=Path, default=ROOT / ".work" / "ckpt")
    ap.add_argument("--work", type=Path, default=ROOT / ".work" / "et_side_by_side")
    ap.add_argument("--reuse", action="store_true", help="keep programs already exported under --work")
    ap.add_argument("--export-only", action="store_true", help="write the programs, measure nothing")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        w = json.loads(args.worker)
        print(
            json.dumps(worker(w["paths"], w["threads"], w["rounds"], w["prompt_len"], w["new"], w["vocab"]))
        )
        return
    import quality_per_byte
    from onnx_vs_genai import checkpoint_folder

    result: dict[str, Any] = {**provenance()}
    ckpt = checkpoint_folder(args.model, args.ckpt_dir).resolve()
    vocab = int(json.loads((ckpt / "config.json").read_text())["vocab_size"])
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    folders: dict[str, Path] = {}
    export_s: dict[str, float | None] = {THEIRS: None}
    for spec in args.ours:
        folders[spec], export_s[spec] = export_ours(ckpt, work, spec, args)
    theirs = work / THEIRS
    if not (args.reuse and (theirs / "model.pte").is_file()):
        quality_per_byte.REUSE = False
        ns = argparse.Namespace(threads=max(args.threads), context=args.context)
        made = quality_per_byte.executorch_export_llm(ckpt, work, ns)[0]["export"]
        if "error" in made:
            raise SystemExit(f"export_llm failed:\n{made['error']}")
        export_s[THEIRS] = made["wall_s"]
    folders[THEIRS] = theirs
    pte_bytes = {n: (f / "model.pte").stat().st_size for n, f in folders.items()}
    result.update(
        model=args.model,
        context=args.context,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        rounds=args.rounds,
        export_s=export_s,
        pte_bytes=pte_bytes,
        bytes_ratio={n: round(pte_bytes[n] / pte_bytes[THEIRS], 3) for n in args.ours},
        by_threads={},
    )
    if args.export_only:
        print(json.dumps(result, indent=1))
        return
    paths = {n: str(f / "model.pte") for n, f in folders.items()}
    for threads in args.threads:
        spec = {"paths": paths, "threads": threads, "rounds": args.rounds, "prompt_len": args.prompt_len}
        spec |= {"new": args.new_tokens, "vocab": vocab}
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        before = os.getloadavg()[0]
        r = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True, text=True
        )
        if r.returncode:
            raise SystemExit(f"worker failed:\n{r.stderr[-3000:]}")
        runs = json.loads(r.stdout.strip().splitlines()[-1])
        med = {n: float(np.median(v)) for n, v in runs.items()}
        against = {}
        for n in args.ours:
            ratios = [a / b for a, b in zip(runs[n], runs[THEIRS])]
            against[n] = {
                "ratio_of_medians": round(med[n] / med[THEIRS], 3),
                "per_round_ratio": {
                    "median": round(float(np.median(ratios)), 3),
                    "min": round(min(ratios), 3),
                    "max": round(max(ratios), 3),
                },
                "rounds_at_or_over_1.15": sum(x >= 1.15 for x in ratios),
            }
        result["by_threads"][str(threads)] = {
            "load_avg_1m_before": round(before, 2),
            "runs": runs,
            "median_tok_s": med,
            "against_theirs": against,
            "load_avg_1m_after": round(os.getloadavg()[0], 2),
        }
        print(f"{threads} thread(s): {json.dumps(result['by_threads'][str(threads)]['against_theirs'])}")
    text = json.dumps(result, indent=1) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
