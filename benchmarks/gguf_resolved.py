"""The GGUF gates' resolved row (`resolved_prefill`, `lfm_export.parity.boundary`) on honest exports and on one
matrix scaled, through the real llama.cpp.

    .venv/bin/python benchmarks/gguf_resolved.py --models tiny tiny-moe out/trained/small \
        --quants q4_0 q4_k_m q4_0-gptq q4_k_m-gptq q4_0-imat q4_k_m-imat --work WORK \
        --out benchmarks/results/gguf_resolved.json

Per model and `--quants` entry: the artifact is exported once (`lfm-export gguf --no-parity --max-seq-len 128`,
kept under `--work` and reused), then the resolved row is run as parity runs it (the parity prompts, 64
positions stepped one token a call, every undecided Q8_0 / Q8_K code and Q8_0 fp16 block scale resolved to the
side the artifact took) against the simulation of the model itself (`honest`) and, with `--scales`, of the
model with one matrix of the middle layer scaled by each of `--scales` in turn, ascending, stopping at the
first one caught (`w2`: the MLP's down projection, the first expert's on MoE
layers; `out_proj`; `in_proj` of the nearest conv layer; `expert`: the second expert's w2; the matrices of
`benchmarks/detection_limits.py`): the artifact relabelled as that model's. Only this row is run (not the
scenarios or the stored-weights check), so "caught" here means caught by the logits through this row alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from provenance import provenance

ROOT = Path(__file__).resolve().parent.parent
MATRICES = ("w2", "out_proj", "in_proj", "expert")


def export(model: str, quant: str, folder: Path) -> None:
    """`lfm-export gguf MODEL -o FOLDER --quant QUANT` without parity, once."""
    if (folder / "manifest.json").is_file():
        return
    cmd = [sys.executable, "-m", "lfm_export.cli", "gguf", model, "-o", str(folder), "--quant", quant]
    cmd += ["--max-seq-len", "128", "--no-parity", "--threads", "1", "--force"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)


def resolved(folder: Path, model: str, matrix: str | None, scale: float) -> dict[str, Any]:
    """The resolved row of the artifact in `folder` against `model` (its `matrix` of the middle layer x
    `scale`)."""
    import torch
    from detection_limits import _conv_layer, _matrix

    from lfm_export.backends import get, open_session
    from lfm_export.contract.manifest import read_manifest
    from lfm_export.loading import load_model
    from lfm_export.parity.boundary import prompts_for, resolve
    from lfm_export.pipeline import _check_calibration, simulation_for
    from lfm_export.progress import Progress
    from lfm_export.quant import simulate

    manifest = read_manifest(folder)
    loaded = load_model(model)
    layer = loaded.config.num_hidden_layers // 2
    if matrix is not None:
        at = _conv_layer(loaded.config, layer) if matrix == "in_proj" else layer
        w = _matrix(loaded.model, at, matrix)
        if w is None:
            return {"skipped": f"no {matrix} in layer {at}"}
        with torch.no_grad():
            w.mul_(scale)
    record = get(manifest["backend"])
    recipe, activations = simulation_for(record, manifest["recipe"])
    start = time.perf_counter()
    with _check_calibration(loaded, manifest, Progress(quiet=True)):
        sim = simulate(
            loaded.model, recipe, activations, threads=1, weights=record.weight_values(manifest["recipe"])
        )
        session = open_session(folder, threads=1)
        tok = folder / "tokenizer.json"
        prompts = prompts_for(session.vocab_size, tok if tok.is_file() else None, session.max_seq_len)
        r = resolve(session, sim, prompts)
        session.close()
    return {**r.to_json(), "layer": layer, "seconds": round(time.perf_counter() - start, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "tiny-moe"])
    ap.add_argument("--quants", nargs="+", default=["q4_0", "q4_k_m"])
    ap.add_argument(
        "--scales", nargs="*", type=float, default=[], help="one matrix scaled by each (none: skip)"
    )
    ap.add_argument("--matrices", nargs="+", default=list(MATRICES))
    ap.add_argument("--scaled-models", nargs="*", help="the models --scales applies to (default: every one)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    rows = []
    for model in args.models:
        for quant in args.quants:
            folder = args.work / f"{Path(model).name}_{quant}"
            export(model, quant, folder)
            row: dict[str, Any] = {
                "model": model,
                "quant": quant,
                "honest": resolved(folder, model, None, 1.0),
            }
            h = row["honest"]
            print(
                f"{model} {quant}: honest {'pass' if h['passed'] else 'FAIL'} {h['logit_max_rel']:.2g} "
                f"({h['codes_resolved']} resolved)",
                flush=True,
            )
            scaled = args.scales and (args.scaled_models is None or model in args.scaled_models)
            for matrix in args.matrices if scaled else []:
                for scale in args.scales:
                    r = resolved(folder, model, matrix, scale)
                    row.setdefault("scaled", {}).setdefault(matrix, {})[str(scale)] = r
                    if "skipped" in r or not r["passed"]:  # a larger error in the same matrix is caught too
                        break
                    print(
                        f"  {matrix} x{scale}: {'passes' if r['passed'] else 'caught'} {r['logit_max_rel']:.2g}",
                        flush=True,
                    )
            rows.append(row)
    out = {**provenance(), "threads": 1, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
