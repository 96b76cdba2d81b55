"""Where an MoE artifact's `prefill` scenario row is furthest from its simulation, and the router margins there.

    .venv/bin/python benchmarks/moe_tie_positions.py OUT --model tiny-moe --threads 1 \\
        --json benchmarks/results/X.json

Runs parity's `prefill` scenario on the artifact in `OUT` (`check_artifact`, its own gate) and, per compared
position, its logit error against the simulation (the largest over the scenario's logit scale, as the gate's
`logit_max_rel` reads it) and KL; for the `--top` worst positions: prompt, position, whether the gate judged
it apart as a router near-tie, the simulation's smallest top-k router margin there and at the positions
before it (`lfm_export.parity.expert_ties`: an expert the runtime chose otherwise at a near-tie moves its
position and the `tie_window` after it). The same for the simulation without activation rounding, which sets
the `-a8` / GGUF allowance. It says where a failure sits; it does not say which expert the runtime ran.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from provenance import provenance  # noqa: E402


def worst_positions(run: Any, ref: int, test: int, margin: float, top: int) -> dict[str, Any]:
    """The `top` positions of `run` where session `test` is furthest from `ref`, with their router margins."""
    from lfm_export.parity.metrics import kl_divergence
    from lfm_export.parity.scenarios import tie_rows

    r = np.asarray(run.logits[ref], np.float64)
    t = np.asarray(run.logits[test], np.float64)
    scale = float(np.abs(r).max())
    rel = np.abs(t - r).max(axis=1) / scale
    kl = kl_divergence(r, t)
    tie = tie_rows(run, margin)
    rows = []
    for i in np.argsort(-rel)[:top]:
        _, q, p = run.tags[i]
        seq = run.sequence_margins.get(int(q))
        rows.append(
            {
                "prompt": int(q),
                "position": int(p),
                "logit_rel": float(rel[i]),
                "kl": float(kl[i]),
                "judged_apart": bool(tie[i]) if tie is not None else None,
                "margin": float(run.tags[i][0]),
                "margins_before": None
                if seq is None
                else [float(m) for m in seq[max(0, int(p) - run.tie_window) : int(p) + 1]],
            }
        )
    kept = ~tie if tie is not None else np.ones(len(rel), bool)
    return {
        "positions": int(len(rel)),
        "judged_apart": int((~kept).sum()),
        "logit_max_rel_not_apart": float(rel[kept].max()) if kept.any() else None,
        "kl_max_not_apart": float(kl[kept].max()) if kept.any() else None,
        "worst": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--model", required=True, help="the checkpoint the artifact was exported from")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()

    import torch

    import lfm_export.parity.scenarios as scenarios
    from lfm_export.backends import all_backends
    from lfm_export.loading import load_model
    from lfm_export.pipeline import check_artifact
    from lfm_export.progress import Progress

    torch.set_num_threads(args.threads)
    all_backends()
    seen: list[tuple[Any, int, int, float]] = []
    pair_metrics = scenarios.pair_metrics

    def spy(run: Any, ref: int, test: int, margin: float | None = None) -> dict[str, float | None]:
        if run.name == "prefill" and margin is not None:
            seen.append((run, ref, test, margin))
        return pair_metrics(run, ref, test, margin)

    scenarios.pair_metrics = spy  # the runs' logits, as the gate compares them
    try:
        result = check_artifact(
            args.folder,
            load_model(args.model),
            threads=args.threads,
            progress=Progress(quiet=True),
            scenarios=["prefill"],
        )
    finally:
        scenarios.pair_metrics = pair_metrics
    if not seen:
        raise SystemExit(f"{args.folder}: its gate judges no router near-tie apart (not an MoE artifact?)")
    failed = [f"{c.scenario}:{c.metric} {c.value} (limit {c.limit})" for c in result.checks if not c.passed]
    names = ("artifact", "simulation without activation rounding")
    out = {
        **provenance(),
        "folder": str(args.folder),
        "model": args.model,
        "passed": bool(result.passed),
        "failed": failed,
        "activation_rounding": result.activation_rounding,
        "tie_margin": seen[0][3],
        "tie_window": int(seen[0][0].tie_window),
        **{
            name: worst_positions(run, ref, test, m, args.top)
            for name, (run, ref, test, m) in zip(names, seen)
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("passed", "failed", "tie_margin")}, indent=1))
    for name in names:
        for w in out[name]["worst"][:4]:
            print(name, w)


if __name__ == "__main__":
    main()
