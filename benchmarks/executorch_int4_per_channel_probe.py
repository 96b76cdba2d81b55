"""A probe, not a recipe: an ExecuTorch program whose every int4 linear (and the lm_head) is quantized in one
block per row (int4 per output channel, one bf16 scale per row), to see what XNNPACK's cheapest int4 weight
layout decodes at against `export_llm`'s q8da4w (`executorch_decode_side_by_side.py --reuse`).

    flock /tmp/lfm-heavy.lock .venv/bin/python benchmarks/executorch_int4_per_channel_probe.py CKPT \\
        W/ours-int4-pc-hack
    flock /tmp/lfm-heavy.lock .venv/bin/python benchmarks/executorch_decode_side_by_side.py --reuse --work W \\
        --ours int4-b128-a8+h4 int4-pc-hack ...

`int4-b128-a8 --head-bits 4 --max-seq-len 512 --max-prefill 64` with `convert.block_as` replaced by the row
length, `--no-parity`: the manifest says blocks of 128, which the program does not hold, so the artifact is
for timing only (parity would fail it). The core recipes hold int4 only in blocks (`recipes.PER_CHANNEL` is
int8's).
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> None:
    import torch

    import lfm_export.backends.executorch.convert as convert
    from lfm_export.backends.executorch.recipes import make_recipe
    from lfm_export.pipeline import export_artifact
    from lfm_export.progress import Progress

    torch.set_num_threads(2)
    convert.block_as = lambda name, core, k: k  # one block per row
    recipe = make_recipe("int4-b128-a8", max_seq_len=512, max_prefill=64, head_bits=4)
    ckpt, out = sys.argv[1], Path(sys.argv[2])
    export_artifact(
        "executorch",
        ckpt,
        out,
        recipe,
        parity=False,
        card=False,
        force=True,
        threads=2,
        progress=Progress(quiet=True),
    )
    print(f"wrote {out / 'model.pte'}")


if __name__ == "__main__":
    main()
