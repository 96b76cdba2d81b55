"""Our MLX export (`.mlxfn` through the MLX shim) against mlx-lm's own `convert -q` + generation, on the same
weights and the same MLX device.

    .venv/bin/python benchmarks/mlx_vs_mlx_lm.py --model random:lfm2-350m
    .venv/bin/python benchmarks/mlx_vs_mlx_lm.py --model tiny --prompt-len 256 --new-tokens 64

1. `lfm-export mlx MODEL --quant fp32` and `--quant int4-g64` (`--no-parity`), each timed in its own process.
2. `mlx_lm.convert(hf_path=<our fp32 folder>, quantize=True, q_group_size=64, q_bits=4)`: mlx-lm's q4 of the
   very same weights (our fp32 folder is an mlx-lm folder).
3. Speed, a fresh process per run, alternating the two for `--rounds` rounds, best of each: prefill of
   `--prompt-len` random ids and `--new-tokens` greedy decode steps (ours: `MlxSession.prefill_last`, which
   like mlx-lm computes logits for the last position only, and `prefill` with every position's logits, as
   parity needs; mlx-lm: `generate_step`, its prefill and KV cache).
4. KL against the fp32 export (which matches the torch reference to 1e-6) over the logits of a
   `--kl-len`-token random prompt: mean, p99; top-1 agreement.

Prints a Markdown table and writes JSON to `--out`/results.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TOKENIZER = ROOT / "lfm_export" / "assets" / "tiny"
"""mlx-lm's loader wants tokenizer files; random presets have none, the bundled one serves (ids are random)."""


def run_ours(folder: Path, prompt_len: int, new: int, seed: int) -> dict:
    import numpy as np

    from lfm_export.runtime.mlx import MlxSession

    t = time.perf_counter()
    s = MlxSession(folder)
    load = time.perf_counter() - t
    ids = np.random.default_rng(seed).integers(0, s.vocab_size, (1, prompt_len))
    t = time.perf_counter()
    tok = int(s.prefill(ids)[0, -1].argmax())
    prefill_all = time.perf_counter() - t
    s.reset()
    t = time.perf_counter()
    tok = int(s.prefill_last(ids)[0].argmax())  # what generation needs, as mlx-lm computes it
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(new):
        tok = int(s.decode(np.array([tok]))[0].argmax())
    decode = time.perf_counter() - t
    return {
        "load_s": load,
        "prefill_tok_s": prompt_len / prefill,
        "prefill_all_logits_tok_s": prompt_len / prefill_all,
        "decode_tok_s": new / decode,
    }


def run_mlx_lm(folder: Path, prompt_len: int, new: int, seed: int) -> dict:
    import mlx.core as mx
    import numpy as np
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    mx.set_default_device(mx.cpu)
    t = time.perf_counter()
    model, _ = load_model(folder)
    load = time.perf_counter() - t
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    ids = mx.array(np.random.default_rng(seed).integers(0, vocab, prompt_len))
    steps = generate_step(ids, model, max_tokens=new + 1, sampler=lambda x: mx.argmax(x, axis=-1))
    t = time.perf_counter()
    next(steps)  # the prompt and the first token
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    n = sum(1 for _ in steps)
    decode = time.perf_counter() - t
    return {"load_s": load, "prefill_tok_s": prompt_len / prefill, "decode_tok_s": n / decode}


def kl_table(fp32: Path, ours: Path, theirs: Path, length: int, seed: int) -> dict:
    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import load_model

    from lfm_export.runtime.mlx import MlxSession

    def logits_ours(folder: Path) -> np.ndarray:
        s = MlxSession(folder)
        return s.prefill(ids)[0].astype(np.float64)

    def logits_mlx_lm(folder: Path) -> np.ndarray:
        model, _ = load_model(folder)
        return np.array(model(mx.array(ids)).astype(mx.float32))[0].astype(np.float64)

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    vocab = json.loads((fp32 / "config.json").read_text())["vocab_size"]
    ids = np.random.default_rng(seed).integers(0, vocab, (1, length))
    ref = log_softmax(logits_ours(fp32))
    out = {"mlx_lm_fp32_vs_ours_fp32_max_abs": float(np.abs(logits_mlx_lm(fp32) - logits_ours(fp32)).max())}
    for name, lp in (
        ("ours", log_softmax(logits_ours(ours))),
        ("mlx-lm", log_softmax(logits_mlx_lm(theirs))),
    ):
        kl = (np.exp(ref) * (ref - lp)).sum(-1)
        out[name] = {
            "kl_mean": float(kl.mean()),
            "kl_p99": float(np.quantile(kl, 0.99)),
            "top1": float((ref.argmax(-1) == lp.argmax(-1)).mean()),
        }
    return out


