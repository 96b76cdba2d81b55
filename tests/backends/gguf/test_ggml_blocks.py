"""ggml block packing: the `gguf` package's own dequantization (llama.cpp's gguf-py) of our bytes gives the
values of the core quantizer's codes times its scales rounded to fp16, and what `ggml_blocks` says it holds."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from lfm_export.ggml_blocks import Q4_0, Q8_0, dequantize, held_values, quantize  # noqa: E402
from lfm_export.quant import fake_quant_q8_0, quantize_block  # noqa: E402

pytestmark = pytest.mark.unit


def weights(seed: int, n: int = 48, k: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_t(4, size=(n, k)).astype(np.float32) * 0.02
    w[0, :32] = 0.0  # an all-zero block
    w[1, 32:64] = 0.5  # a constant block: its extreme is positive
    return w


@pytest.mark.parametrize(("bits", "kind"), [(8, Q8_0), (4, Q4_0)])
@pytest.mark.parametrize("rounding", ["nearest", "mse", "fit"])
def test_gguf_reads_our_blocks_as_the_core_codes(bits, kind, rounding) -> None:
    w = weights(bits)
    data = quantize(w, bits, rounding, threads=1)
    assert data.dtype == np.uint8 and data.shape == (48, 256 // 32 * kind.block_bytes)
    theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind.name])
    q = quantize_block(w, bits, 32, True, rounding, threads=1)
    half = 2 ** (bits - 1)
    codes = q.codes.astype(np.float32).reshape(48, 8, 32) - half
    expected = (codes * q.scales.astype(np.float16).astype(np.float32)[..., None]).reshape(48, 256)
    np.testing.assert_array_equal(theirs, expected)
    np.testing.assert_array_equal(dequantize(data, kind), theirs)
    np.testing.assert_array_equal(held_values(w, bits, rounding, threads=1), theirs)
    # close to the weights: the core's rounding, not a layout mix-up
    step = np.abs(q.scales).max()
    assert np.abs(theirs - w).max() <= step


def test_our_q4_0_packs_as_ggmls_own_quantizer_would() -> None:
    """Where the core's codes and gguf-py's reference Q4_0 quantizer agree (no tie rounded another way), the
    bytes are the same: the nibble order and the fp16 scale sit where ggml reads them."""
    w = weights(7)
    ours = quantize(w, 4, threads=1)
    theirs = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0)
    same_blocks = (ours.reshape(-1, Q4_0.block_bytes) == theirs.reshape(-1, Q4_0.block_bytes)).all(-1)
    assert same_blocks.mean() > 0.9


def test_fake_quant_q8_0_is_ggmls_q8_0_round_trip() -> None:
    """Our activation rounding equals gguf-py's Q8_0 (llama.cpp's reference quantize_row_q8_0) quantize then
    dequantize, wherever no value sits on a rounding tie (roundf and rint differ only there)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 256)).astype(np.float32) * 3
    x[0, :32] = 0.0
    ours = fake_quant_q8_0(torch.from_numpy(x)).numpy()
    theirs = gguf.quants.dequantize(
        gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    )
    np.testing.assert_array_equal(ours, theirs)
    assert np.abs(ours - x).max() < 3 * 4 / 127  # a rounding, not a scrambling


def test_gptq_in_act_order_keeps_the_imat_scales_and_lowers_the_output_error() -> None:
    """GPTQ with act-order on ggml's Q4_0 blocks (`cholesky_factor(act_order=True)`, the writer's
    `ggml_blocks.quantize`), on real calibration statistics (`tiny`, 256 tokens of the bundled text): layer 4's
    FFN down projection, whose inputs have one channel with a mean square thousands of times the median's. The
    order starts with that channel; the bytes keep `-imat`'s scale bytes (static groups: ordinary blocks) and
    their output error `trace((W - Q) H (W - Q)^T)` is below half that of GPTQ in column order."""
    from lfm_export.calibrate import calibrate
    from lfm_export.loading import load_model
    from lfm_export.rounding import DAMP, OrderedFactor, cholesky_factor, hessian_error

    name = "model.layers.4.feed_forward.w2.weight"
    loaded = load_model("tiny", lazy=True)
    seen: dict = {}

    def keep(_idx: int, stats: dict) -> None:
        if name in stats:
            seen["h"], seen["imp"] = stats[name].hessian.copy(), stats[name].mean_square.copy()

    calibrate(loaded, tokens=256, hessian=True, layer_done=keep)
    w, h, imp = loaded.weights.get(name).numpy(), seen["h"], seen["imp"]
    d = np.diag(h)
    assert d.max() > 1000 * np.median(d)
    act, in_order = cholesky_factor(h, act_order=True), cholesky_factor(h)
    assert isinstance(act, OrderedFactor) and act.order[0] == d.argmax()
    imat, ours, theirs = (
        quantize(w, 4, r, 1, imp, f) for r, f in (("imat", None), ("gptq", act), ("gptq", in_order))
    )
    blocks = [b.reshape(len(w), -1, Q4_0.block_bytes) for b in (imat, ours, theirs)]
    assert np.array_equal(blocks[0][..., :2], blocks[1][..., :2])  # scale bytes: -imat's
    damped = h + DAMP * d.mean() * np.eye(len(d))
    err_ours, err_theirs = (hessian_error(w, dequantize(b, Q4_0), damped) for b in (ours, theirs))
    assert err_ours < 0.5 * err_theirs, (err_ours, err_theirs)
