"""Activation-aware scaling (`-awq`): the fold keeps the float model's function, export and simulation read the
same folded tensors (lazy source and real model alike), the reference keeps the original ones; an exported
`-awq` artifact passes parity and, judged without its scales, fails exactness (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lfm_export.awq import ScaledSource, consumers, scaled_model, scales_from_manifest, search
from lfm_export.config import Lfm2Config
from lfm_export.contract.errors import UnsupportedError
from lfm_export.loading import LoadedModel
from lfm_export.quant import simulate
from lfm_export.recipes import parse_recipe
from lfm_export.weights import RandomWeights, materialize

torch.set_num_threads(1)
CFG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    layer_types=("conv", "full_attention", "conv"),
)


def _loaded() -> LoadedModel:
    cfg = Lfm2Config(**CFG)
    model = materialize(cfg, RandomWeights(cfg, seed=7))
    with torch.no_grad():  # channels of unequal size, as trained models have
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.exp(torch.randn(p.shape, generator=gen)))
            elif p.dim() == 2:
                p.mul_(4.0)
    return LoadedModel(
        model=model, config=cfg, source="test", path=None, random=True, weights_dtype="float32"
    )


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, *model.empty_state(batch=ids.shape[0]))[0]


@pytest.mark.unit
def test_the_fold_keeps_the_float_model_and_is_shared_by_export_and_simulation() -> None:
    torch.manual_seed(0)
    loaded = _loaded()
    recipe = parse_recipe("int4-b32-awq")
    scales, entry = search(loaded, recipe, tokens=256)
    assert scales, entry["alpha"]  # some norm scaled
    assert all(g <= 1.0 for g in entry["output_error_vs_unscaled"].values())
    assert set(entry["alpha"]) == set(consumers(loaded.config))
    # the manifest's scales are the very tensors
    back = scales_from_manifest(json.loads(json.dumps({"awq": entry})))
    assert back is not None and all(torch.equal(back[n], s) for n, s in scales.items())
    folded = scaled_model(loaded.model, loaded.config, scales)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    want, got = _logits(loaded.model, ids), _logits(folded, ids)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5  # the same function in float
    norm = next(iter(scales))
    assert not torch.equal(
        folded.get_parameter(norm), loaded.model.get_parameter(norm)
    )  # reference untouched
    # a lazy source gives the export the same tensors the simulation holds
    cfg = loaded.config
    source = ScaledSource(RandomWeights(cfg, seed=7), cfg, scales)
    plain = materialize(cfg, RandomWeights(cfg, seed=7))
    lazy_folded = scaled_model(plain, cfg, scales)
    for name, p in lazy_folded.named_parameters():
        assert torch.equal(source.get(name), p.detach()), name
    # quantized: the folded weights round otherwise
    a = _logits(simulate(folded, recipe), ids)
    b = _logits(simulate(loaded.model, recipe), ids)
    assert float((a - b).abs().max()) > 1e-3


@pytest.mark.unit
def test_awq_recipe_names() -> None:
    assert parse_recipe("int4-b64-gptq-awq").name == "int4-b64-gptq-awq"
    assert parse_recipe("int4-awq").awq and parse_recipe("int4-awq").name == "int4-b32-awq"
    for bad in ("fp32-awq", "int4-awq-gptq", "int4-awq-awq"):
        with pytest.raises(UnsupportedError):
            parse_recipe(bad)


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend,model,quant", [("onnx", "tiny", "int4-b64-awq"), ("mlx", "tiny-moe", "int4-b32-awq")]
)
def test_awq_exports_pass_parity_and_fail_without_their_scales(
    tmp_path: Path, backend: str, model: str, quant: str
) -> None:
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    from lfm_export.backends import get
    from lfm_export.pipeline import check_artifact, export_artifact
    from lfm_export.progress import Progress

    out = tmp_path / backend
    outcome = export_artifact(
        backend, model, out, get(backend).recipe(quant, 64), threads=1, progress=Progress(quiet=True)
    )
    assert outcome.passed, outcome.parity.verdict_line()
    assert outcome.manifest["awq"]["scales_f32_base64"]
    again = check_artifact(out, threads=1, scenarios=["prefill", "decode"], progress=Progress(quiet=True))
    assert again.passed, again.verdict_line()
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["awq"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    wrong = check_artifact(out, threads=1, scenarios=["prefill", "decode"], progress=Progress(quiet=True))
    assert not wrong.part_passed("exactness"), wrong.verdict_line()
