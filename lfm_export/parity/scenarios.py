"""Parity scenarios and the run loop.

A scenario drives a test session and the reference session with identical token ids and returns both
sessions' logits for the positions it compares. Tokens fed after the prompt are the *reference's* greedy
choices, so the test session never drifts onto a different input because of one early disagreement.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lfm_export.contract.errors import UserError
from lfm_export.parity.expert_ties import RouterMargins, recorder_for
from lfm_export.parity.metrics import greedy_match_length, logit_metrics, state_max_abs
from lfm_export.parity.prompts import check_prompts, default_prompts
from lfm_export.parity.report import EXACTNESS, QUALITY, Check, ExactRow, ParityResult, ScenarioResult
from lfm_export.parity.snapshots import RESTORE_LIMIT, SNAPSHOTS, parity_snapshot_row
from lfm_export.parity.stored_weights import StoredWeights
from lfm_export.parity.stored_weights import checks as stored_weight_checks
from lfm_export.parity.thresholds import POOLED, Gate, gate_for, sanity_gate

if TYPE_CHECKING:
    # only for annotations: the editable install may not map lfm_export.runtime yet
    from lfm_export.contract.session import Session
    from lfm_export.parity.streaming import StreamingReference


@dataclass
class ScenarioOptions:
    decode_steps: int = 16
    batch_decode_steps: int = 4
    fill_chunk: int = 256
    """Chunk size of the cheap filler prefill in `near_max_seq_len`."""
    near_max_tail: int = 8
    """Positions of the last filler chunk compared in `near_max_seq_len` and `long_context`."""
    full_context_limit: int | None = None
    """`near_max_seq_len` runs on declared contexts up to this (None: any)."""
    fill_limit: int | None = None
    """The fill scenarios (`near_max_seq_len`, `long_context`) run only on fills up to this many tokens (None:
    any); a streaming reference sets it (`lfm_export.parity.streaming.STREAM_FILL_LIMIT`)."""


class Sessions:
    """The sessions one parity run drives with identical token ids: `test` (the artifact), `lead` (the
    simulation of the recipe, or the reference itself) and `others` (the fp32 reference when a simulation
    leads). Each call returns every session's logits, lead first, test last. The greedy choices fed after a
    prompt are the lead's, or the test session's where `test_chooses` (a streaming reference computes the
    comparisons only after the scenarios ran, `lfm_export.parity.streaming`).

    `margins` records the lead's router margins (`lfm_export.parity.expert_ties`): after each call `tags` holds
    `[B, T, 3]` (margin, sequence, position) for the positions it computed, which a scenario slices as it
    slices the logits, and `since_reset` the margins of every position since the last reset (`[B, P]`)."""

    def __init__(
        self,
        test: Session,
        lead: Session,
        others: Sequence[Session] = (),
        margins: RouterMargins | None = None,
        test_chooses: bool = False,
    ) -> None:
        self.test, self.lead, self.others = test, lead, list(others)
        self.chooser = -1 if test_chooses else 0
        """Index into each call's `[lead, *others, test]` logits of the session whose greedy choices are fed."""
        self.margins = margins
        self.tags: np.ndarray | None = None
        self._since_reset: list[np.ndarray] = []
        self._sequence = 0
        self.sequences: dict[int, list[np.ndarray]] = {}
        """Every position's margin of each sequence run so far (`[T]` per call), by sequence number."""

    @property
    def comparisons(self) -> list[Session]:
        return [self.lead, *self.others]

    @property
    def since_reset(self) -> np.ndarray | None:
        return np.concatenate(self._since_reset, axis=1) if self._since_reset else None

    def reset(self, batch: int) -> None:
        for s in (self.test, *self.comparisons):
            s.reset(batch)
        if self.margins is not None:
            self.margins.take()
            if self._since_reset:  # the next sequences are numbered after the last batch's rows
                self._sequence += self._since_reset[0].shape[0]
            self._since_reset = []
        self.tags = None

    def _record(self, start: int) -> None:
        """Tag the positions the lead just computed (from `start`) with its margins."""
        m = None if self.margins is None else self.margins.take()
        if m is None:
            self.tags = None
            return
        b, t = m.shape
        seq = np.broadcast_to(self._sequence + np.arange(b)[:, None], (b, t))
        pos = np.broadcast_to(start + np.arange(t)[None], (b, t))
        self.tags = np.stack([m, seq, pos], axis=-1).astype(np.float64)
        self._since_reset.append(m)
        for row in range(b):
            self.sequences.setdefault(self._sequence + row, []).append(m[row])

    def prefill(
        self, tokens: np.ndarray, test_chunks: Sequence[np.ndarray] | None = None
    ) -> list[np.ndarray]:
        """`[lead, *others, test]` logits of `tokens`; the test session takes them in `test_chunks` if given."""
        start = self.lead.position
        outs = [s.prefill(tokens) for s in self.comparisons]
        self._record(start)
        if test_chunks is None:
            t = _logits(self.test, self.test.prefill(tokens), outs[0].shape, "prefill")
        else:
            pieces = []
            for chunk in test_chunks:
                shape = (tokens.shape[0], chunk.shape[-1], outs[0].shape[-1])
                pieces.append(_logits(self.test, self.test.prefill(chunk), shape, "prefill"))
            t = np.concatenate(pieces, axis=1)
        return [*outs, t]

    def decode(self, tokens: np.ndarray) -> list[np.ndarray]:
        start = self.lead.position
        outs = [s.decode(tokens) for s in self.comparisons]
        self._record(start)
        return [*outs, _logits(self.test, self.test.decode(tokens), outs[0].shape, "decode")]


