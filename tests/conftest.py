"""Shared fixtures: the tiny canonical config, and checkpoints written by transformers' own `save_pretrained`
(never by our code), built once per session."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lfm_export.check import save_random_transformers as save_hf
from lfm_export.check import small_shape
from lfm_export.config import Lfm2Config

torch.set_num_threads(2)

TINY_CONFIG = Lfm2Config(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    layer_types=("conv", "full_attention", "conv", "conv", "full_attention"),
)
"""Conv and attention layers, GQA 4/2, head_dim 16; every width a multiple of 32 (int4/int8 block 32 fit)."""

TINY_MOE_CONFIG = Lfm2Config(
    model_type="lfm2_moe",
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    layer_types=("full_attention", "conv", "conv"),
    num_dense_layers=1,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    use_expert_bias=True,
)
"""Attention first, one dense FFN layer, then 4 experts top-2 with an expert bias."""

CHECKPOINT_CONFIG = Lfm2Config(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    layer_types=("conv", "full_attention", "conv"),
)
"""Three layers, FFN width 96: what the loader tests write as checkpoints (their messages name its shapes)."""


@pytest.fixture(scope="session")
def tiny_config() -> Lfm2Config:
    return TINY_CONFIG


def stable_seed(name: str) -> int:
    """A seed from a name, the same in every process (`hash()` of a str changes with PYTHONHASHSEED)."""
    return zlib.crc32(name.encode()) % 1000


HF_SHAPES = {
    # name: (transformers config kwargs, dtype)
    "dense_odd": (
        dict(
            vocab_size=301,
            hidden_size=96,
            intermediate_size=200,
            num_hidden_layers=4,
            num_attention_heads=3,
            num_key_value_heads=1,
            layer_types=["conv", "full_attention", "conv", "full_attention"],
            block_auto_adjust_ff_dim=False,
        ),
        torch.float32,
    ),
    "dense_attn_first_hd32": (
        dict(
            vocab_size=256,
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            layer_types=["full_attention", "conv", "conv"],
            block_auto_adjust_ff_dim=True,
            block_ffn_dim_multiplier=1.0,
            block_multiple_of=64,
        ),
        torch.float32,
    ),
    "moe_dense_first": (
        dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=160,
            moe_intermediate_size=48,
            num_experts=6,
            num_experts_per_tok=2,
            num_dense_layers=1,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            layer_types=["conv", "full_attention", "conv", "conv"],
            use_expert_bias=True,
            routed_scaling_factor=1.5,
        ),
        torch.float32,
    ),
    "moe_b32": (small_shape("moe"), torch.float32),  # every width a multiple of 32: block 32 fits all
}


def _save_hf(name: str, folder: Path) -> Path:
    kwargs, dtype = HF_SHAPES[name]
    return save_hf(folder, kwargs, dtype, seed=stable_seed(name))


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {name: _save_hf(name, root / name) for name in HF_SHAPES}
    # Original Liquid key style with bf16 weights: rewrite a transformers config into the old keys.
    liquid = _save_hf("dense_odd", root / "liquid_bf16")
    import transformers

    model = transformers.Lfm2ForCausalLM.from_pretrained(liquid, dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(liquid)
    cfg = json.loads((liquid / "config.json").read_text())
    old = {
        "model_type": "lfm2",
        "architectures": ["Lfm2ForCausalLM"],
        "vocab_size": cfg["vocab_size"],
        "block_dim": cfg["hidden_size"],
        "block_ff_dim": cfg["intermediate_size"],
        "block_auto_adjust_ff_dim": False,
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_attention_heads": cfg["num_attention_heads"],
        "num_key_value_heads": cfg["num_key_value_heads"],
        "full_attn_idxs": [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"],
        "theta": 1000000.0,
        "tie_embedding": True,
        "norm_eps": 1e-5,
        "conv_L_cache": 3,
        "torch_dtype": "bfloat16",
    }
    (liquid / "config.json").write_text(json.dumps(old, indent=2))
    out["liquid_bf16"] = liquid
    return out


def genai_greedy(og: Any, folder: Path, prompt: list[int], new: int) -> list[int]:
    """Greedy tokens from onnxruntime-genai (`og`) on the folder, `prompt` then up to `new` tokens."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, do_sample=False, repetition_penalty=1.0)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], np.int32))
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens


DENSE_2K = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=2,
    layer_types=["conv", "full_attention", "conv", "conv", "full_attention"],
    initializer_range=0.08,
    max_position_embeddings=2048,
    block_auto_adjust_ff_dim=False,
)
"""A transformers-written dense checkpoint at `initializer_range` 0.08 with a 2048-token context: the init
under which fp16 errors of the rotary angles showed at late positions (tests/test_long_context*.py)."""


@pytest.fixture(scope="session")
def dense_2k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf(tmp_path_factory.mktemp("hf2k") / "dense", DENSE_2K, torch.float32, seed=17)
