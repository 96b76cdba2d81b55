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

`--control C` (a byte copy of B) runs a third session in the same blocks and rounds (open and run order
rotated over A, B, C), so the A/A control and the comparison share the machine's state: C/B is reported beside
A/B. `--forced` feeds the same seeded random token at each decode step instead of the greedy one, so two files
with other weights decode the same sequence (greedy runs differ in the tokens they generate, hence in the
token-table rows they read). `--ftz`: flush-to-zero and denormals-are-zero set in this thread's MXCSR before any
session opens (llama.cpp's worker threads start with a copy of it), through a two-line C helper built with the
system's C compiler: whether subnormal floats explain a speed difference.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from provenance import provenance


def decode_round(
    s, ids: np.ndarray, new_tokens: int, forced: np.ndarray | None = None
) -> tuple[float, float]:
    """`gguf_vs_llamacpp.decode_round` timed twice: tok/s by wall time and by the process's CPU time. With one
    thread llama.cpp computes on the calling thread, so the CPU-time rate leaves out the time other processes
    held the core (it keeps what they cost through shared caches). `forced`: the tokens fed at each step instead
    of the greedy ones, so two files with other weights decode the same sequence."""
    s.reset()
    tok = int(s.prefill_last(ids)[0].argmax())
    t, c = time.perf_counter(), time.process_time()
    for i in range(new_tokens):
        if forced is not None:
            tok = int(forced[i])
        tok = int(s.decode(np.array([tok]))[0].argmax())
    return new_tokens / (time.perf_counter() - t), new_tokens / (time.process_time() - c)


def set_flush_to_zero() -> None:
    """Set FTZ and DAZ in the calling thread's MXCSR (x86-64), compiling a tiny helper with `cc`."""
    import ctypes
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "ftz.c").write_text(
            "#include <xmmintrin.h>\nvoid set_ftz_daz(void) { _mm_setcsr(_mm_getcsr() | 0x8040); }\n"
        )
        subprocess.run(
            ["cc", "-O2", "-shared", "-fPIC", "-o", str(work / "ftz.so"), str(work / "ftz.c")], check=True
        )
        ctypes.CDLL(str(work / "ftz.so")).set_ftz_daz()


def block(folders: dict[str, Path], k: int, args: argparse.Namespace) -> dict:
    """Block `k`: every session opened afresh (the open order rotated by `k`: A first in even blocks of an A/B
    run), one warm-up round each, `args.repeats` timed rounds, the run order rotated each round; tok/s per round.
    Ratios are each file's median over B's (C's: the control, a byte copy of B)."""
    from lfm_export.runtime.gguf import GgufSession

    names = list(folders)
    opened = names[k % len(names) :] + names[: k % len(names)]
    sessions = {who: GgufSession(folders[who], threads=args.threads) for who in opened}
    rng = np.random.default_rng(1)
    ids = rng.integers(16, sessions["a"].vocab_size, (1, args.prompt_len))
    forced = rng.integers(16, sessions["a"].vocab_size, args.new_tokens) if args.forced else None
    for s in sessions.values():
        decode_round(s, ids, args.new_tokens, forced)
    runs: dict[str, list[float]] = {who: [] for who in names}
    cpu: dict[str, list[float]] = {who: [] for who in names}
    for r in range(args.repeats):
        for who in names[r % len(names) :] + names[: r % len(names)]:
            wall, by_cpu = decode_round(sessions[who], ids, args.new_tokens, forced)
            runs[who].append(round(wall, 2))
            cpu[who].append(round(by_cpu, 2))
    for s in sessions.values():
        s.close()
    out: dict = {"opened_first": opened[0], "open_order": opened}
    for who in names:
        out[who], out[who + "_cpu"] = runs[who], cpu[who]
    for who in [w for w in names if w != "b"]:
        key = "ratio_of_medians" if who == "a" else f"{who}_ratio_of_medians"
        out[key] = round(float(np.median(runs[who]) / np.median(runs["b"])), 4)
        out["cpu_" + key] = round(float(np.median(cpu[who]) / np.median(cpu["b"])), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument(
        "--control", type=Path, default=None, help="a byte copy of B, run in the same rounds (C/B)"
    )
    ap.add_argument("--forced", action="store_true", help="decode a fixed random token sequence, not greedy")
    ap.add_argument("--ftz", action="store_true", help="flush-to-zero / denormals-are-zero in the MXCSR")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.ftz:
        set_flush_to_zero()
    folders = {"a": args.a, "b": args.b, **({"c": args.control} if args.control else {})}
    for p in folders.values():
        if not (p / "manifest.json").is_file():
            raise SystemExit(f"{p}: not an artifact folder (no manifest.json)")
    if args.blocks < 1 or args.repeats < 1:
        raise SystemExit("--blocks and --repeats must be at least 1")
    load_before = round(os.getloadavg()[0], 2)
    blocks = []
    for k in range(args.blocks):
        blocks.append(block(folders, k, args))
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
        "control": str(args.control) if args.control else None,
        "forced": args.forced,
        "ftz": args.ftz,
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
    if args.control:
        xc = [x for blk in blocks for x in blk["c_cpu"]]
        xb = [x for blk in blocks for x in blk["b_cpu"]]
        result["c_cpu_median"] = median("c_cpu")
        result["cpu_control_ratio_of_medians"] = round(float(np.median(xc) / np.median(xb)), 4)
        result["cpu_control_block_ratios"] = [blk["cpu_c_ratio_of_medians"] for blk in blocks]
        result["control_block_ratios"] = [blk["c_ratio_of_medians"] for blk in blocks]
        print(
            f"CPU time: control C/B ratio of medians {result['cpu_control_ratio_of_medians']}; "
            f"blocks {result['cpu_control_block_ratios']}"
        )
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
