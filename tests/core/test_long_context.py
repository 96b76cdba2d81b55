"""Long contexts: exports at a checkpoint's own 2048-token context pass parity through the end of the cache,
and artifacts that go wrong only at late positions fail it there.

The checkpoint is written by transformers with `initializer_range` 0.08 (the init under which fp16 errors in the
rotary angles first showed: keys off by up to 1.1 at 2k context in Core ML while every 32- to 128-token test
passed). The wrong artifacts are real: a Core ML program whose RoPE angles are computed in fp16 (what
coremltools' fp16 pass made of the canonical model), and a torch session that rounds positions through fp16
(exact below 2048), checked at positions past 8192 by `long_context`."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import DENSE_2K

import lfm_export.model as canonical
from lfm_export.config import Lfm2Config
from lfm_export.loading import init_random
from lfm_export.parity import ScenarioOptions, run_parity
from lfm_export.parity.reference import ReferenceSession
from lfm_export.parity.scenarios import LONG_CONTEXT
from lfm_export.pipeline import check_artifact, export_artifact
from lfm_export.progress import Progress

CONTEXT = DENSE_2K["max_position_embeddings"]


def failed_scenarios(result) -> set[str]:
    return {c.scenario for c in result.failures}


# ---- positions past 8k, and positions past 2048, in the parity core ------------------------------------------
def fp16_positions(positions: torch.Tensor, head_dim: int, theta: float):
    """RoPE at positions rounded through fp16: exact up to 2048, every second position up to 4096, ..."""
    return ROPE(positions.half().float(), head_dim, theta)


ROPE = canonical.rope_cos_sin


class Fp16Positions(ReferenceSession):
    """A runtime whose positions pass through fp16 before the rotary angles are computed."""

    def _forward(self, ids, conv, keys, values):
        with mock.patch.object(canonical, "rope_cos_sin", fp16_positions):
            return super()._forward(ids, conv, keys, values)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    cfg = Lfm2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        layer_types=("conv", "full_attention"),
    )
    m = init_random(cfg, seed=3)
    with torch.no_grad():  # unit-variance activations, so that the attention layer matters
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(p.shape[1] ** -0.5 / 0.02)
    return m


def test_long_context_compares_positions_past_8k_and_catches_late_errors(small_model) -> None:
    torch.set_num_threads(1)
    context = LONG_CONTEXT + 64
    opts = ScenarioOptions(fill_chunk=2048, full_context_limit=4096)
    names = ["prefill", "decode", "near_max_seq_len", "long_context"]
    ref = ReferenceSession(small_model)
    honest = run_parity(
        ReferenceSession(small_model, "self", context), ref, "fp32", scenarios=names, options=opts
    )
    assert honest.passed, [c.describe() for c in honest.failures]
    assert "full-context limit 4096" in honest.scenario("near_max_seq_len").reason
    run = honest.scenario("long_context")
    assert run.status == "ok" and run.details["last_position"] > LONG_CONTEXT

    broken = Fp16Positions(small_model, "fp16-positions", context)
    result = run_parity(broken, ref, "fp32", scenarios=names, options=opts)
    assert failed_scenarios(result) == {"long_context"}  # right at every position the short scenarios reach
    assert result.scenario("long_context").metrics["logit_max_abs"] > 1e-2


def test_long_context_defers_to_near_max_where_it_fills_the_context(small_model) -> None:
    ref = ReferenceSession(small_model)
    opts = ScenarioOptions(fill_chunk=256)
    short = run_parity(
        ReferenceSession(small_model, "s", 300), ref, "fp32", scenarios=["long_context"], options=opts
    )
    assert "ends before position 8192" in short.scenario("long_context").reason
    assert (
        "no fixed max_seq_len"
        in run_parity(ReferenceSession(small_model, "u"), ref, "fp32", scenarios=["long_context"])
        .scenario("long_context")
        .reason
    )


# ---- Core ML at the checkpoint's own context -------------------------------------------------------------
def export_coreml(model: Path, out: Path, quant: str, parity: bool = True):
    pytest.importorskip("coremltools")
    from lfm_export.backends.coreml.recipes import make_recipe

    torch.set_num_threads(2)
    return export_artifact(
        "coreml", str(model), out, make_recipe(quant), parity=parity, threads=2, progress=Progress(quiet=True)
    )


def test_coreml_fp16_passes_at_the_full_2k_context(dense_2k: Path, tmp_path: Path) -> None:
    outcome = export_coreml(dense_2k, tmp_path / "cm", "fp16")
    assert outcome.manifest["max_seq_len"] == CONTEXT  # the model's own context, not a test's
    assert outcome.passed, outcome.manifest["parity"]["verdict"]
    ran = outcome.manifest["parity"]["scenarios"]
    assert ran["near_max_seq_len"] == "ok" and ran["long_context"] == "skipped"
    near = json.loads((outcome.out / "parity" / "parity.json").read_text())
    near = next(s for s in near["scenarios"] if s["name"] == "near_max_seq_len")
    assert near["metrics"]["state_max_rel"] < 0.02  # keys were off by 0.23 of their scale with fp16 angles


def test_coreml_with_fp16_rotary_angles_fails_only_near_the_end(dense_2k: Path, tmp_path: Path) -> None:
    from lfm_export.backends.coreml import precision

    always = precision.ALWAYS_FP32 - {"cos", "sin"}
    with (
        mock.patch.object(precision, "ANGLE_OPS", frozenset()),
        mock.patch.object(precision, "ALWAYS_FP32", always),
    ):
        outcome = export_coreml(dense_2k, tmp_path / "cm-bad", "fp16", parity=False)
    result = check_artifact(outcome.out, threads=2, progress=Progress(quiet=True))
    assert not result.passed
    failed = {c.scenario for c in result.failures if c.part == "exactness"}
    # the scenario rows see it only near the end; the exact fp16 program row (interpreter) sees the angles anywhere
    assert failed == {"near_max_seq_len", "fp16_program_prefill"}
    assert result.scenario("near_max_seq_len").metrics["state_max_rel"] > 0.1


def test_fill_keeps_no_logits_beyond_the_compared_positions(small_model) -> None:
    ref = ReferenceSession(small_model)
    result = run_parity(
        ReferenceSession(small_model, "s", 600),
        ref,
        "fp32",
        scenarios=["near_max_seq_len"],
        options=ScenarioOptions(fill_chunk=128),
    )
    run = result.scenario("near_max_seq_len")
    # one position per filler chunk but the last, the last chunk's tail, two decode steps
    assert run.metrics["positions"] == (run.details["chunks"] - 1) + 8 + 2
    assert np.isfinite(run.metrics["logit_max_abs"])
