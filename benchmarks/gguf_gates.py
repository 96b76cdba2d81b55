"""Calibrate the GGUF exactness gates (`lfm_export/backends/gguf/gates.py`): honest exports against ones with one
matrix 2% off, run through llama.cpp.

    .venv/bin/python benchmarks/gguf_gates.py --out benchmarks/results/gguf_gates.json

For each model (`tiny`, `tiny-moe`) and type (`q4_0`, `q8_0`): export at context 64 (`--contexts`: each of a
list; the parity prompts grow with it) with the full parity run,
then for each of five matrices raise that matrix's block scales by `--error` (2%) in the file itself and check
parity again (`bf16`: the matrix's values, rounded back to bf16); `--honest-types` (the `-mse` variants) are
exported honest only. `--types bf16 --honest-types ''` measures the `bf16-bf16` gate
(`benchmarks/results/gguf_bf16_gate.json`). Every row holds, per metric,
the worst value over the scenarios divided by what the activation rounding
itself does to it (the simulation with against without llama.cpp's Q8_0 activation rounding; KL max: its
square root, as the gate squares its factor): a gate at FACTOR fails a row above FACTOR.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from provenance import provenance

ROOT = Path(__file__).resolve().parent.parent
TARGETS = (
    "blk.3.shortconv.out_proj.weight",
    "blk.2.attn_q.weight",
    "blk.0.ffn_down.weight",
    "blk.4.attn_output.weight",
    "blk.5.shortconv.in_proj.weight",
)
BLOCK_BYTES = {"Q4_0": 18, "Q8_0": 34}


def _factor(gate: str) -> float:
    """The activation-rounding multiple gate `gate` allows (its `logit_max_rel` limit's `rounding`)."""
    from lfm_export.backends import all_backends
    from lfm_export.parity.thresholds import GATES

    all_backends()  # the GGUF gates register through the backend record
    return next(lim.rounding for lim in GATES[gate].limits if lim.metric == "logit_max_rel")


def scale_bf16(data: np.ndarray, factor: float) -> None:
    """Multiply the BF16 values held in `data` (uint8 bytes) by `factor` in place, rounded back to bf16."""
    import gguf

    kind = gguf.GGMLQuantizationType.BF16
    flat = data.reshape(-1, data.shape[-1])
    values = gguf.quants.dequantize(flat, kind) * np.float32(factor)
    flat[...] = gguf.quants.quantize(values.astype(np.float32), kind)


def ratios(folder: Path) -> dict:
    """Worst metric over the scenarios as a multiple of the activation-rounding effect."""
    d = json.loads((folder / "parity" / "parity.json").read_text())
    f = _factor(str(d["gate"]))
    out: dict[str, float] = {}
    for c in d["checks"]:
        if c["metric"] in ("logit_max_rel", "kl_max") and c["limit"]:
            effect = c["limit"] / (f if c["metric"] == "logit_max_rel" else f**2)
            value = c["value"] / effect if c["metric"] == "logit_max_rel" else (c["value"] / effect) ** 0.5
            out[c["metric"]] = max(out.get(c["metric"], 0.0), value)
    return {**{k: round(v, 3) for k, v in out.items()}, "passed": d["passed"]}


def main() -> None:
    import gguf

    from lfm_export.backends.gguf.recipes import make_recipe
    from lfm_export.pipeline import check_artifact, export_artifact
    from lfm_export.progress import Progress

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,tiny-moe")
    ap.add_argument("--types", default="q4_0,q8_0")
    ap.add_argument("--honest-types", default="q4_0-mse,q8_0-mse", help="types exported honest only")
    ap.add_argument("--error", type=float, default=0.02, help="relative error of the broken matrix")
    ap.add_argument("--contexts", default="64", help="comma-separated --max-seq-len values")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf_gates"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    quiet = Progress(quiet=True)
    rows = []
    for context, model in [(int(c), m) for c in args.contexts.split(",") for m in args.models.split(",")]:
        broken_types = [t for t in args.types.split(",") if t]
        for kind in broken_types + [t for t in args.honest_types.split(",") if t]:
            honest = args.work / f"{Path(model).name}-{kind}-{context}"
            export_artifact(
                "gguf", model, honest, make_recipe(kind, context), threads=args.threads, progress=quiet
            )
            rows.append({"model": model, "type": kind, "context": context, "broken": None, **ratios(honest)})
            print(json.dumps(rows[-1]), flush=True)
            for name in TARGETS if kind in broken_types else ():
                broken = args.work / f"{Path(model).name}-{kind}-{context}-broken"
                shutil.rmtree(broken, ignore_errors=True)
                shutil.copytree(honest, broken)
                reader = gguf.GGUFReader(broken / "model.gguf", "r+")
                tensor = next((t for t in reader.tensors if t.name == name), None)
                if tensor is None:  # tiny-moe's layer 0 holds experts, not ffn_down
                    continue
                if tensor.tensor_type.name == "BF16":  # its values, rounded back to bf16
                    scale_bf16(tensor.data, 1 + args.error)
                else:  # its block scales
                    blocks = tensor.data.reshape(-1, BLOCK_BYTES[tensor.tensor_type.name])
                    scales = blocks[:, :2].copy().view(np.float16)
                    blocks[:, :2] = (scales * np.float16(1 + args.error)).view(np.uint8)
                reader.data.flush()
                del reader
                check_artifact(broken, threads=args.threads, progress=quiet)
                rows.append(
                    {
                        "model": model,
                        "type": kind,
                        "context": context,
                        "broken": f"{name} x{1 + args.error:g}",
                        **ratios(broken),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    result = {
        **provenance(),
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
