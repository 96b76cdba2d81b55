"""Why a calibrated GGUF export of `tiny-moe` fails its exactness gate with bit-exact stored weights: where
llama.cpp's logits leave the simulation's, beside the simulation's top-k router margin there.

    .venv/bin/python benchmarks/gguf_moe_router.py --quant q4_k_m-imat \
        --out benchmarks/results/gguf_moe_router_imat.json

Exports `tiny-moe` at `--quant` (no parity), rebuilds its calibration table from the manifest as `parity`
does, runs every parity prompt through llama.cpp (`GgufSession`, 1 thread) and through the simulation
(`lfm_export.quant.simulate` with the file's own values and llama.cpp's activation rounding), and records per
position the logit max abs error over the simulation's largest logit, the KL, and the simulation's smallest
router margin over the MoE layers (`lfm_export.model.MoE.router_margin`: the last selected expert's lead over
the first unselected one, relative to the spread of the choices). The result lists the worst positions and,
for the prompt holding the worst, every position from its first departure (rel > 1e-5) on.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from provenance import provenance


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", default="q4_k_m-imat")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf_moe_router"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from lfm_export import calibrated
    from lfm_export.backends.gguf import simulation, weight_values
    from lfm_export.backends.gguf.recipes import make_recipe
    from lfm_export.calibrate import table_from_manifest
    from lfm_export.loading import load_model
    from lfm_export.parity import ReferenceSession
    from lfm_export.parity.expert_ties import RouterMargins
    from lfm_export.parity.metrics import log_softmax
    from lfm_export.parity.prompts import default_prompts
    from lfm_export.pipeline import export_artifact
    from lfm_export.progress import Progress
    from lfm_export.quant import simulate
    from lfm_export.runtime.gguf import GgufSession

    torch.set_num_threads(1)
    shutil.rmtree(args.work, ignore_errors=True)
    folder = args.work / "artifact"
    quiet = Progress(quiet=True)
    export_artifact("gguf", "tiny-moe", folder, make_recipe(args.quant, 256), parity=False, progress=quiet)
    manifest = json.loads((folder / "manifest.json").read_text())
    loaded = load_model("tiny-moe")
    table = table_from_manifest(loaded, manifest)
    with calibrated.active(table) if table is not None else _nothing():
        core, act = simulation(manifest["recipe"])
        sim = simulate(loaded.model, core, act, threads=1, weights=weight_values(manifest["recipe"]))
    margins_of = RouterMargins(sim)
    ref, art = ReferenceSession(sim), GgufSession(folder, threads=1)
    positions, per_prompt = [], []
    for p, ids in enumerate(default_prompts(loaded.config.vocab_size, loaded.tokenizer_file)):
        ref.reset()
        art.reset()
        a = ref.prefill(ids[None])[0]
        margins = margins_of.take()[0]
        b = art.prefill(ids[None])[0]
        la, lb = log_softmax(a), log_softmax(b)
        kl = (np.exp(la) * (la - lb)).sum(-1)
        rel = np.abs(a - b).max(-1) / np.abs(a).max()
        per_prompt.append((rel, kl, margins))
        positions += [(float(kl[t]), p, t, float(rel[t]), float(margins[t])) for t in range(len(kl))]
    every = np.array([m for *_, m in positions])
    worst = sorted(positions, reverse=True)[:8]
    rows = [
        {
            "kl": k,
            "prompt": p,
            "position": t,
            "logit_max_rel": r,
            "router_margin": m,
            "margin_quantile": float((every < m).mean()),
        }
        for k, p, t, r, m in worst
    ]
    rel, kl, margins = per_prompt[worst[0][1]]
    first = int(np.argmax(rel > 1e-5)) if (rel > 1e-5).any() else None
    trace = [
        {
            "position": t,
            "logit_max_rel": float(rel[t]),
            "kl": float(kl[t]),
            "router_margin": float(margins[t]),
        }
        for t in range(first or 0, min(len(rel), (first or 0) + 10))
    ]
    result = {
        **provenance(),
        "quant": args.quant,
        "positions": len(positions),
        "router_margin_median": float(np.median(every)),
        "worst": rows,
        "worst_prompt_from_first_departure": trace,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    main()
