"""Module swaps that keep the canonical math but use only ops ExecuTorch's XNNPACK partitioner takes, so the
program is cut into fewer delegate partitions (each one is preprocessed separately at export and is one
delegate call per forward at run time).

`XnnpackRMSNorm`: XNNPACK lowers `mean.dim` only over the two inner dims of a 4-D tensor with keepdim (its
global average pooling); the canonical `x.pow(2).mean(-1)` on a 3-D tensor ran as a portable op and cut a
partition at every norm (17 cuts per method on `tiny`). Here the rows are viewed as `[rows, 1, H, 1]`.

`XnnpackShortConv`: the canonical `chunk` of the conv's input projection is `split_with_sizes_copy`, which
XNNPACK does not take; three slices of the last dim are (`slice_copy`), and the gates are applied in
`[B, T, H]` before one transpose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfm_export.model import RMSNorm, ShortConv


class XnnpackRMSNorm(nn.Module):
    """`RMSNorm` (float32 models) with the mean over a `[rows, 1, H, 1]` view."""

    def __init__(self, norm: RMSNorm) -> None:
        super().__init__()
        self.eps = norm.eps
        self.weight = norm.weight

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, 1, x.shape[-1], 1)
        scale = torch.rsqrt((rows * rows).mean((2, 3), keepdim=True) + self.eps)
        return self.weight * (rows * scale).reshape(x.shape)


class XnnpackShortConv(nn.Module):
    """`ShortConv` with the input projection sliced, not chunked (same submodules, so the same weights)."""

    def __init__(self, conv: ShortConv) -> None:
        super().__init__()
        self.L, self.in_proj, self.conv, self.out_proj = conv.L, conv.in_proj, conv.conv, conv.out_proj

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        p = self.in_proj(x)  # [B, T, 3H]
        h = p.shape[-1] // 3
        b, c, xx = p[..., :h], p[..., h : 2 * h], p[..., 2 * h :]
        z = torch.cat([state, (b * xx).transpose(1, 2)], dim=2)  # [B, H, L-1+T]
        y = F.conv1d(z, self.conv.weight, self.conv.bias, groups=h).transpose(1, 2) * c
        return self.out_proj(y), z[:, :, -(self.L - 1) :]


def xnnpack_layers(module: nn.Module) -> nn.Module | None:
    """Swap for `lfm_export.trace.apply_swaps`: norms and short convs become their XNNPACK-friendly forms."""
    if isinstance(module, RMSNorm) and module.weight.dtype == torch.float32:
        return XnnpackRMSNorm(module)
    if isinstance(module, ShortConv):
        return XnnpackShortConv(module)
    return None
