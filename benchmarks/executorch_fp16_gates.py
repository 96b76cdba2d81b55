"""An ExecuTorch fp16 artifact against the two candidate simulations of fp16 compute, with their gates: torch
running the canonical model in fp16 (`native`, the `fp16-native` gate: what the backend uses) and fp32
compute with fp16-rounded linear inputs (`fp16` / `fp16-routed`, Core ML's `fp16-fp16` / `fp16-fp16-moe`
gates). With `--w2-scale S` the model's layer 0 w2 is scaled by S first (an artifact of other weights: every
gate should fail). Prints one JSON line per simulation: the gate, whether exactness passed, worst and pooled
metrics. `python benchmarks/executorch_fp16_gates.py OUT MODEL [--w2-scale 1.05] [--threads 1]` (OUT from
`lfm-export executorch MODEL -o OUT --quant fp16`; the README's fp16 gate comparison)."""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifact")
    parser.add_argument("model")
    parser.add_argument("--w2-scale", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from lfm_export.loading import load_model
    from lfm_export.parity import ReferenceSession, run_parity
    from lfm_export.quant import simulate
    from lfm_export.recipes import parse_recipe
    from lfm_export.runtime.executorch import ExecuTorchSession

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    if args.w2_scale != 1.0:
        with torch.no_grad():
            loaded.model.model.layers[0].feed_forward.w2.weight.mul_(args.w2_scale)
    session = ExecuTorchSession(args.artifact, threads=args.threads)
    context = session.max_seq_len
    reference = ReferenceSession(loaded.model, max_seq_len=context)
    recipe = parse_recipe("fp16")
    for mode in ("native", "fp16", "fp16-routed"):
        simulated = ReferenceSession(
            simulate(loaded.model, recipe, mode), name="simulated", max_seq_len=context
        )
        rounding = None
        if mode != "native":
            unrounded = simulate(loaded.model, recipe, "float")
            rounding = ReferenceSession(unrounded, name="unrounded", max_seq_len=context)
        result = run_parity(
            session, reference, "fp16", simulation=simulated, activations=mode, rounding=rounding
        )
        exact = result.summary()["exactness"]
        print(json.dumps({"activations": mode, **exact}))


if __name__ == "__main__":
    main()
