"""Measured detection limits of the parity gates: per backend, recipe and model, the smallest single-matrix
scale error the exactness gate catches.

    .venv/bin/python benchmarks/detection_limits.py --out benchmarks/results/detection_limits.json --threads 1

For each `--runs` entry (`backend:recipe:model`; `onnx-qnn:16a8w:tiny` too, at context `QNN_CONTEXT`) it exports the model once (`--no-parity`), checks the honest
artifact, then checks the same artifact against the model with one matrix of a middle layer (`--layer`,
default the middle one) scaled by each of `--scales` in turn, ascending, stopping at the first one the gate
catches (a larger error in the same matrix is caught too: every per-position metric grows with it). Matrices:
`w2` (the MLP's down projection; on MoE layers the first expert's), `out_proj` (the layer's conv or attention
output projection), `in_proj` (a conv layer's input projection) and, on MoE models, `expert` (the second
expert's w2). The checks run parity's `prefill` scenario only (`--scenarios`), whose pooled row is what the
statistical limits read: fewer positions than a full parity run, so a limit measured here is an upper bound
of the full run's. Where the runtime rounds activations to int8 the check also holds the `-a8` gates' tight
row (`resolved_prefill`, `lfm_export.parity.boundary`). "Caught" counts the logits checks only: each check
records whether the logits checks alone passed (`logits_exactness_passed`) and the stored-weights verdict
(`stored_weights`, with the checkpoint tensor nearest to each unmatched artifact tensor; null where the backend
has no reader), which compares the artifact's quantized weights bit for bit with the simulation's; a cell
caught only by the stored weights says so. `--markdown` prints the table docs/parity.md holds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from provenance import provenance

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUNS = ("onnx:int4:tiny", "onnx:int4:tiny-moe", "executorch:8da4w:tiny", "mlx:int4:tiny")
MATRICES = ("w2", "out_proj", "in_proj", "expert")
METRICS = ("logit_max_rel", "logit_median_rel", "kl_mean", "kl_max")
STORED = "stored_weights"
"""Scenario prefix of the stored-weights check's rows, left out of "caught" (module doc)."""


QNN_CONTEXT = 64
"""The context of `onnx-qnn` runs: every step moves the whole static KV cache through the emulated HTP (about
0.3 s a token for `tiny` at 64), and the QNN results in docs/backends/qnn.md were measured at 64."""


def _recipe(backend: str, quant: str) -> Any:
    from lfm_export.backends import get

    record = get(backend)
    if backend == "executorch":
        return record.recipe(quant, 128, max_prefill=32)
    if backend == "onnx-qnn":
        return record.recipe(quant, QNN_CONTEXT)
    return record.recipe(quant, 128)


def _matrix(model: Any, layer: int, name: str) -> Any:
    """The weight `name` names in `layer` of the canonical model (None where the layer has none)."""
    block = model.model.layers[layer]
    ff = block.feed_forward
    experts = getattr(ff, "experts", None)
    if name == "w2":
        return (experts[0].w2 if experts is not None else ff.w2).weight
    if name == "expert":
        return None if experts is None else experts[1].w2.weight
    mixer = getattr(block, "conv", None) or getattr(block, "self_attn", None)
    if name == "out_proj":
        return mixer.out_proj.weight
    if name == "in_proj":
        conv = getattr(block, "conv", None)
        return None if conv is None else conv.in_proj.weight
    raise ValueError(name)


def _conv_layer(config: Any, layer: int) -> int:
    """`layer` if it is a conv layer, else the nearest conv layer after it (in_proj lives there)."""
    types = list(config.layer_types)
    for i in list(range(layer, len(types))) + list(range(layer)):
        if types[i] == "conv":
            return i
    return layer


REPLAYED = ("onnx-qnn",)
"""Backends whose artifact outputs are computed once per token sequence and replayed in the later checks
(`ReplaySession`): the emulated HTP runs about 0.3 s a token, and only the reference and the simulation change
between the checks of one run."""