@dataclass
class ScenarioRun:
    """Every session's logits `[N, vocab]` for the compared positions (`[lead, *others, test]`), or why the
    scenario was skipped."""

    name: str
    logits: list[np.ndarray] = field(default_factory=list)
    skipped: str | None = None
    steps: int | None = None
    """Decode scenarios: the trailing `steps` rows are greedy steps (for the greedy-match length)."""
    states: list[dict[str, np.ndarray] | None] = field(default_factory=list)
    state_steps: list[dict[str, float] | None] = field(default_factory=list)
    """Per session, its `state_steps()` where it has one (the quantization step of each state it writes)."""
    positions: list[int] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    tags: np.ndarray | None = None
    """`[N, 3]` per compared row: the lead's router margin, the sequence and the position (`Sessions.tags`)."""
    state_margins: np.ndarray | None = None
    """`[B, P]`: the lead's router margin at every position its final state holds."""
    sequence_margins: dict[int, np.ndarray] = field(default_factory=dict)
    """Each compared sequence's margins at every position it ran (`Sessions.sequences`)."""
    tie_window: int = 0
    """Positions after a tie that its other expert's output reaches undiluted (`RouterMargins.window`)."""

    @property
    def test_logits(self) -> np.ndarray:
        return self.logits[-1]


ScenarioFn = Callable[[Sessions, Sequence[np.ndarray], ScenarioOptions], ScenarioRun]


def _logits(session: Session, out: np.ndarray, shape: tuple[int, ...], call: str) -> np.ndarray:
    arr = np.asarray(out)
    if arr.shape != shape:
        raise ValueError(
            f"{session.name}: {call} returned logits of shape {list(arr.shape)}, expected {list(shape)}"
        )
    return arr


def _finish(run: ScenarioRun, ss: Sessions, tags: list[np.ndarray | None] | None = None) -> ScenarioRun:
    """Read every session's state and position into `run`; `tags`: `Sessions.tags` sliced as the rows were."""
    every = [*ss.comparisons, ss.test]
    run.states = [s.state() for s in every]
    run.state_steps = [_state_steps(s) for s in every]
    run.positions = [s.position for s in every]
    if tags and all(t is not None for t in tags):
        run.tags = np.concatenate([t.reshape(-1, 3) for t in tags if t is not None])
        run.state_margins = ss.since_reset
        run.sequence_margins = {
            q: np.concatenate(ss.sequences[q]) for q in np.unique(run.tags[:, 1]).astype(int).tolist()
        }
        run.tie_window = ss.margins.window if ss.margins is not None else 0
    return run


def _state_steps(session: Session) -> dict[str, float] | None:
    """The session's `state_steps()` (state name -> the quantization step of the grid it writes that state
    on), where it has one: a quantized-state simulation; None elsewhere."""
    steps = getattr(session, "state_steps", None)
    return steps() if callable(steps) else None


