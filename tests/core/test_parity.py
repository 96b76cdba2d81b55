"""Parity core: the reference passes against itself, and deliberately broken sessions are caught and named."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch
from broken_sessions import DropsConvState, KvOneOff

from lfm_export.config import Lfm2Config
from lfm_export.contract.errors import ContextLimitError, UnsupportedError, UserError
from lfm_export.loading import init_random
from lfm_export.parity import (
    EXACTNESS,
    GATES,
    QUALITY,
    SCHEMA_VERSION,
    ScenarioOptions,
    exit_code,
    gate_for,
    gates_markdown,
    random_prompts,
    run_parity,
    to_json,
    to_markdown,
    tokenizer_prompts,
    write_reports,
)
from lfm_export.parity.metrics import (
    greedy_match_length,
    kl_divergence,
    log_softmax,
    logit_metrics,
    state_max_abs,
)
from lfm_export.parity.reference import ReferenceSession
from lfm_export.signature import build_signature

pytestmark = pytest.mark.unit

torch.set_num_threads(1)

ALL = ["prefill", "decode", "chunked_prefill", "batch2", "near_max_seq_len", "long_context"]
OPTS = ScenarioOptions(fill_chunk=16)
MAX_SEQ = 40


@pytest.fixture(scope="module")
def model():
    """Random 2 conv + 2 attention model, rescaled to unit-variance activations so every block matters
    (with init_random's std 0.02 a 3% weight error would move the logits by less than 1e-5)."""
    cfg = Lfm2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=("conv", "full_attention", "conv", "full_attention"),
    )
    m = init_random(cfg, seed=0)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(p.shape[1] ** -0.5 / 0.02)
            elif p.dim() == 3:
                p.mul_(0.5 / 0.02)
    return m


@pytest.fixture(scope="module")
def ref(model):
    return ReferenceSession(model)


# ---- broken sessions ---------------------------------------------------------------------------------
class ForgetsChunks(ReferenceSession):
    """(d) a multi-token prefill after the first call starts from an empty state (the position count is kept)."""

    def prefill(self, tokens):
        if np.asarray(tokens).shape[1] > 1 and self.position > 0:
            self.conv_states, self.keys, self.values = self.model.empty_state(self.batch_size)
        return super().prefill(tokens)


class NoBatch(ReferenceSession):
    supports_batch = False


class CrashesOnDecode(ReferenceSession):
    def decode(self, tokens):
        raise RuntimeError("decode kernel missing")


class NanLogits(ReferenceSession):
    def decode(self, tokens):
        out = super().decode(tokens)
        out[:, 3] = np.nan
        return out


def rescaled(model, layer: int, factor: float):
    """(c) a deep copy with one layer's mixer out_proj scaled by `factor`."""
    bad = copy.deepcopy(model)
    mixer = bad.model.layers[layer]
    proj = mixer.self_attn.out_proj if mixer.is_attention else mixer.conv.out_proj
    with torch.no_grad():
        proj.weight.mul_(factor)
    return bad


def rounded(model, dtype: torch.dtype):
    """A slightly noisy model: every weight rounded through `dtype` (what fp16 storage does)."""
    q = copy.deepcopy(model)
    with torch.no_grad():
        for p in q.parameters():
            p.copy_(p.to(dtype).float())
    return q


def failing(result, part: str | None = None) -> set[tuple[str, str]]:
    return {(c.scenario, c.metric) for c in result.failures if part is None or c.part == part}


def logit_failures(result) -> set[str]:
    return {c.scenario for c in result.failures if c.metric in ("logit_max_abs", "top1_agreement")}


# ---- the reference -------------------------------------------------------------------------------------
def test_reference_state_uses_signature_names(model, ref):
    ref.reset(2)
    ref.prefill(np.arange(10, dtype=np.int64).reshape(2, 5))
    state = ref.state()
    sig = build_signature(model.config)
    assert sorted(state) == sorted(s.name for s in sig.state_inputs())
    assert state["past.0.conv"].shape == (2, 64, 2)
    assert state["past_key_values.1.key"].shape == (2, 2, 5, 16)
    assert ref.position == 5


