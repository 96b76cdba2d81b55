"""A backend is one folder and one registry line: a toy backend declared in a temporary package, registered by
`LFM_EXPORT_BACKENDS` (the out-of-tree form of the one `REGISTRY` line), gets its command with the shared
options and its own, export, parity, `run`, `bench` and `inspect`, with no edit anywhere else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOY = '''
"""The toy backend: the ONNX export under another name, plus a file and an option of its own."""

from dataclasses import dataclass
from typing import Any

from lfm_export.backends import onnx
from lfm_export.backends.record import Backend, ExportResult, Option


@dataclass(frozen=True)
class ToyRecipe:
    onnx: Any
    note: str

    @property
    def name(self) -> str:
        return self.onnx.name


def export(loaded, folder, recipe, progress):
    result = onnx.export(loaded, folder, recipe.onnx, progress)
    with progress.step("Writing toy.txt"):
        (folder / "toy.txt").write_text(recipe.note)
    return ExportResult(result.signature, result.recipe, {**result.extra, "toy": {"note": recipe.note}})


BACKEND = Backend(
    name="toy",
    help="Export MODEL to the toy backend.",
    recipe=lambda quant, max_seq_len, note="hello": ToyRecipe(onnx.cli_recipe(quant, max_seq_len), note),
    export=export,
    session="lfm_export.runtime.onnx:OnnxSession",
    install="onnx",
    options=(Option("note", str, "hello", "A note the artifact keeps."),),
    simulation=onnx.simulation,
)
'''


@pytest.fixture(scope="module")
def toy_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("toy_pkg")
    (root / "toy_backend").mkdir()
    (root / "toy_backend" / "__init__.py").write_text(TOY)
    env = dict(os.environ)
    env["LFM_EXPORT_BACKENDS"] = "toy_backend"
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    return env


def lfm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lfm_export.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_a_registered_toy_backend_gets_every_command(toy_env: dict[str, str], tmp_path: Path) -> None:
    helped = lfm(toy_env, "toy", "--help")
    assert helped.returncode == 0 and "--note" in helped.stdout and "--max-seq-len" in helped.stdout
    out = tmp_path / "toy"
    args = ["toy", "tiny", "-o", str(out), "--quant", "int4", "--max-seq-len", "64", "--threads", "1"]
    r = lfm(toy_env, *args, "--note", "hi there", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(r.stdout)
    assert data["backend"] == "toy" and data["parity"]["passed"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["toy"] == {"note": "hi there"} and (out / "toy.txt").read_text() == "hi there"
    assert (out / "tokenizer.json").is_file()  # the pipeline copies the tokenizer files
    card = (out / "README.md").read_text()  # the pipeline's model card, with the record's facts
    assert (
        "library_name" not in card and "# tiny: toy int4-b32" in card and f"lfm-export run {out.name}" in card
    )

    ran = lfm(toy_env, "run", str(out), "--prompt", "Once upon", "--max-new-tokens", "4", "--greedy")
    assert ran.returncode == 0 and ran.stdout.strip(), ran.stderr[-2000:]
    bench = lfm(toy_env, "bench", str(out), "--prompt-len", "8", "--new-tokens", "4", "--json")
    assert bench.returncode == 0 and json.loads(bench.stdout)["decode_tok_s"] > 0, bench.stderr[-2000:]
    shown = lfm(toy_env, "inspect", str(out))
    assert shown.returncode == 0 and "toy" in shown.stdout


def test_without_the_registry_line_there_is_no_toy_command(toy_env: dict[str, str]) -> None:
    env = {k: v for k, v in toy_env.items() if k != "LFM_EXPORT_BACKENDS"}
    r = lfm(env, "toy", "--help")
    assert r.returncode == 2 and "toy" in r.stderr
