"""The exact check of int8-activation artifacts: the simulation with its undecided activation codes resolved.

A runtime that rounds the activations of quantized linears to int8 (onnxruntime's MatMulNBits at accuracy
level 4, XNNPACK's QD8 in ExecuTorch `8da4w` / `8da8w`, llama.cpp's Q8_0 / Q8_K blocks in every quantized GGUF
matmul) computes each op exactly as the simulation does (`lfm_export.quant`, 4e-7 op by op; llama.cpp 1.5e-7,
benchmarks/results/gguf_exactness_trace_tiny_q4_k_m.json) but from inputs computed in its own float32 order.
Now and then a scaled input lies within that difference of the halfway point between two codes, rounds the
other way, and the flip grows through the next layers' rounding to the size of the activation rounding itself
(`lfm_export.quant.BoundaryCodes`); llama.cpp's Q8_0 blocks also store their scale `amax / 127` in fp16, which
flips to the neighbouring fp16 number the same way (every value of the block with it). The scenario gates can
only allow for that; this check removes it, resolving codes and fp16 scales alike.

The prompt is run through the artifact and through the simulation one position at a time (`decode` calls: the
multi-token path is judged by the scenario rows; on `tiny-moe` at ExecuTorch `8da4w` a whole-prompt call put the
last position 1.9e-4 off the stepped simulation, the state carrying an expert chosen otherwise at a router
near-tie earlier in the prompt).
At each position the simulation first rounds as usual; where its logits differ from the artifact's by more
than `LIMIT` (largest error over the position's largest logit), each undecided code of that position (within
`lfm_export.quant.BOUNDARY_MARGIN` of a halfway point, nearest first) is tried on its other side, keeping the
first that brings the position within `LIMIT` (greedily, up to `MAX_FLIPS` codes a position, `MAX_TRIES`
forwards); a flip that leaves the position off is tried once more together with the code it moved nearest to a
halfway point in a later layer, which the artifact may have taken as well (`_search`). A position still off is
then tried with one undecided code of each of the `conv_L_cache - 1` positions before it flipped, re-stepped
from there: the short convolution carries a position's `B * x` into the next ones, where its own gate `C` can
hide it from its own logits (`_search_back`). An honest artifact is then
within float32 rounding at every position (onnxruntime 1.32, tiny int8-b32: 1.4e-6 with 4 codes resolved;
benchmarks/results/a8_exactness.json; llama.cpp: see docs/backends/gguf.md); an artifact of other weights is
not, since no choice of undecided codes explains a matrix 1% off. After the first position that stays off, the
rest of the prompt is compared without searching.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from lfm_export.contract.session import Session
from lfm_export.contract.signature import KEY, VALUE, past_name
from lfm_export.parity.exact_row import ExactInputs, PositionRow, first_position, relative_error
from lfm_export.parity.prompts import default_prompts
from lfm_export.parity.report import _num
from lfm_export.parity.thresholds import RESOLVED_LIMIT

if TYPE_CHECKING:
    from lfm_export.quant import Boundary, BoundaryCodes

SCENARIO = "resolved_prefill"
"""The report row of this check."""
METRIC = "logit_max_rel"
LIMIT = RESOLVED_LIMIT
POSITIONS = 64
"""Positions compared at most (the parity prompts, in order, the last one cut): one simulation forward each,
one token at a time, and a search where a position is off."""
TARGET = 2e-6
"""A position whose error exceeds this (3x the largest honest error with every code decided alike) has its
undecided codes searched, even within `LIMIT`: a flipped code left in the state grows at later positions."""
MAX_FLIPS = 3
"""Undecided codes resolved per position at most (honest: 1 in every case measured)."""
MAX_TRIES = 32
"""Simulation forwards spent searching one position at most (a wrong artifact would otherwise try every
undecided code of every position)."""


@dataclass
class Resolved(PositionRow):
    """Per prompt: positions compared, the largest and median error, codes resolved, and the first position
    (prompt, position, error) no choice of undecided codes brought within `LIMIT`."""

    name: ClassVar[str] = SCENARIO
    metric: ClassVar[str] = METRIC
    runs: ClassVar[str] = (
        "the artifact one token a call against the simulation, its undecided int8 activation codes resolved"
    )
    summary_keys: ClassVar[tuple[str, ...]] = ("passed", "positions", "logit_max_rel", "codes_resolved")
    codes_resolved: int = 0
    forwards: int = 0
    unexplained: list[tuple[int, int, float]] = field(default_factory=list)

    @property
    def worst(self) -> float:
        return self.max_rel

    @property
    def limit(self) -> float:
        return LIMIT

    @property
    def passed(self) -> bool:
        return self.positions > 0 and not self.unexplained and self.max_rel <= LIMIT

    @property
    def first_failure(self) -> str | None:
        return first_position(self, self.unexplained)

    def describe(self) -> str:
        head = (
            f"{self.positions} positions, {self.codes_resolved} undecided activation codes resolved: "
            f"logit max rel {self.max_rel:.2g} (median {self.median_rel:.2g}, limit {LIMIT:g})"
        )
        if not self.unexplained:
            return head
        where = ", ".join(f"prompt {p} position {t} ({e:.2g})" for p, t, e in self.unexplained)
        return f"{head}; no choice of undecided codes explains {where}"

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "positions": self.positions,
            "logit_max_rel": self.max_rel,
            "logit_median_rel": self.median_rel,
            "limit": LIMIT,
            "codes_resolved": self.codes_resolved,
            "forwards": self.forwards,
            "unexplained": [{"prompt": p, "position": t, "logit_max_rel": e} for p, t, e in self.unexplained],
        }

    def note(self) -> str:
        head = (
            f"Resolved prefill {self.verdict}: {self.positions} positions against the simulation run one token "
            f"at a time, {self.codes_resolved} activation codes (or fp16 block scales) that sat on a rounding "
            f"boundary (within float32 rounding) resolved to the side the artifact took: logit max rel "
            f"{_num(self.max_rel)} (limit {_num(LIMIT)})"
        )
        if self.unexplained:
            bad = ", ".join(f"prompt {p} position {t}" for p, t, _ in self.unexplained)
            head += f"; no choice of such codes explains {bad}"
        return f"{head}."


def _kv_at(session: Session, layers: list[int], length: int) -> list[np.ndarray] | None:
    """The artifact's keys and values `[kv_heads, T, head_dim]` per attention layer after its prefill, where
    its session exposes them (a flipped code in a key or value shows there at its own position, while the
    logits may show it only positions later)."""
    state = session.state()
    if not state or not layers:
        return None
    out = []
    for layer in layers:
        for role in (KEY, VALUE):
            t = state.get(past_name(role, layer))
            if t is None or t.ndim != 4 or t.shape[0] != 1 or t.shape[2] < length:
                return None
            out.append(np.asarray(t[0], dtype=np.float32))
    return out


def _error(artifact: np.ndarray, kv: list[np.ndarray] | None, t: int, result: tuple) -> float:
    """The position's error: its logits, and where the artifact's keys and values are known, theirs (each over
    its own largest magnitude at the position)."""
    err = relative_error(artifact[t], result[0][0, -1].numpy())
    if kv is not None:
        sim_kv = [x for pair in zip(result[2], result[3], strict=True) for x in pair]
        for mine, theirs in zip(sim_kv, kv, strict=True):
            err = max(err, relative_error(theirs[:, t], mine[0, :, -1].numpy()))
    return err


def prompts_for(
    vocab_size: int, tokenizer_file: str | Path | None = None, max_seq_len: int | None = None
) -> list[np.ndarray]:
    """The parity prompts (`default_prompts`), each cut to `max_seq_len`, `POSITIONS` positions in all."""
    out, left = [], POSITIONS
    for ids in default_prompts(vocab_size, tokenizer_file):
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)[:, : min(left, max_seq_len or left)]
        if ids.size:
            out.append(ids)
            left -= ids.size
    return out


def _step(
    simulated: Any, token: Any, state: tuple, flips: list[Boundary], found: list[Boundary] | None
) -> tuple:
    """One position through `simulated` from `state` (left as it is), with `flips` set and, where `found` is a
    list, the undecided codes listed into it: `(logits, conv, keys, values)`."""
    import torch

    from lfm_export.model import GROWING

    codes: BoundaryCodes = simulated.boundary_codes
    chosen: dict[str, dict[int, float]] = {}
    scales: dict[str, dict[int, float]] = {}
    for b in flips:
        (scales if b.scale else chosen).setdefault(b.linear, {})[b.index] = b.code
    codes.start(found, chosen, scales)
    try:
        with torch.no_grad():
            conv, keys, values = (list(part) for part in state)
            return simulated(token, conv, keys, values, form=GROWING)
    finally:
        codes.stop()


def resolve(session: Session, simulated: Any, prompts: list[np.ndarray], follow: bool = True) -> Resolved:
    """The artifact `session` against `simulated` (`lfm_export.quant.simulate`'s module, int8 activations) on
    each prompt (`[1, T]` ids), undecided codes resolved per position (module doc; `follow`: chains of flips
    too, `_search`). Leaves `session` reset."""
    from lfm_export.model import MOE_SPARSE, MoE

    out = Resolved()
    errors: list[float] = []
    # the sparse MoE form (the same numbers): only the experts a token is routed to run, so the undecided codes
    # listed are those of matrices the runtime ran, not of experts weighted zero
    moe = [m for m in simulated.modules() if isinstance(m, MoE)]
    forms = [m.form for m in moe]
    for m in moe:
        m.form = MOE_SPARSE
    try:
        _resolve_prompts(session, simulated, prompts, out, errors, follow)
    finally:
        for m, form in zip(moe, forms, strict=True):
            m.form = form
    session.reset(1)
    out.take(errors)
    return out


def _resolve_prompts(
    session: Session,
    simulated: Any,
    prompts: list[np.ndarray],
    out: Resolved,
    errors: list[float],
    follow: bool = True,
) -> None:
    """`resolve`'s loop over the prompts, into `out` and `errors` (one per position)."""
    import torch

    from lfm_export.model import GROWING

    for p, ids in enumerate(prompts):
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        session.reset(1)
        # one token a call, as the simulation steps: a multi-token call may order its sums otherwise, which on
        # an MoE model can choose another expert where the router is near a tie and carry that in the state
        artifact = np.stack(
            [np.asarray(session.decode(ids[:, t]), dtype=np.float32)[0] for t in range(ids.shape[1])]
        )
        kv = _kv_at(session, simulated.config.attn_layers, ids.shape[1])
        state = simulated.empty_state(1, form=GROWING, dtype=torch.float32)
        window = int(getattr(simulated.config, "conv_L_cache", 1)) - 1 if simulated.config.conv_layers else 0

        searching = True  # until a position stays off: then the rest of the prompt is only compared
        history: list[tuple[tuple, list[Boundary]]] = []  # per position: the state it started from, its flips
        for t in range(ids.shape[1]):
            token = torch.from_numpy(ids[:, t : t + 1])
            result = _step(simulated, token, state, [], None)
            out.forwards += 1
            err = _error(artifact, kv, t, result)
            flips: list[Boundary] = []
            if searching and err > TARGET:
                err, result, flips = _search(
                    simulated, token, state, artifact, kv, t, err, result, out, follow
                )
            if searching and err > TARGET and window:
                back = _search_back(simulated, ids, history, window, artifact, kv, err, out)
                if back is not None:  # a decision of an earlier position, carried here in the conv state
                    redone, redone_errors, state, result, err = back
                    history[t - len(redone) :] = redone
                    errors[len(errors) - len(redone_errors) :] = redone_errors
                    out.codes_resolved += 1
                    flips = []
                    if err > TARGET:
                        err, result, flips = _search(
                            simulated, token, state, artifact, kv, t, err, result, out, follow
                        )
            errors.append(err)
            if err > LIMIT and searching:
                out.unexplained.append((p, t, err))
                searching = False
            out.codes_resolved += len(flips)
            history.append((state, flips))
            state = result[1:]


def _search_back(
    simulated: Any,
    ids: np.ndarray,
    history: list[tuple[tuple, list[Boundary]]],
    window: int,
    artifact: np.ndarray,
    kv: list[np.ndarray] | None,
    err: float,
    out: Resolved,
) -> tuple[list[tuple[tuple, list[Boundary]]], list[float], tuple, tuple, float] | None:
    """An undecided decision of one of the `window` positions before position `t = len(history)` that explains
    `t`: the short convolution carries each position's `B * x` into the next `window` positions' outputs,
    where the gate `C` of its own position can hide it (`tiny-moe` `q4_0-gptq` through llama.cpp: an fp16
    block scale of layer 5's `in_proj` input, 1.4e-7 from a halfway point, taken the other way at position 10
    left that position 1.3e-7 off and put position 11 1.6e-3 off). A flip is kept only where it leaves its own
    position and those up to `t` within `TARGET`; the one that brings `t` nearest, if nearer than `err`:
    `(history from that position on, their errors, the state at t, t's forward, t's error)`, else None."""
    import torch

    t = len(history)
    best = None
    tries = 0
    for back in range(1, min(window, t) + 1):
        s = t - back
        start, kept = history[s]
        found: list[Boundary] = []
        _step(simulated, torch.from_numpy(ids[:, s : s + 1]), start, kept, found)
        out.forwards += 1
        taken = {_key(b) for b in kept}
        for b in sorted(found, key=lambda b: b.margin):
            if tries >= MAX_TRIES:
                return best
            if _key(b) in taken:
                continue
            tries += 1
            chain = [*kept, b]
            trial = _step(simulated, torch.from_numpy(ids[:, s : s + 1]), start, chain, None)
            out.forwards += 1
            e = _error(artifact, kv, s, trial)
            if e > TARGET:
                continue
            redone, errs, state = [(start, chain)], [e], trial[1:]
            for j in range(s + 1, t):
                step = _step(simulated, torch.from_numpy(ids[:, j : j + 1]), state, history[j][1], None)
                out.forwards += 1
                e = _error(artifact, kv, j, step)
                if e > TARGET:
                    break
                redone.append((state, history[j][1]))
                errs.append(e)
                state = step[1:]
            else:
                now = _step(simulated, torch.from_numpy(ids[:, t : t + 1]), state, [], None)
                out.forwards += 1
                e = _error(artifact, kv, t, now)
                if e < (err if best is None else best[4]):
                    best = (redone, errs, state, now, e)
                if e <= TARGET:
                    return best
    return best


def _key(b: Boundary) -> tuple[str, int, bool]:
    """A decision's identity (its linear, index and kind), whatever forward listed it."""
    return b.linear, b.index, b.scale


def _search(
    simulated: Any,
    token: Any,
    state: tuple,
    artifact: np.ndarray,
    kv: list[np.ndarray] | None,
    t: int,
    err: float,
    result: tuple,
    out: Resolved,
    follow: bool = True,
) -> tuple[float, tuple, list[Boundary]]:
    """Position `t`'s undecided codes resolved (module doc): `(error, forward, flips kept)`.

    Each trial forward lists its own undecided codes. A flip changes every later layer's inputs, which can put a
    code there on a boundary that was not on one before, and the artifact may have taken that one the other way
    too: then the first flip alone leaves the position as far off as none, and the second is listed by no
    forward without the first. So where a trial stays off, the code its flip moved nearest to a halfway point is
    tried with it (one more forward) before the next candidate. Without that, an honest position holding such a
    chain stayed unexplained (`tiny` int4, tests/core/test_parity_gates.py), or a flip elsewhere that happened
    to land near the artifact was kept (`small` ONNX with 2-bit MLPs: 7.7e-6 where the chain resolves to
    1.0e-6; docs/quality_per_byte.md). `follow` False searches as before (benchmarks/resolved_chains.py)."""
    found: list[Boundary] = []
    _step(simulated, token, state, [], found)  # the same forward again, listing undecided codes (slower)
    out.forwards += 1
    flips: list[Boundary] = []
    tries = 0
    while err > TARGET and len(flips) < MAX_FLIPS and tries < MAX_TRIES:
        best = None
        known = {_key(b) for b in found}
        taken = {_key(b) for b in flips}
        for b in sorted(found, key=lambda b: b.margin):
            if tries >= MAX_TRIES:
                break
            if _key(b) in taken:
                continue
            chain: list[Boundary] = [*flips, b]
            listed: list[Boundary] = []
            tries += 1
            trial = _step(simulated, token, state, chain, listed if follow else None)
            out.forwards += 1
            e = _error(artifact, kv, t, trial)
            moved = sorted((c for c in listed if _key(c) not in known), key=lambda c: c.margin)
            if follow and e > TARGET and moved and tries < MAX_TRIES and len(chain) < MAX_FLIPS:
                tries += 1
                more: list[Boundary] = []
                followed = _step(simulated, token, state, [*chain, moved[0]], more)
                out.forwards += 1
                e2 = _error(artifact, kv, t, followed)
                if e2 < e:
                    e, trial, chain, listed = e2, followed, [*chain, moved[0]], more
            if best is None or e < best[0]:
                best = (e, chain, trial, listed)
            if e <= TARGET:
                break
        if best is None or best[0] >= err:
            break
        err, flips, result = best[0], best[1], best[2]
        if follow:  # what the kept flips put on a boundary
            found += [c for c in best[3] if _key(c) not in known]
    return err, result, flips


def exact_row(inputs: ExactInputs) -> Resolved | None:
    """The row of an artifact whose runtime rounds activations to int8 (`Backend.exact_row` of ONNX, ExecuTorch
    and GGUF): its prompts resolved against the core simulation; None where no activation is rounded to int8,
    or no core simulation runs (a backend's own simulation session)."""
    from lfm_export.quant import RESOLVABLE_MODES, activation_modes

    if inputs.simulated is None or inputs.activations in ("float", "native"):
        return None
    if not set(activation_modes(inputs.activations).values()) & set(RESOLVABLE_MODES):
        return None
    return resolve(inputs.session, inputs.simulated, inputs.prompts)
