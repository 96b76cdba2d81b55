"""One worker process pinned to N cores (`taskset`), the way the MLX benchmarks time MLX (MLX 0.32 has no thread
setting): the parent writes a JSON spec, runs the same script with `--worker SPEC` under `taskset -c 0..N-1`, and
reads the worker's JSON result from its last line of output."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_worker_option(ap: argparse.ArgumentParser) -> None:
    """The hidden `--worker SPEC` option that `serve_worker` answers."""
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)


def serve_worker(args: argparse.Namespace, worker: Callable[[dict], Any]) -> bool:
    """In a worker process (`--worker SPEC` given): print `worker(spec)` as one JSON line and return True."""
    if not args.worker:
        return False
    print(json.dumps(worker(json.loads(args.worker.read_text()))))
    return True


def run_pinned(script: str, spec: dict, threads: int, env: dict[str, str] | None = None) -> Any:
    """Run `script --worker SPEC` pinned to the first `threads` cores and return its JSON result; a failed worker
    ends the benchmark with the tail of its stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        cores = ",".join(str(c) for c in range(threads))
        r = subprocess.run(
            ["taskset", "-c", cores, sys.executable, script, "--worker", str(spec_file)],
            capture_output=True,
            text=True,
            env=env if env is not None else dict(os.environ),
        )
    if r.returncode:
        raise SystemExit(f"worker ({threads} threads) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])
