"""`lfm-export compare`: per-entry diffs of hand-written exports (manifests, parity reports, a matrix report),
tolerances, exit codes, the GitHub step summary and a comment of at most 60 lines."""

import json
import os
import subprocess
import sys

import pytest

from lfm_export.compare import compare, load_side, parse_fail_on
from lfm_export.contract.errors import UserError


def cli(*args, env=None):
    """The command in this process (the subprocess form, as CI runs it, is `test_bad_input_is_one_line`'s)."""
    from typer.testing import CliRunner

    from lfm_export.cli import app

    return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)


def write_artifact(folder, *, recipe="int4-b32", kl=0.04, top1=0.88, size=1_000_000, passed=True, greedy=9):
    """An artifact folder as compare reads it: the manifest's parity summary and size, parity/parity.json."""
    (folder / "parity").mkdir(parents=True)
    manifest = {
        "model": {"source": "tiny"},
        "backend": "onnx",
        "recipe": {"name": recipe},
        "total_bytes": size,
        "parity": {
            "passed": passed,
            "verdict": "PASSED" if passed else "FAILED: quality FAILED",
            "quality": {"pooled": {"kl_mean": kl, "top1_agreement": top1, "top1_decisive": 0.99}},
        },
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    report = {
        "checks": [
            {
                "scenario": "prefill",
                "metric": "kl_max",
                "value": 0.002,
                "op": "<=",
                "limit": 0.01,
                "part": "exactness",
            },
            {
                "scenario": "pooled",
                "metric": "kl_mean",
                "value": kl,
                "op": "<=",
                "limit": 1.0,
                "part": "quality",
            },
        ],
        "quality": {
            "scenarios": [{"name": "decode", "metrics": {"greedy_match": greedy, "greedy_steps": 17}}]
        },
    }
    (folder / "parity" / "parity.json").write_text(json.dumps(report))
    return folder


@pytest.mark.unit
def test_two_artifacts_diff_and_fail_on(tmp_path):
    base = write_artifact(tmp_path / "int8", recipe="int8-b32", kl=0.001, top1=0.98, size=2_000_000)
    head = write_artifact(tmp_path / "int4", kl=0.04, top1=0.88, size=1_380_000, greedy=3)
    (row,) = compare(load_side(base), load_side(head), parse_fail_on("kl=+10%")).rows
    assert row.key == "tiny/onnx/int8-b32 -> tiny/onnx/int4-b32"
    assert row.base.values == {
        "kl": 0.001,
        "top1": 0.98,
        "top1_decisive": 0.99,
        "exact": 0.2,
        "greedy": 9,
        "size": 2e6,
    }
    assert row.failures == ["kl 1.000e-03 -> 4.000e-02 (tolerance kl=+10%)"]

    r = cli("compare", str(base), str(head), "--fail-on", "kl=+10%,size=+2%")
    assert r.exit_code == 1, r.output
    assert (
        "| `tiny/onnx/int8-b32 -> tiny/onnx/int4-b32` | ❌ FAIL | passed | 1.000e-03 → 4.000e-02 (+3900.0%)"
        in r.output
    )
    assert "2.000 MB → 1.380 MB (-31.0%)" in r.output and "| greedy match | 9 → 3 (-66.7%) |" in r.output
    r = cli("compare", str(base), str(head), "--fail-on", "size=+2%,decode=-5%", "--json")
    assert r.exit_code == 0, r.output  # smaller is no failure; decode: neither side has bench figures
    data = json.loads(r.output)
    assert data["entries"][0]["change"]["size"] == {
        "base": 2e6,
        "head": 1.38e6,
        "delta": -620000.0,
        "relative": -0.31,
    }
    assert cli("compare", str(base), str(head), "--fail-on", "size=-30%").exit_code == 1


@pytest.mark.unit
def test_identical_exports_are_no_change(tmp_path):
    a, b = write_artifact(tmp_path / "a"), write_artifact(tmp_path / "b")
    r = cli("compare", str(a), str(b), "--fail-on", "kl=+0%,size=+0%,top1=-0%")
    assert r.exit_code == 0, r.output
    assert "**No change** in 1 entry." in r.output


@pytest.mark.unit
def test_a_verdict_regression_always_fails(tmp_path):
    a, b = write_artifact(tmp_path / "a"), write_artifact(tmp_path / "b", passed=False)
    r = cli("compare", str(a), str(b))
    assert r.exit_code == 1 and "passed → failed" in r.output and "verdict passed -> failed" in r.output
    assert cli("compare", str(b), str(a)).exit_code == 0  # a fix is a change, not a failure


@pytest.mark.unit
def test_matrix_folders_pair_by_entry_and_the_comment_fits(tmp_path):
    """Two matrix output folders (matrix.json with bench figures) of 40 entries: entries pair by id, the
    GitHub step summary holds every entry, the comment at most 60 lines with the failing one first."""
    sides = {}
    for side in ("base", "head"):
        root = tmp_path / side
        entries = []
        for i in range(40):
            ident = f"tiny/onnx/int4-{i:02d}"
            write_artifact(root / ident, size=1_000_000 + (5000 if side == "head" and i == 7 else 0))
            decode = 100.0 if side == "base" or i != 12 else 90.0
            bench = {"decode_tok_s": decode, "prefill_tok_s": 900.0, "load_s": 0.1, "peak_rss_bytes": 2e8}
            entries.append({"id": ident, "artifact": ident, "status": "ok", "bench": bench})
        (root / "matrix.json").write_text(json.dumps({"entries": entries}))
        sides[side] = root
    summary, body = tmp_path / "summary.md", tmp_path / "comment.md"
    env = {**os.environ, "GITHUB_STEP_SUMMARY": str(summary)}
    args = ["compare", str(sides["base"]), str(sides["head"]), "--fail-on", "size=+0.2%,decode=-5%"]
    r = cli(*args, "--format", "github", "--comment", str(body), env=env)
    assert r.exit_code == 1, r.output
    lines = body.read_text().splitlines()
    assert len(lines) <= 60 and r.output.strip() == body.read_text().strip()
    table = [line for line in lines if line.startswith("| `")]
    assert [t.split("`")[1] for t in table[:2]] == ["tiny/onnx/int4-07", "tiny/onnx/int4-12"]
    assert "❌ FAIL" in table[0] and "100.0 → 90.0 (-10.0%)" in table[1]
    assert "<details><summary>Details</summary>" in lines and lines[-1] == "</details>"
    full = summary.read_text()
    assert full.count("| `tiny/onnx/int4-") == 40 and "**2 failing**, 2 of 40 entries changed" in full


@pytest.mark.unit
def test_bad_input_is_one_line(tmp_path):
    assert [str(t) for t in parse_fail_on("kl=+10%, decode=-5%,size=+1000")] == [
        "kl=+10%",
        "decode=-5%",
        "size=+1000",
    ]
    (top1,) = parse_fail_on("top1=-0%")
    assert top1.exceeded(0.9, 0.89) and not top1.exceeded(0.9, 0.95)  # -0%: any fall fails, a rise does not
    with pytest.raises(UserError, match="unknown figure 'speed'"):
        parse_fail_on("speed=+1%")
    with pytest.raises(UserError, match="KEY=\\+N%"):
        parse_fail_on("kl=10%")
    (tmp_path / "x.json").write_text("{")
    r = subprocess.run(
        [sys.executable, "-m", "lfm_export.cli", "compare", str(tmp_path / "x.json"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "not a JSON report" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(UserError, match="no artifact"):
        load_side(tmp_path)
