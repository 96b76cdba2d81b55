"""The streaming reference (`lfm_export.parity.streaming`): the fp32 reference and the recipe's simulation computed
one layer at a time from lazy weights give the in-memory sessions' logits, states and simulated weights (when
parity streams: `tests/core/test_loading_memory.py`)."""

import numpy as np
import pytest
import torch

from lfm_export.loading import load_model
from lfm_export.parity import ReferenceSession
from lfm_export.parity.prompts import random_prompts
from lfm_export.parity.scenarios import ScenarioOptions, Sessions, batch2, decode, prefill
from lfm_export.parity.stored_weights import RowPool, simulated_weights
from lfm_export.parity.streaming import StreamingReference
from lfm_export.quant import simulate
from lfm_export.recipes import ACT_FLOAT, ACT_INT8_BLOCK, parse_recipe

torch.set_num_threads(1)

OPTS = ScenarioOptions(decode_steps=3, batch_decode_steps=2)
SCENARIOS = (prefill, decode, batch2)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_streamed_reference_and_simulation_equal_the_in_memory_ones(name):
    """int4 with int8-block activations (ONNX level 4): the fp32 reference, the weight-only simulation (the
    rounding-effect session) and every simulated weight equal the in-memory ones; the rounded simulation is
    compared on prefill only, where both compute the same full sequence (stepwise, a code on a rounding
    boundary can flip: that is why its gate allows for the rounding)."""
    lazy = load_model(name, lazy=True)
    eager = lazy.materialized().model
    recipe = parse_recipe("int4")
    prompts = random_prompts(lazy.config.vocab_size, count=2, lengths=(12, 9))
    stream = StreamingReference(
        lazy.config, lazy.weights, None, recipe=recipe, activations=ACT_INT8_BLOCK, rounding=True
    )
    rounded = simulate(eager, recipe, ACT_INT8_BLOCK)
    unrounded = simulate(eager, recipe, ACT_FLOAT)
    # the artifact stand-in: the weight-only simulation, whose greedy choices are fed to both runs
    streamed_runs, eager_runs = [], []
    for fn in SCENARIOS:
        ss = Sessions(
            ReferenceSession(unrounded, name="test"),
            stream.simulation,
            [stream.reference, stream.rounding],
            test_chooses=True,
        )
        streamed_runs.append(fn(ss, prompts, OPTS))
        sessions = [ReferenceSession(m, name=n) for m, n in ((rounded, "s"), (eager, "r"), (unrounded, "u"))]
        eager_runs.append(
            fn(
                Sessions(
                    ReferenceSession(unrounded, name="test"), *sessions[:1], sessions[1:], test_chooses=True
                ),
                prompts,
                OPTS,
            )
        )
    stream.complete(streamed_runs, ss.comparisons)
    for got, want in zip(streamed_runs, eager_runs, strict=True):
        for i in (1, 2, 3):  # the reference, the weight-only simulation, the test session
            assert got.logits[i].shape == want.logits[i].shape
            assert _rel(got.logits[i], want.logits[i]) < 1e-5, (got.name, i)
            assert sorted(got.states[i]) == sorted(want.states[i])
            for k, v in want.states[i].items():
                assert _rel(got.states[i][k], v) < 1e-5, (got.name, i, k)
        assert got.positions == want.positions
    # prefill, the rounded simulation: the sparse MoE (streamed) and the dense one (in memory) sum in another
    # order, which int8-block rounding hides unless a value sits on a code boundary; there the code flips
    # (tiny-moe on an AMD EPYC: one position of 21, 2.3e-3 where rounding itself moves the logits 6.6e-3).
    # So each position is equal, or off by less than half of what activation rounding does there (leaving the
    # rounding out would be off by all of it), and most positions are equal.
    got0, want0, unrounded0 = (
        r.logits[i] for r, i in ((streamed_runs[0], 0), (eager_runs[0], 0), (eager_runs[0], 2))
    )
    scale = np.abs(want0).max()
    off = np.abs(got0 - want0).max(-1) / scale
    rounding_effect = np.abs(want0 - unrounded0).max(-1) / scale
    assert (off < np.maximum(1e-5, 0.5 * rounding_effect)).all(), (off, rounding_effect)
    assert (off < 1e-5).mean() > 0.8, off
    pool = RowPool()
    for _, w in simulated_weights(rounded, recipe):
        pool.add(w)
    assert stream.pool.rows == pool.rows and stream.pool.tensors == pool.tensors > 0


def test_fills_above_the_fill_limit_are_skipped_not_passed():
    from lfm_export.parity.scenarios import near_max_seq_len

    lazy = load_model("tiny", lazy=True)
    stream = StreamingReference(lazy.config, lazy.weights, 64)
    run = near_max_seq_len(
        Sessions(stream.reference, stream.reference),
        random_prompts(lazy.config.vocab_size),
        ScenarioOptions(fill_limit=32),
    )
    assert (
        run.skipped is not None
        and "fill limit of 32" in run.skipped
        and not stream.reference.segments[-1].calls
    )