def test_reference_enforces_max_seq_len_and_shapes(model):
    s = ReferenceSession(model, max_seq_len=8)
    s.prefill(np.zeros((1, 6), dtype=np.int64))
    s.decode(np.zeros(1, dtype=np.int64))
    s.decode(np.zeros(1, dtype=np.int64))
    with pytest.raises(ContextLimitError, match="max_seq_len 8"):
        s.decode(np.zeros(1, dtype=np.int64))
    with pytest.raises(ValueError, match="batch 2"):
        s.reset(1)
        s.prefill(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="fp32"):
        ReferenceSession(copy.deepcopy(model).half())


def test_reference_against_itself_passes(model, ref):
    test = ReferenceSession(model, name="self", max_seq_len=MAX_SEQ)
    result = run_parity(test, ref, "fp32", options=OPTS)
    assert result.passed, [c.describe() for c in result.failures]
    assert exit_code(result) == 0
    assert [s.name for s in result.scenarios] == ALL + ["pooled", "snapshots"]
    assert all(s.status == "ok" for s in result.scenarios if s.name != "long_context")
    assert result.scenario("snapshots").metrics == {"restore_decode_rel": 0.0, "prefix_reuse_rel": 0.0}
    assert "ends before position 8192" in result.scenario("long_context").reason
    decode = result.scenario("decode").metrics
    assert decode["greedy_match"] == decode["greedy_steps"] == 17
    assert result.scenario("chunked_prefill").details["chunks"] == [8, 12, 4]
    assert result.scenario("near_max_seq_len").details["fill"] == MAX_SEQ - 2
    assert test.position == MAX_SEQ
    for s in (s for s in result.scenarios if s.status == "ok" and s.name != "snapshots"):
        assert s.metrics["logit_max_abs"] <= 1e-4 and s.metrics["top1_agreement"] == 1.0


def test_skips_are_reported_with_reasons(model, ref):
    result = run_parity(NoBatch(model, name="nobatch"), ref, "fp32")
    assert result.passed
    assert result.scenario("batch2").status == "skipped"
    assert "does not support batch" in result.scenario("batch2").reason
    assert "no fixed max_seq_len" in result.scenario("near_max_seq_len").reason
    md = to_markdown(result)
    assert "### Skipped scenarios" in md and "batch2: nobatch does not support batch > 1" in md


# ---- broken sessions are caught ------------------------------------------------------------------------
def test_dropped_conv_state_fails_decode_and_chunked_prefill(model, ref):
    result = run_parity(DropsConvState(model, name="drop-conv"), ref, "fp32")
    assert not result.passed and exit_code(result) == 1
    assert {"decode", "chunked_prefill", "batch2"} <= logit_failures(result)
    assert "prefill" not in logit_failures(result)  # one call from an empty state is still right...
    assert ("prefill", "state_max_abs") in failing(result)  # ...but the state it leaves behind is not
    md = to_markdown(result)
    assert md.startswith("**FAIL**")
    assert "decode: logit_max_abs =" in md and "chunked_prefill: top1_agreement =" in md


def test_kv_one_position_off_fails_decode(model, ref):
    result = run_parity(KvOneOff(model, name="kv-off", max_seq_len=MAX_SEQ), ref, "fp32", options=OPTS)
    assert not result.passed
    assert {"decode", "chunked_prefill", "batch2", "near_max_seq_len"} <= logit_failures(result)
    assert "prefill" not in {c.scenario for c in result.failures}
    assert result.scenario("decode").metrics["logit_max_abs"] > 1e-2


def test_misscaled_weight_fails_prefill_too(model, ref):
    for layer in (0, 1):  # a conv and an attention out_proj
        bad = ReferenceSession(rescaled(model, layer, 1.03), name=f"scaled-{layer}")
        result = run_parity(bad, ref, "fp32")
        assert {"prefill", "decode", "chunked_prefill", "batch2"} <= {c.scenario for c in result.failures}
        assert ("prefill", "logit_max_abs") in failing(result)
        assert result.scenario("prefill").metrics["logit_max_abs"] > 1e-3
        assert "prefill: logit_max_abs =" in to_markdown(result)


def test_forgotten_chunk_state_fails_only_chunked_scenarios(model, ref):
    """...and the snapshot scenario, which prefills a conversation after a restored prefix (a chunk)."""
    result = run_parity(ForgetsChunks(model, name="forgets", max_seq_len=MAX_SEQ), ref, "fp32", options=OPTS)
    assert not result.passed
    assert {c.scenario for c in result.failures if c.part == EXACTNESS} == {
        "chunked_prefill",
        "near_max_seq_len",
        "snapshots",
    }
    assert ("chunked_prefill", "logit_max_abs") in failing(result)
    assert result.verdict().startswith("FAILED: exactness FAILED: the artifact does not compute its recipe")


