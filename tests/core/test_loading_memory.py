"""Frugal loading and lazy weights: a model is exported one tensor at a time, so models bigger than memory
export (the 8B MoE within 16 GB, slow); loading an fp32 checkpoint stays within 1.2x its size (slow)."""

import hashlib
import json
import resource
import subprocess
import sys
import zlib

import numpy as np
import psutil
import pytest
import torch

from lfm_export.config import Lfm2Config
from lfm_export.loading import LoadedModel, load_model, save_checkpoint
from lfm_export.presets import get_preset, param_count
from lfm_export.weights import RandomWeights, lazy_model, lazy_source, materialize

torch.set_num_threads(1)

# lfm2-8b-a1b's structure (dense layers first, then MoE with biased top-k routing; conv and attention layers)
# at a size that exports in seconds; every width a multiple of 32 so int4-b32 applies everywhere.
SMALL_MOE = Lfm2Config(
    model_type="lfm2_moe",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    layer_types=("conv", "conv", "full_attention", "conv"),
    num_dense_layers=2,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    use_expert_bias=True,
)

CLI = [sys.executable, "-m", "lfm_export.cli"]


def test_random_weights_are_seeded_by_tensor_name():
    name = "model.layers.2.feed_forward.experts.1.w2.weight"
    a, b = RandomWeights(SMALL_MOE, seed=0), RandomWeights(SMALL_MOE, seed=0)
    b.get("model.layers.3.conv.in_proj.weight")  # another tensor first: order does not matter
    w = a.get(name)
    assert torch.equal(w, b.get(name))
    # the documented formula, so artifacts of random presets repeat across runs and versions
    gen = torch.Generator().manual_seed(zlib.crc32(f"0:{name}".encode()))
    assert torch.equal(w, torch.empty(64, 64).normal_(0.0, 0.02, generator=gen))
    assert not torch.equal(w, RandomWeights(SMALL_MOE, seed=1).get(name))
    assert not torch.equal(w, a.get(name.replace("experts.1", "experts.2")))
    assert torch.equal(a.get("lm_head.weight"), a.get("model.embed_tokens.weight"))  # tied
    assert torch.equal(a.get("model.layers.0.operator_norm.weight"), torch.ones(64))
    assert torch.equal(a.get("model.layers.2.feed_forward.expert_bias"), torch.zeros(4))
    big = RandomWeights(get_preset("lfm2-350m").config).get("model.embed_tokens.weight")
    assert abs(big.std().item() - 0.02) < 1e-4 and abs(big.mean().item()) < 1e-4


def test_lazy_model_holds_no_weights_and_materializes_the_same_tensors():
    source = RandomWeights(SMALL_MOE, seed=3)
    lazy = lazy_model(SMALL_MOE, source)
    assert lazy_source(lazy) is source
    for name, t in lazy.state_dict().items():
        assert t.isnan().all() and all(s == 0 for s in t.stride()), name
    eager = materialize(SMALL_MOE, source)
    assert lazy_source(eager) is None
    for name, t in eager.state_dict().items():
        assert torch.equal(t, source.get(name)), name
    assert eager.lm_head.weight is eager.model.embed_tokens.weight


def test_lazy_bf16_checkpoint_converts_one_tensor_at_a_time(tmp_path):
    eager_src = materialize(SMALL_MOE, RandomWeights(SMALL_MOE, seed=4))
    save_checkpoint(eager_src, tmp_path / "m", dtype=torch.bfloat16)
    lazy, eager = load_model(tmp_path / "m", lazy=True), load_model(tmp_path / "m")
    assert lazy.lazy and not eager.lazy and lazy.weights_dtype == "bfloat16"
    name = "model.layers.3.feed_forward.experts.0.w1.weight"
    assert lazy.weights.get(name).dtype == torch.float32
    assert torch.equal(lazy.weights.get(name), eager.model.state_dict()[name])
    assert torch.equal(
        lazy.weights.get(name), eager_src.state_dict()[name].to(torch.bfloat16).float()
    )  # independently: the source weight rounded to bf16
    for n, t in lazy.materialized().model.state_dict().items():
        assert torch.equal(t, eager.model.state_dict()[n]), n


