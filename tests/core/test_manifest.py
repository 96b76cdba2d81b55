import hashlib
import json

import pytest

from lfm_export.contract.errors import UserError
from lfm_export.manifest import (
    SCHEMA_VERSION,
    atomic_output,
    build_manifest,
    check_output_path,
    read_manifest,
    write_manifest,
)


def test_success_renames_into_place(tmp_path):
    out = tmp_path / "art"
    with atomic_output(out) as tmp:
        assert tmp.parent == tmp_path and not out.exists()
        (tmp / "model.bin").write_bytes(b"abc")
    assert (out / "model.bin").read_bytes() == b"abc"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temp folder left behind


def test_failure_leaves_nothing(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(RuntimeError), atomic_output(out) as tmp:
        (tmp / "half.onnx").write_bytes(b"x" * 10)
        raise RuntimeError("killed half-way")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_output(tmp_path / "art") as tmp:
        (tmp / "half.onnx").write_bytes(b"x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_without_force(tmp_path):
    (tmp_path / "art").mkdir()
    with pytest.raises(UserError, match="already exists"), atomic_output(tmp_path / "art"):
        pass


def test_force_replaces_but_a_failed_replacement_keeps_the_old_artifact(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(RuntimeError), atomic_output(out, force=True) as tmp:
        (tmp / "new").write_text("new")
        raise RuntimeError
    assert (out / "old").read_text() == "old"
    with atomic_output(out, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_manifest_lists_files_with_sha256(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"graph")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.data").write_bytes(b"weights")
    m = build_manifest(
        model_identity={"source": "tiny"},
        config={},
        backend="onnx",
        recipe={"name": "fp32"},
        signature={"form": "growing", "max_seq_len": None},
        folder=tmp_path,
    )
    write_manifest(tmp_path, m)
    back = read_manifest(tmp_path)
    assert back["schema_version"] == SCHEMA_VERSION and back["backend"] == "onnx"
    files = {f["path"]: f for f in back["files"]}
    assert set(files) == {"model.onnx", "sub/w.data"}
    assert files["sub/w.data"]["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert back["total_bytes"] == 12 and "torch" in back["tool"]["versions"]


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no manifest.json"),
        ("{", "not valid JSON"),
        ('{"a": 1}', "not an lfm-export manifest"),
    ],
)
def test_bad_manifests(tmp_path, content, message):
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(UserError, match=message):
        read_manifest(tmp_path)


def test_newer_schema_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(UserError, match="newer"):
        read_manifest(tmp_path)


def test_atomic_output_creates_missing_parents_but_not_under_a_file(tmp_path):
    out = tmp_path / "a" / "b" / "artifact"
    with atomic_output(out) as tmp:
        (tmp / "x").write_text("1")
    assert (out / "x").read_text() == "1"
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is not a folder"):
        check_output_path(tmp_path / "file" / "artifact", force=False)