def sub(mode: str, *args: str) -> dict:
    r = subprocess.run(
        [sys.executable, __file__, "--worker", mode, *args], capture_output=True, text=True, check=False
    )
    if r.returncode:
        raise SystemExit(f"{mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def folder_bytes(folder: Path, names: tuple[str, ...]) -> int:
    return sum((folder / n).stat().st_size for n in names if (folder / n).is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:lfm2-350m")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--kl-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench-mlx")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        mode, folder, p, n, seed = a.worker
        fn = {"ours": run_ours, "mlx-lm": run_mlx_lm}[mode]
        print(json.dumps(fn(Path(folder), int(p), int(n), int(seed))))
        return

    import mlx.core as mx

    work = a.out / a.model.replace(":", "-")
    work.mkdir(parents=True, exist_ok=True)
    context = a.prompt_len + a.new_tokens + 8
    folders = {"fp32": work / "ours-fp32", "ours": work / "ours-int4-g64", "mlx-lm": work / "mlx-lm-q4"}
    exports = {}
    for key, quant in (("fp32", "fp32"), ("ours", "int4-g64")):
        t = time.perf_counter()
        cmd = [str(BIN / "lfm-export"), "mlx", a.model, "-o", str(folders[key]), "--quant", quant]
        cmd += ["--max-seq-len", str(max(context, a.kl_len)), "--no-parity", "--force"]
        subprocess.run(cmd, check=True, capture_output=True)
        exports[key] = time.perf_counter() - t
        for f in ("tokenizer.json", "tokenizer_config.json"):
            if not (folders[key] / f).is_file():
                shutil.copy(TOKENIZER / f, folders[key] / f)
    t = time.perf_counter()
    shutil.rmtree(folders["mlx-lm"], ignore_errors=True)
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from mlx_lm import convert; "
            "convert(hf_path=sys.argv[1], mlx_path=sys.argv[2], quantize=True, q_group_size=64, q_bits=4)",
            str(folders["fp32"]),
            str(folders["mlx-lm"]),
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        raise SystemExit(f"mlx_lm.convert failed:\n{r.stderr[-3000:]}")
    exports["mlx-lm"] = time.perf_counter() - t

    runs: dict[str, list[dict]] = {"ours": [], "mlx-lm": []}
    for _ in range(a.rounds):
        for key in ("ours", "mlx-lm"):
            args = (str(folders[key]), str(a.prompt_len), str(a.new_tokens), str(a.seed))
            runs[key].append(sub(key, *args))
    kl = kl_table(folders["fp32"], folders["ours"], folders["mlx-lm"], a.kl_len, a.seed)

    rows = {}
    for key in ("ours", "mlx-lm"):
        best = {m: max(r[m] for r in runs[key]) for m in ("prefill_tok_s", "decode_tok_s")}
        rows[key] = {
            "export_s": exports[key],
            "weights_mb": folder_bytes(folders[key], ("model.safetensors",)) / 1e6
            or sum(p.stat().st_size for p in folders[key].glob("*.safetensors")) / 1e6,
            **best,
            "prefill_all_logits_tok_s": max(r.get("prefill_all_logits_tok_s", 0) for r in runs[key]),
            "prefill_runs": [r["prefill_tok_s"] for r in runs[key]],
            "decode_runs": [r["decode_tok_s"] for r in runs[key]],
            **kl[key],
        }
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {platform.system()}".strip(),
        "mlx": mx.__version__,
        "model": a.model,
        "prompt_len": a.prompt_len,
        "new_tokens": a.new_tokens,
        "kl_len": a.kl_len,
        "mlx_lm_fp32_vs_ours_fp32_max_abs": kl["mlx_lm_fp32_vs_ours_fp32_max_abs"],
        "rows": rows,
    }
    (work / "results.json").write_text(json.dumps(result, indent=2))
    print(
        "| model | artifact | export s | weights MB | prefill tok/s (best; runs) | prefill, every position's logits "
        "| decode tok/s (best; runs) | KL mean | KL p99 | top-1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    names = {"ours": "lfm-export int4-g64 (.mlxfn)", "mlx-lm": "mlx_lm.convert -q (g64, 4 bit)"}
    for key, r in rows.items():
        runs_txt = ", ".join(f"{v:.2f}" for v in r["decode_runs"])
        pre_txt = ", ".join(f"{v:.2f}" for v in r["prefill_runs"])
        every = f"{r['prefill_all_logits_tok_s']:.2f}" if key == "ours" else "n/a"
        print(
            f"| `{a.model}` | {names[key]} | {r['export_s']:.1f} | {r['weights_mb']:.0f} "
            f"| {r['prefill_tok_s']:.2f} ({pre_txt}) | {every} "
            f"| {r['decode_tok_s']:.2f} ({runs_txt}) | {r['kl_mean']:.4f} | {r['kl_p99']:.4f} | {r['top1']:.3f} |"
        )
    ratio = rows["ours"]["decode_tok_s"] / rows["mlx-lm"]["decode_tok_s"]
    pre = rows["ours"]["prefill_tok_s"] / rows["mlx-lm"]["prefill_tok_s"]
    print(
        f"\ndecode ratio {ratio:.2f}x, prefill ratio {pre:.2f}x (ours / mlx-lm); "
        f"fp32 folders: mlx-lm vs our .mlxfn logits max abs {kl['mlx_lm_fp32_vs_ours_fp32_max_abs']:.2e}"
    )


if __name__ == "__main__":
    main()
