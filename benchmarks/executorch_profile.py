"""Where an ExecuTorch program's time goes: per-op times from an ETDump, split into prefill and decode.

    .venv/bin/python benchmarks/executorch_profile.py OUT/model.pte --prompt-len 512 --decode 32

Loads the `.pte` with ETDump enabled (`portable_lib._load_for_executorch(..., enable_etdump=True)`), prefills
a seeded random prompt in chunks of the program's `get_max_seq_len`, decodes `--decode` steps, and prints the
ops with the largest total time in each phase (`executorch.devtools.Inspector`; delegate-internal XNNPACK
ops are listed by XNNPACK's operator names, e.g. `Fully Connected (NC, QDU8, F32, QB4W) GEMM`).

`--json FILE` also writes, per phase, every op's microseconds per call of `forward` and how many times one call
runs it (with the provenance and load average), for comparing two programs step for step:

    flock /tmp/lfm-heavy.lock .venv/bin/python benchmarks/executorch_profile.py A.pte B.pte --prompt-len 64 \
        --decode 32 --threads 1 --json benchmarks/results/executorch_profile_350m.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import provenance  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pte", type=Path, nargs="+")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    result: dict[str, Any] = {**provenance(), "threads": args.threads, "prompt_len": args.prompt_len}
    result |= {"decode_steps": args.decode, "programs": {}}
    for pte in args.pte:
        print(f"== {pte}")
        result["programs"][str(pte)] = profile(pte, args)
    result["load_average_end"] = round(os.getloadavg()[0], 2)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


def profile(pte: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run `pte` with ETDump on, print the top ops per phase; per phase and op: microseconds per `forward` call
    and calls per `forward` call."""

    import torch
    from executorch.devtools import Inspector
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(args.threads)
    module = portable_lib._load_for_executorch(str(pte), enable_etdump=True)
    chunk = int(module.run_method("get_max_seq_len", ())[0])
    ids = torch.randint(16, 60000, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    prefill_runs = 0
    for s in range(0, args.prompt_len, chunk):
        module.run_method("forward", (ids[:, s : s + chunk], torch.tensor([s])))
        prefill_runs += 1
    for i in range(args.decode):
        module.run_method("forward", (torch.tensor([[100 + i]]), torch.tensor([args.prompt_len + i])))
    runs = prefill_runs + args.decode
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "profile.etdp"
        module.write_etdump_result_to_file(str(path))
        inspector = Inspector(etdump_path=str(path))
    phases = {"prefill": collections.Counter(), "decode": collections.Counter()}
    counts: collections.Counter = collections.Counter()
    for block in inspector.event_blocks:
        for event in block.events:
            raw = event.perf_data.raw if event.perf_data is not None else []
            if not raw or len(raw) % runs:  # load / init events, once per program
                continue
            per_run = len(raw) // runs
            counts[event.name] += per_run
            phases["prefill"][event.name] += sum(raw[: prefill_runs * per_run])
            phases["decode"][event.name] += sum(raw[prefill_runs * per_run :])
    calls = {"prefill": prefill_runs, "decode": args.decode}
    out: dict[str, Any] = {}
    for phase, totals in phases.items():
        whole = totals.get("Method::execute", 0.0) or 1.0
        print(f"{phase}: Method::execute {whole:.1f} ms")
        skip = {"Method::execute", "DELEGATE_CALL", "OPERATOR_CALL"}
        for name, ms in [(n, v) for n, v in totals.most_common() if n not in skip][: args.top]:
            print(f"  {ms:9.1f} ms {100 * ms / whole:5.1f}%  {name}")
        out[phase] = {
            n: {"us_per_call": round(1000 * ms / max(calls[phase], 1), 1), "per_call": counts[n]}
            for n, ms in totals.most_common()
        }
    return out


if __name__ == "__main__":
    main()
