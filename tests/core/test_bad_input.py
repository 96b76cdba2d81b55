"""Bad input through the real CLI: one line on stderr, exit 2 (130 on SIGINT), nothing left at OUT and no
temporary folder beside it."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CHECKPOINT_CONFIG as CFG
from safetensors.torch import load_file, save_file

from lfm_export.loading import BUNDLED, init_random, save_checkpoint


def cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lfm_export.cli", *args], capture_output=True, text=True, timeout=300, **kw
    )


def assert_user_error(r: subprocess.CompletedProcess, fragment: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and fragment in error[0], r.stderr


def assert_nothing_left(parent: Path) -> None:
    """No artifact, no `.OUT.tmp-*` folder, no write probe: the parent is as it was (empty)."""
    assert sorted(p.name for p in parent.iterdir()) == []


@pytest.fixture()
def ckpt(tmp_path):
    folder = tmp_path / "m"
    save_checkpoint(init_random(CFG, seed=3), folder)
    return folder


def test_unwritable_output_folder(tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    if os.geteuid() == 0:  # permission bits do not stop root; the immutable attribute does (ext4, xfs, btrfs)
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(parent)]).returncode:
            pytest.skip(
                "running as root and `chattr +i` is unavailable here: no way to make a folder unwritable"
            )
        unlock = ["chattr", "-i", str(parent)]
    else:
        parent.chmod(0o555)
        unlock = ["chmod", "755", str(parent)]
    try:
        r = cli("onnx", "tiny", "-o", str(parent / "out"), "--no-parity")
        assert_user_error(r, "is not writable")
        assert str(parent / "out") in r.stderr
        assert_nothing_left(parent)
    finally:
        subprocess.run(unlock, check=True)


def test_disk_full_while_writing_leaves_nothing(tmp_path):
    """A file size limit (RLIMIT_FSIZE, 1 MB) makes the first big write fail with EFBIG, as a full disk fails
    with ENOSPC; CPython ignores SIGXFSZ, so the write raises instead of killing the process."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    parent = tmp_path / "full"
    parent.mkdir()
    r = cli("onnx", "tiny", "-o", str(parent / "out"), "--no-parity", preexec_fn=limit_file_size)
    assert_user_error(r, "file size limit reached")
    assert str(parent / "out") in r.stderr
    assert_nothing_left(parent)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["INT", "TERM"])
def test_signal_during_export_exits_and_removes_the_temp_folder(tmp_path, signum, code):
    """Ctrl-C and a cancel (SIGTERM: CI systems, `timeout`) both leave nothing behind."""
    parent = tmp_path / "sig"
    parent.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lfm_export.cli",
            "onnx",
            "tiny",
            "-o",
            str(parent / "out"),
            "--quant",
            "int4",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".out.tmp-") for p in parent.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "the export never created its temp folder"
        time.sleep(0.05)
    proc.send_signal(signum)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert_nothing_left(parent)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "tokenizer.json: not valid JSON"),
        ('{"version": "1.0", "model": {"type": "NoSuchModel"}}', "tokenizer.json: tokenizers cannot load it"),
    ],
)
def test_corrupt_tokenizer_is_refused_before_export(tmp_path, content, message):
    src = tmp_path / "model"
    shutil.copytree(BUNDLED["tiny"], src)
    (src / "tokenizer.json").write_text(content)
    parent = tmp_path / "outs"
    parent.mkdir()
    r = cli("onnx", str(src), "-o", str(parent / "out"), "--no-parity")
    assert_user_error(r, message)
    assert "Tracing" not in r.stderr  # refused while loading, before any export stage
    assert_nothing_left(parent)


def test_max_seq_len_above_the_model_limit(tmp_path):
    parent = tmp_path / "outs"
    parent.mkdir()
    r = cli("onnx", "tiny", "-o", str(parent / "out"), "--max-seq-len", "4097")  # tiny declares 4096
    assert_user_error(r, "exceeds the model's max_position_embeddings 4096")
    assert "Tracing" not in r.stderr
    assert_nothing_left(parent)


@pytest.mark.parametrize(
    "dtype, message",
    [
        (torch.int8, "unsupported dtype I8"),
        (torch.uint8, "unsupported dtype U8"),
        (torch.float8_e4m3fn, "unsupported dtype F8_E4M3"),
        (torch.bool, "unsupported dtype BOOL"),
        (torch.int32, "is int32; a float weight is expected"),
        (torch.int64, "is int64; a float weight is expected"),
    ],
)
def test_unsupported_tensor_dtype_names_the_tensor(ckpt, tmp_path, dtype, message):
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors = load_file(ckpt / "model.safetensors")
    tensors[name] = (tensors[name] * 100).to(dtype)
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    parent = tmp_path / "outs"
    parent.mkdir()
    r = cli("onnx", str(ckpt), "-o", str(parent / "out"), "--no-parity")
    assert_user_error(r, message)
    assert name in r.stderr
    assert_nothing_left(parent)
