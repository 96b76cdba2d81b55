"""The precision policy (`lfm_export.precision`): its rules, the names each backend asks it about, and the
manifest's `precision` against what an artifact actually holds (ONNX initializers and MatMulNBits / QMoE /
GatherBlockQuantized attributes; MLX safetensors dtypes and quantized scales)."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lfm_export.precision import (
    BIAS,
    CONV,
    EMBEDDING_TABLE,
    EXPERT_BIAS,
    LINEAR,
    LM_HEAD,
    NORM,
    ROUTER,
    RULES,
    held_as,
    manifest_entry,
    rule_for,
)
from lfm_export.recipes import parse_recipe

CONTEXT = 64


@pytest.mark.unit
@pytest.mark.parametrize(
    "name, rule",
    [
        ("model.layers.2.feed_forward.gate.weight", ROUTER),
        ("model.layers.2.feed_forward.expert_bias", EXPERT_BIAS),
        ("model.layers.0.conv.conv.weight", CONV),
        ("model.layers.0.operator_norm.weight", NORM),
        ("model.layers.3.self_attn.q_layernorm.weight", NORM),
        ("model.embedding_norm.weight", NORM),
        ("model.layers.0.conv.in_proj.bias", BIAS),
        ("model.embed_tokens.weight", EMBEDDING_TABLE),
        ("lm_head.weight", LM_HEAD),
        ("model.layers.2.feed_forward.experts.7.w1.weight", LINEAR),
        ("model.layers.0.feed_forward.w2.weight", LINEAR),
        ("model.layers.0.conv.in_proj.weight", LINEAR),
        # backends' own spellings of checkpoint names
        ("model.layers.2.feed_forward.gate.weight.T", ROUTER),  # ONNX float layout
        ("model_model_layers_2_feed_forward_gate_weight_to_fp16", ROUTER),  # Core ML const
        ("model_model_embed_tokens_weight_to_fp16", EMBEDDING_TABLE),
        ("model_model_layers_0_conv_conv_weight_to_fp16", CONV),
        ("model_model_layers_0_feed_forward_w1_weight_to_fp16", LINEAR),
        ("24_to_fp16", LINEAR),  # a name no rule knows: decided by the backend's structure
    ],
)
def test_rule_for(name: str, rule: object) -> None:
    assert rule_for(name) is rule


@pytest.mark.unit
def test_held_as() -> None:
    int4 = parse_recipe("int4")
    assert (int4.bits, int4.head_bits, int4.embedding_bits) == (4, 8, 8)
    assert held_as("model.layers.0.self_attn.q_proj.weight", int4) == 4
    assert held_as("lm_head.weight", int4) == 8
    assert held_as("model.embed_tokens.weight", int4) == 8
    for kept in ("model.layers.2.feed_forward.gate.weight", "model.layers.0.conv.conv.weight"):
        assert held_as(kept, int4) is None
    headless = int4.with_options(head_bits=4, embedding_bits=None)
    assert held_as("lm_head.weight", headless) == 4 and held_as("model.embed_tokens.weight", headless) is None
    for float_recipe in ("fp32", "fp16", "bf16"):
        assert held_as("model.layers.0.self_attn.q_proj.weight", parse_recipe(float_recipe)) is None
    assert RULES[-1] is LINEAR and all(r.why for r in RULES)


@pytest.mark.unit
def test_manifest_entry_labels() -> None:
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.layers.0.conv.in_proj.weight"]
    got = manifest_entry(names, parse_recipe("int4-b64-asym").to_dict())["tensors"]
    assert got == dict(zip(names, ["int8-b64-asym", "int8-b64-asym", "int4-b64-asym"]))
    assert set(manifest_entry(names, parse_recipe("int8-pc").to_dict())["tensors"].values()) == {"int8-pc"}
    assert set(manifest_entry(names, parse_recipe("fp16").to_dict())["tensors"].values()) == {"float"}
    assert manifest_entry(names, {"quant": "16a8w", "activations": "uint16"}) == {}  # QNN: not a core recipe


@pytest.mark.unit
def test_policy_imports_no_torch() -> None:
    code = "import sys, lfm_export.precision, lfm_export.recipes; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the manifest against the artifact -------------------------------------------------------------------------


def _export(backend: str, tmp_path: Path, **options: Any) -> Path:
    from lfm_export.backends import get
    from lfm_export.pipeline import export_artifact
    from lfm_export.progress import Progress

    folder = tmp_path / backend
    recipe = get(backend).recipe("int4", CONTEXT, **options)
    export_artifact(backend, "tiny-moe", folder, recipe, parity=False, progress=Progress(quiet=True))
    return folder


def _expand(base: str) -> list[str]:
    """`model.layers.0.self_attn.q_proj+k_proj+v_proj` -> the checkpoint names of the fused weights."""
    head, _, last = base.rpartition(".")
    return [f"{head}.{part}.weight" for part in last.split("+")]


def _onnx_holds(folder: Path, names: list[str]) -> dict[str, str]:
    """What `model.onnx` holds for each checkpoint tensor, read from the graph alone."""
    import onnx

    model = onnx.load(folder / "model.onnx", load_external_data=False)
    graph = model.graph
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    held: dict[str, str] = {}

    def attrs(node: onnx.NodeProto) -> dict[str, Any]:
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    for node in graph.node:
        a = attrs(node)
        if node.op_type == "MatMulNBits":
            label = f"int{a['bits']}-b{a['block_size']}"
            base = node.input[1].removesuffix(".qweight")
            if base == "model.embed_tokens" and node.output[0] in outputs:
                held["lm_head.weight"] = label  # the tied head reads the embedding's packed table
            else:
                held.update(dict.fromkeys(_expand(base), label))
        elif node.op_type == "QMoE":
            label = f"int{a['expert_weight_bits']}-b{a['block_size']}"
            prefix = node.input[2].removesuffix(".b1")
            held.update({n: label for n in names if n.startswith(prefix + ".")})
        elif node.op_type == "GatherBlockQuantized":
            held["model.embed_tokens.weight"] = f"int{a['bits']}-b{a['block_size']}"
    for name in names:
        for stored in (name, f"{name}.T"):
            if name not in held and stored in inits and inits[stored].data_type in floats:
                held[name] = "float"
    return held


def _safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _mlx_holds(folder: Path, names: list[str]) -> dict[str, str]:
    """What the MLX folder holds for each checkpoint tensor: its safetensors dtypes and shapes (a quantized
    weight is uint32 codes with `.scales` beside it; its bits from the packed width) and `config.json`."""
    from lfm_export.backends.mlx.weights import mlx_name
    from lfm_export.loading import load_model

    header = _safetensors_header(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    cfg = load_model("tiny-moe", lazy=True).config
    held: dict[str, str] = {}
    for name in names:
        target, _ = mlx_name(cfg, "model.embed_tokens.weight" if name == "lm_head.weight" else name)
        base = target.removesuffix(".weight")
        if f"{base}.scales" in header:
            weight, scales = header[f"{base}.weight"], header[f"{base}.scales"]
            assert weight["dtype"] == "U32", (name, weight)
            group = config["quantization"].get(base, config["quantization"])["group_size"]
            k = scales["shape"][-1] * group
            bits = weight["shape"][-1] * 32 // k
            assert bits == config["quantization"].get(base, config["quantization"])["bits"], name
            held[name] = f"int{bits}-b{group}"
        elif header.get(target, {}).get("dtype") in ("F32", "F16", "BF16"):
            held[name] = "float"
    return held


@pytest.mark.slow  # the MLX test below checks the same manifest entry on a cheaper export
def test_onnx_manifest_lists_what_the_artifact_holds(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    folder = _export("onnx", tmp_path)
    listed = json.loads((folder / "manifest.json").read_text())["precision"]["tensors"]
    assert _onnx_holds(folder, list(listed)) == listed
    assert {v for k, v in listed.items() if re.search(r"\.(experts\.\d+\.w\d|self_attn\.q_proj)\.", k)} == {
        "int4-b32"
    }


def test_mlx_manifest_lists_what_the_artifact_holds(tmp_path: Path) -> None:
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    folder = _export("mlx", tmp_path, max_prefill=8)
    listed = json.loads((folder / "manifest.json").read_text())["precision"]["tensors"]
    assert _mlx_holds(folder, list(listed)) == listed
    assert listed["model.layers.2.feed_forward.gate.weight"] == "float"
    assert listed["lm_head.weight"] == listed["model.embed_tokens.weight"] == "int8-b32"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mlx", "onnx"])
def test_a_precision_mix_is_what_the_artifact_holds(tmp_path: Path, backend: str) -> None:
    """A `--budget` mix (`Recipe.mix`) reaches the files: each tensor group at its own bits and block."""
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    from lfm_export.backends import get
    from lfm_export.budget import with_core
    from lfm_export.pipeline import export_artifact
    from lfm_export.progress import Progress

    recipe = get(backend).recipe("int4", CONTEXT)
    mix = (
        ("model.embed_tokens.weight", 8, 64),
        ("lm_head.weight", 8, 64),
        ("layers.0.conv", 8, 32),
        ("layers.2.self_attn", 4, 64),
        ("layers.2.feed_forward", 8, 128),
        ("layers.3.feed_forward", 4, 128),
    )
    recipe = with_core(recipe, recipe.recipe.with_options(mix=mix))
    folder = tmp_path / backend
    export_artifact(backend, "tiny-moe", folder, recipe, parity=False, progress=Progress(quiet=True))
    listed = json.loads((folder / "manifest.json").read_text())["precision"]["tensors"]
    holds = _mlx_holds if backend == "mlx" else _onnx_holds
    assert holds(folder, list(listed)) == listed
    assert listed["model.layers.2.feed_forward.experts.0.w2.weight"] == "int8-b128"
    assert listed["model.layers.3.conv.in_proj.weight"] == "int4-b32"
    assert listed["model.layers.2.self_attn.q_proj.weight"] == "int4-b64"
    assert listed["model.embed_tokens.weight"] == "int8-b64"
