import json

import pytest

from lfm_export.config import Lfm2Config, effective_ff_dim, parse_hf_config
from lfm_export.contract.errors import ConfigError
from lfm_export.presets import PRESETS, get_preset, param_count

pytestmark = pytest.mark.unit

LFM2_1_2B_LIQUID = {
    "model_type": "lfm2",
    "vocab_size": 65536,
    "block_dim": 2048,
    "block_ff_dim": 12288,
    "block_auto_adjust_ff_dim": True,
    "block_ffn_dim_multiplier": 1.0,
    "block_multiple_of": 256,
    "num_hidden_layers": 16,
    "num_heads": 32,
    "num_key_value_heads": 8,
    "full_attn_idxs": [2, 5, 8, 10, 12, 14],
    "theta": 1000000.0,
    "tie_embedding": True,
    "norm_eps": 1e-05,
    "conv_L_cache": 3,
}
LFM2_1_2B_HF = {
    "model_type": "lfm2",
    "vocab_size": 65536,
    "hidden_size": 2048,
    "intermediate_size": 12288,
    "block_auto_adjust_ff_dim": True,
    "block_ffn_dim_multiplier": 1.0,
    "block_multiple_of": 256,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "layer_types": ["full_attention" if i in (2, 5, 8, 10, 12, 14) else "conv" for i in range(16)],
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "tie_word_embeddings": True,
}


def test_both_key_styles_give_the_same_1_2b_config():
    a, b = parse_hf_config(LFM2_1_2B_LIQUID), parse_hf_config(LFM2_1_2B_HF)
    assert a == b
    assert a.intermediate_size == 8192  # 12288 -> int(2*12288/3) = 8192, already a multiple of 256
    assert a.head_dim == 64 and a.conv_state_len == 2 and a.attn_layers == [2, 5, 8, 10, 12, 14]
    assert param_count(a) == 1_170_340_608


def test_effective_ff_rule():
    assert effective_ff_dim(12288, True, 1.0) == 8192
    assert effective_ff_dim(6656, True, 1.0) == 4608  # LFM2-350M
    assert effective_ff_dim(1000, True, None, 256) == 768  # int(666.67)=666 -> rounded up to 768
    assert effective_ff_dim(1000, False) == 1000


def test_rope_theta_sources():
    assert parse_hf_config({**LFM2_1_2B_HF, "rope_parameters": None, "rope_theta": 5e5}).rope_theta == 5e5
    assert parse_hf_config({**LFM2_1_2B_LIQUID, "theta": 2e6}).rope_theta == 2e6


def test_moe_fields():
    cfg = parse_hf_config(
        {
            **LFM2_1_2B_HF,
            "model_type": "lfm2_moe",
            "num_hidden_layers": 16,
            "intermediate_size": 7168,
            "num_dense_layers": 2,
            "num_experts": 32,
            "num_experts_per_tok": 4,
            "moe_intermediate_size": 1792,
            "use_expert_bias": True,
            "norm_topk_prob": True,
            "routed_scaling_factor": 1.0,
        }
    )
    assert cfg.is_moe and cfg.intermediate_size == 7168  # no auto-adjust for MoE dense layers
    assert not cfg.is_moe_layer(1) and cfg.is_moe_layer(2)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "unknown model_type"),
        ({"num_hidden_layers": 15}, "layer_types has 16 entries"),
        ({"num_attention_heads": 30}, "does not divide hidden_size"),
        ({"num_key_value_heads": 5}, "does not divide num_attention_heads"),
        ({"layer_types": ["conv", "mamba"] * 8}, "unknown layer type"),
        ({"vocab_size": "many"}, "malformed"),
    ],
)
def test_inconsistent_configs_are_clear_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        parse_hf_config({**LFM2_1_2B_HF, **change})


def test_missing_key_is_named():
    raw = dict(LFM2_1_2B_HF)
    del raw["vocab_size"]
    with pytest.raises(ConfigError, match="vocab_size"):
        parse_hf_config(raw)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Lfm2Config.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Lfm2Config.from_file(tmp_path / "config.json")


def test_round_trip_through_transformers_style_dict(tmp_path):
    cfg = get_preset("lfm2-8b-a1b").config
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert Lfm2Config.from_file(tmp_path / "config.json") == cfg


@pytest.mark.parametrize(
    "name, published",
    [
        ("lfm2-350m", 354_483_968),
        ("lfm2-700m", 742_489_344),
        ("lfm2-1.2b", 1_170_340_608),
        ("lfm2.5-1.2b", 1_170_340_608),
    ],
)
def test_preset_parameter_counts_match_published(name, published):
    assert get_preset(name).params == published


def test_rounded_published_sizes():
    moe = get_preset("lfm2-8b-a1b")
    assert round(moe.params / 1e9, 1) == 8.3 and round(moe.active_params / 1e9, 1) == 1.6  # card: 8.3B / 1.5B
    assert round(get_preset("lfm2.5-230m").params / 1e6) == 230
    assert "intermediate_size" in get_preset("lfm2.5-230m").unconfirmed
    assert get_preset("lfm2.5-8b-a1b").config.vocab_size == 128000


def test_every_released_architecture_has_a_preset():
    assert set(PRESETS) == {
        "lfm2-350m",
        "lfm2-700m",
        "lfm2-1.2b",
        "lfm2-8b-a1b",
        "lfm2.5-230m",
        "lfm2.5-350m",
        "lfm2.5-1.2b",
        "lfm2.5-8b-a1b",
    }
    assert get_preset("LFM2.5-1.2B-Thinking").name == "lfm2.5-1.2b"
