"""Pool the per-block ratios of `gguf_decode_ab.py` result files: the geometric mean of the blocks' ratios of medians and its 95% interval (mean of the logs +- 1.96 standard
errors; each block is a fresh pair of sessions, so the blocks, not the rounds, are the independent draws).

    .venv/bin/python benchmarks/gguf_decode_pool.py --group "A/A q4_0 1t" R1.json R2.json \
        --group "ours/theirs q4_0 1t" R3.json R4.json --out benchmarks/results/pooled.json

`--group NAME FILE...`: the files' blocks pooled under NAME; the CPU-time block ratios (`--wall`: wall time).
`--control-group NAME FILE...`: the same for the C/B ratios of runs made with `gguf_decode_ab.py --control`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from provenance import provenance


def summary(ratios: list[float]) -> dict:
    """Geometric mean, its 95% interval, the spread (standard deviation of the logs) and the range."""
    logs = [math.log(r) for r in ratios]
    n = len(logs)
    mean = sum(logs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1)) if n > 1 else float("nan")
    se = sd / math.sqrt(n)
    return {
        "blocks": n,
        "geometric_mean": round(math.exp(mean), 4),
        "ci95": [round(math.exp(mean - 1.96 * se), 4), round(math.exp(mean + 1.96 * se), 4)],
        "log_sd": round(sd, 4),
        "min": min(ratios),
        "max": max(ratios),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group", nargs="+", action="append", required=True, metavar="NAME FILE")
    ap.add_argument("--control-group", nargs="+", action="append", default=[], metavar="NAME FILE")
    ap.add_argument("--wall", action="store_true", help="wall-time block ratios instead of CPU time")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    groups: dict[str, tuple[list[Path], bool]] = {}
    for spec, control in [(g, False) for g in args.group] + [(g, True) for g in args.control_group]:
        name, *files = spec
        if not files:
            raise SystemExit(f"group {name}: no files")
        groups[name] = ([Path(f) for f in files], control)
    out: dict = {**provenance(), "groups": {}}
    for name, (files, control) in groups.items():
        ratios: list[float] = []
        key = "block_ratios" if args.wall else "cpu_block_ratios"
        if control:
            key = "control_block_ratios" if args.wall else "cpu_control_block_ratios"
        for f in files:
            if not f.is_file():
                raise SystemExit(f"{f}: no such file")
            d = json.loads(f.read_text())
            if "cpu_block_ratios" not in d:
                raise SystemExit(f"{f}: not a gguf_decode_ab.py result (no cpu_block_ratios)")
            if key not in d:
                raise SystemExit(f"{f}: no {key} (run without --control)")
            ratios += d[key]
        out["groups"][name] = {"files": [str(f) for f in files], **summary(ratios)}
        s = out["groups"][name]
        print(
            f"{name}: {s['blocks']} blocks, geometric mean {s['geometric_mean']} (95% {s['ci95']}), "
            f"range {s['min']}-{s['max']}"
        )
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