def replay_session(inner: Any, cache: dict[tuple, tuple]) -> Any:
    """`inner` (the artifact's session) behind a `SessionBase` that keeps each `prefill`'s logits and state in
    `cache`, keyed by every chunk fed since the last reset, and returns them when the same chunks come again;
    on a new chunk it brings `inner` to the held tokens (replaying them where it holds others) and runs it.
    Snapshots are not taken (its row is skipped): they test the runtime alone, which does not change here."""
    import numpy as np

    from lfm_export.contract.session import SessionBase

    class ReplaySession(SessionBase):
        def __init__(self) -> None:
            self.name, self.vocab_size = inner.name, inner.vocab_size
            self.max_seq_len, self.artifact_id = inner.max_seq_len, getattr(inner, "artifact_id", None)
            self.supports_batch = getattr(inner, "supports_batch", True)
            self._key: tuple = ()
            self._inner_key: tuple | None = None
            self.reset(1)

        def _reset_state(self, batch_size: int) -> None:
            self._key = (batch_size,)

        def _prefill(self, ids: np.ndarray) -> np.ndarray:
            key = (*self._key, (ids.shape, ids.tobytes()))
            if key not in cache:
                if self._inner_key != self._key:
                    inner.reset(self._key[0])
                    for shape, raw in self._key[1:]:
                        inner.prefill(np.frombuffer(raw, dtype=np.int64).reshape(shape))
                cache[key] = (inner.prefill(ids), inner.state())
                self._inner_key = key
            self._key = key
            return cache[key][0].copy()

        def state(self) -> dict[str, np.ndarray] | None:
            held = cache.get(self._key)
            return None if held is None or held[1] is None else {k: v.copy() for k, v in held[1].items()}

        def _snapshot_state(self) -> dict[str, np.ndarray]:
            from lfm_export.contract.errors import UnsupportedError

            raise UnsupportedError(
                f"{self.name}: replayed outputs (benchmarks/detection_limits.py) take no snapshot"
            )

    return ReplaySession()


