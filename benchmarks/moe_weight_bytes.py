"""Weight bytes one decode step reads at 8da4w, computed from a preset's shapes (not measured): what the composed
MoE form (`backends/executorch/composed_moe.py`, top-k experts per token) and the dense form (every expert)
read, beside a dense preset.

    .venv/bin/python benchmarks/moe_weight_bytes.py lfm2-8b-a1b lfm2-1.2b

Storage as `lfm-export executorch --quant 8da4w` writes it: linears and experts int4 in blocks of 32 with a
bf16 scale per block (0.5625 bytes a weight), the lm_head int8 per output channel with fp32 scales, the MoE
router float32, one int8 embedding row (scales left out: under 1 KB). Norms and conv kernels are left out
(under 1 MB at these sizes).
"""

from __future__ import annotations

import argparse
import math

from lfm_export.presets import get_preset
from lfm_export.weights import model_shapes

INT4_BYTES = 0.5 + 2 / 32


def read_per_token(name: str) -> tuple[float, float]:
    """(composed form, dense form) weight bytes one decode step reads for preset `name`."""
    cfg = get_preset(name).config
    linears = experts = router = 0
    for key, shape in model_shapes(cfg).items():
        n = math.prod(shape)
        if ".experts." in key:
            experts += n
        elif key.endswith("feed_forward.gate.weight"):
            router += n
        elif len(shape) == 2 and "embed_tokens" not in key and key != "lm_head.weight":
            linears += n
    head = cfg.vocab_size * cfg.hidden_size + 4 * cfg.vocab_size
    rest = INT4_BYTES * linears + head + 4 * router + cfg.hidden_size
    top = (cfg.num_experts_per_tok / cfg.num_experts) if cfg.num_experts else 0.0
    return rest + INT4_BYTES * experts * top, rest + INT4_BYTES * experts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("presets", nargs="+")
    args = ap.parse_args()
    print("| preset | MB read per decode step, top-k experts | MB read, every expert (dense form) |")
    print("|---|---|---|")
    for name in args.presets:
        sparse, dense = read_per_token(name)
        print(f"| {name} | {sparse / 1e6:.0f} | {dense / 1e6:.0f} |")


if __name__ == "__main__":
    main()