def test_crash_and_nan_are_failures_not_exceptions(model, ref):
    result = run_parity(CrashesOnDecode(model, name="crash"), ref, "fp32", scenarios=["prefill", "decode"])
    assert not result.passed
    assert result.scenario("prefill").status == "ok"
    assert result.scenario("decode").status == "error"
    assert "decode kernel missing" in result.scenario("decode").reason
    md = to_markdown(result)
    assert "decode: error (RuntimeError: decode kernel missing)" in md and "| decode | ERROR |" in md

    result = run_parity(NanLogits(model, name="nan"), ref, "int4", scenarios=["decode"])
    assert ("decode", "finite") in failing(result) and ("decode", "kl_max") in failing(result)
    assert json.dumps(to_json(result), allow_nan=False)  # NaN is written as null, still valid JSON


def test_quantized_gates_split_exactness_from_quality(model, ref):
    """A lossy but honest "artifact" (fp16-rounded weights, run beside its own simulation) passes exactness at
    every quantized gate and reports its loss against fp32; the same weights with broken state handling fail
    exactness; a strict --max-kl fails only the quality part."""
    noisy = rounded(model, torch.float16)
    sim = ReferenceSession(noisy, name="simulated")
    strict = run_parity(ReferenceSession(noisy, name="fp16-weights"), ref, "fp32", scenarios=["prefill"])
    assert not strict.passed and ("prefill", "logit_max_abs") in failing(strict, EXACTNESS)
    for recipe in ("fp16", "int8", "int4-b32"):
        result = run_parity(ReferenceSession(noisy, name="fp16-weights"), ref, recipe, simulation=sim)
        assert result.passed, (recipe, [c.describe() for c in result.failures])
        assert {c.metric for c in result.checks if c.part == EXACTNESS} >= {
            "logit_max_rel",
            "kl_max",
            "top1_decisive",
        }
        assert result.scenario("prefill").metrics["logit_max_abs"] == 0.0  # same math as its simulation
        assert result.pooled()["kl_mean"] > 0  # ...and a real loss against fp32, reported
        assert result.pooled(result.recipe_loss)["kl_mean"] == pytest.approx(
            result.pooled()["kl_mean"], rel=1e-3
        )
    broken = run_parity(DropsConvState(noisy, name="drop-conv"), ref, "int8", simulation=sim)
    assert not broken.part_passed(EXACTNESS)
    assert ("decode", "kl_max") in failing(broken, EXACTNESS) and ("decode", "logit_max_rel") in failing(
        broken
    )

    from lfm_export.parity import quality_gate

    lossy = run_parity(
        ReferenceSession(noisy, name="fp16-weights"),
        ref,
        "int4",
        simulation=sim,
        quality=quality_gate("int4", 1e-9),
    )
    assert lossy.part_passed(EXACTNESS) and not lossy.part_passed(QUALITY) and exit_code(lossy) == 1
    assert failing(lossy) == {("pooled", "kl_mean")}
    assert (
        lossy.verdict()
        == "FAILED: exactness passed; quality FAILED: the recipe is too lossy for --max-kl 1e-09"
    )
    md = to_markdown(lossy)
    assert md.startswith("**FAIL**") and "quality: pooled: kl_mean" in md


def test_top1_decisive_ignores_near_ties_only():
    from lfm_export.parity.metrics import top1_decisive

    ref = np.array([[2.0, 1.99, 0.0], [5.0, 0.0, 0.0]])
    flipped_tie = np.array([[1.99, 2.0, 0.0], [5.0, 0.0, 0.0]])
    flipped_clear = np.array([[2.0, 1.99, 0.0], [0.0, 5.0, 0.0]])
    assert top1_decisive(ref, flipped_tie) == 1.0
    assert top1_decisive(ref, flipped_clear) == 0.0
    flat = np.zeros((3, 5))
    assert top1_decisive(flat, flat[:, ::-1] + np.arange(5)) is None  # no decisive position: not 1.0
    m = logit_metrics(flat, flat + np.arange(5))
    assert m["decisive"] == 0 and m["top1_decisive"] is None


