"""Decode tok/s of two GGUF artifact folders, side by side in one process, with the order the two are opened in
alternating as well as the order they run in: the control experiment for `gguf_vs_llamacpp.py
--decode-repeats`, whose sessions are always opened ours first.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gguf_decode_ab.py A_DIR B_DIR --threads 1 --blocks 4 \
        --repeats 5 --out benchmarks/results/X.json

`--blocks` K: K times, both sessions are opened afresh (A first in even blocks, B first in odd ones), one untimed
warm-up round each, then `--repeats` rounds of `gguf_vs_llamacpp.decode_round` (the same prefill, then
`--new-tokens` greedy steps), the run order alternating within the block. Per file: every round's tok/s and the
median; the ratio of medians A / B over all rounds, per block, and split by which file was opened first. An A/A
run (B a byte copy of A under another path) shows what the protocol alone makes of two equal files.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from provenance import provenance


def decode_round(s, ids: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """`gguf_vs_llamacpp.decode_round` timed twice: tok/s by wall time and by the process's CPU time. With one
    thread llama.cpp computes on the calling thread, so the CPU-time rate leaves out the time other processes
    held the core (it keeps what they cost through shared caches)."""
    s.reset()
    tok = int(s.prefill_last(ids)[0].argmax())
    t, c = time.perf_counter(), time.process_time()
    for _ in range(new_tokens):
        tok = int(s.decode(np.array([tok]))[0].argmax())
    return new_tokens / (time.perf_counter() - t), new_tokens / (time.process_time() - c)


def block(a: Path, b: Path, a_first: bool, args: argparse.Namespace) -> dict:
    """One block: both sessions opened (`a_first`: A first), one warm-up round each, `args.repeats` timed rounds
    in alternating order; tok/s per round."""
    from lfm_export.runtime.gguf import GgufSession

    order = [("a", a), ("b", b)] if a_first else [("b", b), ("a", a)]
    sessions = {who: GgufSession(folder, threads=args.threads) for who, folder in order}
    ids = np.random.default_rng(1).integers(16, sessions["a"].vocab_size, (1, args.prompt_len))
    for s in sessions.values():
        decode_round(s, ids, args.new_tokens)
    runs: dict[str, list[float]] = {"a": [], "b": []}
    cpu: dict[str, list[float]] = {"a": [], "b": []}
    for r in range(args.repeats):
        for who in ("a", "b") if r % 2 == 0 else ("b", "a"):
            wall, by_cpu = decode_round(sessions[who], ids, args.new_tokens)
            runs[who].append(round(wall, 2))
            cpu[who].append(round(by_cpu, 2))
    for s in sessions.values():
        s.close()
    return {
        "opened_first": "a" if a_first else "b",
        "a": runs["a"],
        "b": runs["b"],
        "a_cpu": cpu["a"],
        "b_cpu": cpu["b"],
        "ratio_of_medians": round(float(np.median(runs["a"]) / np.median(runs["b"])), 4),
        "cpu_ratio_of_medians": round(float(np.median(cpu["a"]) / np.median(cpu["b"])), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    for p in (args.a, args.b):
        if not (p / "manifest.json").is_file():
            raise SystemExit(f"{p}: not an artifact folder (no manifest.json)")
    if args.blocks < 1 or args.repeats < 1:
        raise SystemExit("--blocks and --repeats must be at least 1")
    load_before = round(os.getloadavg()[0], 2)
    blocks = []
    for k in range(args.blocks):
        blocks.append(block(args.a, args.b, k % 2 == 0, args))
        print(json.dumps(blocks[-1]), flush=True)

    def ratio(key: str, first: str | None = None) -> float | None:
        """Ratio of medians A / B of `key` ("" wall, "_cpu" CPU time) over the blocks `first` opened first."""
        sel = [blk for blk in blocks if first is None or blk["opened_first"] == first]
        if not sel:
            return None
        xa = [x for blk in sel for x in blk["a" + key]]
        xb = [x for blk in sel for x in blk["b" + key]]
        return round(float(np.median(xa) / np.median(xb)), 4)

    def median(key: str) -> float:
        return float(np.median([x for blk in blocks for x in blk[key]]))

    result = {
        **provenance(),
        "a": str(args.a),
        "b": str(args.b),
        "threads": args.threads,
        "blocks": args.blocks,
        "repeats": args.repeats,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "a_median": median("a"),
        "b_median": median("b"),
        "ratio_of_medians": ratio(""),
        "ratio_a_opened_first": ratio("", "a"),
        "ratio_b_opened_first": ratio("", "b"),
        "block_ratios": [blk["ratio_of_medians"] for blk in blocks],
        "a_cpu_median": median("a_cpu"),
        "b_cpu_median": median("b_cpu"),
        "cpu_ratio_of_medians": ratio("_cpu"),
        "cpu_ratio_a_opened_first": ratio("_cpu", "a"),
        "cpu_ratio_b_opened_first": ratio("_cpu", "b"),
        "cpu_block_ratios": [blk["cpu_ratio_of_medians"] for blk in blocks],
        "per_block": blocks,
    }
    for key, label in (("", "wall"), ("cpu_", "CPU time")):
        print(
            f"{label}: A/B ratio of medians {result[key + 'ratio_of_medians']}; A opened first "
            f"{result[key + 'ratio_a_opened_first']}, B opened first {result[key + 'ratio_b_opened_first']}; "
            f"blocks {result[key + 'block_ratios']}"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
