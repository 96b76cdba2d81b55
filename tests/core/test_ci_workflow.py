"""The pull-request workflow, run here: the steps of the GitHub Actions workflow `matrix --emit github` writes
(the one in examples/ci/ is its output), in order, job by job, on this machine. `run:` steps run in bash as
written; the steps that need GitHub (`uses:` actions, the install, fetching the base branch's outputs with `gh`,
posting the comment) are done by hand here as they would be there: artifacts are folders, the base branch's
report is a copy of this run's, the comment is read instead of posted."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lfm_export.ci_emit import BASE, COMMENT, OUT, emit
from lfm_export.matrix import read_spec

ROOT = Path(__file__).resolve().parents[2]


class Workflow:
    """Runs the jobs of an emitted workflow in a workspace folder, as GitHub would on a pull request."""

    def __init__(self, text: str, workspace: Path, base_from_head: bool = True) -> None:
        self.data = yaml.safe_load(text)
        self.ws = workspace
        self.artifacts = workspace.parent / "artifacts"
        self.artifacts.mkdir()
        self.base_from_head = base_from_head
        self.log: list[tuple[str, str, str]] = []  # (job, step, outcome)
        bin_dir = workspace.parent / "bin"
        bin_dir.mkdir()
        shim = bin_dir / "lfm-export"
        shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m lfm_export.cli "$@"\n')
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "GITHUB_STEP_SUMMARY": str(workspace.parent / "step_summary.md"),
            "GITHUB_REPOSITORY": "liquid/lfm-export",
            "OMP_NUM_THREADS": "1",
        }

    def job(self, name: str, matrix: dict[str, str] | None = None) -> str:
        """Run one job's steps; returns the job's outcome (success / failure)."""
        outcomes: dict[str, str] = {}
        failed = False
        self.ws.mkdir(exist_ok=True)
        for step in self.data["jobs"][name]["steps"]:
            label = step.get("name", step.get("uses", "?"))
            if not self._condition(step.get("if"), outcomes, failed):
                self.log.append((name, label, "skipped"))
                continue
            ok = self._step(step, matrix or {})
            outcome = "success" if ok else "failure"
            if "id" in step:
                outcomes[step["id"]] = outcome
            self.log.append((name, label, outcome))
            if not ok and not step.get("continue-on-error"):
                failed = True
        return "failure" if failed else "success"

    def _expand(self, text: str, matrix: dict[str, str]) -> str:
        context = {"github.token": "token", "github.base_ref": "main", "github.workflow": "lfm-export",
                   "github.event.pull_request.number": "21"}  # fmt: skip
        for k, v in matrix.items():
            context[f"matrix.{k}"] = v
        return re.sub(r"\$\{\{\s*([\w.]+)\s*\}\}", lambda m: context[m.group(1)], text)

    def _condition(self, expr: str | None, outcomes: dict[str, str], failed: bool) -> bool:
        """GitHub's `if:`: without a status function (`always()`, `failure()`) a step runs only while no
        earlier step has failed."""
        if expr is None:
            return not failed
        py = expr.replace("always()", "True").replace("&&", " and ").replace("||", " or ")
        py = py.replace("github.event_name", "'pull_request'")
        py = re.sub(
            r"hashFiles\('([^']+)'\)", lambda m: repr("x" if (self.ws / m.group(1)).exists() else ""), py
        )
        py = re.sub(r"steps\.(\w+)\.outcome", lambda m: repr(outcomes.get(m.group(1), "skipped")), py)
        value = bool(eval(py))  # the expressions of the emitted workflow only
        return value if "always()" in expr else value and not failed

    def _step(self, step: dict, matrix: dict[str, str]) -> bool:
        uses, name = step.get("uses", ""), step.get("name", "")
        with_ = {k: self._expand(str(v), matrix) for k, v in step.get("with", {}).items()}
        if uses.startswith(("actions/checkout@", "actions/setup-python@")) or name == "Install":
            return True  # the checkout is ROOT, the interpreter and packages this one's
        if uses.startswith("actions/upload-artifact@"):
            shutil.copytree(self.ws / with_["path"], self.artifacts / with_["name"], dirs_exist_ok=True)
            return True
        if uses.startswith("actions/download-artifact@"):
            pattern = with_["pattern"].replace("*", "")
            for a in sorted(self.artifacts.iterdir()):
                if a.name.startswith(pattern) and a.name != "lfm-export-report":
                    shutil.copytree(a, self.ws / with_["path"], dirs_exist_ok=True)
            return True
        if name == "Fetch the base branch's outputs":  # gh run download of the base branch's report
            if self.base_from_head:
                shutil.copytree(self.artifacts / "lfm-export-report", self.ws / BASE)
            return True
        if name == "Comment on the pull request":  # gh pr comment: read what it would post
            body = (self.ws / COMMENT).read_text()
            return len(body.splitlines()) <= 60
        env = {**self.env, **{k: self._expand(str(v), matrix) for k, v in step.get("env", {}).items()}}
        script = self._expand(step["run"], matrix)
        assert self.data["defaults"]["run"]["shell"] == "bash"  # GitHub runs it as bash -eo pipefail
        r = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script], cwd=self.ws, env=env, capture_output=True,
                           text=True, timeout=1200)  # fmt: skip
        (self.ws.parent / "logs").mkdir(exist_ok=True)
        (self.ws.parent / "logs" / f"{len(self.log):02d}.log").write_text(
            f"$ {script}\n{r.stdout}\n{r.stderr}"
        )
        return r.returncode == 0


def run_pull_request(spec_path: Path, tmp_path: Path) -> Workflow:
    """Every export job (one per matrix entry, each in a fresh workspace), then the report job."""
    text = emit("github", read_spec(spec_path), str(spec_path))
    flow = Workflow(text, tmp_path / "ws")
    for entry in flow.data["jobs"]["export"]["strategy"]["matrix"]["include"]:
        flow.ws = tmp_path / f"ws-{entry['slug']}"
        flow.job("export", entry)
    flow.ws = tmp_path / "ws-report"
    flow.job("report")
    return flow


FAILING = """
models: [tiny]
threads: 1
backends:
  onnx: {recipes: [int3]}
  mlx: {recipes: [int2]}