def _fit(prompt: np.ndarray, session: Session, reserve: int = 0) -> np.ndarray:
    room = session.max_seq_len
    return prompt if room is None else prompt[: max(1, room - reserve)]


def _sliced(tags: np.ndarray | None, take: Callable[[np.ndarray], np.ndarray]) -> np.ndarray | None:
    return None if tags is None else take(tags)


def _stack(rows: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Per-call lists of `[lead, *others, test]` arrays -> one `[N, vocab]` array per session."""
    return [np.concatenate([r[i].reshape(-1, r[i].shape[-1]) for r in rows]) for i in range(len(rows[0]))]


def prefill(ss: Sessions, prompts: Sequence[np.ndarray], opts: ScenarioOptions) -> ScenarioRun:
    """Every prompt in one prefill call from an empty state; every position of every prompt compared."""
    rows, lengths, tags = [], [], []
    for prompt in prompts:
        p = _fit(prompt, ss.test)
        ss.reset(1)
        rows.append(ss.prefill(p[None]))
        tags.append(ss.tags)
        lengths.append(int(p.size))
    return _finish(ScenarioRun("prefill", _stack(rows), details={"prompt_lens": lengths}), ss, tags)


def decode(ss: Sessions, prompts: Sequence[np.ndarray], opts: ScenarioOptions) -> ScenarioRun:
    """Prefill, then `decode_steps` greedy steps with state carried; the last prompt position and every
    step are compared."""
    p = _fit(prompts[0], ss.test, reserve=opts.decode_steps)
    room = ss.test.max_seq_len
    steps = opts.decode_steps if room is None else min(opts.decode_steps, room - p.size)
    ss.reset(1)
    rows = [[o[0, -1:] for o in ss.prefill(p[None])]]
    tags = [_sliced(ss.tags, lambda t: t[0, -1:])]
    fed = []
    for _ in range(steps):
        tok = np.array([int(np.argmax(rows[-1][ss.chooser][-1]))], dtype=np.int64)
        fed.append(int(tok[0]))
        rows.append(ss.decode(tok))
        tags.append(ss.tags)
    run = ScenarioRun(
        "decode",
        _stack(rows),
        steps=len(rows),
        details={"prompt_len": int(p.size), "steps": steps, "fed_tokens": fed},
    )
    return _finish(run, ss, tags)


def chunked_prefill(ss: Sessions, prompts: Sequence[np.ndarray], opts: ScenarioOptions) -> ScenarioRun:
    """The test session prefills the prompt in three uneven chunks; the others in one call."""
    p = _fit(max(prompts, key=len), ss.test)
    n = p.size
    cuts = sorted({c for c in (n // 3, n // 3 + n // 2) if 0 < c < n})
    chunks = np.split(p, cuts)
    ss.reset(1)
    outs = ss.prefill(p[None], test_chunks=[c[None] for c in chunks])
    run = ScenarioRun(
        "chunked_prefill", [o[0] for o in outs], details={"chunks": [int(c.size) for c in chunks]}
    )
    return _finish(run, ss, [ss.tags])


def batch2(ss: Sessions, prompts: Sequence[np.ndarray], opts: ScenarioOptions) -> ScenarioRun:
    """Two different equal-length prompts as one batch, then a few greedy steps per row."""
    if not ss.test.supports_batch:
        return ScenarioRun("batch2", skipped=f"{ss.test.name} does not support batch > 1")
    a = prompts[0]
    b = prompts[1] if len(prompts) > 1 else prompts[0][::-1]
    n = min(a.size, b.size)
    tokens = np.stack([a[:n], b[:n]])
    room = ss.test.max_seq_len
    if room is not None:
        tokens = tokens[:, : max(1, room - opts.batch_decode_steps)]
    steps = opts.batch_decode_steps if room is None else min(opts.batch_decode_steps, room - tokens.shape[1])
    ss.reset(2)
    first = ss.prefill(tokens)
    rows, tags = [first], [ss.tags]
    last = first[ss.chooser][:, -1]
    for _ in range(steps):
        out = ss.decode(np.argmax(last, axis=-1).astype(np.int64))
        rows.append(out)
        tags.append(ss.tags)
        last = out[ss.chooser]
    run = ScenarioRun("batch2", _stack(rows), details={"prompt_len": int(tokens.shape[1]), "steps": steps})
    return _finish(run, ss, tags)


def _fill_and_decode(
    name: str, ss: Sessions, prompts: Sequence[np.ndarray], opts: ScenarioOptions, fill: int
) -> ScenarioRun:
    """Fill `fill` tokens (the prompts repeated) in `fill_chunk` chunks, then decode 2 greedy steps.

    Compared: the last position of every filler chunk, the last `near_max_tail` positions of the final chunk
    and both decode steps; the state after them covers every cache slot filled. The fill keeps no other
    logits, so a long fill costs the prefill compute and no memory beyond the caches."""
    tokens = np.resize(np.concatenate(list(prompts)), fill).astype(np.int64)
    chunks = np.split(tokens, range(opts.fill_chunk, fill, opts.fill_chunk))
    ss.reset(1)
    rows, tags = [], []
    for i, chunk in enumerate(chunks):
        keep = opts.near_max_tail if i == len(chunks) - 1 else 1
        rows.append([o[0, -keep:] for o in ss.prefill(chunk[None])])
        tags.append(_sliced(ss.tags, lambda t, keep=keep: t[0, -keep:]))
    for _ in range(2):
        tok = np.array([int(np.argmax(rows[-1][ss.chooser][-1]))], dtype=np.int64)
        rows.append(ss.decode(tok))
        tags.append(ss.tags)
    last = fill + 1
    details = {"fill": fill, "fill_chunk": opts.fill_chunk, "chunks": len(chunks), "last_position": last}
    if ss.test.max_seq_len is not None:
        details["max_seq_len"] = ss.test.max_seq_len
    return _finish(ScenarioRun(name, _stack(rows), details=details), ss, tags)


def near_max_seq_len(ss: Sessions, prompts: Sequence[np.ndarray], opts: ScenarioOptions) -> ScenarioRun:
    """Fill to `max_seq_len - 2`, then decode 2 steps up to exactly `max_seq_len`: the last slots of the
    cache, and every slot in the state compared. Skipped above `opts.full_context_limit` (long_context then
    compares positions past `LONG_CONTEXT`)."""
    room = ss.test.max_seq_len
    if room is None:
        return ScenarioRun("near_max_seq_len", skipped=f"{ss.test.name} has no fixed max_seq_len")
    if room - 2 < 1:
        return ScenarioRun("near_max_seq_len", skipped=f"max_seq_len {room} leaves no room to fill")
    if opts.full_context_limit is not None and room > opts.full_context_limit:
        return ScenarioRun(
            "near_max_seq_len",
            skipped=f"context {room} is above the full-context limit {opts.full_context_limit} "
            f"(long_context compares positions past {LONG_CONTEXT}; --full-context to fill it all)",
        )
    return _over_fill_limit("near_max_seq_len", room - 2, opts) or _fill_and_decode(
        "near_max_seq_len", ss, prompts, opts, room - 2
    )


def _over_fill_limit(name: str, fill: int, opts: ScenarioOptions) -> ScenarioRun | None:
    if opts.fill_limit is None or fill <= opts.fill_limit:
        return None
    return ScenarioRun(
        name,
        skipped=f"a fill of {fill} tokens is above this run's fill limit of {opts.fill_limit} (the streaming "
        "reference computes each sequence whole)",
    )


LONG_CONTEXT = 8192
"""Positions past this are what `long_context` compares: where fp16 positions and RoPE angles (exact integers
only up to 2048 in fp16) and any converter constant of the rotary frequencies show their error."""


def long_context(ss: Sessions, prompts: Sequence[np.ndarray], opts: ScenarioOptions) -> ScenarioRun:
    """Fill past `LONG_CONTEXT` (to `LONG_CONTEXT + near_max_tail`), then decode 2 steps, where nothing else
    compares positions past it: a declared context above the full-context limit (near_max_seq_len skipped).
    Otherwise skipped, naming the scenario that covers it: near_max_seq_len fills the whole context and
    compares the last position of every chunk and the last slots of the cache. Every runtime shim declares
    its context; a session without one (a torch session in a test) is skipped as by near_max_seq_len."""
    room = ss.test.max_seq_len
    fill = LONG_CONTEXT + opts.near_max_tail
    if room is None:
        return ScenarioRun("long_context", skipped=f"{ss.test.name} has no fixed max_seq_len")
    if fill + 2 > room:
        return ScenarioRun(
            "long_context",
            skipped=f"context {room} ends before position {LONG_CONTEXT}: near_max_seq_len compares its end",
        )
    if opts.full_context_limit is None or room <= opts.full_context_limit:
        return ScenarioRun(
            "long_context",
            skipped=f"near_max_seq_len fills the whole {room}-token context, past position {LONG_CONTEXT}",
        )
    return _over_fill_limit("long_context", fill, opts) or _fill_and_decode(
        "long_context", ss, prompts, opts, fill
    )


SCENARIOS: dict[str, ScenarioFn] = {
    "prefill": prefill,
    "decode": decode,
    "chunked_prefill": chunked_prefill,
    "batch2": batch2,
    "near_max_seq_len": near_max_seq_len,
    "long_context": long_context,
}


AT_TIE = "_at_tie"
"""Suffix of the metrics over the positions judged apart (`Gate.router_margin`): where the simulation's expert
choice ties within fp16 rounding, held to the gate's `*_at_tie` limits instead of the tight ones."""


def within_window(tied: np.ndarray, window: int) -> np.ndarray:
    """Boolean `[..., P]`: positions tied, or at most `window` positions after a tie (along the last axis)."""
    out = tied.copy()
    for k in range(1, window + 1):
        out[..., k:] |= tied[..., :-k]
    return out


def tie_rows(run: ScenarioRun, margin: float | None) -> np.ndarray | None:
    """Boolean `[N]`: the compared rows judged apart under `margin` (`Gate.router_margin`): where the lead's
    router margin is below it, and the `tie_window` positions after such a tie in the same sequence, which the
    other expert's output reaches undiluted through the short convolution (honest `tiny-moe` palettize4 on
    Core ML: logit error 1.9e-2 and 5.7e-3 at the two positions after a flip, at most 1.6e-3 beyond).
    Later positions keep the tight limits. None where the gate judges none apart or the lead recorded no
    margins (no MoE layer, no torch simulation)."""
    if margin is None or run.tags is None:
        return None
    apart = {q: within_window(m < margin, run.tie_window) for q, m in run.sequence_margins.items()}
    return np.array([bool(apart[int(q)][int(p)]) for q, p in run.tags[:, 1:]], dtype=bool)


def _tie_slots(run: ScenarioRun, margin: float) -> np.ndarray | None:
    """Boolean `[P]` over the final state's positions judged apart in any batch row (as `tie_rows`): their KV
    slots, and a conv state holding one of them, leave the tight limits."""
    if run.state_margins is None:
        return None
    return within_window(run.state_margins < margin, run.tie_window).any(axis=0)


def _rows_metrics(r: np.ndarray, t: np.ndarray) -> dict[str, float | None]:
    """`logit_metrics`, or only the counts where no row is left (their limits then do not apply)."""
    if r.shape[0]:
        return logit_metrics(r, t)
    return {"positions": 0, "finite": 1.0, "decisive": 0}


def pair_metrics(
    run: ScenarioRun, ref: int, test: int, margin: float | None = None
) -> dict[str, float | None]:
    """Metrics of session `test` against session `ref` (indices into `run.logits`) in one scenario run.

    `margin` (`Gate.router_margin`, `lfm_export.parity.expert_ties`): rows where the lead's router margin is
    below it are judged apart (`judged_apart` counts them) and give the `*_at_tie` metrics, every other row the
    usual ones. The state likewise, by KV slot (a conv state goes with the last positions it holds)."""
    r, t = run.logits[ref], run.logits[test]
    tie = tie_rows(run, margin)
    apart = None
    if tie is None:
        m = logit_metrics(r, t)
    else:
        m = _rows_metrics(r[~tie], t[~tie])
        m["finite"] = float(np.isfinite(t).all())  # NaN logits never pass, judged apart or not
        m["judged_apart"] = int(tie.sum())
        if tie.any():
            tied = logit_metrics(r[tie], t[tie])
            for k in ("logit_max_rel", "kl_max"):
                m[k + AT_TIE] = tied[k]
        apart = _tie_slots(run, margin) if margin is not None else None
    if run.steps is not None:
        m["greedy_match"] = greedy_match_length(r[-run.steps :], t[-run.steps :])
        m["greedy_steps"] = run.steps
    steps = run.state_steps[ref] if run.state_steps else None
    state_err, info = state_max_abs(run.states[ref], run.states[test], run.positions[ref], apart, steps)
    if state_err is not None:
        m["state_max_abs"] = state_err
        m["state_max_rel"] = info["max_rel"]
        m["state_p99_rel"] = info["p99_rel"]
        if "p99_steps" in info:  # the reference side's steps: an artifact cannot widen them by its own scales
            m["state_max_steps"] = info["max_steps"]
            m["state_p99_steps"] = info["p99_steps"]
        if apart is not None and apart.any():
            _, tied_state = state_max_abs(run.states[ref], run.states[test], run.positions[ref], ~apart)
            m["state_max_rel" + AT_TIE] = tied_state["max_rel"]
    if info.get("problems"):
        run.details["state_problems"] = info["problems"]
    m["position_match"] = float(run.positions[test] == run.positions[ref])
    return m


NOT_DECISIVE = "n/a (no decisive positions)"


ROW_METRICS = ("logit_max_abs", "logit_max_rel", "logit_median_rel", "kl_max", "kl_mean", "top1_decisive")
"""Metrics over compared rows, which a scenario whose every row was judged apart or after a tie lacks."""
ROUNDING_METRICS = ("logit_max_rel", "logit_median_rel", "kl_max", "state_max_rel", "top1_decisive")
"""What the activation-rounding effect is measured on (the simulation with against without it)."""


def check(
    gate: Gate,
    scenario: str,
    metrics: dict[str, float | None],
    part: str = EXACTNESS,
    noise: dict[str, float | None] | None = None,
) -> list[Check]:
    """One check per gate limit that applies to `scenario` and whose metric the scenario reports.

    `state_*` metrics are only reported where both sessions expose state, and `greedy_match` only by decode
    scenarios; every other gated metric is always reported, so a limit is never skipped silently for them.
    Top-1 on decisive positions where there are none is recorded as a passing check marked `NOT_DECISIVE`.
    `noise`: the activation-rounding effect in this scenario, which widens limits that allow for it."""
    out = []
    for lim in gate.limits:
        optional = (
            lim.metric.startswith("state_") or lim.metric == "greedy_match" or lim.metric.endswith(AT_TIE)
        )
        if not lim.applies_to(scenario) or (optional and lim.metric not in metrics):
            continue
        if metrics.get("positions") == 0 and lim.metric in ROW_METRICS:
            continue  # every row judged apart: the `*_at_tie` limits hold them
        value = metrics.get(lim.metric)
        if lim.metric == "top1_decisive" and value is None and metrics.get("decisive") == 0:
            out.append(Check(scenario, lim.metric, None, lim.op, lim.value, True, NOT_DECISIVE, part))
            continue
        n = (noise or {}).get(lim.metric)
        out.append(Check(scenario, lim.metric, value, lim.op, lim.bound(n), lim.holds(value, n), part=part))
    return out


def _rounding_effect(effects: list[dict[str, float | None]]) -> dict[str, float | None]:
    """What activation rounding does to each exactness metric, worst over the scenarios and the pooled row: one
    allowance for the whole run, since a short scenario can sample its effect where it happens to be small
    (on `tiny` int8-b32, near_max_seq_len's own effect on KL max was a third of the artifact's honest value)."""
    out: dict[str, float | None] = {}
    for k in ROUNDING_METRICS:
        vals = [e[k] for e in effects if e.get(k) is not None]
        out[k] = (min(vals) if k == "top1_decisive" else max(vals)) if vals else None
    return out


def _pooled(runs: list[ScenarioRun], ref: int, test: int, margin: float | None = None) -> ScenarioResult:
    """Every compared row of `runs`, less those judged apart under `margin` (`pair_metrics`)."""
    r = np.concatenate([run.logits[ref] for run in runs])
    t = np.concatenate([run.logits[test] for run in runs])
    classes = [tie_rows(run, margin) for run in runs]
    if margin is None or any(c is None for c in classes):
        metrics = logit_metrics(r, t)
    else:
        tie = np.concatenate([c for c in classes if c is not None])
        metrics = _rows_metrics(r[~tie], t[~tie])
        metrics["judged_apart"] = int(tie.sum())
    return ScenarioResult(POOLED, "ok", metrics=metrics, details={"of": [run.name for run in runs]})


def _snapshot_row(session: Session, prompt: np.ndarray, checks: list[Check]) -> ScenarioResult:
    status, metrics, reason = parity_snapshot_row(session, prompt)
    if status == "error":
        checks.append(Check(SNAPSHOTS, "error", None, "", None, False, note=reason))
    for metric, value in metrics.items():
        ok = bool(np.isfinite(value)) and value <= RESTORE_LIMIT
        checks.append(Check(SNAPSHOTS, metric, value, "<=", RESTORE_LIMIT, ok, note=reason))
    return ScenarioResult(SNAPSHOTS, status, metrics=metrics, reason=reason)


def run_parity(
    test_session: Session,
    reference_session: Session,
    recipe: str | Gate,
    prompts: Sequence[np.ndarray] | None = None,
    scenarios: Sequence[str] | None = None,
    *,
    simulation: Session | None = None,
    activations: str | dict[str, str] = "float",
    rounding: Session | None = None,
    quality: Gate | None = None,
    tokenizer_file: str | None = None,
    options: ScenarioOptions | None = None,
    metadata: dict[str, Any] | None = None,
    snapshots: bool = True,
    stored_weights: StoredWeights | Callable[[], StoredWeights] | None = None,
    streaming: StreamingReference | None = None,
    exact_rows: Sequence[ExactRow] = (),
) -> ParityResult:
    """Run `scenarios` (default: all) on the sessions and check both parts of the verdict:

    - exactness: `test_session` against `simulation` (the recipe computed in torch; None: the recipe is the
      reference's own math, fp32) with the tight gate for `recipe` and the runtime's `activations` rounding
      (`lfm_export.recipes.ACTIVATION_MODES`); `rounding` is the simulation without activation rounding, whose
      distance from `simulation` widens the limits of gates that allow for it (`Limit.rounding`);
    - quality: `test_session` (and `simulation`) against the fp32 `reference_session`, checked by `quality`
      (default: the loose sanity bound of the recipe's family, `sanity_gate`).

    `snapshots`: also run the snapshot scenario (`lfm_export.parity.snapshots`) on `test_session` alone: a
    restored snapshot continues as the session did, and a conversation started from a prefix's snapshot
    equals recomputing it (row `snapshots`, skipped where the runtime hides its state).
    `stored_weights` (the artifact's stored quantized weights against the simulation's,
    `lfm_export.parity.stored_weights.compare`, or a function giving it, called after the scenarios) adds its
    checks to exactness, and so does each of `exact_rows` (`lfm_export.parity.exact_row`: the rows the backend's
    gate computed, which the report also carries).

    `streaming`: the reference, simulation and rounding sessions are its recorders, computed one layer at a
    time after the scenarios ran (`lfm_export.parity.streaming`): the tokens fed after a prompt are then the
    artifact's greedy choices, and fill scenarios longer than its fill limit are skipped.

    Tokens fed after a prompt are the simulation's greedy choices (the reference's without one). A scenario in
    which a session raises is recorded as an `error` with a failing exactness check, so one crash does not hide
    the other scenarios' results.
    """
    if test_session is reference_session or test_session is simulation:
        raise ValueError("the test and reference sessions must be two objects (both are fed the same tokens)")
    gate = recipe if isinstance(recipe, Gate) else gate_for(recipe, activations)
    quality_gate = quality or sanity_gate(recipe if isinstance(recipe, str) else gate.name)
    for other in (reference_session, simulation, rounding):
        if other is not None and test_session.vocab_size != other.vocab_size:
            raise UserError(
                f"{test_session.name} has vocabulary {test_session.vocab_size}, {other.name} {other.vocab_size}"
            )
    names = list(SCENARIOS) if scenarios is None else list(scenarios)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise UserError(f"unknown parity scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    vocab = reference_session.vocab_size
    ids = check_prompts(prompts, vocab) if prompts is not None else default_prompts(vocab, tokenizer_file)
    opts = options or ScenarioOptions()
    # positions judged apart where the gate asks for it: the simulation's router margins (a torch model's)
    margin = gate.router_margin if simulation is not None else None
    margins = recorder_for(simulation) if margin is not None else None
    if margins is None:
        margin = None
    replay = streaming is not None
    if replay:
        opts = dataclasses.replace(opts, fill_limit=streaming.fill_limit)
    if simulation is None:
        sessions = Sessions(
            test_session, reference_session, [rounding] if rounding else [], test_chooses=replay
        )
        lead = ref = 0
    else:
        others = [reference_session, *([rounding] if rounding else [])]
        sessions = Sessions(test_session, simulation, others, margins, test_chooses=replay)
        lead, ref = 0, 1
    # the rounding effect: the simulation against itself without activation rounding; where the runtime
    # computes in half precision (`native`), against the fp32 reference (what computing in that type does)
    noisy = len(sessions.comparisons) - 1 if rounding is not None else None
    if noisy is None and activations == "native" and simulation is not None:
        noisy = ref
    test = -1
    exact: list[ScenarioResult] = []
    qual: list[ScenarioResult] = []
    loss: list[ScenarioResult] = []
    effects: list[dict[str, float | None]] = []
    checks: list[Check] = []
    compared: list[ScenarioRun] = []
    # first, so that the scenarios leave the sessions as callers expect them (the last one's state)
    snapshot_row = _snapshot_row(test_session, ids[0], checks) if snapshots else None
    outcomes: list[ScenarioRun | tuple[str, str]] = []
    try:
        for name in names:
            try:
                outcomes.append(SCENARIOS[name](sessions, ids, opts))
            except Exception as e:  # a crashing backend is a parity failure, reported like one
                outcomes.append((name, f"{type(e).__name__}: {e}"))
    finally:
        if margins is not None:
            margins.close()
    if streaming is not None:
        ran = [r for r in outcomes if isinstance(r, ScenarioRun) and r.skipped is None]
        streaming.complete(ran, sessions.comparisons)
    for run in outcomes:
        if not isinstance(run, ScenarioRun):
            name, msg = run
            exact.append(ScenarioResult(name, "error", reason=msg))
            checks.append(Check(name, "error", None, "", None, False, note=msg))
            continue
        name = run.name
        if run.skipped is not None:
            exact.append(ScenarioResult(name, "skipped", reason=run.skipped))
            continue
        exact_metrics = pair_metrics(run, lead, test, margin)
        details = dict(run.details)
        classes = tie_rows(run, margin)
        if classes is not None:
            details["judged_apart"] = [[int(q), int(p)] for _, q, p in run.tags[classes]]
        exact.append(ScenarioResult(name, "ok", metrics=exact_metrics, details=details))
        if noisy is not None:
            effects.append(pair_metrics(run, lead, noisy, margin))
        q = pair_metrics(run, ref, test) if ref != lead else dict(exact[-1].metrics)
        qual.append(ScenarioResult(name, "ok", metrics=q))
        checks.extend(check(quality_gate, name, q, QUALITY))
        if ref != lead:
            loss.append(ScenarioResult(name, "ok", metrics=pair_metrics(run, ref, lead)))
        compared.append(run)
    if compared:
        exact.append(_pooled(compared, lead, test, margin))
        if noisy is not None:
            effects.append(_pooled(compared, lead, noisy, margin).metrics)
        qual.append(_pooled(compared, ref, test))
        checks.extend(check(quality_gate, POOLED, qual[-1].metrics, QUALITY))
        if ref != lead:
            loss.append(_pooled(compared, ref, lead))
    noise = _rounding_effect(effects) if effects else None
    checks[:0] = [c for s in exact if s.status == "ok" for c in check(gate, s.name, s.metrics, noise=noise)]
    if snapshot_row is not None:
        exact.append(snapshot_row)
    if callable(stored_weights):
        stored_weights = stored_weights()
    if stored_weights is not None:
        checks[:0] = stored_weight_checks(stored_weights)
    for row in exact_rows:
        checks[:0] = row.checks()
    return ParityResult(
        recipe=gate.name if isinstance(recipe, Gate) else recipe,
        activation_rounding=noise,
        gate=gate,
        test_name=test_session.name,
        reference_name=reference_session.name,
        scenarios=exact,
        checks=checks,
        metadata=dict(metadata or {}),
        prompt_lengths=[int(p.size) for p in ids],
        simulation_name=None if simulation is None else simulation.name,
        quality_gate=quality_gate,
        quality=qual,
        recipe_loss=loss,
        stored_weights=None if stored_weights is None else stored_weights.to_json(),
        streaming=None if streaming is None else streaming.describe(),
        exact_rows=list(exact_rows),
    )
