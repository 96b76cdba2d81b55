"""`lfm-export matrix`: the spec, the entries' command lines and memory estimates, the combined report over
entry results, and the CI pipelines it emits (the ones in examples/ci/ are its output, linted by actionlint)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lfm_export.ci_emit import emit
from lfm_export.contract.errors import UserError
from lfm_export.matrix import ENTRIES_DIR, command, export_memory_estimate, read_spec, select, write_report

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "ci"


def spec_file(tmp_path, text, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.unit
def test_spec_entries_gates_and_command_lines(tmp_path):
    (tmp_path / "g.json").write_text("{}")
    path = spec_file(
        tmp_path,
        """
models: [tiny, tiny-moe]
max_seq_len: 64
backends:
  onnx: {recipes: [int4, int8], options: {ops: portable, asymmetric: true}}
  coreml: {max_seq_len: 32}
gates:
  - {match: "tiny-moe/*", gates: g.json}
  - {match: "*/*/int4", max_kl: 0.1}
""",
    )
    spec = read_spec(path)
    assert [e.id for e in spec.entries] == [
        "tiny/onnx/int4",
        "tiny/onnx/int8",
        "tiny/coreml/fp16",  # the backend's default recipe
        "tiny-moe/onnx/int4",
        "tiny-moe/onnx/int8",
        "tiny-moe/coreml/fp16",
    ]
    by_id = {e.id: e for e in spec.entries}
    assert by_id["tiny/onnx/int4"].max_kl == 0.1 and by_id["tiny/onnx/int8"].max_kl is None
    assert by_id["tiny-moe/onnx/int4"].gates == str(tmp_path / "g.json")  # the first matching rule
    assert command(by_id["tiny/onnx/int4"], Path("o"), 1) == [
        "onnx", "tiny", "-o", "o/tiny/onnx/int4", "--quant", "int4", "--force", "--threads", "1", "--json",
        "--max-seq-len", "64", "--max-kl", "0.1", "--ops", "portable", "--asymmetric",
    ]  # fmt: skip
    assert by_id["tiny/coreml/fp16"].max_seq_len == 32
    assert [e.id for e in select(spec, ["*/coreml/*"])] == ["tiny/coreml/fp16", "tiny-moe/coreml/fp16"]
    with pytest.raises(UserError, match="no entry"):
        select(spec, ["*/mlx/*"])


@pytest.mark.unit
@pytest.mark.parametrize(
    "text, message",
    [
        ("models: [tiny]\nbackends: {tensorrt: {}}", "unknown backend 'tensorrt'"),
        ("models: []\nbackends: {onnx: {}}", "non-empty list"),
        ("models: [tiny]\nbackends: {onnx: {recipe: int4}}", "backends.onnx takes"),
        ("models: [tiny]\nbackend: {onnx: {}}", "unknown key(s) backend"),
        ("models: [tiny, ./tiny]\nbackends: {onnx: {}}", "share an id (tiny/onnx/fp32)"),
        ("models: [tiny\n", "not valid YAML"),
    ],
)
def test_bad_specs_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(UserError, match=message.replace("(", "\\(").replace(")", "\\)")):
        read_spec(spec_file(tmp_path, text))


@pytest.mark.unit
def test_toml_spec(tmp_path):
    spec = read_spec(spec_file(tmp_path, 'models = ["tiny"]\n[backends.mlx]\nrecipes = ["int4"]\n', "m.toml"))
    assert [e.id for e in spec.entries] == ["tiny/mlx/int4"]


@pytest.mark.unit
def test_memory_estimate_follows_the_model(tmp_path):
    """float32 copies of the parameters (export + reference + simulation; a third for int8 activations) on top
    of the runtime: a 1.2B model's parity export needs 14 GB more than its --no-parity one... and tiny's ~1 GB."""
    from lfm_export.matrix import RUNTIME_OVERHEAD, Entry

    big = Entry("random:lfm2-1.2b", "onnx", "int4")
    params = 1170340608  # `lfm-export presets`: lfm2-1.2b
    assert export_memory_estimate(big) == RUNTIME_OVERHEAD + 3 * 4 * params
    assert (
        export_memory_estimate(Entry("random:lfm2-1.2b", "executorch", "8da4w"))
        == RUNTIME_OVERHEAD + 16 * params
    )
    assert (
        export_memory_estimate(Entry("random:lfm2-1.2b", "onnx", "int4", parity=False))
        == RUNTIME_OVERHEAD + 4 * params
    )
    assert RUNTIME_OVERHEAD < export_memory_estimate(Entry("tiny", "onnx", "int4")) < RUNTIME_OVERHEAD * 1.1


@pytest.mark.unit
def test_report_combines_entry_results_and_gates(tmp_path):
    """Entry results gathered from several CI jobs combine into one report; one failed entry fails it."""
    (tmp_path / ENTRIES_DIR).mkdir()
    for ident, status in (
        ("tiny/onnx/int4", "passed"),
        ("tiny/onnx/int3", "error"),
        ("tiny/mlx/int4", "failed"),
    ):
        entry = {"id": ident, "status": status, "error": "bad recipe" if status == "error" else "",
                 "seconds": 3.0, "peak_rss_bytes": 6e8, "total_bytes": 1e6, "parity": None, "bench": None}  # fmt: skip
        (tmp_path / ENTRIES_DIR / f"{ident.replace('/', '-')}.json").write_text(json.dumps(entry))
    report = write_report(tmp_path)
    assert report["counts"] == {"passed": 1, "failed": 1, "error": 1} and report["passed"] is False
    assert json.loads((tmp_path / "matrix.json").read_text())["entries"][0]["id"] == "tiny/mlx/int4"
    assert "| `tiny/onnx/int3` | error: bad recipe |" in (tmp_path / "matrix.md").read_text()
    from typer.testing import CliRunner

    from lfm_export.cli import app

    r = CliRunner().invoke(app, ["matrix", str(EXAMPLES / "matrix.yaml"), "--report", "-o", str(tmp_path)])
    assert r.exit_code == 1 and "1 passed, 1 failed, 1 errors" in r.output, r.output


@pytest.mark.unit
@pytest.mark.parametrize(
    "kind, path", [("github", "github/lfm-export.yml"), ("gitlab", "gitlab/.gitlab-ci.yml")]
)
def test_examples_are_the_emitted_pipelines(kind, path):
    """examples/ci/ is what `matrix examples/ci/matrix.yaml --emit KIND` prints: one job per entry."""
    spec = read_spec(EXAMPLES / "matrix.yaml")
    text = emit(kind, spec, "examples/ci/matrix.yaml")
    assert (EXAMPLES / path).read_text() == text, (
        f"run: lfm-export matrix examples/ci/matrix.yaml --emit {kind}"
    )
    data = yaml.safe_load(text)
    if kind == "github":
        ids = [i["id"] for i in data["jobs"]["export"]["strategy"]["matrix"]["include"]]
    else:
        ids = [m["ENTRY"] for m in data["lfm-export"]["parallel"]["matrix"]]
    assert ids == [e.id for e in spec.entries] and len(ids) == 16


@pytest.mark.unit
def test_emitted_workflow_passes_actionlint(tmp_path):
    actionlint = shutil.which("actionlint") or shutil.which(
        "actionlint", path=str(Path(sys.executable).parent)
    )
    if actionlint is None:
        pytest.skip("actionlint not installed (the test extra installs it)")
    spec = read_spec(spec_file(tmp_path, "models: [tiny]\nbackends: {mlx: {recipes: [int4]}}\n"))
    (tmp_path / "w.yml").write_text(emit("github", spec))
    r = subprocess.run([actionlint, str(tmp_path / "w.yml")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout
    (tmp_path / "bad.yml").write_text(emit("github", spec).replace("runs-on: ubuntu-latest", "runs-on: [", 1))
    assert subprocess.run([actionlint, str(tmp_path / "bad.yml")], capture_output=True).returncode == 1
