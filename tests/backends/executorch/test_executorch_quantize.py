"""`backends/executorch/quantize.py` computes torchao's symmetric quantization itself (in row chunks, for speed):
its codes and scales must be torchao's own, which is what XNNPACK's kernels and ExecuTorch's exporter use."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao")

from torchao.quantization.quant_primitives import (  # noqa: E402
    MappingType,
    choose_qparams_affine,
    quantize_affine,
)

from lfm_export.backends.executorch.quantize import ROWS_PER_CHUNK, xnnpack_int4, xnnpack_int8  # noqa: E402


def _torchao(
    w: torch.Tensor, block: int, qmin: int, qmax: int, bf16: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: torchao's functions, as this backend called them before."""
    shape = (1, block)
    scale, _ = choose_qparams_affine(
        w, MappingType.SYMMETRIC, shape, target_dtype=torch.int8, quant_min=qmin, quant_max=qmax
    )
    scale = scale.reshape(w.shape[0], w.shape[1] // block)
    if bf16:
        scale = scale.to(torch.bfloat16).float()
    zero = torch.zeros_like(scale, dtype=torch.int8)
    codes = quantize_affine(w, shape, scale, zero, output_dtype=torch.int8, quant_min=qmin, quant_max=qmax)
    return codes, scale.float()


def _weights() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rows = ROWS_PER_CHUNK * 2 + 37  # chunks and a remainder
    normal = torch.randn(rows, 256, generator=g) * 0.02
    heavy = torch.randn(rows, 256, generator=g) ** 3  # wide dynamic range, blocks with one large value
    zeros = normal.clone()
    zeros[5, :64] = 0.0  # all-zero blocks: the scale clamps to eps
    zeros[6] = 0.0
    ties = torch.round(torch.randn(rows, 256, generator=g) * 8) / 16  # many values on rounding ties
    return [normal, heavy, zeros, ties]


@pytest.mark.parametrize("block", [32, 128])
def test_int4_codes_and_scales_are_torchaos(block: int) -> None:
    for w in _weights():
        codes, scale = xnnpack_int4(w, block)
        want_codes, want_scale = _torchao(w, block, -8, 7, bf16=True)
        assert torch.equal(scale, want_scale)
        assert torch.equal(codes, want_codes)
        assert codes.dtype == torch.int8 and int(codes.min()) >= -8 and int(codes.max()) <= 7


def test_int8_per_row_codes_and_scales_are_torchaos() -> None:
    for w in _weights():
        codes, scale = xnnpack_int8(w)
        want_codes, want_scale = _torchao(w, w.shape[1], -128, 127, bf16=False)
        assert scale.shape == (w.shape[0], 1)
        assert torch.equal(scale, want_scale)
        assert torch.equal(codes, want_codes)


@pytest.mark.parametrize("bits", [4, 8])
def test_mse_rounding_is_never_worse_per_block_and_better_on_heavy_tails(bits: int) -> None:
    from lfm_export.backends.executorch.quantize import dequantize, xnnpack_weight

    w = _weights()[1]  # heavy-tailed: a block's extreme sets a coarse scale for the rest
    block = 32

    def block_errors(rounding: str) -> torch.Tensor:
        codes, scale, group = xnnpack_weight(w, bits, block, rounding)
        err = (dequantize(codes, scale, group) - w).square()
        return err.reshape(w.shape[0], -1, group).sum(-1)

    nearest, searched = block_errors("nearest"), block_errors("mse")
    assert bool((searched <= nearest).all())
    gain = {4: 0.97, 8: 0.995}[bits]  # the core's MSE_GRIDS doc: int4 about -9%, int8 about -2%
    assert float(searched.sum()) < gain * float(nearest.sum())
    codes, scale, _ = xnnpack_weight(w, bits, block, "mse")
    if bits == 4:
        assert torch.equal(scale, scale.to(torch.bfloat16).float())  # XNNPACK holds bf16 scales
        assert int(codes.min()) >= -8 and int(codes.max()) <= 7
