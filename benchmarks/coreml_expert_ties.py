"""Core ML MoE exports: where fp16 compute chooses another expert than the simulation, against the simulation's
top-k router margin, and what the `-fp16-moe` gates decide with positions judged apart at each margin tried.

    flock /tmp/lfm-heavy.lock .venv/bin/python benchmarks/coreml_expert_ties.py \\
        --out benchmarks/results/coreml_expert_ties.json --threads 2

For each recipe it exports `tiny-moe` to Core ML (`--no-parity`, context 64) and runs every parity scenario
through the numpy interpreter against the simulation (`lfm_export.pipeline` builds the same sessions). Per
compared position: the simulation's smallest top-k router margin over the MoE layers
(`lfm_export.model.MoE.router_margin`), the logit error over the scenario's logit scale and the KL. A position
off by more than the dense `-fp16` limits (logit 5e-3, KL 2e-4) is counted as a flip; the file records each
flip's margin, the largest error at the other positions of flipped sequences (after the flip) and of the rest,
and the gate's verdict with each `--margins` value (0: nothing judged apart) on the honest artifact and on
wrong ones: the reference with a middle layer's expert down projections scaled (`w2`: the first expert's,
`expert`: the second's, `experts`: every expert's), and (int4) an export whose stacked experts were left
uncompressed. A position counts as judged apart as the gate decides (`lfm_export.parity.scenarios.tie_rows`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from provenance import provenance

MODEL = "tiny-moe"
CONTEXT = 64
LAYER = 3
TIGHT_LOGIT, TIGHT_KL = 5e-3, 2e-4


class Replay:
    """The artifact's session, each call's answer kept by the token history that led to it, so the same
    scenarios can be judged by several gates for one interpreter pass (every run feeds the same tokens)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.cache: dict[tuple, Any] = {}
        self.history: tuple = ()
        self._position = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def position(self) -> int:
        return self._position

    def reset(self, batch_size: int = 1) -> None:
        self.history = (("reset", batch_size),)
        self._position = 0
        self.inner.reset(batch_size)

    def _call(self, kind: str, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens)
        key = (*self.history, (kind, tokens.shape, tokens.tobytes()))
        if key not in self.cache:
            self.cache[key] = getattr(self.inner, kind)(tokens)
        self.history = key
        self._position += 1 if kind == "decode" else tokens.shape[-1]
        return self.cache[key]

    def prefill(self, tokens: np.ndarray) -> np.ndarray:
        return self._call("prefill", tokens)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        return self._call("decode", tokens)

    def state(self) -> Any:
        key = (*self.history, ("state",))
        if key not in self.cache:
            self.cache[key] = self.inner.state()
        return self.cache[key]


def export(folder: Path, quant: str, threads: int, uncompressed_experts: bool = False) -> None:
    from lfm_export.backends.coreml import compress
    from lfm_export.backends.coreml.recipes import make_recipe
    from lfm_export.pipeline import export_artifact
    from lfm_export.progress import Progress

    if (folder / "manifest.json").is_file():
        return
    keep = compress._experts_config
    if uncompressed_experts:  # what an export once did silently: stacked experts left fp16
        compress._experts_config = lambda recipe: None
    try:
        export_artifact(
            "coreml",
            MODEL,
            folder,
            make_recipe(quant, max_seq_len=CONTEXT),
            parity=False,
            threads=threads,
            progress=Progress(quiet=True),
            force=True,
        )
    finally:
        compress._experts_config = keep


