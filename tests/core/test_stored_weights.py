"""The weights part of exactness: row-hash multiset comparison, and the ONNX reader's unpacking of what the
exporter packs."""

import numpy as np
import pytest

from lfm_export.parity.stored_weights import compare

pytestmark = pytest.mark.unit


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.standard_normal((6, 64), np.float32), "b": rng.standard_normal((4, 64), np.float32)}


def test_fused_and_interleaved_rows_match_without_a_name_map():
    sim = _weights()
    fused = np.empty((10, 64), np.float32)
    fused[0:8:2], fused[1:8:2], fused[8:] = sim["a"][:4], sim["b"], sim["a"][4:]
    result = compare({"fc1": fused}, sim)
    assert result.passed and result.artifact_rows == result.simulation_rows == 10


def test_one_ulp_in_one_row_fails_naming_the_tensor():
    sim = _weights()
    art = {k: v.copy() for k, v in sim.items()}
    art["b"][2, 5] = np.nextafter(art["b"][2, 5], np.float32(np.inf))
    result = compare(art, sim)
    assert not result.passed and result.unmatched == {"b": (1, 4)}
    assert "b (1/4 rows)" in result.describe()


def test_a_tensor_named_by_place_is_also_named_by_the_nearest_simulated_weight():
    """A `.pte` names its tensors by place: a failure adds the simulated weight of its shape nearest to it;
    a name that already says its module gets no hint, and neither does an artifact of other weights (more
    than `NEAREST_AT_MOST` tensors differ)."""
    from lfm_export.parity.stored_weights import NEAREST_AT_MOST, checks

    sim = {f"layers.{i}.w2.weight": w for i, w in enumerate(_weights(3).values())}
    sim["layers.2.w2.weight"] = sim["layers.0.w2.weight"][::-1] * np.float32(3)
    art = {
        "xnnpack[4].fc[2]": sim["layers.0.w2.weight"] * np.float32(1.02),
        "layers.1.w2.qweight": sim["layers.1.w2.weight"] * 2,
    }
    result = compare(art, sim)
    assert result.nearest == {"xnnpack[4].fc[2]": "layers.0.w2.weight"}
    assert [c.scenario for c in checks(result)] == [
        "stored_weights[xnnpack[4].fc[2] ~layers.0.w2.weight]",
        "stored_weights[layers.1.w2.qweight]",
    ]
    many = {f"fc[{i}]": sim["layers.0.w2.weight"] + np.float32(i + 1) for i in range(NEAREST_AT_MOST + 1)}
    assert compare(many, sim).nearest == {}


def test_rows_match_at_most_as_often_as_the_simulation_holds_them():
    sim = _weights()
    art = {"a": sim["a"], "b": np.repeat(sim["b"][:1], 4, axis=0)}  # one row stored four times
    assert compare(art, sim).unmatched == {"b": (3, 4)}


def test_signed_zero_is_zero_and_rows_of_other_lengths_never_match():
    sim = {"w": np.zeros((2, 32), np.float32)}
    assert compare({"w": -np.zeros((2, 32), np.float32)}, sim).passed
    assert not compare({"w": np.zeros((2, 16), np.float32)}, sim).passed


def test_an_artifact_with_no_quantized_weight_fails():
    result = compare({}, _weights())
    assert not result.passed and "no quantized weight" in result.describe()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_onnx_reader_unpacks_matmulnbits_packing_bit_for_bit(bits, symmetric):
    from lfm_export.backends.onnx.quantize import matmulnbits_tensors
    from lfm_export.backends.onnx.stored_weights import _dequantize
    from lfm_export.quant import quantize_block

    w = np.random.default_rng(1).standard_normal((8, 96), np.float32)
    q = quantize_block(w, bits, 32, symmetric)
    b, scales, zp = matmulnbits_tensors(q)
    got = _dequantize(b, scales, zp, bits, 8, 96)
    assert got.tobytes() == q.dequantize().tobytes()
    # 3 blocks a row: the 4-bit zero points pack to 2 bytes a row, the last nibble padding
    assert zp is None or zp.shape == (8, 2 if bits == 4 else 3)
