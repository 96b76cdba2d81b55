"""The canonical model against transformers, and its own state semantics (chunked, static, batch)."""

import dataclasses

import pytest
import torch
from conftest import TINY_CONFIG as CFG
from conftest import TINY_MOE_CONFIG as MOE

from lfm_export.check import run_check
from lfm_export.loading import init_random, load_model
from lfm_export.model import MoE
from lfm_export.signature import build_signature
from lfm_export.trace import SignatureModule, example_inputs, export_program


@pytest.mark.parametrize("name", ["dense_odd", "dense_attn_first_hd32", "moe_dense_first", "liquid_bf16"])
def test_canonical_matches_transformers(hf_checkpoints, name):
    loaded = load_model(hf_checkpoints[name])
    prompt = [1, 17, 42, 99, 3, 250, 7, 8, 120, 64, 5]
    result = run_check(loaded, prompt, decode_steps=32)
    assert result.passed, result.parts
    assert result.max_abs_error <= 1e-4
    assert set(result.parts) == {"prefill", "decode", "chunked_prefill"}
    assert result.greedy_match


def test_check_catches_a_wrong_weight(hf_checkpoints):
    loaded = load_model(hf_checkpoints["dense_odd"])
    with torch.no_grad():
        loaded.model.model.layers[1].self_attn.out_proj.weight.mul_(1.05)
    result = run_check(loaded, [1, 5, 9, 13, 21], decode_steps=4)
    assert not result.passed and result.parts["prefill"] > 1e-4


@pytest.mark.parametrize("cfg", [CFG, MOE], ids=["dense", "moe"])
def test_chunked_prefill_equals_full_prefill_both_forms(cfg):
    model = init_random(cfg, seed=3)
    ids = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, *_ = model(ids, *model.empty_state(2))
        for form in ("growing", "static"):
            state = model.empty_state(2, max_seq_len=32, form=form)
            outs, pos = [], 0
            for a, b in ((0, 5), (5, 6), (6, 13)):
                kw = {"input_pos": torch.tensor([pos])} if form == "static" else {}
                out, *state = model(ids[:, a:b], *state, form=form, **kw)
                outs.append(out)
                pos = b
            torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)


def test_conv_state_is_the_last_two_steps_of_bx():
    model = init_random(CFG, seed=1)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        _, conv, _, _ = model(ids, *model.empty_state(1))
        assert conv[0].shape == (1, CFG.hidden_size, 2)
        # feeding a zero state vs. the carried one changes the next step: state is really used
        a, *_ = model(ids[:, -1:], conv, *model.empty_state(1)[1:])
    assert conv[0].abs().sum() > 0 and a.isfinite().all()


def test_batch_rows_are_independent():
    model = init_random(CFG, seed=2)
    ids = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        both, *_ = model(ids, *model.empty_state(2))
        one, *_ = model(ids[1:], *model.empty_state(1))
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=0)


def test_signature_names_follow_genai_convention():
    sig = build_signature(CFG)
    assert sig.input_names == [
        "input_ids",
        "attention_mask",
        "past.0.conv",
        "past_key_values.1.key",
        "past_key_values.1.value",
        "past.2.conv",
        "past.3.conv",
        "past_key_values.4.key",
        "past_key_values.4.value",
    ]
    assert sig.output_names[0] == "logits" and sig.present_for("past.2.conv") == "present.2.conv"
    conv = sig.inputs[2]
    assert conv.shape == ("batch_size", 64, 2) and conv.dynamic_axes == {0: "batch_size"}
    static = build_signature(CFG, "static", 128)
    assert static.input_names[1] == "input_pos" and static.inputs[3].shape == ("batch_size", 2, 128, 16)
    assert type(sig).from_dict(sig.to_dict()) == sig


