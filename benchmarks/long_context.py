"""Parity at each checkpoint's full context, for the recipes whose long-context failures were fixed: Core ML fp16
and int4, MLX bf16 and ExecuTorch fp16, on transformers-written checkpoints at `initializer_range` 0.08 (dense
and MoE, 2048-token context) and on the trained bundled models at 4096. Writes one JSON row per export
(verdict, failures, and the exactness metrics of `near_max_seq_len`, the scenario that fills the context) to
`--out` with the date, machine and commit.

`python benchmarks/long_context.py --out benchmarks/results/long_context.json [--threads 1] [--only coreml]`
(the figures of docs/parity.md, *Long contexts*; about 25 minutes on one idle core of the 2-core development VM)."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import cpu_model

CONTEXT = 2048
RANDOM = {
    "random-dense-0.08": dict(
        vocab_size=512,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=5,
        num_attention_heads=6,
        num_key_value_heads=2,
        layer_types=["conv", "full_attention", "conv", "conv", "full_attention"],
        initializer_range=0.08,
        max_position_embeddings=CONTEXT,
        block_auto_adjust_ff_dim=False,
    ),
    "random-moe-0.08": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_experts=6,
        num_experts_per_tok=2,
        num_dense_layers=1,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["conv", "full_attention", "conv", "full_attention"],
        use_expert_bias=True,
        initializer_range=0.08,
        max_position_embeddings=CONTEXT,
    ),
}
TRAINED_CONTEXT = 4096
RUNS = [("coreml", "fp16"), ("coreml", "int4"), ("mlx", "bf16"), ("executorch", "fp16")]


def write_random(name: str, folder: Path, seed: int) -> Path:
    import torch

    from lfm_export.check import save_random_transformers

    return save_random_transformers(folder, RANDOM[name], torch.float32, seed)


def recipe_for(backend: str, quant: str, context: int | None):
    if backend == "coreml":
        from lfm_export.backends.coreml.recipes import make_recipe
    elif backend == "mlx":
        from lfm_export.backends.mlx.recipes import make_recipe
    else:
        from lfm_export.backends.executorch.recipes import make_recipe
    return make_recipe(quant, max_seq_len=context)


def near_max(folder: Path) -> dict:
    report = json.loads((folder / "parity" / "parity.json").read_text())
    row = next(s for s in report["scenarios"] if s["name"] == "near_max_seq_len")
    keep = ("logit_max_rel", "logit_median_rel", "kl_max", "state_max_rel", "state_p99_rel")
    return {k: row["metrics"].get(k) for k in keep} | {"fill": row["details"].get("fill")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default=None, help="run one backend (coreml | mlx | executorch)")
    args = parser.parse_args()

    import torch

    from lfm_export.pipeline import export_artifact
    from lfm_export.progress import Progress

    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            name: (str(write_random(name, Path(tmp) / name, seed=i + 1)), None)
            for i, name in enumerate(RANDOM)
        }
        models |= {"tiny": ("tiny", TRAINED_CONTEXT), "tiny-moe": ("tiny-moe", TRAINED_CONTEXT)}
        for label, (model, context) in models.items():
            for backend, quant in RUNS:
                if args.only and backend != args.only:
                    continue
                out = Path(tmp) / f"{label}-{backend}-{quant}"
                start = time.perf_counter()
                outcome = export_artifact(
                    backend,
                    model,
                    out,
                    recipe_for(backend, quant, context),
                    threads=args.threads,
                    progress=Progress(quiet=True),
                )
                p = outcome.manifest["parity"]
                rows.append(
                    {
                        "model": label,
                        "backend": backend,
                        "recipe": quant,
                        "context": outcome.manifest["max_seq_len"],
                        "gate": p["exactness"]["gate"],
                        "passed": p["passed"],
                        "failures": p["failures"],
                        "near_max_seq_len": near_max(out),
                        "seconds": round(time.perf_counter() - start, 1),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {platform.processor() or ''} {cpu_model()}".strip(),
        "commit": commit,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "threads": args.threads,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