def sessions(folder: Path, matrix: str | None, scale: float, threads: int) -> dict[str, Any]:
    """The artifact's session (replayed), the reference and the simulation (with and without fp16 input
    rounding) of the model with `matrix` of layer `LAYER` scaled by `scale`."""
    import torch

    from lfm_export.backends import get, open_session
    from lfm_export.loading import load_model
    from lfm_export.manifest import read_manifest
    from lfm_export.parity import ReferenceSession
    from lfm_export.pipeline import simulation_for
    from lfm_export.quant import simulate

    manifest = read_manifest(folder)
    loaded = load_model(MODEL)
    if matrix is not None:
        experts = loaded.model.model.layers[LAYER].feed_forward.experts
        chosen = experts if matrix == "experts" else [experts[0 if matrix == "w2" else 1]]
        with torch.no_grad():
            for expert in chosen:
                expert.w2.weight.mul_(scale)
    record = get("coreml")
    sim_recipe, activations = simulation_for(record, manifest["recipe"])
    weights = record.weight_values(manifest["recipe"])
    test = Replay(open_session(folder, threads=threads))
    simulated = simulate(loaded.model, sim_recipe, activations, threads=threads, weights=weights)
    unrounded = simulate(loaded.model, sim_recipe, "float", threads=threads, weights=weights)
    return {
        "test": test,
        "reference": ReferenceSession(loaded.model, max_seq_len=test.max_seq_len),
        "simulation": ReferenceSession(simulated, name="simulated", max_seq_len=test.max_seq_len),
        "rounding": ReferenceSession(unrounded, name="unrounded", max_seq_len=test.max_seq_len),
        "activations": activations,
        "recipe": manifest["recipe"]["name"],
        "tokenizer": folder / "tokenizer.json",
    }


def per_position(s: dict[str, Any]) -> list[dict[str, Any]]:
    """Every scenario's compared rows: margin, sequence, position, logit error over the scenario's logit scale,
    KL; and the state's largest error with and without the KV slots of low-margin positions."""
    from lfm_export.parity.expert_ties import recorder_for
    from lfm_export.parity.metrics import kl_divergence, state_max_abs
    from lfm_export.parity.prompts import default_prompts
    from lfm_export.parity.scenarios import SCENARIOS, ScenarioOptions, Sessions, within_window
    from lfm_export.pipeline import FULL_CONTEXT_LIMIT

    margins = recorder_for(s["simulation"])
    ss = Sessions(s["test"], s["simulation"], [s["reference"]], margins)
    ids = default_prompts(s["reference"].vocab_size, str(s["tokenizer"]))
    out = []
    for name, fn in SCENARIOS.items():
        run = fn(ss, ids, ScenarioOptions(full_context_limit=FULL_CONTEXT_LIMIT))
        if run.skipped is not None:
            continue
        r, t = (np.asarray(x, dtype=np.float64) for x in (run.logits[0], run.logits[-1]))
        rel = np.abs(t - r).max(-1) / np.abs(r).max()
        kl = kl_divergence(r, t)
        states = {}
        for bound in (0.0, 3e-4, 1e-3, 3e-3):
            slots = None
            if run.state_margins is not None:
                slots = within_window(run.state_margins < bound, run.tie_window).any(0)
            _, info = state_max_abs(run.states[0], run.states[-1], run.positions[0], slots)
            states[f"{bound:g}"] = info["max_rel"]
        out.append(
            {
                "scenario": name,
                "rows": [
                    [float(m), int(q), int(p), float(e), float(k)]
                    for (m, q, p), e, k in zip(run.tags, rel, kl, strict=True)
                ],
                "state_max_rel_by_margin": states,
                "tie_window": run.tie_window,
            }
        )
    margins.close()
    return out


