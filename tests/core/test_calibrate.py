"""Calibrated recipes end to end (slow: full exports with parity): the bundled models exported with `-gptq` /
`-imat` pass the same parity gates on ONNX and MLX, parity in another process rebuilds the calibrated codes from
the manifest, and an artifact checked as the wrong recipe fails exactness; bad calibration input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lfm_export.calibrate import CalibrationError, calibrate, calibration_ids
from lfm_export.contract.errors import UnsupportedError, UserError
from lfm_export.loading import load_model
from lfm_export.pipeline import check_artifact, export_artifact
from lfm_export.progress import Progress


@pytest.mark.unit
def test_calibration_input_is_checked(tmp_path: Path) -> None:
    loaded = load_model("tiny", lazy=True)
    short = tmp_path / "short.txt"
    short.write_text("A cat sat.")
    with pytest.raises(CalibrationError, match="tokens, calibration takes 2048"):
        calibration_ids(loaded, short, 2048)
    with pytest.raises(CalibrationError, match="cannot read"):
        calibration_ids(loaded, tmp_path / "missing.txt", 2048)
    with pytest.raises(CalibrationError, match="multiple of 256"):
        calibration_ids(loaded, None, 300)


@pytest.mark.slow
def test_moe_calibration_counts_routing_and_expert_tokens() -> None:
    loaded = load_model("tiny-moe", lazy=True)
    calib = calibrate(loaded, tokens=512)
    top_k = loaded.config.num_experts_per_tok
    for layer, freq in calib.routing.items():
        assert len(freq) == loaded.config.num_experts and abs(sum(freq) - 1) < 1e-4, layer
        routed = sum(calib.linears[f"{layer}.experts.{e}.w1.weight"].tokens for e in range(len(freq)))
        assert routed == 512 * top_k  # each expert saw exactly the tokens routed to it


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend,model,quant",
    [
        ("onnx", "tiny", "int4-b64-gptq"),
        ("onnx", "tiny-moe", "int4-b32-imat"),
        ("mlx", "tiny", "int4-b64-gptq"),
    ],
)
def test_calibrated_exports_pass_parity(tmp_path: Path, backend: str, model: str, quant: str) -> None:
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    from lfm_export.backends import get

    record = get(backend)
    out = tmp_path / backend
    outcome = export_artifact(
        backend, model, out, record.recipe(quant, 64), threads=1, progress=Progress(quiet=True)
    )
    assert outcome.passed, outcome.parity.verdict_line()
    entry = outcome.manifest["calibration"]
    assert entry["corpus"] == "bundled" and entry["tokens"] == 2048
    # parity in another process: the codes are rebuilt from the manifest's calibration
    again = check_artifact(out, threads=1, scenarios=["prefill", "decode"], progress=Progress(quiet=True))
    assert again.passed
    # the same artifact judged as plain rounding's fails exactness
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["recipe"] = {**manifest["recipe"], "rounding": "nearest", "name": quant.rsplit("-", 1)[0]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    wrong = check_artifact(out, threads=1, scenarios=["prefill", "decode"], progress=Progress(quiet=True))
    assert not wrong.part_passed("exactness"), wrong.verdict_line()


@pytest.mark.slow
def test_calibrated_recipe_on_a_backend_without_the_core_quantizer_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("executorch")
    from lfm_export.backends import get

    with pytest.raises(UnsupportedError, match="core quantizer"):
        export_artifact(
            "executorch",
            "tiny",
            tmp_path / "et",
            get("executorch").recipe("int4-b32-a8-gptq", 64),
            parity=False,
            progress=Progress(quiet=True),
        )
    assert not (tmp_path / "et").exists()


def test_streamed_gptq_factors_are_calibrated_when_read_and_dropped_after_use() -> None:
    """A `-gptq` table for a format that rounds its own blocks (GGUF), streamed (an export no parity follows):
    no layer is calibrated before a weight of it is read, reading one of layer 3 calibrates layers 0-3 only,
    each factor is dropped once every linear sharing it has been served (q/k/v share one), a second read is
    refused, and `finish` completes the manifest entry as an eager calibration writes it; the factors equal
    the eager table's."""
    import numpy as np

    from lfm_export.calibrate import calibrated_table, finish
    from lfm_export.recipes import parse_recipe

    loaded = load_model("tiny", lazy=True)
    core = parse_recipe("int4-b32-gptq")
    eager, eager_entry = calibrated_table(loaded, core, tokens=256, keep_factors=True)
    table, entry = calibrated_table(loaded, core, tokens=256, keep_factors=True, stream=True)
    assert not table.factors and entry == {"rounding": "gptq"}
    names = [f"model.layers.4.self_attn.{p}_proj.weight" for p in "qkv"]  # layer 4: attention, one input
    w = [loaded.weights.get(n).numpy() for n in names]
    factors = [table.find_importance(x, 4, 32, "factors") for x in w]
    assert len({id(f) for f in factors}) == 1 and factors[0].shape == (w[0].shape[1],) * 2
    np.testing.assert_array_equal(factors[0], eager.find_importance(w[0], 4, 32, "factors"))
    layers = {int(n.split(".")[2]) for n in loaded.weights.names() if ".layers." in n}
    assert 0 < len(table.factors) < len(eager.factors) and len(layers) == 6  # layers 0-4 of 6, q/k/v gone
    assert id(factors[0]) not in {id(f) for f in table.factors.values()}
    with pytest.raises(UserError, match="read twice"):
        table.find_importance(w[1], 4, 32, "factors")
    finish(table)
    assert entry == eager_entry and table.more is None


