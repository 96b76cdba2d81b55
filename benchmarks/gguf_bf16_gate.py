"""Measure the GGUF `bf16` exactness gate (`bf16-bf16`, `lfm_export/parity/thresholds.py`): honest exports against
ones with one matrix off, run through llama.cpp.

    .venv/bin/python benchmarks/gguf_bf16_gate.py --out benchmarks/results/gguf_bf16_gate.json

For each model (`tiny`, `tiny-moe`): export `--quant bf16` at context 64 with the full parity run, then for each
matrix of `TARGETS` multiply its BF16 values by `--error` (rounded back to bf16, in the file itself)
and check parity again (every scenario). Every row holds, per metric, the worst value over the scenarios
divided by what llama.cpp's bf16 input rounding itself does to it (the simulation with against without it;
KL max: its square root, as the gate squares its factor): the gate (2x) fails a row above 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from provenance import provenance

TARGETS = (
    "blk.3.shortconv.out_proj.weight",
    "blk.2.attn_q.weight",
    "blk.0.ffn_down.weight",
    "blk.4.attn_output.weight",
    "blk.5.shortconv.in_proj.weight",
)
"""The matrices put off, one at a time: those `benchmarks/gguf_gates.py` puts off for the Q8_0 / Q4_0 gates."""


def ratios(folder: Path) -> dict:
    """Worst metric over the scenarios as a multiple of the activation-rounding effect."""
    from lfm_export.parity.thresholds import ROUNDING_FACTOR

    d = json.loads((folder / "parity" / "parity.json").read_text())
    out: dict[str, float] = {}
    for c in d["checks"]:
        if c["metric"] in ("logit_max_rel", "kl_max") and c["limit"]:
            square = c["metric"] == "kl_max"
            effect = c["limit"] / (ROUNDING_FACTOR**2 if square else ROUNDING_FACTOR)
            value = (c["value"] / effect) ** 0.5 if square else c["value"] / effect
            out[c["metric"]] = max(out.get(c["metric"], 0.0), value)
    return {**{k: round(v, 3) for k, v in out.items()}, "passed": d["passed"], "gate": d.get("gate")}


def scale_bf16(data: np.ndarray, factor: float) -> None:
    """Multiply the BF16 values held in `data` (uint8 bytes) by `factor` in place, rounded back to bf16."""
    import gguf

    kind = gguf.GGMLQuantizationType.BF16
    flat = data.reshape(-1, data.shape[-1])
    values = gguf.quants.dequantize(flat, kind) * np.float32(factor)
    flat[...] = gguf.quants.quantize(values.astype(np.float32), kind)


def main() -> None:
    import gguf

    from lfm_export.backends.gguf.recipes import make_recipe
    from lfm_export.pipeline import check_artifact, export_artifact
    from lfm_export.progress import Progress

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,tiny-moe")
    ap.add_argument("--error", type=float, default=0.02, help="relative error of the broken matrix")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf_bf16_gate"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    quiet = Progress(quiet=True)
    rows = []
    for model in args.models.split(","):
        honest = args.work / f"{model}-bf16"
        export_artifact("gguf", model, honest, make_recipe("bf16", 64), threads=args.threads, progress=quiet)
        rows.append({"model": model, "broken": None, **ratios(honest)})
        print(json.dumps(rows[-1]), flush=True)
        for name in TARGETS:
            broken = args.work / f"{model}-bf16-broken"
            shutil.rmtree(broken, ignore_errors=True)
            shutil.copytree(honest, broken)
            reader = gguf.GGUFReader(broken / "model.gguf", "r+")
            tensor = next((t for t in reader.tensors if t.name == name), None)
            if tensor is None:  # tiny-moe's layer 0 holds experts, not ffn_down
                continue
            scale_bf16(tensor.data, 1 + args.error)
            reader.data.flush()
            del reader
            check_artifact(broken, threads=args.threads, progress=quiet)
            rows.append({"model": model, "broken": f"{name} x{1 + args.error:g}", **ratios(broken)})
            print(json.dumps(rows[-1]), flush=True)
    result = {**provenance(), "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
