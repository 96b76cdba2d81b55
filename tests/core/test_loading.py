import json
import shutil

import pytest
import torch
from conftest import CHECKPOINT_CONFIG as CFG
from safetensors.torch import save_file

from lfm_export.config import Lfm2Config
from lfm_export.contract.errors import CheckpointError, ConfigError, UnsupportedError, UserError
from lfm_export.loading import init_random, load_model, save_checkpoint


@pytest.fixture()
def ckpt(tmp_path):
    model = init_random(CFG, seed=7)
    save_checkpoint(model, tmp_path / "m")
    return tmp_path / "m", model


def _same(a, b):
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_round_trip_and_tied_head(ckpt):
    folder, model = ckpt
    loaded = load_model(folder)
    _same(loaded.model, model)
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert not loaded.random and loaded.identity()["weights_sha256"]


def test_fp32_weights_are_memory_mapped_not_copied(ckpt):
    folder, _ = ckpt
    loaded = load_model(folder)
    w = loaded.model.model.layers[0].conv.in_proj.weight
    # a view into the file map: its storage is the whole file, not just this tensor
    assert w.untyped_storage().nbytes() == (folder / "model.safetensors").stat().st_size


def test_sharded_bf16_checkpoint(tmp_path):
    model = init_random(CFG, seed=8)
    save_checkpoint(model, tmp_path / "s", dtype=torch.bfloat16, max_shard_bytes=20_000)
    assert len(list((tmp_path / "s").glob("model-*.safetensors"))) > 1
    loaded = load_model(tmp_path / "s")
    assert loaded.weights_dtype == "bfloat16"
    ref = model.model.layers[1].self_attn.q_proj.weight.to(torch.bfloat16).float()
    assert torch.equal(loaded.model.model.layers[1].self_attn.q_proj.weight, ref)
    assert loaded.model.model.layers[1].self_attn.q_proj.weight.dtype == torch.float32


def test_fused_experts_are_unfused(tmp_path):
    cfg = Lfm2Config(
        model_type="lfm2_moe",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        layer_types=("conv", "full_attention"),
        num_dense_layers=1,
        num_experts=3,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        use_expert_bias=True,
    )
    model = init_random(cfg, seed=9)
    save_checkpoint(model, tmp_path / "f")
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "f" / "model.safetensors")
    p = "model.layers.1.feed_forward.experts"
    sd[f"{p}.gate_up_proj"] = torch.stack(
        [torch.cat([sd.pop(f"{p}.{e}.w1.weight"), sd.pop(f"{p}.{e}.w3.weight")]) for e in range(3)]
    )
    sd[f"{p}.down_proj"] = torch.stack([sd.pop(f"{p}.{e}.w2.weight") for e in range(3)])
    save_file(sd, tmp_path / "f" / "model.safetensors")
    _same(load_model(tmp_path / "f").model, model)


def test_missing_folder():
    with pytest.raises(UserError, match="not found"):
        load_model("/definitely/not/here")


def test_missing_config(ckpt):
    folder, _ = ckpt
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json not found"):
        load_model(folder)


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_hf_dict()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(ckpt, damage):
    folder, _ = ckpt
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00garbage" * 10, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder)


def test_config_that_does_not_match_weights_names_the_tensor(ckpt):
    folder, _ = ckpt
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.0\.feed_forward\.w1\.weight has shape \[96, 64\]"
    ):
        load_model(folder)


def test_missing_and_unexpected_tensors_are_named(ckpt, tmp_path):
    folder, _ = ckpt
    cfg = json.loads((folder / "config.json").read_text())
    cfg["layer_types"] = ["conv", "conv", "conv"]
    cfg["full_attn_idxs"] = []
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.1\.conv"):
        load_model(folder)


def test_missing_shard(tmp_path):
    save_checkpoint(init_random(CFG), tmp_path / "s", max_shard_bytes=20_000)
    shard = sorted((tmp_path / "s").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(tmp_path / "s")


def test_unknown_preset_is_a_user_error():
    with pytest.raises(UserError, match="unknown preset"):
        load_model("random:lfm2-9000b")


@pytest.mark.slow
def test_random_source_is_marked_and_seeded():
    a, b = load_model("random:lfm2.5-230m"), load_model("random:lfm2.5-230m")
    assert a.random and a.identity()["random_weights"] and a.identity()["weights_sha256"] is None
    assert torch.equal(
        a.model.model.layers[2].self_attn.q_proj.weight, b.model.model.layers[2].self_attn.q_proj.weight
    )


def test_random_model_refuses_what_does_not_fit_in_memory():
    from lfm_export.loading import random_model

    with pytest.raises(UnsupportedError, match="GB"):
        random_model("lfm2.5-8b-a1b", dtype=torch.float64)


def test_chat_template_sources(ckpt):
    from lfm_export.loading import read_chat_template

    folder, _ = ckpt
    assert read_chat_template(folder) is None
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert read_chat_template(folder) == "{{ messages }}"
    (folder / "chat_template.jinja").write_text("J")
    assert read_chat_template(folder) == "J"
    shutil.rmtree(folder)
