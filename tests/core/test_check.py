"""`run_check` is independent of our config parser: transformers reads each checkpoint folder (written by its
own `save_pretrained`) with its own config, so config features on either side are compared, and a key only
transformers honours makes the check fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_hf, stable_seed

from lfm_export.check import OWN_CONFIG, run_check
from lfm_export.loading import load_model

pytest.importorskip("transformers")

PROMPT = [1, 17, 42, 99, 3, 250, 7, 8, 120, 64, 5]
DENSE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    layer_types=["conv", "full_attention", "conv"],
    block_auto_adjust_ff_dim=False,
)
MOE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_experts=4,
    num_experts_per_tok=2,
    num_dense_layers=1,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    layer_types=["conv", "full_attention", "conv"],
)
VARIANTS = {
    # name: (transformers config kwargs, dtype written)
    "moe_scaled_unnormalised": (
        {**MOE, "routed_scaling_factor": 2.5, "norm_topk_prob": False},
        torch.float32,
    ),
    "moe_normalised_no_bias": ({**MOE, "norm_topk_prob": True, "use_expert_bias": False}, torch.float32),
    "moe_bf16": ({**MOE, "use_expert_bias": True, "routed_scaling_factor": 1.5}, torch.bfloat16),
    "dense_untied_conv_bias": ({**DENSE, "tie_word_embeddings": False, "conv_bias": True}, torch.float32),
    "dense_fp16": (DENSE, torch.float16),
}


def write(folder: Path, name: str) -> Path:
    kwargs, dtype = VARIANTS[name]
    return save_hf(folder / name, kwargs, dtype, seed=stable_seed(name))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_features_pass_with_transformers_parsing_its_own_config(tmp_path: Path, name: str) -> None:
    folder = write(tmp_path, name)
    written = json.loads((folder / "config.json").read_text())
    for key, value in VARIANTS[name][0].items():  # what transformers wrote is what the test asked for
        assert written[key] == value, key
    result = run_check(load_model(folder), PROMPT, decode_steps=4)
    assert result.passed and result.max_abs_error <= 1e-4, result.parts
    assert result.reference_config == OWN_CONFIG and result.greedy_match
    assert result.reference_class == ("Lfm2MoeForCausalLM" if "num_experts" in written else "Lfm2ForCausalLM")


def test_a_key_only_transformers_honours_fails_the_check(tmp_path: Path) -> None:
    """Linear RoPE scaling: transformers applies `rope_parameters.rope_type`; our parser reads only the theta.
    With our config handed to transformers (as before) both sides ignored it and the check passed."""
    folder = write(tmp_path, "dense_untied_conv_bias")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    result = run_check(load_model(folder), PROMPT, decode_steps=2)
    assert not result.passed and result.parts["prefill"] > 1e-2, result.parts


def test_liquid_key_style_falls_back_to_our_config_and_says_so(hf_checkpoints) -> None:
    result = run_check(load_model(hf_checkpoints["liquid_bf16"]), PROMPT, decode_steps=2)
    assert result.passed, result.parts
    assert result.reference_config.startswith("lfm-export (config.json uses the original Liquid keys")


def test_a_model_without_folder_uses_our_config_and_says_so(tiny_config) -> None:
    from lfm_export.loading import LoadedModel, init_random

    loaded = LoadedModel(init_random(tiny_config, seed=1), tiny_config, "random:tiny", None, True, "float32")
    result = run_check(loaded, [1, 2, 3, 4], decode_steps=2)
    assert result.passed and result.reference_config.startswith("lfm-export (no checkpoint folder")
