"""The model an `fp16` ExecuTorch export traces: every parameter in float16, so the linears and the rest of what
XNNPACK takes run on its fp16 kernels, the residual stream is fp16, and the state buffers the trace makes (KV
caches, conv states) take the parameters' type (`lfm_export.trace.export_stateful_program`). What stays float32 is what the
canonical model computes in float32 itself: norm statistics, RoPE tables (cast to fp16 where applied), MoE
routing scores and the `expert_bias` buffer. This is the whole model in fp16, as ExecuTorch's own LLM export
does for `dtype_override: fp16` (`LLMEdgeManager.to_dtype` casts the model), and what
`lfm_export.quant.simulate`'s `native` mode runs in torch.

`HalfMLP` (`half_layers`): the canonical `F.silu` decomposes, at fp16, into a SiLU computed in fp32 between
two casts, and ExecuTorch 1.5.1's XNNPACK partitioner takes neither cast: every MLP was cut into three
partitions with two portable casts (one fp16 MLP lowered alone: 3 delegate calls and 2 casts; as
`h * sigmoid(h)`: 1 and 0). The rounding differs from torch's fp16 `silu` (one rounding) by the sigmoid's.

The norms keep the canonical form (`x.float()`, statistics, cast back): ExecuTorch 1.5.1's XNNPACK partitioner
leaves those casts and the `mean` to portable ops, so each norm cuts the delegate (54 delegate calls per
forward on `tiny` against 27 at fp32, measured). Computing the statistics in fp16 inside XNNPACK would remove
the cuts but square the activations in fp16, which overflows past 256 (65504 is fp16's largest): not tried.
"""

from __future__ import annotations

import torch
from torch import nn

from lfm_export.model import MLP
from lfm_export.trace import rebind, shared_copy


def half_model(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are new float16 tensors (one per original: tied weights stay tied);
    buffers are shared as they are. `model`'s float32 tensors are left untouched."""
    out = shared_copy(model)
    done: dict[int, nn.Parameter] = {}
    for mod in out.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in done:
                done[id(p)] = nn.Parameter(p.detach().to(torch.float16), requires_grad=False)
            mod._parameters[name] = done[id(p)]
    return out


class HalfMLP(MLP):
    """`MLP` with SiLU as `h * sigmoid(h)`: ops XNNPACK runs in fp16 without casts (module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w1(x)
        return self.w2(h * torch.sigmoid(h) * self.w3(x))


def half_layers(module: nn.Module) -> nn.Module | None:
    """Swap for `lfm_export.trace.apply_swaps`: an fp16 `MLP` becomes a `HalfMLP` over the same weights."""
    if type(module) is MLP and module.w1.weight.dtype == torch.float16:
        return rebind(module, HalfMLP)
    return None
