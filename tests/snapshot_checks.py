"""The snapshot scenario as every backend's tests run it: short fixed token lists (ids below 300, inside every
bundled and test vocabulary), the scenario's checks, and the snapshot's round trip through an `.npz` file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lfm_export.contract.snapshot import Snapshot, SnapshotError
from lfm_export.parity.snapshots import SnapshotReport, snapshot_scenario

PREFIX = [1, 25, 120, 203, 272, 40]
FIRST = [99, 7, 6, 200]
SECOND = [12, 5, 77, 8, 150]
DECODE = [3, 9, 11]


def check_snapshots(
    session, tmp_path: Path, exact_rel: float = 0.0, whole_rel: float = 1e-4, short: bool = False
) -> SnapshotReport:
    """The scenario passes; a snapshot saved and loaded restores the same logits; a snapshot of another
    artifact is refused in one line. `short`: 2 prefix tokens, 1 per conversation, 1 decode step (20 tokens in
    all, for the sessions that run a token at a time in Python; the conv kernel holds 2 past tokens, so a stale
    conv state still shows)."""
    n = (2, 1, 1, 1) if short else (len(PREFIX), len(FIRST), len(SECOND), len(DECODE))
    prefix, first, second, decode = PREFIX[: n[0]], FIRST[: n[1]], SECOND[: n[2]], DECODE[: n[3]]
    report = snapshot_scenario(session, prefix, first, second, decode, exact_rel, whole_rel)
    assert report.passed, report.summary()

    session.reset(1)
    session.prefill(np.array([prefix]))
    snap = session.snapshot()
    want = session.prefill(np.array([second]))
    path = snap.save(tmp_path / "prefix.npz")
    session.prefill(np.array([first]))  # move on, then come back from disk
    loaded = Snapshot.load(path)
    assert loaded.position == len(prefix) and loaded.artifact_id == session.artifact_id
    session.restore(loaded)
    assert session.position == len(prefix)
    got = session.prefill(np.array([second]))
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= exact_rel * scale, "a loaded snapshot continues as the original"

    foreign = Snapshot(snap.session, "sha256:0000000000000000", snap.position, snap.tokens, snap.state)
    with pytest.raises(SnapshotError, match="belongs to artifact sha256:0000000000000000"):
        session.restore(foreign)
    return report
