"""Quality per byte of `--budget` mixes and `-awq` recipes, measured in torch on the recipe's simulation (what the
artifact computes: parity's exactness part holds an ONNX artifact to it), without writing artifacts.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/budget_awq_quality.py --model tiny \\
        --points int4-b32 int4-b32-awq int4-b32@size=1.09 --json benchmarks/results/budget_awq_quality_tiny.json

Points of earlier runs in the same `--json` file (same model and tokens) are kept; each point records its run's
provenance (`run`). Per point: `weight_bytes` (codes at their bits, one float32 scale per block, float tensors at float32, a tied
table once: `lfm_export.budget`'s count, the same for every point), and corpus KL: the mean KL(fp32 || recipe)
per position over held-out text of the bundled models' corpus (`quality_per_byte.heldout_ids`, rows of 256
from an empty state), with the inputs of the quantized linears rounded as ONNX's MatMulNBits at accuracy level
4 does (`int8-block`). A `NAME@BUDGET` point is the mix `--budget BUDGET` chooses for `--quant NAME` (its
estimate is recorded too); `-awq` points fold the searched scales first, as the export does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))


def main() -> None:
    import torch
    from provenance import provenance
    from quality_per_byte import heldout_ids

    from lfm_export.awq import scaled_model, search
    from lfm_export.budget import groups, parse_budget, plan
    from lfm_export.loading import load_model
    from lfm_export.precision import block_as, held_as
    from lfm_export.quant import simulate
    from lfm_export.recipes import parse_recipe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--points", nargs="+", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--corpus-tokens", type=int, default=2048)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = provenance()
    results = {"model": args.model, "corpus_tokens": args.corpus_tokens, "points": {}}
    if args.json.is_file():  # points of earlier runs on the same model are kept, each with its own provenance
        earlier = json.loads(args.json.read_text())
        if earlier.get("model") == args.model and earlier.get("corpus_tokens") == args.corpus_tokens:
            results = earlier
    loaded = load_model(args.model).materialized()
    ref = loaded.model
    ref.set_moe_form("sparse")
    assert loaded.tokenizer_file is not None
    ids = torch.from_numpy(heldout_ids(loaded.tokenizer_file, args.corpus_tokens))

    def logprobs(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            logits = model(ids, *model.empty_state(batch=ids.shape[0]))[0]
        return torch.log_softmax(logits.float(), -1).reshape(-1, logits.shape[-1])

    base = logprobs(ref)
    p = base.exp()
    for point in args.points:
        start = time.perf_counter()
        name, _, budget = point.partition("@")
        recipe = parse_recipe(name)
        entry: dict = {}
        if budget:
            recipe, chosen = plan(loaded, recipe, parse_budget(budget))
            entry["budget"] = {k: chosen[k] for k in ("request", "estimated_kl", "estimated_bytes")}
            entry["mix"] = {g["group"]: g["chosen"] for g in chosen["groups"]}
        model = ref
        if recipe.awq:
            scales, awq = search(loaded, recipe)
            entry["awq_alpha"] = awq["alpha"]
            model = scaled_model(ref, loaded.config, scales)
        sim = simulate(model, recipe, "int8-block", threads=args.threads)
        sim.set_moe_form("sparse")
        kl = float((p * (base - logprobs(sim))).sum(-1).mean())
        found, fixed = groups(loaded, recipe)
        nbytes = fixed
        for g in found:
            for t, shape in g.tensors.items():
                bits, block = held_as(t, recipe), block_as(t, recipe, shape[1])
                nbytes += int(np.prod(shape)) * bits // 8 + int(np.prod(shape)) // block * 4
        results["points"][point] = {
            "recipe": recipe.name,
            "weight_bytes": int(nbytes),
            "corpus_kl": round(kl, 6),
            "seconds": round(time.perf_counter() - start, 1),
            **entry,
            "run": run,
        }
        print(f"{point}: {nbytes:,} bytes, corpus KL {kl:.5f}", file=sys.stderr)
        run["load_average_at_end"] = round(os.getloadavg()[0], 2)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