@pytest.mark.unit
def test_hessian_from_the_upper_blocks_and_the_float32_error_tally(monkeypatch) -> None:
    """The Hessian's `x^T x` is formed from the block rows on and above the diagonal and mirrored (symmetric,
    the plain product's values); the manifest's output-error tally, one float32 product for the plain and the
    calibrated rounding, is `hessian_error` (float64) to 1e-6."""
    import numpy as np
    import torch

    from lfm_export import calibrate
    from lfm_export.quant import quantize_block
    from lfm_export.rounding import gptq, hessian_error

    monkeypatch.setattr(calibrate, "GRAM_BLOCK", 48)  # 200 columns: 5 block rows, the last one 8 wide
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 200, generator=gen) @ (torch.eye(200) + 0.1 * torch.randn(200, 200, generator=gen))
    ours, plain = calibrate._gram(x), x.T @ x
    assert torch.equal(ours, ours.T)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5 * float(plain.abs().max()))

    h = (plain[:192, :192]).double().numpy() / 300  # 192 inputs: blocks of 32
    w = (np.random.default_rng(0).standard_t(4, (64, 192)) * 0.02).astype(np.float32)
    values = (quantize_block(w, 4, 32).dequantize(), gptq(w, 4, 32, h).dequantize())
    got = calibrate._output_errors(w, values, h.astype(np.float32))
    for value, err in zip(values, got):
        assert abs(err / hessian_error(w, value, h) - 1) < 1e-6


def test_kept_factors_carry_the_act_order_where_it_is_switched_on(monkeypatch) -> None:
    """`KEPT_ACT_ORDER` (off for GGUF `-gptq`; the benchmark's `gptq-act`): the calibration then keeps, per
    input, the factor of the Hessian in descending-diagonal order with that order, formed by the one
    factorisation it runs anyway."""
    import numpy as np

    from lfm_export import calibrate
    from lfm_export.recipes import parse_recipe
    from lfm_export.rounding import OrderedFactor

    monkeypatch.setattr(calibrate, "KEPT_ACT_ORDER", True)
    loaded = load_model("tiny", lazy=True)
    table, _ = calibrate.calibrated_table(
        loaded, parse_recipe("int4-b32-gptq"), tokens=256, keep_factors=True
    )
    w = loaded.weights.get("model.layers.4.feed_forward.w2.weight").numpy()
    f = table.find_importance(w, 4, 32, "factors")
    imp = table.find_importance(w, 4, 32)
    assert isinstance(f, OrderedFactor) and f.upper.shape == (w.shape[1],) * 2
    assert sorted(f.order) == list(range(w.shape[1])) and f.order[0] == np.argmax(imp)
