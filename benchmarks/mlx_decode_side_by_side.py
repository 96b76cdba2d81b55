"""Decode speed of an lfm-export MLX artifact against mlx-lm's own `convert` q4 g64 of the same weights,
interleaved in one process so a slow spell of the shared machine hits both alike.

    .venv/bin/python benchmarks/mlx_decode_side_by_side.py --model random:lfm2-1.2b --threads 1 \\
        --rounds 9 --out benchmarks/results/mlx_decode_side_by_side_1.2b_t1.json

1. The checkpoint folder (`random:PRESET`: written once under `--ckpt-dir` by `onnx_vs_genai.checkpoint_folder`,
   fp32 safetensors and the bundled tokenizer files; a path or a bundled name: used as it is).
2. Ours: `lfm-export mlx` of that folder with `--quant int4-b128 --head-bits 4 --embedding-quant 4` and the
   precision mix `--mix` (default `MIX`: the kinds of tensor group the `--budget size=2.7` mix on the trained
   `small` chose, as one rule per kind), `--no-parity`; `--mix none` exports the plain recipe. The mix
   enters through the core recipe's `mix` field, as `--budget` writes it. Plain rounding: calibration
   changes the codes, not the kernels or the bytes.
3. Theirs: `mlx_lm.convert(quantize=True, q_group_size=64, q_bits=4)` (its default 4-bit) of a folder with
   the checkpoint's weights (symlinked) and the Liquid config keys mlx-lm's `lfm2` model reads.
4. Weight bytes of each (the safetensors' tensors, `quality_per_byte.safetensors_bytes`).
5. Decode, in one worker process pinned to `--threads` cores (`taskset`; MLX 0.32 has no thread setting, so
   the cores it may use are what is fixed), holding three sessions at once: ours through our shim
   (`MlxSession`: `prefill_last`, then one `decode` per token), ours through mlx-lm (`load` of our folder,
   `generate_step`), theirs through mlx-lm (`generate_step`). Each round runs all three on the same seeded
   `--prompt-len` random prompt, `--new-tokens` greedy steps timed after the prefill (mlx-lm: after its first
   token, which ends its prefill), the order rotated each round; one untimed warm-up round first. Per
   artifact: every round's tok/s, median, min, max; per pair: the ratio of medians and the median, min and
   max of the per-round ratios. The 1-minute load average before and after.

Writes JSON (provenance, threads, bytes, rounds) to `--out` and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from pinned_worker import add_worker_option, run_pinned, serve_worker  # noqa: E402
from provenance import provenance  # noqa: E402
from side_by_side import parse_mix, timed  # noqa: E402

BIN = Path(sys.executable).parent
MIX = (("feed_forward", 3, 128), ("self_attn", 3, 128), ("conv", 4, 128))
"""The `small` budget mix's kinds (`--budget size=2.7`, `int4-b128-gptq --head-bits 4 --embedding-quant 4`):
every MLP and attention group at int3-b128, the conv blocks at int4-b128 (3 of its 4; one at int3), the
tied table and head at int8-b128 (`side_by_side.TABLE`)."""
MLX_LM_CONVERT = (
    "import sys; from mlx_lm import convert; "
    "convert(hf_path=sys.argv[1], mlx_path=sys.argv[2], quantize=True, q_group_size=64, q_bits=4)"
)
EXPORT = """
import json, sys
from pathlib import Path
from lfm_export.backends.mlx import cli_recipe
from lfm_export.budget import with_core
from lfm_export.pipeline import export_artifact
mix = tuple(tuple(m) for m in json.loads(sys.argv[3]))
recipe = cli_recipe("int4-b128", int(sys.argv[4]), None, "4", 4)
if mix:
    recipe = with_core(recipe, recipe.recipe.with_options(mix=mix))
