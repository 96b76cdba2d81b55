"""The snapshot scenario: a session's own `snapshot()` / `restore(snap)` checked against the same session
recomputing from scratch, on any backend.

One run, on one session (`session` is reset first):
1. prefill a shared prefix P (a system prompt) and snapshot it (`S_P`); prefill conversation A's tokens,
   snapshot (`S_A`), decode k fixed tokens;
2. `restore_decode`: restore `S_A`, decode the same k: the same logits as the first time;
3. `prefix_reuse`: restore `S_P` (the session now holds A's later conv state and KV), prefill conversation B's
   tokens and decode k: the same logits as `reset`, prefill P, prefill B, decode k (the same calls, so
   deterministic runtimes agree bitwise). A session whose restore keeps a later conv state fails here;
4. `whole_prompt`: the same logits for B's positions as one prefill of P + B (another chunking, so within a
   float tolerance, `whole_rel`).

`exact_rel` bounds steps 2 and 3: 0 (bitwise) for runtimes that copy their state, more for one that
recomputes it (ExecuTorch replays the snapshot's tokens). Errors are max |a - b| / max |b| per check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from lfm_export.contract.session import Session


@dataclass(frozen=True)
class SnapshotCheck:
    name: str
    max_rel: float
    limit: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_rel)) and self.max_rel <= self.limit and not self.detail


@dataclass
class SnapshotReport:
    session: str
    checks: list[SnapshotCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def summary(self) -> str:
        rows = [
            f"{c.name}: {c.max_rel:.3g} (limit {c.limit:g}){' ' + c.detail if c.detail else ''}"
            f" {'ok' if c.passed else 'FAIL'}"
            for c in self.checks
        ]
        return f"{self.session}: " + "; ".join(rows)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    scale = max(float(np.abs(b).max()), 1e-30)
    return float(np.abs(a - b).max()) / scale


def _decode(session: Session, tokens: Sequence[int]) -> np.ndarray:
    return np.stack([session.decode(np.array([t], dtype=np.int64))[0] for t in tokens])


def snapshot_scenario(
    session: Session,
    prefix: Sequence[int],
    first: Sequence[int],
    second: Sequence[int],
    decode_tokens: Sequence[int],
    exact_rel: float = 0.0,
    whole_rel: float = 1e-4,
) -> SnapshotReport:
    """Run the scenario of the module docstring on `session` (batch 1); the token lists must be non-empty and
    fit its context together (P + A + k and P + B + k)."""
    p = np.asarray([prefix], dtype=np.int64)
    a = np.asarray([first], dtype=np.int64)
    b = np.asarray([second], dtype=np.int64)
    report = SnapshotReport(session.name)

    session.reset(1)
    session.prefill(p)
    snap_p = session.snapshot()
    session.prefill(a)
    snap_a = session.snapshot()
    first_decode = _decode(session, decode_tokens)

    session.restore(snap_a)
    where = "" if session.position == snap_a.position else f"position {session.position} != {snap_a.position}"
    report.checks.append(
        SnapshotCheck("restore_decode", _rel(_decode(session, decode_tokens), first_decode), exact_rel, where)
    )

    session.restore(snap_p)
    held = session.snapshot().tokens
    where = "" if np.array_equal(held, p) else "the restored session holds other tokens than the prefix"
    reused = np.concatenate([session.prefill(b)[0], _decode(session, decode_tokens)])

    session.reset(1)
    session.prefill(p)
    fresh = np.concatenate([session.prefill(b)[0], _decode(session, decode_tokens)])
    report.checks.append(SnapshotCheck("prefix_reuse", _rel(reused, fresh), exact_rel, where))

    session.reset(1)
    whole = session.prefill(np.concatenate([p, b], axis=1))[0, p.shape[1] :]
    report.checks.append(SnapshotCheck("whole_prompt", _rel(reused[: b.shape[1]], whole), whole_rel))
    return report


SNAPSHOTS = "snapshots"
"""The parity report's row for the snapshot scenario run on the artifact's own session."""
RESTORE_LIMIT = 1e-6
"""Relative limit of `restore_decode` and `prefix_reuse` in a parity run: the same calls on the same state, so
copying runtimes agree bitwise (every backend's tests hold them to 0); the margin only absorbs a runtime that
picks a kernel by thread timing."""


def parity_snapshot_row(session: Session, prompt: np.ndarray) -> tuple[str, dict[str, float], str]:
    """Run the scenario on `session` with tokens of `prompt` (`[T]`, T >= 4; a shorter prefix and conversations
    when it is short): (status, metrics, reason). Status `skipped` where the session takes no snapshots (its
    runtime hides its state), `error` where a call raised."""
    from lfm_export.contract.errors import UnsupportedError

    ids = [int(t) for t in np.asarray(prompt).reshape(-1)]
    if not callable(getattr(session, "snapshot", None)) or not callable(getattr(session, "restore", None)):
        return "skipped", {}, f"{session.name} has no snapshot() / restore()"
    if len(ids) < 4:
        return "skipped", {}, "the prompt is shorter than 4 tokens"
    n = min(6, len(ids) // 3)
    prefix, first, second, decode = ids[:n], ids[n : 2 * n], ids[2 * n : 3 * n][::-1], ids[:3]
    try:
        report = snapshot_scenario(session, prefix, first, second, decode, RESTORE_LIMIT, float("inf"))
    except UnsupportedError as e:
        return "skipped", {}, str(e)
    except Exception as e:  # a crashing restore is a parity failure, reported like one
        return "error", {}, f"{type(e).__name__}: {e}"
    finally:
        try:
            session.reset(1)
        except Exception:  # the error above is the one to report
            pass
    kept = [c for c in report.checks if c.name != "whole_prompt"]
    metrics = {f"{c.name}_rel": (c.max_rel if not c.detail else float("inf")) for c in kept}
    return "ok", metrics, "; ".join(f"{c.name}: {c.detail}" for c in kept if c.detail)