def check(
    folder: Path,
    model: str,
    layer: int,
    matrix: str | None,
    scale: float,
    threads: int,
    scenarios: list[str],
    cache: dict[tuple, tuple] | None = None,
) -> dict[str, Any] | None:
    """Parity of the artifact at `folder` against `model` with `matrix` of `layer` x `scale` (None: honest);
    `cache`: replay the artifact's outputs from it (`replay_session`)."""
    import torch

    from lfm_export import pipeline
    from lfm_export.backends import all_backends, open_session
    from lfm_export.loading import load_model
    from lfm_export.pipeline import check_artifact
    from lfm_export.progress import Progress

    all_backends()  # the gates backends add (QNN's) where the export was reused from --work

    pipeline.open_session = (  # type: ignore[attr-defined]
        open_session
        if cache is None
        else lambda folder, threads: replay_session(open_session(folder, threads=threads), cache)
    )

    loaded = load_model(model)
    if matrix is not None:
        at = _conv_layer(loaded.config, layer) if matrix == "in_proj" else layer
        w = _matrix(loaded.model, at, matrix)
        if w is None:
            return None
        with torch.no_grad():
            w.mul_(scale)
    r = check_artifact(folder, loaded, threads=threads, progress=Progress(quiet=True), scenarios=scenarios)
    pooled = next(s for s in r.scenarios if s.name == "pooled")
    sw = r.stored_weights
    logits = [c for c in r.failures if not c.scenario.startswith(STORED)]
    return {
        "passed": not logits,
        "passed_with_stored_weights": bool(r.passed),
        "exactness_passed": bool(r.part_passed("exactness")),
        "logits_exactness_passed": not [c for c in logits if c.part == "exactness"],
        "stored_weights": None
        if sw is None
        else {
            "passed": sw["passed"],
            "unmatched": {n: u.get("nearest", n) for n, u in sw["unmatched"].items()},
        },
        "failed": sorted({f"{c.scenario}:{c.metric}" for c in r.failures}),
        "pooled": {k: pooled.metrics.get(k) for k in METRICS},
        "resolved_prefill": r.resolved,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="backend:recipe:model")
    ap.add_argument("--scales", nargs="+", type=float, default=[1.01, 1.02, 1.05, 1.10])
    ap.add_argument("--matrices", nargs="+", default=list(MATRICES))
    ap.add_argument("--layer", type=int, default=None, help="default: the middle layer")
    ap.add_argument("--scenarios", nargs="+", default=["prefill"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--work", type=Path, default=None, help="export folder, reused (default: a temporary one)"
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--markdown", action="store_true", help="print the docs table of --out and exit")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())))
        return

    import torch

    from lfm_export.loading import load_model
    from lfm_export.pipeline import export_artifact
    from lfm_export.progress import Progress

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for run in args.runs:
            backend, quant, model = run.split(":")
            folder = work / f"{backend}-{quant}-{model}"
            if not (folder / "manifest.json").is_file():
                export_artifact(
                    backend,
                    model,
                    folder,
                    _recipe(backend, quant),
                    parity=False,
                    threads=args.threads,
                    progress=Progress(quiet=True),
                    force=True,
                )
            layers = load_model(model, lazy=True).config.num_hidden_layers
            layer = args.layer if args.layer is not None else layers // 2
            gate = json.loads((folder / "manifest.json").read_text())["recipe"].get("name")
            row: dict[str, Any] = {
                "backend": backend,
                "recipe": quant,
                "recipe_name": gate,
                "model": model,
                "layer": layer,
            }
            start = time.perf_counter()
            cache: dict[tuple, tuple] | None = {} if backend in REPLAYED else None
            row["replayed"] = cache is not None
            row["honest"] = check(folder, model, layer, None, 1.0, args.threads, args.scenarios, cache)
            row["matrices"] = {}
            for matrix in args.matrices:
                tried = []
                for scale in sorted(args.scales):
                    res = check(folder, model, layer, matrix, scale, args.threads, args.scenarios, cache)
                    if res is None:
                        break
                    tried.append({"scale": scale, **res})
                    if not res["passed"]:
                        break
                if tried:
                    caught = [t["scale"] for t in tried if not t["passed"]]
                    row["matrices"][matrix] = {
                        "smallest_caught": caught[0] if caught else None,
                        "tried": tried,
                    }
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("backend", "recipe", "model", "seconds")}), flush=True)
            result = {
                **provenance(),
                "threads": args.threads,
                "scales": sorted(args.scales),
                "scenarios": args.scenarios,
                "rows": rows,
            }
            args.out.parent.mkdir(parents=True, exist_ok=True)
            # after each run, so a long run keeps the rows it finished
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    """One row per backend, recipe and model: the smallest scale the logits checks catch per matrix (`>x`
    where the largest tried passed), the honest artifact's pooled median logit error and, where activations
    are rounded to int8, its `resolved_prefill` error."""
    lines = [
        "| backend | recipe | model | honest passes | honest pooled median | honest resolved max | "
        + " | ".join(MATRICES)
        + " |",
        "|---" * (5 + len(MATRICES)) + "|---|",
    ]
    for row in result["rows"]:
        cells = []
        for m in MATRICES:
            entry = row["matrices"].get(m)
            if entry is None:
                cells.append("n/a")
            elif entry["smallest_caught"] is None:
                cells.append(f"> x {max(t['scale'] for t in entry['tried']):g} (not caught)")
            else:
                caught = next(t for t in entry["tried"] if t["scale"] == entry["smallest_caught"])
                alone = (
                    caught.get("logits_exactness_passed")
                    and (caught.get("stored_weights") or {}).get("passed") is False
                )
                cells.append(f"x {entry['smallest_caught']:g}" + (" (stored weights)" if alone else ""))
        honest = row["honest"]
        resolved = honest.get("resolved_prefill")
        exact = "n/a" if not resolved else f"{resolved['logit_max_rel']:.1e}"
        lines.append(
            f"| {row['backend']} | {row['recipe']} | `{row['model']}` (layer {row['layer']}) | "
            f"{'yes' if honest['passed'] else 'NO'} | {honest['pooled']['logit_median_rel']:.1e} | {exact} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