export_artifact("mlx", sys.argv[1], Path(sys.argv[2]), recipe, force=True, parity=False, card=False)
"""


def mlx_lm_source(ckpt: Path, work: Path) -> Path:
    """A folder mlx-lm's `lfm2` reads: the checkpoint's files symlinked, its config with the Liquid keys."""
    folder = work / "mlx-lm-src"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for f in ckpt.iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f.resolve())
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.setdefault("block_ff_dim", cfg["intermediate_size"])
    cfg.setdefault("block_auto_adjust_ff_dim", False)
    cfg.setdefault("block_multiple_of", 256)
    cfg.setdefault("block_ffn_dim_multiplier", 1.0)
    cfg.setdefault("block_dim", cfg["hidden_size"])
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


# ---- the worker: all sessions in one process --------------------------------------------------------------


class Shim:
    """Our artifact through our runtime shim."""

    def __init__(self, folder: Path) -> None:
        from lfm_export.runtime.mlx import MlxSession

        self.s = MlxSession(folder)
        self.vocab_size = self.s.vocab_size

    def decode_tok_s(self, ids: np.ndarray, new: int) -> float:
        self.s.reset()
        tok = int(self.s.prefill_last(ids)[0].argmax())
        t = time.perf_counter()
        for _ in range(new):
            tok = int(self.s.decode(np.array([tok]))[0].argmax())
        return new / (time.perf_counter() - t)


class MlxLm:
    """A folder through mlx-lm: its model, prompt cache and `generate_step`."""

    def __init__(self, folder: Path) -> None:
        import mlx.core as mx
        from mlx_lm.utils import load_model

        mx.set_default_device(mx.cpu)
        self.mx = mx
        self.model, cfg = load_model(folder)
        self.vocab_size = int(cfg["vocab_size"])

    def decode_tok_s(self, ids: np.ndarray, new: int) -> float:
        from mlx_lm.generate import generate_step

        mx = self.mx
        steps = generate_step(
            mx.array(ids[0]), self.model, max_tokens=new + 1, sampler=lambda x: mx.argmax(x, axis=-1)
        )
        next(steps)  # the prompt and the first token
        t = time.perf_counter()
        n = sum(1 for _ in steps)
        return n / (time.perf_counter() - t)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Rounds over the artifacts in `spec["artifacts"]` (name -> [kind, folder]), rotated order, one warm-up."""
    sessions = {
        name: (Shim if kind == "shim" else MlxLm)(Path(folder))
        for name, (kind, folder) in spec["artifacts"].items()
    }
    names = list(sessions)
    vocab = min(s.vocab_size for s in sessions.values())
    ids = np.random.default_rng(spec["seed"]).integers(16, vocab, (1, spec["prompt_len"]))
    for s in sessions.values():
        s.decode_tok_s(ids, spec["new_tokens"])
    runs: dict[str, list[float]] = {n: [] for n in names}
    orders = []
    for r in range(spec["rounds"]):
        order = names[r % len(names) :] + names[: r % len(names)]
        orders.append(order)
        for n in order:
            runs[n].append(round(sessions[n].decode_tok_s(ids, spec["new_tokens"]), 2))
    return {"runs": runs, "orders": orders}


