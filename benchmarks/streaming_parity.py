"""`lfm-export parity` of an exported artifact, its wall time and peak RSS: the streaming reference at real size.

Runs `lfm-export parity ARTIFACT --json [--stream-reference]` in a child process under `/usr/bin/time -v` and
records the verdict, how the reference was computed (`reference_form`: streamed or in memory, the scenarios run
and skipped), the headline metrics, the child's wall time and maximum resident set size, and the export's own
record from the artifact's manifest (recipe, size, timings). Run it alone on the machine (`flock
/tmp/lfm-heavy.lock`): the 8B-A1B's parity holds the onnxruntime session and one streamed layer at a time.

    flock /tmp/lfm-heavy.lock /usr/bin/time -v lfm-export onnx random:lfm2-8b-a1b -o OUT/8b-int4 --quant int4 \\
        --no-parity --json 2> OUT/export.time
    flock /tmp/lfm-heavy.lock python benchmarks/streaming_parity.py OUT/8b-int4 --export-log OUT/export.time \\
        --json benchmarks/results/streaming_parity_8b.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import ROOT, provenance  # noqa: E402

HEADLINE = ("logit_max_rel", "kl_max", "kl_mean", "top1_decisive")


def _time_v(stderr: str) -> dict[str, float]:
    """Wall seconds and peak RSS (bytes) from GNU time's `-v` report."""
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    if wall is None or rss is None:
        raise SystemExit("no /usr/bin/time -v report in the child's stderr")
    seconds = 0.0
    for part in wall.group(1).split(":"):
        seconds = seconds * 60 + float(part)
    return {"wall_s": round(seconds, 1), "peak_rss_gb": round(int(rss.group(1)) * 1024 / 1e9, 2)}


def _pooled(rows: list[dict[str, Any]]) -> dict[str, Any]:
    pooled = next((r for r in rows if r["name"] == "pooled"), {"metrics": {}})
    return {k: pooled["metrics"].get(k) for k in HEADLINE}


def run(artifact: Path, threads: int, stream: bool) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "lfm_export.cli",
        "parity",
        str(artifact),
        "--json",
        "--threads",
        str(threads),
    ]
    if stream:
        cmd.append("--stream-reference")
    child = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=ROOT)
    if child.returncode not in (0, 1):
        raise SystemExit(f"lfm-export parity exited {child.returncode}: {child.stderr[-2000:]}")
    report = json.loads(child.stdout)
    manifest = json.loads((artifact / "manifest.json").read_text())
    return {
        "artifact": {
            "model": manifest["model"]["source"],
            "backend": manifest["backend"],
            "recipe": manifest["recipe"]["name"],
            "bytes": manifest["total_bytes"],
            "max_seq_len": manifest.get("max_seq_len"),
            "export_timings_s": manifest.get("timings_s"),
        },
        "parity": {
            "exit_code": child.returncode,
            "passed": report["passed"],
            "verdict": report["verdict"],
            "reference_form": report["reference_form"],
            "prompt_lengths": report["prompt_lengths"],
            "exactness_pooled": _pooled(report["scenarios"]),
            "quality_pooled": _pooled(report["quality"]["scenarios"]),
            "stored_weights": {
                k: (report["exactness"]["stored_weights"] or {}).get(k)
                for k in ("passed", "artifact_rows", "rows_unmatched")
            },
            "failures": [c for c in report["checks"] if not c["passed"]],
        },
        "process": _time_v(child.stderr),
        "threads": threads,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path, help="An artifact folder written by lfm-export.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stream-reference", action="store_true", help="Stream even where the reference fits.")
    ap.add_argument("--json", type=Path, help="Write the result here.")
    ap.add_argument(
        "--export-log",
        type=Path,
        help="The `/usr/bin/time -v` report (stderr) of the command that exported the artifact: its wall time "
        "and peak RSS join the result.",
    )
    args = ap.parse_args()
    head = provenance()  # the load average before the run
    result = {"provenance": head, **run(args.artifact, args.threads, args.stream_reference)}
    if args.export_log is not None:
        result["artifact"]["export_process"] = _time_v(args.export_log.read_text())
    head["load_average_after"] = round(os.getloadavg()[0], 2)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
