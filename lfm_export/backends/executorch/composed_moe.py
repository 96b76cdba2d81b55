"""Quantized MoE layers whose decode runs only the selected experts, on XNNPACK: each expert is lowered to its
own XNNPACK delegate first, and the layer calls those delegates inside `torch.cond` branches (ExecuTorch's
"lower a submodule, compose it into the parent" pattern), as ExecuTorch 1.5.1, torch 2.13.0 and torchao 0.18
allow it. `lfm-export executorch` writes quantized MoE layers (8da4w, 8da8w) in this form;
`moe.py` says why the other sparse forms failed. The experts' delegates come from one lowering per expert
shape (`expert_delegates.py`: one by one, LFM2-8B-A1B's 704 experts took 7-10 s each).

What it took, each point found by running it (one `tiny-moe` layer, 8 experts):

- An expert (its three 8da4w linears, rows dynamic 1..`max_rows`) lowers to one XNNPACK partition. Its
  `LoweredBackendModule` can be called by a module that `torch.export` traces again, also inside `torch.cond`
  branches; `to_edge_transform_and_lower` keeps the branch delegates, collects their named weight data (once
  per expert: the layer's `.pte` is the size of the experts' int4 weights) and `to_executorch` emits the
  branches as jumps. Unselected experts' delegates are not executed: one LFM2-8B-A1B-sized layer at top-4
  decodes in 2.21 / 1.97 / 1.44 ms with 8 / 16 / 32 experts, the dense form in 5.61 / 8.46 ms with 8 / 16
  (`benchmarks/executorch_moe_decode.py`, load average 6: noisy, README).
- Tracing a delegate call runs its original program under fake tensors, which refused the program's real
  int8 constants (seen when `torch.cond` traced its branches) ("Please convert all Tensors to FakeTensors first"). The lowered module's original program is
  therefore replaced by a shape-only one (`zeros_like`): it only gives the call its output shape. The delegate
  blob is untouched. Eager calls of `ComposedMoE` return zeros for that reason; it exists to be exported.
- A `cond` output is (as far as found: inferred from the graph and the plan, not from ExecuTorch's source)
  an alias of memory planned inside its branch, and sibling branches share one arena.
  XNNPACK's partitioner regroups the graph (all routing into one delegate, then all `cond`s, then one delegate
  for the sums), so the first `cond`'s output was overwritten by the next branch before it was summed (wrong
  outputs, zeros). The accumulator is therefore threaded through the `cond`s (the branch returns
  `acc + expert(x) * w`) and copied out of the arena by a portable `index_select` before the next `cond`
  runs: the dependency fixes the order. With that the layer equals the eager torchao layer within 4e-6
  absolute (output scales 0.9-24) for 1, 6 and 16 tokens.

Prefill runs an expert on every row if any row selected it (its rows weighted by 0 otherwise): prefill costs
what the dense form costs for the experts that any row selected; decode runs top-k experts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lfm_export.model import MoE
from lfm_export.trace import Swap
from lfm_export.weights import WeightSource

from .expert_delegates import WEIGHTS, ExpertDelegates
from .moe import take_routing


class ComposedMoE(nn.Module):
    """The core `MoE` with each expert a pre-lowered XNNPACK delegate (`experts`, in the MoE's order) run
    under `torch.cond` (module doc). Routing is the core `MoE._route`, in float32."""

    def __init__(self, moe: MoE, experts: Sequence[nn.Module]) -> None:
        super().__init__()
        take_routing(self, moe)
        self.experts = nn.ModuleList(experts)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        _, idx, w = MoE._route(self, flat)  # type: ignore[arg-type]  # the same attributes as a MoE
        w = w.to(flat.dtype)
        rows = torch.arange(flat.shape[0])
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            hit = idx == e
            weight = (w * hit).sum(-1, keepdim=True)

            def run(flat: Tensor, weight: Tensor, acc: Tensor, expert: Any = expert) -> Tensor:
                return acc + expert(flat)[0] * weight

            def skip(flat: Tensor, weight: Tensor, acc: Tensor) -> Tensor:
                return acc.clone()

            out = torch.cond(hit.any(), run, skip, (flat, weight, out)).index_select(0, rows)
        return out.reshape(shape)


def composed_moe_swap(
    model: nn.Module,
    bits: int,
    block_size: int,
    max_rows: int,
    counts: dict[str, int],
    source: WeightSource | None = None,
    rounding: str = "nearest",
) -> Swap:
    """Swap for `lfm_export.trace.apply_swaps`: every `MoE` of `model` becomes a `ComposedMoE`, its experts
    cloned from one lowering per expert shape (`expert_delegates.ExpertDelegates`), counted in
    `counts["experts"]`. A MoE is recognised by its router weight, which the swapped copy shares. With `source`
    (a lazy model's), each expert weight is read from it, quantized and dropped."""
    names = {id(m.gate.weight): n for n, m in model.named_modules() if isinstance(m, MoE)}
    shapes: dict[tuple[int, int], ExpertDelegates] = {}

    def weights(prefix: str, e: int, expert: nn.Module) -> list[Tensor]:
        if source is None:
            return [getattr(expert, w).weight for w in WEIGHTS]
        return [source.get(f"{prefix}.experts.{e}.{w}.weight") for w in WEIGHTS]

    def swap(module: nn.Module) -> nn.Module | None:
        if not isinstance(module, MoE):
            return None
        prefix = names[id(module.gate.weight)]
        experts = []
        for e, expert in enumerate(module.experts):
            w = weights(prefix, e, expert)
            shape = (w[0].shape[1], w[0].shape[0])
            if shape not in shapes:
                shapes[shape] = ExpertDelegates(*shape, bits, block_size, max_rows, rounding)
            experts.append(shapes[shape].clone(w))
        counts["experts"] = counts.get("experts", 0) + len(experts)
        return ComposedMoE(module, experts)

    return swap
