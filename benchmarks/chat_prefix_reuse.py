"""What a snapshot saves a conversation: time to the first token's logits of a new conversation whose system
prompt (`--prefix` tokens) is shared, recomputed (reset, prefill prefix + turn) against restored (restore the
prefix's snapshot, prefill the turn's `--turn` tokens), on one artifact through its runtime shim; plus the
snapshot's cost (take, restore, save to `.npz`, its size). Token ids are seeded random (the timings do not
depend on them). Rounds alternate the two ways; medians are reported. Writes JSON with the date, machine,
commit and load average to `--out`.

`python benchmarks/chat_prefix_reuse.py OUT --prefix 512 --turn 32 --rounds 7 --threads 1 --out FILE`
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--turn", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    load_before = os.getloadavg()

    from lfm_export.backends import open_session
    from lfm_export.contract.snapshot import Snapshot

    session = open_session(args.artifact, threads=args.threads)
    rng = np.random.default_rng(0)
    prefix = rng.integers(16, session.vocab_size, size=(1, args.prefix))
    session.prefill(prefix)
    t = time.perf_counter()
    snap = session.snapshot()
    take_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        path = snap.save(Path(tmp) / "prefix.npz")
        save_s = time.perf_counter() - t
        size = path.stat().st_size
        t = time.perf_counter()
        Snapshot.load(path)
        load_s = time.perf_counter() - t

    recompute, reuse, restore = [], [], []
    for r in range(args.rounds):
        turn = rng.integers(16, session.vocab_size, size=(1, args.turn))
        for way in ("recompute", "reuse") if r % 2 == 0 else ("reuse", "recompute"):
            if way == "recompute":
                t = time.perf_counter()
                session.reset(1)
                session.prefill(np.concatenate([prefix, turn], axis=1))
                recompute.append(time.perf_counter() - t)
            else:
                t = time.perf_counter()
                session.restore(snap)
                restored = time.perf_counter()
                session.prefill(turn)
                reuse.append(time.perf_counter() - t)
                restore.append(restored - t)

    row = {
        "artifact": str(args.artifact),
        "backend": session.name,
        "prefix_tokens": args.prefix,
        "turn_tokens": args.turn,
        "rounds": args.rounds,
        "recompute_s_median": statistics.median(recompute),
        "reuse_s_median": statistics.median(reuse),
        "restore_s_median": statistics.median(restore),
        "speedup": statistics.median(recompute) / statistics.median(reuse),
        "snapshot_take_s": take_s,
        "snapshot_save_s": save_s,
        "snapshot_load_s": load_s,
        "snapshot_bytes": size,
        "recompute_s": recompute,
        "reuse_s": reuse,
    }
    out = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    out.update(
        {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "commit": commit,
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "threads": args.threads,
        }
    )
    row["load_average_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    out["rows"] = [r for r in out["rows"] if r["artifact"] != row["artifact"]] + [row]
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}, indent=2))


if __name__ == "__main__":
    main()
