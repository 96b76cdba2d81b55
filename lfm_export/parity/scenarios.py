"""Parity scenarios and the run loop.

A scenario drives a test session and the reference session with identical token ids and returns both
sessions' logits for the positions it compares. Tokens fed after the prompt are the *reference's* greedy
choices, so the test session never drifts onto a different input because of one early disagreement.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lfm_export.errors import UserError
from lfm_export.parity.metrics import greedy_match_length, logit_metrics, state_max_abs
from lfm_export.parity.prompts import check_prompts, default_prompts
from lfm_export.parity.report import Check, ParityResult, ScenarioResult
from lfm_export.parity.thresholds import POOLED, Gate, gate_for

if TYPE_CHECKING:
    # only for annotations: the editable install may not map lfm_export.runtime yet
    from lfm_export.runtime.session import Session


@dataclass
class ScenarioOptions:
    decode_steps: int = 16
    batch_decode_steps: int = 4
    fill_chunk: int = 256
    """Chunk size of the cheap filler prefill in `near_max_seq_len`."""
    near_max_tail: int = 8
    """Positions of the last filler chunk compared in `near_max_seq_len`."""


@dataclass
class ScenarioRun:
    """Both sessions' logits `[N, vocab]` for the compared positions, or why the scenario was skipped."""

    name: str
    ref_logits: np.ndarray | None = None
    test_logits: np.ndarray | None = None
    skipped: str | None = None
    greedy: tuple[int, int] | None = None
    """(exact-match length, steps) for decode scenarios."""
    ref_state: dict[str, np.ndarray] | None = None
    test_state: dict[str, np.ndarray] | None = None
    ref_position: int = 0
    test_position: int = 0
    details: dict[str, Any] = field(default_factory=dict)


ScenarioFn = Callable[["Session", "Session", Sequence[np.ndarray], ScenarioOptions], ScenarioRun]


def _logits(session: Session, out: np.ndarray, shape: tuple[int, ...], call: str) -> np.ndarray:
    arr = np.asarray(out)
    if arr.shape != shape:
        raise ValueError(
            f"{session.name}: {call} returned logits of shape {list(arr.shape)}, expected {list(shape)}"
        )
    return arr


def _finish(run: ScenarioRun, test: Session, ref: Session) -> ScenarioRun:
    run.test_state, run.ref_state = test.state(), ref.state()
    run.test_position, run.ref_position = test.position, ref.position
    return run


def _fit(prompt: np.ndarray, session: Session, reserve: int = 0) -> np.ndarray:
    room = session.max_seq_len
    return prompt if room is None else prompt[: max(1, room - reserve)]