@pytest.mark.parametrize("form", ["growing", "static"])
def test_torch_export_is_dynamic_in_batch_seq_and_past(form):
    model = init_random(MOE, seed=4)
    sig = build_signature(MOE, form, 24 if form == "static" else None)
    program = export_program(model, sig)
    for batch, seq, past in ((1, 1, 5), (3, 7, 0), (2, 2, 9)):
        args = example_inputs(sig, batch=batch, seq=seq, past=past)
        got = program.module()(*args)
        want = SignatureModule(model, sig)(*args)
        assert got[0].shape == (batch, seq, MOE.vocab_size)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


# ---- sparse MoE form ------------------------------------------------------------------------------------------
def _moe_cfg(**kw):
    return dataclasses.replace(MOE, num_experts=6, num_experts_per_tok=3, **kw)


def _randomise_expert_bias(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for name, buf in model.named_buffers():
        if name.endswith("expert_bias"):
            buf.copy_(torch.randn(buf.shape, generator=gen) * 0.3)


@pytest.mark.parametrize(
    "cfg",
    [
        _moe_cfg(use_expert_bias=True, norm_topk_prob=True, routed_scaling_factor=2.5),
        _moe_cfg(use_expert_bias=True, norm_topk_prob=False, routed_scaling_factor=0.75),
        _moe_cfg(use_expert_bias=False, norm_topk_prob=False, routed_scaling_factor=1.0),
    ],
    ids=["bias-norm-scaled", "bias-unnormed-scaled", "plain"],
)
def test_sparse_moe_equals_dense_and_runs_only_selected_experts(cfg):
    model = init_random(cfg, seed=11)
    _randomise_expert_bias(model, seed=1)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    weights = {n: t.data_ptr() for n, t in model.state_dict().items()}
    rows = []
    hooks = [
        expert.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
        for moe in model.modules()
        if isinstance(moe, MoE)
        for expert in moe.experts
    ]
    with torch.no_grad():
        dense, *dense_state = model(ids, *model.empty_state(2))
        dense_rows, rows[:] = sum(rows), []
        model.set_moe_form("sparse")
        sparse, *sparse_state = model(ids, *model.empty_state(2))
        sparse_rows = sum(rows)
    for h in hooks:
        h.remove()
    moe_layers = cfg.num_hidden_layers - cfg.num_dense_layers
    assert dense_rows == moe_layers * cfg.num_experts * ids.numel()
    assert sparse_rows == moe_layers * cfg.num_experts_per_tok * ids.numel()
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=0)
    for s, d in zip(sparse_state, dense_state, strict=True):
        torch.testing.assert_close(s, d, atol=1e-5, rtol=0)
    assert {n: t.data_ptr() for n, t in model.state_dict().items()} == weights  # switching moved no weight
    with pytest.raises(ValueError, match="unknown MoE form"):
        model.set_moe_form("gathered")


def test_sparse_moe_on_bundled_model_prefill_and_decode():
    model = load_model("tiny-moe").model
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3))
    outs = {}
    with torch.no_grad():
        for form in ("dense", "sparse"):
            model.set_moe_form(form)
            logits, *state = model(ids[:, :16], *model.empty_state(1))
            steps = [logits]
            for t in range(16, 24):
                logits, *state = model(ids[:, t : t + 1], *state)
                steps.append(logits)
            outs[form] = torch.cat(steps, 1)
    model.set_moe_form("dense")
    torch.testing.assert_close(outs["sparse"], outs["dense"], atol=1e-5, rtol=0)


def test_sparse_moe_traces_with_dynamic_batch_seq_and_past():
    cfg = _moe_cfg(routed_scaling_factor=1.5)
    model = init_random(cfg, seed=12)
    _randomise_expert_bias(model, seed=2)
    sig = build_signature(cfg)
    model.set_moe_form("sparse")
    program = export_program(model, sig)
    model.set_moe_form("dense")
    targets = {n.target for n in program.graph.nodes}
    assert torch.ops.aten.nonzero.default in targets and torch.ops.aten.index_add.default in targets
    for batch, seq, past in ((1, 1, 5), (3, 7, 0), (2, 2, 9)):
        args = example_inputs(sig, batch=batch, seq=seq, past=past)
        with torch.no_grad():
            want = SignatureModule(model, sig)(*args)  # the dense form
            got = program.module()(*args)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
