"""Where an honest Core ML artifact run by the numpy interpreter departs from its simulations, per position.

    flock /tmp/lfm-heavy.lock .venv/bin/python benchmarks/coreml_fp16_program.py --threads 1 --work WORK \\
        --out benchmarks/results/coreml_fp16_program.json

For each `--runs` entry (`recipe:model`, models as `benchmarks/detection_limits.py` names them: the bundled
`tiny` / `tiny-moe`, the transformers-initialised `hf-dense` / `hf-moe` written under `--work`) it exports the
model to Core ML (`--no-parity`, context 128; an export already in `--work` is reused, whatever its context:
each row records it) and feeds the parity
prompts (`lfm_export.parity.boundary.prompts_for`, 64 positions) to the interpreter and to two simulations:

- `input_rounded`: the gate's scenario simulation (`lfm_export.quant.simulate`, activation mode `fp16` /
  `fp16-routed`: each linear's input rounded to fp16, everything else float32), the whole prompt in one call;
- `fp16_program`: the same weights rounded op by op as the interpreter runs the program
  (`lfm_export.parity.fp16_program`), fed in the session's chunks.

Per simulation: the largest and median logit error over each position's largest logit, and the positions that
are not bit-identical; for `fp16_program` also its state error (the row's `ProgramResult`). Then, through the
`fp16_program` row only, the same check against the model with one matrix of the middle layer scaled by each
`--scales` value (the matrices of `benchmarks/detection_limits.py`): whether the row catches it and how far.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from detection_limits import MATRICES, _conv_layer, _export, _matrix, checkpoint_kind, resolve_model
from provenance import provenance

DEFAULT_RUNS = (
    "int4:tiny",
    "int4:tiny-moe",
    "int4:hf-dense",
    "int4:hf-moe",
    "fp16:tiny-moe",
    "int8:tiny-moe",
    "palettize4:tiny-moe",
    "palettize6:tiny-moe",
)


def _per_position(artifact: np.ndarray, simulated: np.ndarray) -> np.ndarray:
    scale = np.abs(simulated.astype(np.float64)).max(-1)
    err = np.abs(artifact.astype(np.float64) - simulated).max(-1)
    return np.where(scale > 0, err / np.where(scale > 0, scale, 1.0), np.where(err > 0, np.inf, 0.0))


def measure(folder: Path, model: str, threads: int, scales: list[float]) -> dict[str, Any]:
    """The honest artifact against both simulations, then the `fp16_program` row on scaled matrices."""
    import torch

    from lfm_export.backends import get
    from lfm_export.contract.manifest import read_manifest
    from lfm_export.loading import load_model
    from lfm_export.parity import fp16_program as fp
    from lfm_export.parity.boundary import prompts_for
    from lfm_export.parity.reference import ReferenceSession
    from lfm_export.pipeline import simulation_for
    from lfm_export.quant import simulate
    from lfm_export.runtime.coreml import CoreMLSession

    manifest = read_manifest(folder)
    record = get("coreml")
    sim_recipe, activations = simulation_for(record, manifest["recipe"])
    weights = record.weight_values(manifest["recipe"]) if record.weight_values else None
    moe_form = manifest["recipe"].get("moe_form", "sparse")
    session = CoreMLSession(folder, threads=threads, engine="interpreter")
    tokenizer = folder / "tokenizer.json"
    prompts = prompts_for(session.vocab_size, tokenizer if tokenizer.is_file() else None, session.max_seq_len)
    artifact = []
    for ids in prompts:
        session.reset(1)
        artifact.append(np.asarray(session.prefill(ids), dtype=np.float32)[0])
    session.reset(1)

    def simulated_for(matrix: str | None, scale: float) -> Any:
        loaded = load_model(model)
        if matrix is not None:
            layer = loaded.config.num_hidden_layers // 2
            at = _conv_layer(loaded.config, layer) if matrix == "in_proj" else layer
            w = _matrix(loaded.model, at, matrix)
            if w is None:
                return None
            with torch.no_grad():
                w.mul_(scale)
        sim = simulate(loaded.model, sim_recipe, activations, threads=threads, weights=weights)
        return fp.program_model(sim, session.max_seq_len, moe_form, reference=loaded.model), sim

    program_sim, simulated = simulated_for(None, 1.0)
    reference = ReferenceSession(simulated, name="simulated", max_seq_len=session.max_seq_len)
    rounded = []
    for ids in prompts:
        reference.reset(1)
        rounded.append(np.asarray(reference.prefill(ids), dtype=np.float64)[0])
    errors = np.concatenate([_per_position(a, r) for a, r in zip(artifact, rounded, strict=True)])
    start = time.perf_counter()
    program = fp.run(session, program_sim, prompts)
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {
        "recipe_name": manifest["recipe"].get("name"),
        "max_seq_len": manifest.get("max_seq_len"),
        "activations": activations,
        "moe_form": moe_form if manifest["recipe"].get("moe") else None,
        "positions": int(errors.size),
        "input_rounded": {
            "logit_max_rel": float(errors.max()),
            "logit_median_rel": float(np.median(errors)),
            "differing_positions": int((errors > 0).sum()),
        },
        "fp16_program": {**program.to_json(), "seconds": round(seconds, 2)},
        "scaled": {},
    }
    for matrix in MATRICES:
        tried = []
        for scale in scales:
            made = simulated_for(matrix, scale)
            if made is None:
                break
            r = fp.run(session, made[0], prompts)
            tried.append({"scale": scale, "caught": not r.passed, **r.to_json()})
        if tried:
            out["scaled"][matrix] = tried
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="recipe:model")
    ap.add_argument("--scales", nargs="+", type=float, default=[1.01, 1.02])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--work", type=Path, default=None, help="export folder, reused (default: a temporary one)"
    )
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for run in args.runs:
            quant, name = run.split(":")
            model = resolve_model(name, work)
            folder = work / f"coreml-{quant}-{name}"
            _export("coreml", quant, model, folder, args.threads)
            row = {"recipe": quant, "model": name, "checkpoint": checkpoint_kind(name)}
            row.update(measure(folder, model, args.threads, sorted(args.scales)))
            rows.append(row)
            p = row["fp16_program"]
            print(
                json.dumps(
                    {
                        "run": run,
                        "input_rounded_max": row["input_rounded"]["logit_max_rel"],
                        "fp16_program_max": max(p["logit_max_rel"], p["state_max_rel"]),
                        "differing": p["differing_positions"],
                        "scaled_caught": {
                            m: [t["scale"] for t in v if t["caught"]] for m, v in row["scaled"].items()
                        },
                    }
                ),
                flush=True,
            )
            result = {**provenance(), "threads": args.threads, "scales": sorted(args.scales), "rows": rows}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