def _files_sha256(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def test_lazily_weighted_moe_exports_as_the_eager_model(tmp_path):
    """The lazy model is traced with NaN placeholders and each weight produced while writing: its int4
    artifact is byte-identical to the eager model's, and its fp32 artifact computes the eager model's logits."""
    from lfm_export.backends.onnx.convert import export_onnx, trace_onnx
    from lfm_export.backends.onnx.recipes import make_recipe

    source = RandomWeights(SMALL_MOE, seed=5)

    def loaded(model):
        return LoadedModel(model, SMALL_MOE, "random:small", None, True, "float32")

    lazy = loaded(lazy_model(SMALL_MOE, source))
    eager = loaded(materialize(SMALL_MOE, source))
    traced = trace_onnx(lazy)
    export_onnx(lazy, tmp_path / "lazy-int4", make_recipe(quant="int4"), traced=traced)
    export_onnx(eager, tmp_path / "eager-int4", make_recipe(quant="int4"), traced=trace_onnx(eager))
    assert _files_sha256(tmp_path / "lazy-int4") == _files_sha256(tmp_path / "eager-int4")
    export_onnx(lazy, tmp_path / "lazy-fp32", make_recipe(quant="fp32"), traced=traced)

    import onnxruntime as ort

    ids = np.array([[1, 17, 42, 99, 7, 200, 3, 64]], dtype=np.int64)
    session = ort.InferenceSession(
        str(tmp_path / "lazy-fp32" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    dims = {"batch_size": 1, "sequence_length": ids.shape[1], "total_sequence_length": ids.shape[1]}
    feeds = {}
    for spec in session.get_inputs():
        shape = [dims.get(d, 0) if isinstance(d, str) else d for d in spec.shape]
        feeds[spec.name] = np.zeros(shape, np.float32)
    feeds["input_ids"], feeds["attention_mask"] = ids, np.ones_like(ids)
    got = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        want = eager.model(torch.from_numpy(ids), *eager.model.empty_state(1))[0].numpy()
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= 1e-4


def test_parity_streams_exactly_when_the_float32_copies_do_not_fit():
    """The rule `lfm-export parity` and every export follow: stream where the reference and simulation copies do
    not fit in memory (the 8B-A1B here: 2 x 33.4 GB), or where asked; never a model already in memory unless
    asked. (`tests/backends/onnx/test_cli_onnx.py` runs a streamed parity through onnxruntime.)"""
    from lfm_export.pipeline import use_streaming

    big = load_model("random:lfm2-8b-a1b", lazy=True)  # lazy: no weights made
    need = 2 * 4 * param_count(get_preset("lfm2-8b-a1b").config)
    if need <= 0.9 * psutil.virtual_memory().available:
        pytest.skip(f"this machine holds {need / 1e9:.0f} GB: parity on lfm2-8b-a1b would not stream")
    assert use_streaming(big, copies=2) and use_streaming(big, copies=1)
    tiny = load_model("tiny", lazy=True)
    assert not use_streaming(tiny, copies=3) and use_streaming(tiny, copies=3, stream=True)
    eager = tiny.materialized()
    assert not use_streaming(eager, copies=10**6) and use_streaming(eager, copies=2, stream=True)


MEASURE = """
import resource, sys, torch
from lfm_export.loading import load_model
loaded = load_model(sys.argv[1])
with torch.no_grad():
    loaded.model(torch.tensor([[1, 2, 3]]), *loaded.model.empty_state(1))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


@pytest.mark.slow
def test_peak_rss_loading_1_2b_fp32(tmp_path):
    write = (
        "import sys; from lfm_export.loading import random_model, save_checkpoint; from pathlib import Path; "
        "save_checkpoint(random_model('lfm2-1.2b').model, Path(sys.argv[1]))"
    )
    subprocess.run([sys.executable, "-c", write, str(tmp_path / "m")], check=True, timeout=1200)
    size = (tmp_path / "m" / "model.safetensors").stat().st_size
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path / "m")],
        capture_output=True,
        text=True,
        check=True,
        timeout=1200,
    )
    peak = int(out.stdout.strip().splitlines()[-1])
    print(f"checkpoint {size / 1e9:.2f} GB, peak RSS {peak / 1e9:.2f} GB ({peak / size:.2f}x)")
    assert peak <= 1.2 * size


@pytest.mark.slow
def test_lfm2_8b_a1b_int4_export_within_16_gb(tmp_path):
    """33.4 GB of fp32 weights, produced one tensor at a time while writing. Measured 2026-11-29 on 2 shared
    cores: 1238 s (trace 407 s, graph cleaning 671 s, int4 128 s), peak RSS 6.96 GB, artifact 5.31 GB."""
    out = tmp_path / "8b"
    r = subprocess.run(
        [*CLI, "onnx", "random:lfm2-8b-a1b", "-o", str(out), "--quant", "int4", "--no-parity", "--json"],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert r.returncode == 0, r.stderr
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"peak RSS {peak / 1e9:.2f} GB, artifact {manifest['total_bytes'] / 1e9:.2f} GB")
    assert peak <= 16e9
    assert manifest["model"]["random_weights"] and manifest["recipe"]["name"] == "int4-b32"
    assert manifest["fusions"]["MoE"] == 22 and manifest["weights"]["rewrites"]["QMoE"] == 22


def _rss_file_kb() -> int:
    """Resident file-backed pages of this process (`RssFile` in /proc/self/status), in kB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_reading_a_lazy_checkpoint_leaves_none_of_its_file_resident(tmp_path):
    # 32 MB of fp32 weights: a 16384 x 512 token table and layers, so the file's pages dwarf the noise
    cfg = Lfm2Config(
        vocab_size=16384, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
        num_key_value_heads=4, layer_types=("conv", "full_attention"),
    )  # fmt: skip
    save_checkpoint(materialize(cfg, RandomWeights(cfg, seed=5)), tmp_path / "m")
    size_kb = (tmp_path / "m" / "model.safetensors").stat().st_size // 1024
    loaded = load_model(tmp_path / "m", lazy=True)
    before = _rss_file_kb()
    expected = RandomWeights(cfg, seed=5)
    for name in loaded.weights.names():
        assert torch.equal(loaded.weights.get(name), expected.get(name)), name
    assert size_kb > 30_000
    # before the pages were handed back, every tensor read stayed resident: RssFile grew by the file's size
    assert _rss_file_kb() - before < size_kb // 4
    for name in loaded.weights.names():  # the released pages read again from the file, unchanged
        assert torch.equal(loaded.weights.get(name), expected.get(name)), name
