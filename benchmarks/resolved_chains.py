"""The `resolved_prefill` row of ONNX artifacts with the search following chains of flips and without (as before).

    .venv/bin/python benchmarks/resolved_chains.py OUT [OUT ...] --threads 1 --json benchmarks/results/X.json

Per artifact folder (its model loaded from the manifest's source, its calibrated codes rebuilt from the manifest
as parity does): the row on the parity prompts or `--prompt` (`lfm_export.parity.boundary.resolve`, `follow`
False and True), and per search the positions compared, the largest and median error, codes resolved,
forwards, the positions left unexplained, and the five worst positions (prompt, position, error). Op by op, what onnxruntime's
MatMulNBits computes is in `benchmarks/onnx_low_bits.py`; this measures only the search.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from provenance import provenance  # noqa: E402


def rows(folder: Path, threads: int, prompt: list[int] | None = None) -> dict[str, Any]:
    """Both searches on one artifact, on the parity prompts or on `prompt` (token ids)."""
    import torch

    from lfm_export import pipeline
    from lfm_export.backends import get, open_session
    from lfm_export.contract.manifest import read_manifest
    from lfm_export.loading import load_model
    from lfm_export.parity import boundary
    from lfm_export.progress import Progress
    from lfm_export.quant import simulate

    torch.set_num_threads(threads)
    manifest = read_manifest(folder)
    loaded = load_model(manifest["model"]["source"], lazy=True).materialized()
    recipe, activations = pipeline.simulation_for(get(manifest["backend"]), manifest["recipe"])
    with pipeline._check_calibration(loaded, manifest, Progress()):
        simulated = simulate(loaded.model, recipe, activations, threads=threads)
    session = open_session(folder, threads=threads)
    prompts = boundary.prompts_for(
        loaded.config.vocab_size, folder / "tokenizer.json", manifest.get("max_seq_len")
    )
    if prompt is not None:
        prompts = [np.array([prompt], np.int64)]
    starts = np.cumsum([0] + [p.shape[1] for p in prompts])
    out: dict[str, Any] = {
        "folder": str(folder),
        "model": manifest["model"]["source"],
        "recipe": manifest["recipe"].get("name"),
        "mix": manifest["recipe"].get("mix"),
        "accuracy_level": manifest["recipe"].get("accuracy_level"),
        "prompt": prompt or "the parity prompts",
    }
    for follow in (False, True):
        errors: list[float] = []
        take = boundary.Resolved.take

        def keep(self: Any, e: list[float], take: Any = take, errors: list[float] = errors) -> None:
            errors.extend(e)
            take(self, e)

        boundary.Resolved.take = keep  # type: ignore[method-assign]
        try:
            row = boundary.resolve(session, simulated, prompts, follow=follow)
        finally:
            boundary.Resolved.take = take  # type: ignore[method-assign]
        worst = []
        for i in np.argsort(errors)[::-1][:5]:
            p = int(np.searchsorted(starts, i, side="right") - 1)
            worst.append({"prompt": p, "position": int(i - starts[p]), "logit_max_rel": float(errors[i])})
        out["follow_chains" if follow else "before"] = {**row.to_json(), "worst": worst}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--prompt", default=None, help="comma-separated token ids instead of the parity prompts")
    args = ap.parse_args()
    prompt = None if args.prompt is None else [int(t) for t in args.prompt.split(",")]
    import onnxruntime as ort

    result: dict[str, Any] = {**provenance(), "onnxruntime": ort.__version__, "threads": args.threads}
    result["artifacts"] = [rows(f, args.threads, prompt) for f in args.folders]
    result["load_average_at_end"] = round(os.getloadavg()[0], 2)
    text = json.dumps(result, indent=1) + "\n"
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
