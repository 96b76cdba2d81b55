"""Does an ExecuTorch MoE program read only the selected experts? Decode time of one MoE layer against its
number of experts.

    .venv/bin/python benchmarks/executorch_moe_decode.py --experts 8 32 --top-k 4 --threads 2

One LFM2-8B-A1B-sized MoE layer (hidden 2048, expert width 1792, top-k 4; random normal(0, 0.02) weights,
seeded) is lowered at `--quant` (8da4w or fp32) twice per expert count:

- `sparse`: `backends/executorch/moe.py` (what `lfm-export executorch` writes for fp32 MoE models);
- `dense`: the core `MoE` in its dense form, linears on XNNPACK (8da4w or fp32; every expert on every token,
  the unselected ones weighted by 0);
- `composed` (8da4w only; what `lfm-export executorch` writes for quantized MoE models):
  `backends/executorch/composed_moe.py`, each expert an XNNPACK delegate (cloned from one lowering,
  `expert_delegates.py`) run under `torch.cond` (its lowering time includes the template's).

Each program decodes one token (`[1, 1, 2048]`) `--steps` times; the median per call is printed, with the
`.pte` size. If the sparse program reads only the top-k experts, its time stays flat as the expert count
grows at fixed top-k, while the dense one grows with it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn


class _Layer(nn.Module):
    """`feed_forward` (the name the router exclusion of `convert.linear_swap` matches: `feed_forward.gate`)."""

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.feed_forward = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(x)


def build(experts: int, top_k: int) -> _Layer:
    from lfm_export.model import MoE
    from lfm_export.presets import get_preset

    cfg = replace(get_preset("lfm2-8b-a1b").config, num_experts=experts, num_experts_per_tok=top_k)
    gen = torch.Generator().manual_seed(0)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return _Layer(moe).eval()


def lower(layer: nn.Module, form: str, quant: str, tmp: Path) -> Path:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    from lfm_export.backends.executorch.convert import quantize_linears
    from lfm_export.backends.executorch.moe import sparse_moe_swap
    from lfm_export.backends.executorch.recipes import make_recipe
    from lfm_export.trace import apply_swaps

    recipe = make_recipe(quant)
    bits = recipe.recipe.bits if recipe.recipe.quantized else None
    if form == "sparse":
        layer = apply_swaps(layer, [sparse_moe_swap(bits, 32, {})])
    elif form == "composed":
        from lfm_export.backends.executorch.composed_moe import composed_moe_swap

        layer = apply_swaps(layer, [composed_moe_swap(layer, bits or 4, 32, 16, {})])
    elif bits:
        quantize_linears(layer, recipe)
    x = torch.zeros(1, 3, layer.feed_forward.gate.in_features)
    seq = torch.export.Dim("seq", min=1, max=16)
    program = torch.export.export(layer, (x,), dynamic_shapes=({1: seq},), strict=False)
    edge = to_edge_transform_and_lower(
        program,
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
    )
    path = tmp / f"{form}.pte"
    path.write_bytes(edge.to_executorch().buffer)
    return path


def decode_ms(path: Path, hidden: int, steps: int) -> float:
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, 1, hidden, generator=gen) for _ in range(steps + 3)]
    times = []
    for i, x in enumerate(xs):
        t0 = time.perf_counter()
        method.execute([x])
        if i >= 3:  # warm-up calls
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument(
        "--forms", nargs="+", default=["sparse", "dense"], choices=["sparse", "dense", "composed"]
    )
    ap.add_argument("--quant", default="8da4w", choices=["8da4w", "fp32"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from executorch.extension.pybindings import portable_lib

    from lfm_export.progress import quiet_torchao

    quiet_torchao()
    torch.set_num_threads(args.threads)
    portable_lib._unsafe_reset_threadpool(args.threads)
    print("| recipe | form | experts | top-k | decode ms / token (median) | .pte MB | lowering s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for experts in args.experts:
            for form in args.forms:
                t0 = time.perf_counter()
                path = lower(build(experts, args.top_k), form, args.quant, Path(tmp))
                lowering = time.perf_counter() - t0
                ms = decode_ms(path, 2048, args.steps)
                mb = path.stat().st_size / 1e6
                print(
                    f"| {args.quant} | {form} | {experts} | {args.top_k} | {ms:.2f} | {mb:.0f} | {lowering:.0f} |",
                    flush=True,
                )
                path.unlink()


if __name__ == "__main__":
    main()