# ---- gates, prompts, reports ---------------------------------------------------------------------------
def test_gate_lookup():
    assert gate_for("fp32") is GATES["fp32"]
    assert gate_for("int4-b32").name == "int4"
    assert gate_for("INT8_per_channel").name == "int8"
    with pytest.raises(UnsupportedError, match="'q3'"):
        gate_for("q3")
    fp32 = {lim.metric: lim.value for lim in GATES["fp32"].limits}
    assert fp32["logit_max_abs"] == 1e-4 and fp32["top1_agreement"] == 1.0
    assert "| int4 |" in gates_markdown()


def test_docs_list_the_gates_in_force():
    """The gate table lives in docs/parity.md (the README links to it), backends' own gates included."""
    from pathlib import Path

    from lfm_export.backends import all_backends

    all_backends()  # registers the gates the backends declare
    doc = (Path(__file__).resolve().parents[2] / "docs" / "parity.md").read_text()
    assert gates_markdown() in doc, "docs/parity.md gate table is stale: paste gates_markdown() into it"


def test_bad_requests_raise_user_errors(model, ref):
    other = ReferenceSession(model, name="other")
    with pytest.raises(ValueError, match="two objects"):
        run_parity(ref, ref, "fp32")
    with pytest.raises(UserError, match="'warmup'"):
        run_parity(other, ref, "fp32", scenarios=["warmup"])
    with pytest.raises(UserError, match="at least 8"):
        run_parity(other, ref, "fp32", prompts=[np.arange(4)])
    with pytest.raises(UserError, match=r"\[0, 256\)"):
        run_parity(other, ref, "fp32", prompts=[np.arange(250, 262)])


def test_prompts_random_and_tokenized(tmp_path):
    a, b = random_prompts(256), random_prompts(256)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(p.size >= 8 and p.max() < 256 and p.dtype == np.int64 for p in a)

    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "the quick brown fox jumps over lazy dog while river keeps flowing".split()
    tok = Tokenizer(
        models.WordLevel({w: i + 1 for i, w in enumerate(words)} | {"<unk>": 0}, unk_token="<unk>")
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    ids = tokenizer_prompts(path, 256)
    assert len(ids) == 4 and ids[0][:4].tolist() == [0, 2, 3, 4]  # "The" is not in the vocabulary
    with pytest.raises(UserError, match="vocabulary is 5"):
        tokenizer_prompts(path, 5)


def test_reports(model, ref, tmp_path):
    bad = ReferenceSession(rescaled(model, 2, 1.03), name="scaled")
    meta = {"backend": "onnx", "artifact": {"path": "out/model.onnx", "sha256": "ab12"}}
    result = run_parity(bad, ref, "fp32", scenarios=["prefill", "decode"], metadata=meta)
    md_path, json_path = write_reports(result, tmp_path / "reports")
    assert md_path.name == "parity.md" and json_path.name == "parity.json"
    md = md_path.read_text()
    assert md.splitlines()[0].startswith(
        "**FAIL** parity of `scaled`, recipe `fp32`: FAILED: exactness FAILED: the artifact does not compute its recipe"
    )
    assert "## (a) Exactness: `scaled` against `reference`" in md and "## (b) Quality" in md
    assert "**" in md.split("| prefill | FAIL |")[1].splitlines()[0] and "✗" in md
    assert "- `logit_max_abs <= 0.0001 (every scenario)`" in md and '"sha256": "ab12"' in md
    data = json.loads(json_path.read_text())
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert data["passed"] is False and data["recipe"] == "fp32" and data["gate"] == "fp32"
    assert data["exactness"]["passed"] is False and data["quality"]["against"] == "reference"
    assert [s["name"] for s in data["quality"]["scenarios"]] == ["prefill", "decode", "pooled"]
    assert data["metadata"] == meta
    assert {"metric": "logit_max_abs", "op": "<=", "limit": 1e-4, "scenarios": None} in data["thresholds"]
    assert [s["name"] for s in data["scenarios"]] == ["prefill", "decode", "pooled", "snapshots"]
    pooled = data["scenarios"][2]
    assert pooled["details"]["of"] == ["prefill", "decode"]
    assert pooled["metrics"]["positions"] == sum(s["metrics"]["positions"] for s in data["scenarios"][:2])
    assert not any(
        c["scenario"] == "pooled" for c in data["checks"] if c["part"] == EXACTNESS
    )  # per scenario
    assert {"logit_max_abs", "kl_mean", "kl_p99", "kl_max", "cosine_mean", "top1_agreement"} <= set(
        data["scenarios"][0]["metrics"]
    )
    assert data["scenarios"][1]["metrics"]["greedy_steps"] == 17
    fail = next(c for c in data["checks"] if c["scenario"] == "prefill" and c["metric"] == "logit_max_abs")
    assert (
        fail
        == {
            "scenario": "prefill",
            "metric": "logit_max_abs",
            "value": fail["value"],
            "op": "<=",
            "limit": 1e-4,
            "passed": False,
            "part": EXACTNESS,
        }
        and fail["value"] > 1e-4
    )
    ok = run_parity(ReferenceSession(model, name="same"), ref, "fp32", scenarios=["prefill"])
    assert to_markdown(ok).startswith("**PASS**") and to_json(ok)["passed"] is True


# ---- metrics ------------------------------------------------------------------------------------------------
def test_metric_math():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(5, 50))
    t = r + rng.normal(scale=0.1, size=r.shape)
    p, q = np.exp(r) / np.exp(r).sum(-1, keepdims=True), np.exp(t) / np.exp(t).sum(-1, keepdims=True)
    np.testing.assert_allclose(kl_divergence(r, t), (p * np.log(p / q)).sum(-1), rtol=1e-10)
    assert np.all(kl_divergence(r, r) == 0)
    big = np.array([[1e4, 0.0, -1e4]])
    assert np.isfinite(log_softmax(big)).all() and abs(log_softmax(big)[0, 0]) < 1e-12
    m = logit_metrics(r, t)
    assert m["logit_max_abs"] == pytest.approx(np.abs(r - t).max())
    assert m["logit_max_rel"] == pytest.approx(np.abs(r - t).max() / np.abs(r).max())
    assert 0.99 < m["cosine_mean"] < 1.0 and m["kl_mean"] <= m["kl_p99"] <= m["kl_max"]
    steps = np.eye(4)
    swapped = steps[[0, 1, 3, 2]]
    assert greedy_match_length(steps, steps) == 4 and greedy_match_length(steps, swapped) == 2


