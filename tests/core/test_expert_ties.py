"""Positions judged apart (`Gate.router_margin`, `lfm_export.parity.expert_ties`): where the simulation's top-k
router margin is within fp16 rounding, a runtime may choose another expert; those positions leave the tight
per-position limits and are reported, every other position keeps them.

The "runtime" here is the simulation itself with the last MoE layer's ties broken the other way (the last
selected expert swapped for the first unselected one wherever the margin is below half the gate's; in the last
layer the other expert's output reaches no later position, as on honest Core ML exports it reaches them only
within rounding): an honest fp16 MoE export as far as the gate can tell. It passes the `-fp16-moe` gate only
because those positions are judged apart, and the same runtime computing one layer's experts 5% off fails it.
Torch sessions on `tiny-moe` (fp16 recipe), prefill scenario; slow (the default suite has the same through
the Core ML interpreter, `tests/backends/coreml/test_coreml.py`), but for the margin itself.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from lfm_export.loading import load_model
from lfm_export.model import MoE
from lfm_export.parity import ReferenceSession, run_parity, to_markdown
from lfm_export.parity.thresholds import gate_for
from lfm_export.quant import simulate
from lfm_export.recipes import ACT_FP16_ROUTED, parse_recipe

CONTEXT = 64
MARGIN = 1e-2
"""Wider than the `-fp16-moe` gates' margin, so the default prompts hold a few ties in the last MoE layer: the
mechanism, not the calibrated bound, is what these tests check."""


class TieBreaking(MoE):
    """Selects the first unselected expert instead of the last selected one where the router margin is below
    `flip_below`, and records where it did (`flipped`: one boolean `[N]` per call)."""

    flip_below: float
    flipped: list[np.ndarray]

    def _route(self, x):
        scores, idx, w = super()._route(x)
        swap = self.router_margin(x) < self.flip_below
        self.flipped.append(swap.numpy().copy())
        if not swap.any():
            return scores, idx, w
        choice = scores + self.expert_bias if self.use_expert_bias else scores
        order = torch.topk(choice, self.top_k + 1, dim=-1).indices
        idx = torch.where(swap[:, None], torch.cat([order[:, : self.top_k - 1], order[:, -1:]], -1), idx)
        w = scores.gather(-1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-6)
        return scores, idx, w * self.scale


@pytest.fixture(scope="module")
def sessions_parts():
    torch.set_num_threads(2)
    loaded = load_model("tiny-moe")
    sim = simulate(loaded.model, parse_recipe("fp16"), ACT_FP16_ROUTED, threads=2)
    return loaded, sim


def tie_breaking(model: torch.nn.Module, flip_below: float) -> tuple[torch.nn.Module, list[TieBreaking]]:
    keep = {id(t): t for t in (*model.parameters(), *model.buffers())}
    out = copy.deepcopy(model, memo=dict(keep))
    layers = [m for m in out.modules() if isinstance(m, MoE)][-1:]
    for m in layers:
        m.__class__ = TieBreaking
        m.flip_below, m.flipped = flip_below, []
    return out, layers


def parity(loaded, sim, artifact, gate):
    return run_parity(
        ReferenceSession(artifact, name="tie-breaking", max_seq_len=CONTEXT),
        ReferenceSession(loaded.model, max_seq_len=CONTEXT),
        gate,
        scenarios=["prefill"],
        simulation=ReferenceSession(sim, name="simulated", max_seq_len=CONTEXT),
        activations=ACT_FP16_ROUTED,
        snapshots=False,
    )


def test_router_margin_is_the_gap_at_the_topk_boundary_over_the_spread() -> None:
    """On `tiny-moe`'s MoE shape with seeded weights and expert bias, against the choices sorted in numpy."""
    cfg = load_model("tiny-moe", lazy=True).config
    torch.manual_seed(0)
    moe = MoE(cfg)
    moe.expert_bias.copy_(torch.randn(cfg.num_experts) * 0.1)
    x = torch.randn(7, cfg.hidden_size)
    with torch.no_grad():
        got = moe.router_margin(x).numpy()
        logits = (x @ moe.gate.weight.T).double().numpy()
    choice = 1 / (1 + np.exp(-logits)) + moe.expert_bias.double().numpy()
    ranked = np.sort(choice, -1)[:, ::-1]
    k = cfg.num_experts_per_tok
    want = (ranked[:, k - 1] - ranked[:, k]) / (ranked[:, 0] - ranked[:, -1])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_ties_broken_otherwise_are_judged_apart_and_the_rest_held_tight(sessions_parts) -> None:
    loaded, sim = sessions_parts
    gate = gate_for("fp16", ACT_FP16_ROUTED)
    assert gate.name == "fp16-fp16-moe" and gate.router_margin is not None
    gate = dataclasses.replace(gate, router_margin=MARGIN)
    artifact, layers = tie_breaking(sim, gate.router_margin / 2)
    result = parity(loaded, sim, artifact, gate)
    flipped = sum(int(np.concatenate(m.flipped).sum()) for m in layers)
    apart = result.judged_apart()
    assert flipped >= 1 and apart is not None and apart["count"] >= 1
    assert result.part_passed("exactness"), result.failures
    assert result.scenario("prefill").metrics["judged_apart"] == apart["count"]
    assert "judged apart: expert choice within the runtime's rounding" in to_markdown(result)
    assert result.summary()["exactness"]["judged_apart"] == apart["count"]
    # what the tight limits would have seen there: the other experts' output, far past fp16 rounding
    prefill = result.scenario("prefill").metrics
    assert prefill["logit_max_rel_at_tie"] > 5e-3 and prefill["logit_max_rel"] < 1e-5
    assert prefill["positions"] + prefill["judged_apart"] == 64


@pytest.mark.slow
def test_wrong_expert_matrices_fail_with_ties_judged_apart(sessions_parts) -> None:
    """Every expert's w2 of one layer 5% off: the positions neither tied nor after a tie catch it (at 2% the
    largest error falls where a later layer's router then ties)."""
    loaded, sim = sessions_parts
    gate = dataclasses.replace(gate_for("fp16", ACT_FP16_ROUTED), router_margin=MARGIN)
    artifact, _ = tie_breaking(sim, gate.router_margin / 2)
    for expert in artifact.model.layers[3].feed_forward.experts:
        expert.w2.weight = torch.nn.Parameter(expert.w2.weight * 1.05, requires_grad=False)
    result = parity(loaded, sim, artifact, gate)
    assert not result.part_passed("exactness")
    assert result.judged_apart()["count"] >= 1
    assert "prefill:logit_max_rel" in {f"{c.scenario}:{c.metric}" for c in result.failures}
