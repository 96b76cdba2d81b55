"""Write a GGUF file of a K-quant mix with a ggml type per kind of tensor group, chosen by hand instead of by
`--budget`'s measuring (too slow at 350M on 2 cores): for the decode A/B of a budget's kinds at a size where
the budget itself is not run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gguf_hand_mix.py CKPT OUT conv=Q4_K,attention=Q3_K,mlp=Q3_K

Groups are `lfm_export.budget.groups`' (per layer its conv / attention mixer and its MLP; the tied table and
head one group, held at Q6_K as llama.cpp's output); each kind's type is one of
`lfm_export.backends.gguf.recipes.MIX_TYPES`. The recipe is `q4_k_m` with that mix (`-fit` rounding: no
calibration); no parity is run. Prints the weight bytes the file holds (the budget's count) and those of the
same groups at Q4_K. `OUT` `-` only prints.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("out", help="artifact folder, or - to print the bytes only")
    ap.add_argument("kinds", help="KIND=TYPE,... for KIND in conv, attention, mlp (experts: experts)")
    ap.add_argument("--context", type=int, default=1024)
    args = ap.parse_args()
    import torch

    from lfm_export.backends.gguf.recipes import MIX_TYPES, make_recipe
    from lfm_export.budget import groups, weight_bytes
    from lfm_export.loading import load_model
    from lfm_export.pipeline import export_artifact
    from lfm_export.progress import Progress

    torch.set_num_threads(1)
    by_type = {name: entry for entry, name in MIX_TYPES.items()}
    kinds = dict(item.split("=") for item in args.kinds.split(","))
    recipe = make_recipe("q4_k_m", args.context)
    loaded = load_model(args.ckpt, lazy=True)
    found, _ = groups(loaded, recipe.recipe)

    def mixed(pick: dict[str, str]) -> object:
        mix = []
        for g in found:
            kind = "Q6_K" if g.name == "head+embedding" else pick[g.name.split(".")[-1]]
            mix += [(p, *by_type[kind]) for p in g.patterns]
        return dataclasses.replace(recipe, recipe=recipe.recipe.with_options(mix=tuple(mix)))

    chosen = mixed(kinds)
    at_q4_k = mixed(dict.fromkeys(kinds, "Q4_K"))
    print(
        f"weight bytes {weight_bytes(loaded, chosen)}; the same groups at Q4_K: {weight_bytes(loaded, at_q4_k)}"
    )
    if args.out != "-":
        export_artifact(
            "gguf", args.ckpt, Path(args.out), chosen, parity=False, threads=1, progress=Progress()
        )


if __name__ == "__main__":
    main()
