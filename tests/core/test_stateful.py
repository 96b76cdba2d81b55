"""State held inside the program (the ExecuTorch / Core ML form), its signature, and module swaps before export."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CONFIG as CFG
from conftest import TINY_MOE_CONFIG as MOE
from torch import Tensor, nn

from lfm_export.contract.signature import STATEFUL, IOSignature
from lfm_export.loading import init_random, load_model
from lfm_export.model import SDPA, Attention, KVUpdate, Rope
from lfm_export.signature import build_signature
from lfm_export.stateful import StatefulModule, held_buffer_name, read_held_state
from lfm_export.trace import (
    SignatureModule,
    apply_swaps,
    example_inputs,
    export_program,
    export_stateful_program,
)

MAX_SEQ, MAX_PREFILL = 48, 16


@pytest.fixture(scope="module")
def bundled():
    return {name: load_model(name).model for name in ("tiny", "tiny-moe")}


def _growing_state_by_name(model, conv, keys, values) -> dict[str, Tensor]:
    cfg = model.config
    out = {f"past.{i}.conv": c for i, c in zip(cfg.conv_layers, conv, strict=True)}
    for i, k, v in zip(cfg.attn_layers, keys, values, strict=True):
        out[f"past_key_values.{i}.key"] = k
        out[f"past_key_values.{i}.value"] = v
    return out


def _assert_held_matches(held: dict[str, Tensor], want: dict[str, Tensor], length: int) -> None:
    """Relative too: deep conv states reach |40| on the bundled models, where fp32 op order differs by 2e-5."""
    assert set(held) == set(want)
    for name, w in want.items():
        got = held[name] if name.endswith(".conv") else held[name][:, :, :length]
        torch.testing.assert_close(got, w, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("name", "moe_form"), [("tiny", "dense"), ("tiny-moe", "dense"), ("tiny-moe", "sparse")]
)
def test_exported_stateful_program_matches_growing_form(bundled, name, moe_form):
    """Prefill, decode, chunked prefill, then a new sequence at position 0 after the first one, through the
    exported program (`ep.module()`), against the growing-KV form fed the same chunks."""
    model = bundled[name]
    model.set_moe_form(moe_form)
    try:
        program = export_stateful_program(model, MAX_SEQ, MAX_PREFILL)
    finally:
        model.set_moe_form("dense")
    module = program.module()
    sig = build_signature(model.config, STATEFUL, MAX_SEQ, max_prefill=MAX_PREFILL)
    gen = torch.Generator().manual_seed(5)
    first = torch.randint(0, model.config.vocab_size, (1, 30), generator=gen)
    second = torch.randint(0, model.config.vocab_size, (1, 7), generator=gen)
    # prefill 9, three decode steps, chunked prefill 5 + 13 (30 positions), then a fresh sequence of 7 + 1
    calls = [
        (first, 0, 9),
        (first, 9, 10),
        (first, 10, 11),
        (first, 11, 12),
        (first, 12, 17),
        (first, 17, 30),
    ]
    calls += [(second, 0, 6), (second, 6, 7)]
    state = model.empty_state(1)
    with torch.no_grad():
        for ids, a, b in calls:
            if a == 0:
                state = model.empty_state(1)
                if ids is second:  # the previous sequence left a conv state the program must clear itself
                    assert read_held_state(module, sig)["past.0.conv"].abs().sum() > 0
            want, *state = model(ids[:, a:b], *state)
            got = module(ids[:, a:b], torch.tensor([a]))
            assert got.shape == (1, b - a, model.config.vocab_size)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            _assert_held_matches(read_held_state(module, sig), _growing_state_by_name(model, *state), b)


def test_stateful_program_holds_and_mutates_only_its_buffers():
    model = init_random(MOE, seed=6)
    program = export_stateful_program(model, MAX_SEQ, MAX_PREFILL)
    sig = build_signature(MOE, STATEFUL, MAX_SEQ, max_prefill=MAX_PREFILL)
    functional = program.run_decompositions({})
    assert list(functional.graph_signature.user_inputs) == ["input_ids", "input_pos"]
    mutated = set(functional.graph_signature.buffers_to_mutate.values())
    assert mutated == {held_buffer_name(s.name) for s in sig.held}
    # tracing ran on fake tensors: a fresh module's buffers are all zero
    eager = StatefulModule(model, sig)
    assert all(float(t.abs().sum()) == 0 for t in read_held_state(eager, sig).values())
    with pytest.raises(AssertionError, match="<= 16"):  # past max_prefill: the dynamic axis is bounded
        program.module()(torch.zeros(1, MAX_PREFILL + 1, dtype=torch.int64), torch.tensor([0]))


def test_stateful_signature_describes_held_state():
    sig = build_signature(CFG, STATEFUL, 128, max_prefill=32)
    assert sig.form == "stateful" and sig.max_seq_len == 128 and sig.max_prefill == 32
    assert sig.input_names == ["input_ids", "input_pos"] and sig.output_names == ["logits"]
    assert sig.inputs[0].shape == (1, "sequence_length") and sig.inputs[1].shape == (1,)
    assert sig.outputs[0].shape == (1, "sequence_length", CFG.vocab_size)
    assert [(s.name, s.shape, s.role, s.layer) for s in sig.held] == [
        ("past.0.conv", (1, 64, 2), "conv", 0),
        ("past_key_values.1.key", (1, 2, 128, 16), "key", 1),
        ("past_key_values.1.value", (1, 2, 128, 16), "value", 1),
        ("past.2.conv", (1, 64, 2), "conv", 2),
        ("past.3.conv", (1, 64, 2), "conv", 3),
        ("past_key_values.4.key", (1, 2, 128, 16), "key", 4),
        ("past_key_values.4.value", (1, 2, 128, 16), "value", 4),
    ]
    assert sig.state_inputs() == [] and sig.state_outputs() == []
    assert IOSignature.from_dict(sig.to_dict()) == sig
    assert build_signature(CFG, STATEFUL, 128).max_prefill == 128
    # a manifest written before `held` existed still loads
    old = build_signature(CFG, "static", 64).to_dict()
    del old["held"], old["max_prefill"]
    assert IOSignature.from_dict(old) == build_signature(CFG, "static", 64)
    with pytest.raises(ValueError, match="needs max_seq_len"):
        build_signature(CFG, STATEFUL)
    with pytest.raises(ValueError, match="max_prefill"):
        build_signature(CFG, STATEFUL, 16, max_prefill=32)
    with pytest.raises(ValueError, match="export_stateful_program"):
        export_program(init_random(CFG), sig)


# ---- module swaps ---------------------------------------------------------------------------------------------
@torch.library.custom_op("lfm_export_test::linear", mutates_args=())
def _custom_linear(x: Tensor, weight: Tensor) -> Tensor:
    return F.linear(x, weight)


@_custom_linear.register_fake
def _(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class CustomLinear(nn.Module):
    """What a backend's quantized linear would be: its own op, over the original weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        assert linear.bias is None
        self.weight = linear.weight

    def forward(self, x: Tensor) -> Tensor:
        return _custom_linear(x, self.weight)


