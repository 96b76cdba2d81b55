"""Hugging Face ids as MODEL, without a network: a hub cache laid out as huggingface_hub lays it out
(models--org--name/refs/main, snapshots/<commit>/...), written here, read with HF_HUB_OFFLINE=1."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from lfm_export.loading import BUNDLED

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cli(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "lfm_export.cli", *args], capture_output=True, text=True, timeout=600, env=env
    )


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory):
    """An offline hub cache holding `LiquidAI/LFM2-350M` at `main` = COMMIT: the bundled tiny checkpoint (a
    small model under the real id's name), plus a file the loader does not need."""
    cache = tmp_path_factory.mktemp("hf") / "hub"
    repo = cache / "models--LiquidAI--LFM2-350M"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in BUNDLED["tiny"].iterdir():
        shutil.copy2(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return env


def test_the_loader_reads_an_id_from_the_cache(hub_env, monkeypatch):
    """In this process: the id resolves to the cached snapshot, only the loader's files, and the commit."""
    for k in ("HF_HUB_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(k, hub_env[k])
    from lfm_export.hub import fetch
    from lfm_export.loading import load_model

    fetched = fetch("LiquidAI/LFM2-350M")
    assert fetched.commit == COMMIT and fetched.folder.name == COMMIT
    loaded = load_model("LiquidAI/LFM2-350M", lazy=True)
    assert loaded.identity()["hub"] == {"repo_id": "LiquidAI/LFM2-350M", "revision": "main", "commit": COMMIT}
    assert loaded.identity()["weights_sha256"] == load_model("tiny", lazy=True).identity()["weights_sha256"]
    assert loaded.name == "LFM2-350M" and loaded.tokenizer_file.parent == fetched.folder
    assert load_model("LiquidAI/LFM2-350M", lazy=True, revision=COMMIT).hub["commit"] == COMMIT


@pytest.mark.slow
def test_export_from_the_cache_records_the_commit(hub_env, tmp_path):
    out = tmp_path / "lfm2-350m"
    args = [
        "onnx",
        "LiquidAI/LFM2-350M",
        "-o",
        str(out),
        "--no-parity",
        "--max-seq-len",
        "32",
        "--threads",
        "1",
    ]
    r = cli(*args, "--json", env=hub_env)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["source"] == "LiquidAI/LFM2-350M" and m["model"]["name"] == "LFM2-350M"
    assert m["model"]["hub"] == {"repo_id": "LiquidAI/LFM2-350M", "revision": "main", "commit": COMMIT}
    tiny = json.loads((BUNDLED["tiny"] / "config.json").read_text())
    assert m["config"]["hidden_size"] == tiny["hidden_size"]
    assert (out / "tokenizer.json").read_bytes() == (BUNDLED["tiny"] / "tokenizer.json").read_bytes()
    card = (out / "README.md").read_text()
    assert 'base_model: "LiquidAI/LFM2-350M"' in card and COMMIT in card
    shown = cli("inspect", "LiquidAI/LFM2-350M", "--json", env=hub_env)  # any MODEL argument takes an id
    assert shown.returncode == 0, shown.stderr[-2000:]


def test_an_id_not_in_the_cache_is_one_line_exit_2(hub_env, tmp_path):
    r = cli("onnx", "LiquidAI/LFM2-1.2B", "-o", str(tmp_path / "x"), env=hub_env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "LiquidAI/LFM2-1.2B" in r.stderr and "offline" in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def test_a_revision_not_in_the_cache_is_refused(hub_env, monkeypatch):
    for k in ("HF_HUB_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(k, hub_env[k])
    from lfm_export.contract.errors import UserError
    from lfm_export.loading import load_model

    with pytest.raises(
        UserError, match="model LiquidAI/LFM2-350M \\(revision v2\\): not in the Hugging Face cache"
    ):
        load_model("LiquidAI/LFM2-350M", revision="v2")