def summarise(scenarios: list[dict[str, Any]]) -> dict[str, Any]:
    """Flips (rows past the tight limits) and their margins; the worst error at the other rows after a flip,
    at those past the conv window after the first flip, and elsewhere."""
    flips, after, beyond, elsewhere = [], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
    margins = []
    for sc in scenarios:
        rows = sc["rows"]
        first_flip: dict[int, int] = {}
        for m, q, p, e, k in rows:
            margins.append(m)
            if e > TIGHT_LOGIT or k > TIGHT_KL:
                flips.append(
                    {
                        "scenario": sc["scenario"],
                        "sequence": q,
                        "position": p,
                        "margin": m,
                        "logit_rel": e,
                        "kl": k,
                    }
                )
                first_flip[q] = min(first_flip.get(q, p), p)
        for _m, q, p, e, k in rows:
            if e > TIGHT_LOGIT or k > TIGHT_KL:
                continue
            into = after if q in first_flip and p > first_flip[q] else elsewhere
            into[0], into[1] = max(into[0], e), max(into[1], k)
            if q in first_flip and p > first_flip[q] + sc["tie_window"]:
                beyond[0], beyond[1] = max(beyond[0], e), max(beyond[1], k)
    arr = np.array(margins)
    return {
        "positions": len(margins),
        "flips": flips,
        "largest_flip_margin": max((f["margin"] for f in flips), default=None),
        "after_flip_worst": {"logit_rel": after[0], "kl": after[1]},
        "beyond_window_worst": {"logit_rel": beyond[0], "kl": beyond[1]},
        "elsewhere_worst": {"logit_rel": elsewhere[0], "kl": elsewhere[1]},
        "share_below": {f"{b:g}": float((arr < b).mean()) for b in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)},
    }


def verdicts(s: dict[str, Any], margins: list[float]) -> dict[str, Any]:
    from lfm_export.parity import run_parity
    from lfm_export.parity.thresholds import gate_for

    base = gate_for(s["recipe"], s["activations"])
    out = {}
    for m in margins:
        gate = dataclasses.replace(base, router_margin=m)
        r = run_parity(
            s["test"],
            s["reference"],
            gate,
            simulation=s["simulation"],
            activations=s["activations"],
            rounding=s["rounding"],
            tokenizer_file=str(s["tokenizer"]),
            snapshots=False,
        )
        worst = {
            k: r.worst(k)
            for k in (
                "logit_max_rel",
                "kl_max",
                "state_max_rel",
                "logit_max_rel_at_tie",
                "kl_max_at_tie",
                "state_max_rel_at_tie",
            )
        }
        pooled = r.scenario("pooled").metrics
        apart = sum(int(x.metrics.get("judged_apart") or 0) for x in r.scenarios if x.name != "pooled")
        out[f"{m:g}"] = {
            "exactness_passed": r.part_passed("exactness"),
            "failed": sorted({f"{c.scenario}:{c.metric}" for c in r.failures if c.part == "exactness"}),
            "worst": worst,
            "judged_apart": apart,
            "pooled_positions": pooled.get("positions"),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["fp16", "int8", "int4", "palettize4"])
    ap.add_argument("--wrong", nargs="+", default=["w2:1.02", "w2:1.05", "experts:1.02", "experts:1.05"])
    ap.add_argument("--wrong-recipes", nargs="+", default=["fp16", "int4"])
    ap.add_argument("--margins", nargs="+", type=float, default=[0.0, 3e-4, 1e-3, 3e-3])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        plan = [(q, False) for q in args.recipes] + [("int4", True)]
        for quant, uncompressed in plan:
            start = time.perf_counter()
            label = quant + ("-uncompressed-experts" if uncompressed else "")
            folder = work / f"coreml-{label}"
            export(folder, quant, args.threads, uncompressed)
            row: dict[str, Any] = {"recipe": label, "export_s": round(time.perf_counter() - start, 1)}
            s = sessions(folder, None, 1.0, args.threads)
            if not uncompressed:
                row["per_position"] = per_position(s)
                row["summary"] = summarise(row["per_position"])
            row["honest" if not uncompressed else "uncompressed_experts"] = verdicts(s, args.margins)
            if quant in args.wrong_recipes and not uncompressed:
                row["wrong"] = {}
                for spec in args.wrong:
                    matrix, scale = spec.split(":")
                    w = sessions(folder, matrix, float(scale), args.threads)
                    row["wrong"][spec] = verdicts(w, args.margins)
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(
                json.dumps({k: v for k, v in row.items() if k not in ("per_position",)}, default=str)[:3000],
                flush=True,
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(
                json.dumps(
                    {
                        **provenance(),
                        "model": MODEL,
                        "context": CONTEXT,
                        "threads": args.threads,
                        "rows": rows,
                    },
                    indent=1,
                )
                + "\n"
            )


if __name__ == "__main__":
    main()
