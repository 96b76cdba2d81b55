"""The header of every benchmark result file: when, on what machine, at which commit, by which command, and the
load the machine was under (a timing on a shared machine means little without it)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def provenance() -> dict[str, Any]:
    """`date` (UTC), `machine`, `commit`, `command` (as run from the repository root) and the 1-minute
    `load_average` now."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {cpu_model() or platform.processor()} {platform.system()}, "
        f"{os.cpu_count()} cores".replace("  ", " "),
        "commit": commit.stdout.strip(),
        "command": " ".join([script.as_posix(), *sys.argv[1:]]),
        "load_average": round(os.getloadavg()[0], 2),
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
