"""The CLI as CI runs it: a subprocess, its exit code, stdout for results, one-line errors on stderr."""

import json
import subprocess
import sys

import pytest

from lfm_export.loading import init_random, save_checkpoint


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lfm_export.cli", *args], capture_output=True, text=True, timeout=300
    )


def assert_user_error(r: subprocess.CompletedProcess, fragment: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert fragment in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2, r.stderr


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_config):
    folder = tmp_path_factory.mktemp("cli") / "m"
    save_checkpoint(init_random(tiny_config, seed=5), folder)
    return folder


def test_presets_json():
    r = cli("presets", "--json")
    assert r.returncode == 0
    rows = {p["name"]: p for p in json.loads(r.stdout)}
    assert rows["lfm2-1.2b"]["params"] == 1170340608
    assert {
        "lfm2-350m",
        "lfm2-700m",
        "lfm2-8b-a1b",
        "lfm2.5-230m",
        "lfm2.5-350m",
        "lfm2.5-1.2b",
        "lfm2.5-8b-a1b",
    } <= set(rows)


@pytest.mark.slow  # `check` on the bundled models stays in the default suite (test_check.py)
def test_check_json_on_transformers_checkpoints(hf_checkpoints):
    for name in ("moe_dense_first", "liquid_bf16"):
        r = cli("check", str(hf_checkpoints[name]), "--json")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["passed"] and out["max_abs_error"] <= 1e-4


def test_missing_folder():
    assert_user_error(cli("check", "/no/such/model"), "not found")


def test_missing_config(ckpt, tmp_path):
    (tmp_path / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    assert_user_error(cli("check", str(tmp_path)), "config.json not found")


def test_corrupt_safetensors(ckpt, tmp_path):
    (tmp_path / "config.json").write_text((ckpt / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:3000])
    assert_user_error(cli("check", str(tmp_path)), "model.safetensors")


def test_config_weights_mismatch(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["hidden_size"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    assert_user_error(cli("check", str(tmp_path)), "shape")


def test_unknown_preset():
    assert_user_error(cli("inspect", "random:lfm9"), "unknown preset")


def test_inspect_model_signature():
    r = cli("inspect", "random:lfm2-1.2b", "--json")
    assert r.returncode == 0
    names = [s["name"] for s in json.loads(r.stdout)["signature"]["inputs"]]
    assert names[:3] == ["input_ids", "attention_mask", "past.0.conv"] and "past_key_values.2.key" in names


def test_usage_error_exit_code():
    r = cli("check")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_core_import_is_torch_free():
    code = (
        "import sys, lfm_export, lfm_export.signature, lfm_export.contract.errors, lfm_export.manifest; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_inspect_shows_any_backends_manifest(tmp_path):
    """A manifest of a backend this install has no shim for (batch-1 static cache, state held inside the
    program): every part is shown, keys the tool does not know included."""
    from lfm_export.contract.manifest import SCHEMA_VERSION

    spec = {"shape": ["batch_size", 64, 2], "dtype": "float32", "role": "conv", "layer": 0}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "backend": "coreml",
        "recipe": {"name": "int4-b32", "bits": 4, "block_size": 32},
        "model": {"source": "tiny", "random_weights": True, "weights_sha256": "ab" * 32},
        "max_seq_len": 256,
        "files": [{"path": "model.mlpackage/weights.bin", "bytes": 123456, "sha256": "0" * 64}],
        "total_bytes": 123456,
        "signature": {
            "form": "stateful",
            "inputs": [
                {"name": "input_ids", "shape": [1, "sequence_length"], "dtype": "int64", "role": "input_ids"}
            ],
            "outputs": [
                {"name": "logits", "shape": [1, "sequence_length", 320], "dtype": "float32", "role": "logits"}
            ],
            "held": [{**spec, "name": "past.0.conv"}],
            "max_seq_len": 256,
        },
        "parity": {
            "passed": False,
            "verdict": "FAILED: exactness passed; quality failed",
            "exactness": {"passed": True, "against": "simulated"},
            "quality": {"passed": False, "against": "reference", "pooled": {"kl_mean": 0.31}},
        },
        "compute_units": "CPU_AND_NE",
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    r = cli("inspect", str(tmp_path))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for fragment in (
        "backend   coreml",
        "recipe    int4-b32  (bits 4, block_size 32)",
        "model     tiny  (RANDOM WEIGHTS)",
        "context   256 tokens",
        "parity    FAILED: exactness passed; quality failed",
        "quality",
        "kl_mean 0.31",
        "model.mlpackage/weights.bin",
        "123,456 B",
        "signature stateful form",
        "held  past.0.conv",
        "compute_units CPU_AND_NE",
    ):
        assert fragment in out, (fragment, out)
    assert json.loads(cli("inspect", str(tmp_path), "--json").stdout) == manifest


def test_readme_cli_reference_matches_help():
    """The README's command table lists every command in `--help` order, with its help text and options."""
    import re
    from pathlib import Path

    import click
    import typer.main

    from lfm_export.cli import app

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## CLI reference", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for row in (line for line in section.splitlines() if line.startswith("| `")):
        name, text, options = (c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1])
        text = text.replace("\\|", "|")  # a `|` in a help text is escaped in the table
        documented[name.strip("`").split()[0]] = (text, set(re.findall(r"--[a-z][a-z-]*", options)))
    group = typer.main.get_command(app)
    ctx = click.Context(group)
    assert list(documented) == group.list_commands(ctx)
    for name, (text, options) in documented.items():
        command = group.get_command(ctx, name)
        assert text == " ".join(command.help.split()), name
        real = {o for p in command.params for o in p.opts if o.startswith("--") and o != "--help"}
        assert options == real, (name, options ^ real)
