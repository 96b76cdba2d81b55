"""Decode speed of an lfm-export ONNX artifact holding a precision mix against onnxruntime-genai's builder
`-p int4` of the same weights, interleaved in one process so a slow spell of the shared machine hits both alike.

    .venv/bin/python benchmarks/onnx_decode_side_by_side.py --model random:lfm2-350m --threads 1 \\
        --rounds 9 --out benchmarks/results/onnx_decode_side_by_side_350m_t1.json

1. The checkpoint folder (`random:PRESET`: written once under `--ckpt-dir` by `onnx_vs_genai.checkpoint_folder`;
   a path or a bundled name: used as it is).
2. Ours: `lfm-export onnx` of that folder with `--quant int4-b128 --head-bits 4 --embedding-quant 4` and the
   precision mix `--mix` (default `MIX`: the kinds of tensor group the `--budget size=3.838` mix on the trained
   `small` chose, one rule per kind), `--no-parity`, entering through the core recipe's `mix` as `--budget`
   writes it; `--mix none` exports the plain recipe. Plain rounding: calibration changes the codes, not the
   kernels or the bytes.
3. Theirs: `onnxruntime_genai.models.builder -p int4 -e cpu` (its default), given our manifest as
   `benchmarks/quality_per_byte.py` does.
4. Weight bytes of each (every initializer, `quality_per_byte.sizes`).
5. Decode in one worker process holding both sessions (`OnnxSession`, `--threads`): each round runs both on
   the same seeded `--prompt-len` random prompt, `--new-tokens` greedy steps timed after the prefill, the order
   alternating; one untimed warm-up round first. Per artifact every round's tok/s and the median; the ratio of
   medians and the median, min and max of the per-round ratios. The 1-minute load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
from side_by_side import parse_mix, timed  # noqa: E402

MIX = (("feed_forward", 2, 64), ("self_attn", 4, 128), ("conv", 4, 64))
"""The `small` ONNX budget mix's kinds (`--budget size=3.838`, `int4-b128-gptq --head-bits 4 --embedding-quant
4`): MLPs at 2 bits (four of six there, in blocks of 32 to 128: here every MLP at int2-b64), attention at
int4-b128, conv blocks at int4 (blocks of 32 to 128: here int4-b64), the tied table and head at int8-b128
(`side_by_side.TABLE`)."""
EXPORT = """
import json, sys
from pathlib import Path
from lfm_export.backends.onnx import cli_recipe
from lfm_export.budget import with_core
from lfm_export.pipeline import export_artifact
mix = tuple(tuple(m) for m in json.loads(sys.argv[3]))
recipe = cli_recipe("int4-b128", None, None, "ort", False, 4, "4", 4)
if mix:
    recipe = with_core(recipe, recipe.recipe.with_options(mix=mix))
export_artifact("onnx", sys.argv[1], Path(sys.argv[2]), recipe, force=True, parity=False, card=False,
                threads=int(sys.argv[4]))
"""


def decode_tok_s(session: Any, ids: np.ndarray, new: int) -> float:
    """Greedy decode tok/s after a prefill of `ids`."""
    session.reset(1)
    tok = int(np.asarray(session.prefill(ids))[0, -1].argmax())
    t = time.perf_counter()
    for _ in range(new):
        tok = int(np.asarray(session.decode(np.array([tok])))[0].argmax())
    return new / (time.perf_counter() - t)


def worker(ours: str, theirs: str, threads: int, rounds: int, prompt_len: int, new: int) -> dict[str, Any]:
    from lfm_export.runtime.onnx import OnnxSession

    sessions = {"ours": OnnxSession(ours, threads=threads), "builder": OnnxSession(theirs, threads=threads)}
    ids = np.random.default_rng(0).integers(16, sessions["ours"].vocab_size, (1, prompt_len))
    names = list(sessions)
    runs: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 1):
        order = names if r % 2 else names[::-1]
        for n in order:
            tok_s = decode_tok_s(sessions[n], ids, new)
            if r:  # round 0 warms up
                runs[n].append(round(tok_s, 2))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:lfm2-350m")
    ap.add_argument("--mix", default="default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ckpt-dir", type=Path, default=ROOT / ".work" / "ckpt")
    ap.add_argument("--work", type=Path, default=ROOT / ".work" / "onnx_side_by_side")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        ours, theirs, threads, rounds, p, n = args.worker
        print(json.dumps(worker(ours, theirs, int(threads), int(rounds), int(p), int(n))))
        return
    from onnx_vs_genai import checkpoint_folder, describe_builder_output
    from quality_per_byte import sizes

    result: dict[str, Any] = {**provenance(), "load_avg_1m_at_start": os.getloadavg()[0]}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    ckpt = checkpoint_folder(args.model, args.ckpt_dir).resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    mix = parse_mix(args.mix, MIX)
    ours = args.work / "ours"
    theirs = args.work / "builder-int4"
    export_s = timed(
        [sys.executable, "-c", EXPORT, str(ckpt), str(ours), json.dumps(mix), str(args.threads)], env
    )
    shutil.rmtree(theirs, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(theirs)]
    builder_s = timed([*cmd, "-p", "int4", "-e", "cpu", "-c", str(args.work / "builder-cache")], env)
    describe_builder_output(theirs, ckpt)
    result.update(
        model=args.model,
        mix=[list(m) for m in mix],
        threads=args.threads,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        export_s={"ours": export_s, "builder": builder_s},
        weight_bytes={"ours": sizes(ours)["weight_bytes"], "builder": sizes(theirs)["weight_bytes"]},
    )
    cmd = [sys.executable, __file__, "--worker", str(ours), str(theirs), str(args.threads), str(args.rounds)]
    r = subprocess.run(
        [*cmd, str(args.prompt_len), str(args.new_tokens)], env=env, capture_output=True, text=True
    )
    if r.returncode:
        raise SystemExit(f"worker failed:\n{r.stderr[-3000:]}")
    runs = json.loads(r.stdout.strip().splitlines()[-1])
    med = {n: float(np.median(v)) for n, v in runs.items()}
    ratios = [a / b for a, b in zip(runs["ours"], runs["builder"])]
    result.update(
        runs=runs,
        median_tok_s=med,
        ratio_of_medians=round(med["ours"] / med["builder"], 3),
        per_round_ratio={
            "median": round(float(np.median(ratios)), 3),
            "min": round(min(ratios), 3),
            "max": round(max(ratios), 3),
        },
        bytes_ratio=round(result["weight_bytes"]["ours"] / result["weight_bytes"]["builder"], 3),
        load_avg_1m_at_end=os.getloadavg()[0],
    )
    text = json.dumps(result, indent=1) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