def _prefill_both(test: Session, ref: Session, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = ref.prefill(tokens)
    t = _logits(test, test.prefill(tokens), r.shape, "prefill")
    return r, t


def _decode_both(test: Session, ref: Session, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = ref.decode(tokens)
    t = _logits(test, test.decode(tokens), r.shape, "decode")
    return r, t


def prefill(test: Session, ref: Session, prompts: Sequence[np.ndarray], opts: ScenarioOptions) -> ScenarioRun:
    """Every prompt in one prefill call from an empty state; every position of every prompt compared."""
    ref_rows, test_rows, lengths = [], [], []
    for prompt in prompts:
        p = _fit(prompt, test)
        test.reset(1)
        ref.reset(1)
        r, t = _prefill_both(test, ref, p[None])
        ref_rows.append(r[0])
        test_rows.append(t[0])
        lengths.append(int(p.size))
    run = ScenarioRun(
        "prefill", np.concatenate(ref_rows), np.concatenate(test_rows), details={"prompt_lens": lengths}
    )
    return _finish(run, test, ref)


def decode(test: Session, ref: Session, prompts: Sequence[np.ndarray], opts: ScenarioOptions) -> ScenarioRun:
    """Prefill, then `decode_steps` greedy steps with state carried; the last prompt position and every
    step are compared."""
    p = _fit(prompts[0], test, reserve=opts.decode_steps)
    room = test.max_seq_len
    steps = opts.decode_steps if room is None else min(opts.decode_steps, room - p.size)
    test.reset(1)
    ref.reset(1)
    r, t = _prefill_both(test, ref, p[None])
    ref_rows, test_rows, fed = [r[0, -1]], [t[0, -1]], []
    for _ in range(steps):
        tok = np.array([int(np.argmax(ref_rows[-1]))], dtype=np.int64)
        fed.append(int(tok[0]))
        r1, t1 = _decode_both(test, ref, tok)
        ref_rows.append(r1[0])
        test_rows.append(t1[0])
    rr, tt = np.stack(ref_rows), np.stack(test_rows)
    run = ScenarioRun(
        "decode",
        rr,
        tt,
        greedy=(greedy_match_length(rr, tt), len(ref_rows)),
        details={"prompt_len": int(p.size), "steps": steps, "fed_tokens": fed},
    )
    return _finish(run, test, ref)


def chunked_prefill(
    test: Session, ref: Session, prompts: Sequence[np.ndarray], opts: ScenarioOptions
) -> ScenarioRun:
    """The test session prefills the prompt in three uneven chunks; the reference in one call."""
    p = _fit(max(prompts, key=len), test)
    n = p.size
    cuts = sorted({c for c in (n // 3, n // 3 + n // 2) if 0 < c < n})
    test.reset(1)
    ref.reset(1)
    r = ref.prefill(p[None])
    pieces = []
    for chunk in np.split(p, cuts):
        pieces.append(_logits(test, test.prefill(chunk[None]), (1, chunk.size, r.shape[-1]), "prefill"))
    t = np.concatenate(pieces, axis=1)
    sizes = [int(c.size) for c in np.split(p, cuts)]
    return _finish(ScenarioRun("chunked_prefill", r[0], t[0], details={"chunks": sizes}), test, ref)


def batch2(test: Session, ref: Session, prompts: Sequence[np.ndarray], opts: ScenarioOptions) -> ScenarioRun:
    """Two different equal-length prompts as one batch, then a few greedy steps per row."""
    if not test.supports_batch:
        return ScenarioRun("batch2", skipped=f"{test.name} does not support batch > 1")
    a = prompts[0]
    b = prompts[1] if len(prompts) > 1 else prompts[0][::-1]
    n = min(a.size, b.size)
    tokens = np.stack([a[:n], b[:n]])
    room = test.max_seq_len
    if room is not None:
        tokens = tokens[:, : max(1, room - opts.batch_decode_steps)]
    steps = opts.batch_decode_steps if room is None else min(opts.batch_decode_steps, room - tokens.shape[1])
    test.reset(2)
    ref.reset(2)
    r, t = _prefill_both(test, ref, tokens)
    ref_rows, test_rows = [r.reshape(-1, r.shape[-1])], [t.reshape(-1, t.shape[-1])]
    last = r[:, -1]
    for _ in range(steps):
        toks = np.argmax(last, axis=-1).astype(np.int64)
        last, t1 = _decode_both(test, ref, toks)
        ref_rows.append(last)
        test_rows.append(t1)
    run = ScenarioRun(
        "batch2",
        np.concatenate(ref_rows),
        np.concatenate(test_rows),
        details={"prompt_len": int(tokens.shape[1]), "steps": steps},
    )
    return _finish(run, test, ref)


def near_max_seq_len(
    test: Session, ref: Session, prompts: Sequence[np.ndarray], opts: ScenarioOptions
) -> ScenarioRun:
    """Fill to `max_seq_len - 2` in chunks, then decode 2 steps up to exactly `max_seq_len`.

    Compared: the last position of every filler chunk, the last `near_max_tail` positions of the final chunk
    and both decode steps (logits of the whole fill are not kept, so big contexts stay cheap in memory)."""
    room = test.max_seq_len
    if room is None:
        return ScenarioRun("near_max_seq_len", skipped=f"{test.name} has no fixed max_seq_len")
    fill = room - 2
    if fill < 1:
        return ScenarioRun("near_max_seq_len", skipped=f"max_seq_len {room} leaves no room to fill")
    tokens = np.resize(np.concatenate(list(prompts)), fill).astype(np.int64)
    chunks = np.split(tokens, range(opts.fill_chunk, fill, opts.fill_chunk))
    test.reset(1)
    ref.reset(1)
    ref_rows, test_rows = [], []
    for i, chunk in enumerate(chunks):
        r, t = _prefill_both(test, ref, chunk[None])
        keep = opts.near_max_tail if i == len(chunks) - 1 else 1
        ref_rows.append(r[0, -keep:])
        test_rows.append(t[0, -keep:])
    for _ in range(2):
        tok = np.array([int(np.argmax(ref_rows[-1][-1]))], dtype=np.int64)
        r1, t1 = _decode_both(test, ref, tok)
        ref_rows.append(r1)
        test_rows.append(t1)
    run = ScenarioRun(
        "near_max_seq_len",
        np.concatenate(ref_rows),
        np.concatenate(test_rows),
        details={"max_seq_len": room, "fill": fill, "fill_chunk": opts.fill_chunk, "chunks": len(chunks)},
    )
    return _finish(run, test, ref)


SCENARIOS: dict[str, ScenarioFn] = {
    "prefill": prefill,
    "decode": decode,
    "chunked_prefill": chunked_prefill,
    "batch2": batch2,
    "near_max_seq_len": near_max_seq_len,
}


def measure(run: ScenarioRun) -> dict[str, float]:
    """Metrics of one scenario run."""
    assert run.ref_logits is not None and run.test_logits is not None
    m: dict[str, float] = logit_metrics(run.ref_logits, run.test_logits)
    if run.greedy is not None:
        m["greedy_match"], m["greedy_steps"] = run.greedy
    state_err, info = state_max_abs(run.ref_state, run.test_state, run.ref_position)
    if state_err is not None:
        m["state_max_abs"] = state_err
    if info.get("problems"):
        run.details["state_problems"] = info["problems"]
    m["position_match"] = float(run.test_position == run.ref_position)
    return m


def check(gate: Gate, scenario: str, metrics: dict[str, float]) -> list[Check]:
    """One check per gate limit that applies to `scenario` and whose metric the scenario reports.

    `state_max_abs` is only reported where both sessions expose state; every other gated metric is always
    reported, so a limit is never skipped silently for them."""
    out = []
    for lim in gate.limits:
        if not lim.applies_to(scenario) or (lim.metric == "state_max_abs" and lim.metric not in metrics):
            continue
        value = metrics.get(lim.metric)
        out.append(Check(scenario, lim.metric, value, lim.op, lim.value, lim.holds(value)))
    return out


def run_parity(
    test_session: Session,
    reference_session: Session,
    recipe: str | Gate,
    prompts: Sequence[np.ndarray] | None = None,
    scenarios: Sequence[str] | None = None,
    *,
    tokenizer_file: str | None = None,
    options: ScenarioOptions | None = None,
    metadata: dict[str, Any] | None = None,
) -> ParityResult:
    """Run `scenarios` (default: all) on both sessions and check them against the gate for `recipe`.

    A scenario in which the test session raises is recorded as an `error` with a failing check, so one crash
    does not hide the other scenarios' results.
    """
    if test_session is reference_session:
        raise ValueError("the test and reference sessions must be two objects (both are fed the same tokens)")
    gate = recipe if isinstance(recipe, Gate) else gate_for(recipe)
    if test_session.vocab_size != reference_session.vocab_size:
        raise UserError(
            f"{test_session.name} has vocabulary {test_session.vocab_size}, "
            f"the reference {reference_session.vocab_size}"
        )
    names = list(SCENARIOS) if scenarios is None else list(scenarios)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise UserError(f"unknown parity scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    vocab = reference_session.vocab_size
    ids = check_prompts(prompts, vocab) if prompts is not None else default_prompts(vocab, tokenizer_file)
    opts = options or ScenarioOptions()
    results: list[ScenarioResult] = []
    checks: list[Check] = []
    compared: list[ScenarioRun] = []
    for name in names:
        try:
            run = SCENARIOS[name](test_session, reference_session, ids, opts)
        except Exception as e:  # a crashing backend is a parity failure, reported like one
            msg = f"{type(e).__name__}: {e}"
            results.append(ScenarioResult(name, "error", reason=msg))
            checks.append(Check(name, "error", None, "", None, False, note=msg))
            continue
        if run.skipped is not None:
            results.append(ScenarioResult(name, "skipped", reason=run.skipped))
            continue
        metrics = measure(run)
        results.append(ScenarioResult(name, "ok", metrics=metrics, details=run.details))
        checks.extend(check(gate, name, metrics))
        compared.append(run)
    if compared:
        pooled = logit_metrics(
            np.concatenate([r.ref_logits for r in compared]),  # type: ignore[misc]
            np.concatenate([r.test_logits for r in compared]),  # type: ignore[misc]
        )
        results.append(
            ScenarioResult(POOLED, "ok", metrics=pooled, details={"of": [r.name for r in compared]})
        )
        checks.extend(check(gate, POOLED, pooled))
    return ParityResult(
        recipe=gate.name if isinstance(recipe, Gate) else recipe,
        gate=gate,
        test_name=test_session.name,
        reference_name=reference_session.name,
        scenarios=results,
        checks=checks,
        metadata=dict(metadata or {}),
        prompt_lengths=[int(p.size) for p in ids],
    )