def test_state_compare_aligns_static_kv():
    ref = {"past_key_values.1.key": np.ones((1, 2, 5, 4)), "past.0.conv": np.ones((1, 8, 2))}
    static = {
        "past_key_values.1.key": np.concatenate([np.ones((1, 2, 5, 4)), np.zeros((1, 2, 3, 4))], 2),
        "past.0.conv": np.ones((1, 8, 2), dtype=np.float16),
    }
    assert state_max_abs(ref, static, position=5)[0] == 0.0
    err, info = state_max_abs(ref, {"past.0.conv": np.ones((1, 8, 2))}, position=5)
    assert err == float("inf") and "past_key_values.1.key missing in test" in info["problems"]
    assert state_max_abs(ref, None, position=5)[0] is None


def test_state_error_in_steps_of_its_grid():
    """A quantized state's error counted in steps of the grid it is written on: the same absolute error is one
    step of a coarse grid and 100 of a fine one, whatever the prompt's largest value; the 99th percentile per
    position leaves out the one slot of 40 that is far off, the maximum does not."""
    rng = np.random.default_rng(0)
    ref = {"past_key_values.1.key": rng.normal(size=(1, 2, 40, 4)), "past.0.conv": np.ones((1, 8, 2))}
    test = {k: v.copy() for k, v in ref.items()}
    test["past_key_values.1.key"][0, 1, :, 2] += 0.01  # every slot 0.01 off
    test["past_key_values.1.key"][0, 0, 7, 3] += 0.5  # one slot 0.5 off
    test["past.0.conv"][0, 3, 1] += 0.02
    steps = {"past_key_values.1.key": 1e-4, "past.0.conv": 0.02}
    _, info = state_max_abs(ref, test, position=40, steps=steps)
    assert info["max_steps"] == pytest.approx(5000) and info["p99_steps"] == pytest.approx(100)
    _, coarse = state_max_abs(ref, test, position=40, steps={"past_key_values.1.key": 0.5})
    assert coarse["max_steps"] == pytest.approx(1.0)  # the conv state has no step: left out
    assert "max_steps" not in state_max_abs(ref, test, position=40)[1]


def test_parity_core_is_torch_free():
    import subprocess

    code = "import sys, lfm_export.parity as p; p.run_parity; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