def _to_custom(m: nn.Module) -> nn.Module | None:
    return CustomLinear(m) if isinstance(m, nn.Linear) else None


def _custom_calls(program: torch.export.ExportedProgram) -> int:
    return sum(n.target == torch.ops.lfm_export_test.linear.default for n in program.graph.nodes)


def test_swaps_reach_the_exported_graph_and_leave_the_model_untouched():
    model = init_random(MOE, seed=7)
    before = {n: (type(m), id(m)) for n, m in model.named_modules()}
    weights = {n: p.data_ptr() for n, p in model.named_parameters()}
    sig = build_signature(MOE, "growing")
    program = export_program(model, sig, swaps=[_to_custom])
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert _custom_calls(program) == linears  # every linear (tied lm_head included) runs the custom op
    assert not any(n.target == torch.ops.aten.linear.default for n in program.graph.nodes)
    assert {n: (type(m), id(m)) for n, m in model.named_modules()} == before
    # the copy shared the weights: the program's parameters are the model's tensors
    shared = {n.removeprefix("model."): p.data_ptr() for n, p in program.state_dict.items()}
    assert {n: shared[n] for n in weights} == weights
    args = example_inputs(sig, batch=1, seq=4, past=3)
    with torch.no_grad():
        for got, want in zip(program.module()(*args), SignatureModule(model, sig)(*args), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_swaps_apply_in_order_and_to_the_stateful_program():
    model = init_random(CFG, seed=8)
    seen: list[str] = []

    def attention_marker(m: nn.Module) -> nn.Module | None:
        if isinstance(m, Attention):
            seen.append(type(m).__name__)
        return None  # leave it, look inside: the linears in it are still swapped by the next swap

    program = export_stateful_program(model, MAX_SEQ, MAX_PREFILL, swaps=[attention_marker, _to_custom])
    assert seen == ["Attention", "Attention"]
    assert _custom_calls(program) == sum(isinstance(m, nn.Linear) for m in model.modules())
    assert not any(isinstance(m, CustomLinear) for m in model.modules())


def _pieces(model: nn.Module) -> list[tuple[type, type, type]]:
    return [
        (type(m.rope), type(m.kv_update), type(m.attend)) for m in model.modules() if isinstance(m, Attention)
    ]


def test_backend_swaps_replace_only_their_attention_pieces():
    """Each backend swaps the pieces of the canonical attention it computes its own way; the attention, its
    weights and the model are left as they are."""
    from lfm_export.backends.coreml.modules import SliceWriteKV, slice_write_attention
    from lfm_export.backends.executorch.attention import (
        CustomOpKVUpdate,
        CustomSDPA,
        SeqFirstRope,
        custom_op_attention,
    )
    from lfm_export.backends.qnn.attention import MaskedProbsSDPA

    model = init_random(CFG, seed=9)
    cases = {
        slice_write_attention: (Rope, SliceWriteKV, SDPA),
        custom_op_attention: (SeqFirstRope, CustomOpKVUpdate, CustomSDPA),
        MaskedProbsSDPA.swap: (Rope, KVUpdate, MaskedProbsSDPA),
    }
    for swap, pieces in cases.items():
        swapped = apply_swaps(model, [swap])
        assert _pieces(swapped) == [pieces] * len(CFG.attn_layers)
        assert [type(m) for m in swapped.modules() if isinstance(m, Attention)] == [Attention] * len(
            CFG.attn_layers
        )
        assert {n: p.data_ptr() for n, p in swapped.named_parameters()} == {
            n: p.data_ptr() for n, p in model.named_parameters()
        }
    assert _pieces(model) == [(Rope, KVUpdate, SDPA)] * len(CFG.attn_layers)


def test_core_ml_pieces_match_the_canonical_stateful_module():
    """Core ML's slice-write KV update and `buf[:] = new` conv write-back, run eagerly, against the canonical
    stateful module: prefill, decode, then a new sequence."""
    from lfm_export.backends.coreml.modules import CoreMLStatefulModule, slice_write_attention

    model = init_random(CFG, seed=10)
    sig = build_signature(CFG, STATEFUL, MAX_SEQ, max_prefill=MAX_PREFILL)
    canonical = StatefulModule(model, sig)
    coreml = CoreMLStatefulModule(apply_swaps(model, [slice_write_attention]), sig)
    ids = torch.randint(0, CFG.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for a, b in [(0, 9), (9, 10), (10, 12), (0, 5)]:
            pos = torch.tensor([a])
            torch.testing.assert_close(coreml(ids[:, a:b], pos), canonical(ids[:, a:b], pos), atol=0, rtol=0)
            for name, held in read_held_state(coreml, sig).items():
                torch.testing.assert_close(held, read_held_state(canonical, sig)[name], atol=0, rtol=0)
