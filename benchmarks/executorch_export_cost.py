"""Export cost of the ExecuTorch backend on the first N layers of a preset (random weights, its real widths and
vocabulary): stage times, wall time and peak RSS of one `export_executorch`, light enough to run beside other
jobs (3 layers of LFM2-350M: about 1 minute, 1.8 GB), for comparing lowering changes on two checkouts.

    .venv/bin/python benchmarks/executorch_export_cost.py --preset lfm2-350m --layers 3 --out /tmp/et-cost

The lowering grows with the layers (graph nodes and delegate partitions), not with the weight bytes; the whole
model's figures come from `lfm-export executorch random:PRESET ...` (stage times in its manifest) or the
benchmark against ExecuTorch's own export (`executorch_vs_own.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="lfm2-350m")
    ap.add_argument("--layers", type=int, default=3, help="the preset's first N layers")
    ap.add_argument("--quant", default="8da4w")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--max-prefill", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("out/et-cost"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from lfm_export.backends.executorch import export
    from lfm_export.backends.executorch.recipes import make_recipe
    from lfm_export.loading import LoadedModel
    from lfm_export.presets import get_preset
    from lfm_export.progress import Progress
    from lfm_export.weights import RandomWeights, lazy_model

    torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset).config
    cfg = dataclasses.replace(cfg, layer_types=cfg.layer_types[: args.layers])
    weights = RandomWeights(cfg)
    loaded = LoadedModel(
        model=lazy_model(cfg, weights),
        config=cfg,
        source=f"random:{args.preset} (first {args.layers} layers)",
        path=None,
        random=True,
        weights_dtype="float32",
        weights=weights,
    )
    recipe = make_recipe(args.quant, max_seq_len=args.max_seq_len, max_prefill=args.max_prefill)
    args.out.mkdir(parents=True, exist_ok=True)
    progress = Progress()
    start = time.monotonic()
    export(loaded, args.out, recipe, progress)
    wall = time.monotonic() - start
    result = {
        "preset": args.preset,
        "layers": list(cfg.layer_types),
        "quant": args.quant,
        "wall_s": round(wall, 1),
        "stages_s": progress.timings,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "cpu_user_s": round(resource.getrusage(resource.RUSAGE_SELF).ru_utime, 1),
        "pte_mb": round((args.out / "model.pte").stat().st_size / 1e6, 1),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