def summary(runs: dict[str, list[float]], a: str, b: str) -> dict[str, Any]:
    ratios = [x / y for x, y in zip(runs[a], runs[b])]
    return {
        "ratio_of_medians": round(float(np.median(runs[a]) / np.median(runs[b])), 4),
        "round_ratio_median": round(float(np.median(ratios)), 4),
        "round_ratio_min": round(min(ratios), 4),
        "round_ratio_max": round(max(ratios), 4),
        "round_ratios": [round(r, 4) for r in ratios],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:lfm2-350m")
    ap.add_argument("--mix", default="default", help="default | none | PATTERN=BITS/BLOCK,...")
    ap.add_argument("--threads", type=int, default=1, help="cores the decode worker is pinned to (taskset)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--reuse", action="store_true", help="keep artifacts already in --work")
    ap.add_argument("--no-shim-in-mlx-lm", action="store_true", help="skip ours through mlx-lm")
    ap.add_argument("--ckpt-dir", type=Path, default=Path("/tmp/lfm_ckpt"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/mlx_decode_side_by_side"))
    ap.add_argument("--out", type=Path, default=None)
    add_worker_option(ap)
    a = ap.parse_args()
    if serve_worker(a, worker):
        return

    from onnx_vs_genai import checkpoint_folder
    from quality_per_byte import safetensors_bytes

    load_start = round(os.getloadavg()[0], 2)
    mix = parse_mix(a.mix, MIX)
    a.ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_folder(a.model, a.ckpt_dir).resolve()
    work = a.work / a.model.replace(":", "-").replace("/", "_")
    work.mkdir(parents=True, exist_ok=True)
    threads_env = {"OMP_NUM_THREADS": str(a.threads), "OPENBLAS_NUM_THREADS": str(a.threads)}
    env = {
        **os.environ,
        **threads_env,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    ours, theirs = work / "ours", work / "mlx-lm-q4-g64"
    exports = {}
    if not (a.reuse and (ours / "manifest.json").is_file()):
        exports["ours_s"] = timed(
            [sys.executable, "-c", EXPORT, str(ckpt), str(ours), json.dumps(mix), str(a.max_seq_len)], env
        )
    if not (a.reuse and (theirs / "config.json").is_file()):
        shutil.rmtree(theirs, ignore_errors=True)
        exports["mlx_lm_s"] = timed(
            [sys.executable, "-c", MLX_LM_CONVERT, str(mlx_lm_source(ckpt, work)), str(theirs)], env
        )
    if not (ours / "tokenizer.json").is_file():  # mlx-lm's load wants one (ids are random anyway)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            if (ckpt / f).is_file():
                shutil.copy(ckpt / f, ours / f)
    nbytes = {
        "ours": safetensors_bytes(ours / "model.safetensors"),
        "mlx-lm": sum(safetensors_bytes(p) for p in theirs.glob("*.safetensors")),
    }
    artifacts = {"ours (shim)": ["shim", str(ours)], "mlx-lm q4 g64": ["mlx-lm", str(theirs)]}
    if not a.no_shim_in_mlx_lm:
        artifacts["ours (mlx-lm)"] = ["mlx-lm", str(ours)]
    res: dict[str, Any] = {"runs": {}, "orders": []}
    per: dict[str, Any] = {}
    pairs: dict[str, Any] = {}
    load_before = load_after = round(os.getloadavg()[0], 2)
    cores = ",".join(str(c) for c in range(a.threads))
    if a.rounds:  # --rounds 0: the exports and their bytes only
        spec = {
            "artifacts": artifacts,
            "rounds": a.rounds,
            "prompt_len": a.prompt_len,
            "new_tokens": a.new_tokens,
            "seed": a.seed,
        }
        load_before = round(os.getloadavg()[0], 2)
        res = run_pinned(__file__, spec, a.threads, env)
        load_after = round(os.getloadavg()[0], 2)
        runs = res["runs"]
        per = {
            n: {"tok_s": v, "median": float(np.median(v)), "min": min(v), "max": max(v)}
            for n, v in runs.items()
        }
        pairs = {"ours (shim) / mlx-lm q4 g64": summary(runs, "ours (shim)", "mlx-lm q4 g64")}
        if "ours (mlx-lm)" in runs:
            pairs["ours (mlx-lm) / mlx-lm q4 g64"] = summary(runs, "ours (mlx-lm)", "mlx-lm q4 g64")
    manifest = json.loads((ours / "manifest.json").read_text())
    result = {
        **provenance(),
        "load_average_at_start": load_start,
        "model": a.model,
        "checkpoint": str(ckpt),
        "threads": a.threads,
        "pinned_cores": cores,
        "prompt_len": a.prompt_len,
        "new_tokens": a.new_tokens,
        "rounds": a.rounds,
        "ours_recipe": {
            "quant": "int4-b128",
            "head_bits": 4,
            "embedding_quant": 4,
            "mix": [list(m) for m in mix],
            "recorded": manifest.get("recipe"),
        },
        "peer": "mlx_lm.convert q4 g64",
        "exports_s": exports,
        "weight_bytes": nbytes,
        "weight_bytes_ratio": round(nbytes["ours"] / nbytes["mlx-lm"], 4),
        "load_avg_1m_before_decode": load_before,
        "load_avg_1m_after_decode": load_after,
        "orders": res["orders"],
        "decode_tok_s": per,
        "ratios": pairs,
    }
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"weight bytes ours {nbytes['ours']} / mlx-lm {nbytes['mlx-lm']} = {result['weight_bytes_ratio']}x")
    for n, p in per.items():
        print(f"{n}: median {p['median']} [{p['min']}-{p['max']}] tok/s")
    for k, s in pairs.items():
        print(
            f"{k}: of medians {s['ratio_of_medians']}, per round median {s['round_ratio_median']} "
            f"({s['round_ratio_min']}-{s['round_ratio_max']})"
        )
    if a.rounds:
        print(f"load average {load_before} before, {load_after} after the decode rounds")


if __name__ == "__main__":
    main()
