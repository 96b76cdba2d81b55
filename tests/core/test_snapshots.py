"""Session snapshots on the reference session: the scenario passes, fails for a session whose restore keeps a
later conv state, and the `.npz` file format refuses what it did not write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from broken_sessions import KeepsConvOnRestore
from snapshot_checks import DECODE, FIRST, PREFIX, SECOND, check_snapshots

from lfm_export.contract.snapshot import Snapshot, SnapshotError
from lfm_export.loading import load_model
from lfm_export.parity import ReferenceSession
from lfm_export.parity.snapshots import snapshot_scenario


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_model("tiny").model


def test_reference_session_snapshots_pass_the_scenario(tiny, tmp_path: Path) -> None:
    report = check_snapshots(ReferenceSession(tiny, max_seq_len=64), tmp_path)
    assert [c.name for c in report.checks] == ["restore_decode", "prefix_reuse", "whole_prompt"]
    assert report.checks[0].max_rel == 0.0 and report.checks[1].max_rel == 0.0  # bitwise


def test_a_restore_that_keeps_a_later_conv_state_fails_the_scenario(tiny) -> None:
    report = snapshot_scenario(KeepsConvOnRestore(tiny), PREFIX, FIRST, SECOND, DECODE)
    assert not report.passed
    failed = {c.name for c in report.checks if not c.passed}
    assert {"prefix_reuse", "whole_prompt"} <= failed
    assert min(c.max_rel for c in report.checks if c.name in failed) > 1e-2


def test_a_snapshot_is_a_copy_and_keeps_its_tokens(tiny) -> None:
    s = ReferenceSession(tiny)
    s.prefill(np.array([PREFIX]))
    snap = s.snapshot()
    kept = {k: v.copy() for k, v in snap.state.items()}
    s.decode(np.array([5]))
    assert all(np.array_equal(snap.state[k], kept[k]) for k in kept)
    assert snap.tokens.tolist() == [PREFIX] and snap.position == len(PREFIX)
    s.restore(snap)
    assert s.tokens().tolist() == [PREFIX]
    s.decode(np.array([5]))
    assert s.snapshot().tokens.tolist() == [[*PREFIX, 5]]


@pytest.mark.unit
def test_snapshot_files_refuse_what_they_did_not_write(tmp_path: Path) -> None:
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(SnapshotError, match="not a snapshot file written by lfm-export"):
        Snapshot.load(tmp_path / "other.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(SnapshotError, match="not a snapshot file"):
        Snapshot.load(tmp_path / "text.npz")
    with pytest.raises(SnapshotError, match="does not exist"):
        Snapshot.load(tmp_path / "missing.npz")
    snap = Snapshot(
        "onnx", "sha256:ab", 2, np.array([[1, 2]]), {"past.0.conv": np.ones((1, 4, 2), np.float16)}
    )
    back = Snapshot.load(snap.save(tmp_path / "s.npz"))
    assert back.session == "onnx" and back.artifact_id == "sha256:ab" and back.tokens.tolist() == [[1, 2]]
    assert back.state["past.0.conv"].dtype == np.float16
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_restore_refuses_another_session_or_a_snapshot_past_the_context(tiny) -> None:
    s = ReferenceSession(tiny, max_seq_len=4)
    with pytest.raises(SnapshotError, match="taken by a onnx session"):
        s.restore(Snapshot("onnx", None, 0, np.zeros((1, 0), np.int64)))
    with pytest.raises(SnapshotError, match="restore takes a Snapshot"):
        s.restore({"past.0.conv": np.zeros(1)})
    too_long = Snapshot("reference", None, 6, np.ones((1, 6), np.int64))
    with pytest.raises(Exception, match="outside 0..4"):
        s.restore(too_long)


def test_parity_fails_a_session_whose_restore_keeps_a_later_conv_state(tiny) -> None:
    """`run_parity` runs the snapshot scenario on the artifact's own session: the honest reference passes it
    bitwise; a session whose `restore` keeps the previous conversation's conv state fails parity there, though
    its other scenarios (which never restore) agree."""
    from lfm_export.parity import run_parity

    prompts = [np.array([1, 25, 120, 203, 272, 40, 99, 7, 6, 200, 12, 5, 77], dtype=np.int64)]
    honest = run_parity(ReferenceSession(tiny), ReferenceSession(tiny), "fp32", prompts, ["prefill"])
    assert honest.passed and honest.scenario("snapshots").metrics == {
        "restore_decode_rel": 0.0,
        "prefix_reuse_rel": 0.0,
    }
    broken = run_parity(KeepsConvOnRestore(tiny), ReferenceSession(tiny), "fp32", prompts, ["prefill"])
    assert not broken.passed and broken.failed_scenarios() == ["snapshots"]
    assert broken.scenario("snapshots").metrics["prefix_reuse_rel"] > 1e-2