ci: {fail_on: "kl=+10%,size=+2%"}
"""
"""Two entries that fail at once (no such recipes): every step of the workflow runs, and no export."""

SMALL = """
models: [tiny]
max_seq_len: 32
threads: 1
backends:
  onnx: {recipes: [int4, int3]}
ci: {fail_on: "kl=+10%,size=+2%"}
"""
"""One real export (tiny, ONNX int4) and one entry that fails at once (no int3 recipe)."""

REPORT_STEPS = [
    "actions/checkout@v5",
    "actions/setup-python@v6",
    "Install",
    "Gather the outputs",
    "Combined report and gate",
    "Keep the combined report",
    "Fetch the base branch's outputs",
    "Compare with the base branch",
    "Comment on the pull request",
    "Fail on a gate or a regression",
]


def _outcomes(flow: Workflow, job: str, step: str | None = None) -> list[str]:
    return [o for j, s, o in flow.log if j == job and (step is None or s == step)]


def test_the_workflow_steps_run_here_in_order(tmp_path):
    """Every step, in order, with two entries that fail at once: each export job fails alone and keeps its
    output; the report job gathers both, its gate fails, the comparison with the base branch (the same
    outputs) says no change, the comment is posted, and the job fails on the gate."""
    spec = tmp_path / "matrix.yaml"
    spec.write_text(FAILING)
    flow = run_pull_request(spec, tmp_path)
    assert _outcomes(flow, "export", "Export and gate") == ["failure", "failure"], flow.log
    assert _outcomes(flow, "export", "Keep the output") == ["success", "success"]  # if: always()
    assert [s for j, s, _ in flow.log if j == "report"] == REPORT_STEPS
    assert _outcomes(flow, "report") == ["success"] * 4 + ["failure"] + ["success"] * 4 + ["failure"], (
        flow.log
    )
    summary = Path(flow.env["GITHUB_STEP_SUMMARY"]).read_text()
    assert "0 passed, 0 failed, 2 errors" in summary
    assert "| `tiny/onnx/int3` | error: error: --quant 'int3' is unknown" in summary
    comment = (tmp_path / "ws-report" / COMMENT).read_text()
    assert "**No change** in 2 entries." in comment and len(comment.splitlines()) <= 60


@pytest.mark.slow
def test_the_pull_request_workflow_exports_here(tmp_path):
    """On tiny with a real export: the int4 job passes and the int3 one fails alone; the report holds the
    artifact with its model card and parity, the comparison says no change."""
    spec = tmp_path / "matrix.yaml"
    spec.write_text(SMALL)
    flow = run_pull_request(spec, tmp_path)
    assert _outcomes(flow, "export", "Export and gate") == ["success", "failure"], flow.log
    assert _outcomes(flow, "report") == ["success"] * 4 + ["failure"] + ["success"] * 4 + ["failure"], (
        flow.log
    )
    head = tmp_path / "ws-report" / OUT
    assert (head / "tiny" / "onnx" / "int4" / "README.md").is_file()
    summary = Path(flow.env["GITHUB_STEP_SUMMARY"]).read_text()
    assert "1 passed, 0 failed, 1 errors" in summary
    assert "**No change** in 2 entries." in (tmp_path / "ws-report" / COMMENT).read_text()


@pytest.mark.slow
def test_the_example_workflow_runs_here(tmp_path):
    """examples/ci/ as it is: 16 export jobs (tiny and tiny-moe on ONNX, ExecuTorch, MLX, Core ML, two recipes
    each), all passing, then the report job, all green but the comparison (the base is the same outputs)."""
    flow = run_pull_request(ROOT / "examples" / "ci" / "matrix.yaml", tmp_path)
    failed = [s for s in flow.log if s[2] == "failure"]
    assert not failed, failed
