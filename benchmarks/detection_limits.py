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
row (`resolved_prefill`, `lfm_export.parity.boundary`), and where the Core ML interpreter runs the artifact
the `-fp16` gates' exact row (`fp16_program_prefill`, `lfm_export.parity.fp16_program`). "Caught" counts the logits checks only: each check
records whether the logits checks alone passed (`logits_exactness_passed`) and the stored-weights verdict
(`stored_weights`, with the checkpoint tensor nearest to each unmatched artifact tensor; null where the backend
has no reader), which compares the artifact's quantized weights bit for bit with the simulation's; a cell
caught only by the stored weights says so. Where the backend adds a graph row (QNN: the artifact's QDQ graph on
onnxruntime's CPU provider against the fake-quantized program, `lfm_export.parity.graph_row`), it counts as
caught too, and the scales go on until the rows of the artifact's own runtime (the emulated HTP) catch the
error as well: the cell gives both. Each check records the state metrics of every scenario (`state`, with the
state error in steps of its grid where the simulation gives them) and the graph row (`graph_prefill`).

Models: the bundled trained `tiny` / `tiny-moe`, and `hf-dense` / `hf-moe`, checkpoints the script writes itself
with transformers' own `save_pretrained` (`lfm_export.check.save_random_transformers`, seeded; the shapes of
tests/core/test_parity_gates.py, the MoE one with `routed_scaling_factor` 1.5) into `--work`. Their random
initialisation gives flat logits: KL and top-1 say little there, so the scale-free logit and state errors carry
the exactness gate (module doc of lfm_export.parity.thresholds).

Wrong artifacts (`--wrong`, run on the `--wrong-scenarios`, which include decode and a chunked prefill, where a
state bug shows; the honest artifact is checked on them too, `honest_wrong_scenarios`):
- `other_weights`: the artifact checked against a model of the same shapes and other weights (the
  transformers initialisation with another seed), through the real runtime;
- `dropped_conv_state`, `kv_off_by_one`: the broken sessions of tests/broken_sessions.py over the backend's own
  simulation (its weight values and activation rounding), checked in the runtime shim's place under the
  artifact's gate (`check_artifact(session=...)`; hiding their state where the shim exposes none, as
  ExecuTorch's and GGUF's do): what the gate catches of such a runtime bug, not the runtime itself. On
  `onnx-qnn`, whose simulation is the fake-quantized program (`simulation_session`) and not a core recipe, the
  bug is put into the artifact's own runtime session instead (`htp_broken_session`: the emulated HTP with its
  conv state zeroed after every call, or every call after a sequence's first fed one position later), so the
  check carries the HTP's own distance from the program as well;
- `routing_scale_dropped` (MoE models whose `routed_scaling_factor` is not 1): a real artifact exported from a
  copy of the checkpoint whose config says 1, checked against the original, through the real runtime.

`--merge` adds the `--wrong` columns to the rows `--out` already holds (same `--runs`, reusing the exports in
`--work` or making them anew): the matrices and the honest check stay as they were, each new column records its
own scenarios and provenance (`added`), and the honest artifact is checked again on the new `--wrong-scenarios`.

`--markdown [FILE ...]` prints the table docs/parity.md holds, of `--out` or of the files given.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from provenance import provenance

from lfm_export.check import small_shape

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUNS = ("onnx:int4:tiny", "onnx:int4:tiny-moe", "executorch:int4-b32-a8:tiny", "mlx:int4:tiny")
MATRICES = ("w2", "out_proj", "in_proj", "expert")
WRONG = ("other_weights", "dropped_conv_state", "kv_off_by_one", "routing_scale_dropped")
WRONG_SCENARIOS = ("prefill", "decode", "chunked_prefill")
HF_MODELS: dict[str, tuple[dict[str, Any], int]] = {
    # name: (transformers config kwargs, seed); the shapes of tests/core/test_parity_gates.py's checkpoints
    "hf-dense": (small_shape("dense"), 1),
    "hf-moe": ({**small_shape("moe"), "routed_scaling_factor": 1.5}, 3),
    # one conv and one attention layer: the QNN tests' SMALL checkpoint (tests/backends/qnn/test_qnn.py), whose
    # emulated-HTP runs are cheap; seed 807 = stable_seed("qnn-small")
    "hf-qnn-small": (
        {
            "vocab_size": 128,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "layer_types": ["conv", "full_attention"],
            "block_auto_adjust_ff_dim": False,
        },
        807,
    ),
}
"""Transformers-initialised checkpoints the script writes (`--work`/checkpoints); `<name>-other` is the same
shapes with seed + 100, the `other_weights` model."""
OTHER_SEED = 100
METRICS = ("logit_max_rel", "logit_median_rel", "kl_mean", "kl_max")
STORED = "stored_weights"
"""Scenario prefix of the stored-weights check's rows, left out of "caught" (module doc)."""
GRAPH = "graph_prefill"
"""The graph row (`lfm_export.parity.graph_row`, QNN): the artifact's graph run as written on a reference
runtime against the simulation. It counts as caught; `runtime_rows_passed` says what the rows of the artifact's
own runtime caught without it."""
STATE = ("state_max_rel", "state_p99_rel", "state_max_steps", "state_p99_steps")
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


def _hf_kwargs(model: str) -> dict[str, Any]:
    """Transformers config kwargs of a bundled model (its `to_hf_dict` without the file-only keys)."""
    from lfm_export.loading import load_model

    d = load_model(model, lazy=True).config.to_hf_dict()
    for key in ("architectures", "model_type", "torch_dtype", "full_attn_idxs", "rope_parameters"):
        d.pop(key, None)
    return d


def resolve_model(model: str, work: Path) -> str:
    """What `load_model` takes for `model`: a bundled name as is; `hf-*` (and `<name>-other`, the other-weights
    model of any name) as the checkpoint folder the script writes under `work` with transformers'
    `save_pretrained`, once."""
    import torch

    from lfm_export.check import save_random_transformers

    base, other = (model[: -len("-other")], True) if model.endswith("-other") else (model, False)
    if base not in HF_MODELS and not other:
        return model
    folder = work / "checkpoints" / model
    if not (folder / "config.json").is_file():
        kwargs, seed = HF_MODELS[base] if base in HF_MODELS else (_hf_kwargs(base), 0)
        save_random_transformers(folder, kwargs, torch.float32, seed + (OTHER_SEED if other else 0))
    return str(folder)


def checkpoint_kind(model: str) -> str:
    return "transformers-initialised" if model in HF_MODELS else "trained"


def without_routing_scale(model: str, work: Path) -> str | None:
    """A copy of `model`'s checkpoint whose config says `routed_scaling_factor` 1 (None: no MoE scale to drop)."""
    if model not in HF_MODELS or HF_MODELS[model][0].get("routed_scaling_factor", 1.0) == 1.0:
        return None
    source = Path(resolve_model(model, work))
    folder = work / "checkpoints" / f"{model}-noscale"
    if not (folder / "config.json").is_file():
        shutil.copytree(source, folder, dirs_exist_ok=True)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["routed_scaling_factor"] = 1.0
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return str(folder)


def broken_session(folder: Path, model: str, kind: str, threads: int) -> Any:
    """The broken session of tests/broken_sessions.py for `kind` over the backend's own simulation of `model`,
    hiding its state where the artifact's shim exposes none."""
    sys.path.insert(0, str(ROOT / "tests"))
    from broken_sessions import DropsConvState, KvOneOff

    from lfm_export.backends import get, open_session
    from lfm_export.contract.manifest import read_manifest
    from lfm_export.loading import load_model
    from lfm_export.pipeline import simulation_for
    from lfm_export.quant import simulate

    manifest = read_manifest(folder)
    record = get(manifest["backend"])
    sim_recipe, activations = simulation_for(record, manifest["recipe"])
    weights = record.weight_values(manifest["recipe"]) if record.weight_values else None
    simulated = simulate(load_model(model).model, sim_recipe, activations, threads=threads, weights=weights)
    real = open_session(folder, threads=threads)
    cls: Any = {"dropped_conv_state": DropsConvState, "kv_off_by_one": KvOneOff}[kind]
    if real.state() is None:
        cls = type(cls.__name__, (cls,), {"state": lambda self: None})
    return cls(simulated, name=kind, max_seq_len=real.max_seq_len)


def htp_broken_session(folder: Path, kind: str, threads: int) -> Any:
    """The `onnx-qnn` artifact's own emulated-HTP session (`lfm_export.runtime.qnn.QnnSession`) with the runtime
    bug `kind`: `dropped_conv_state` zeroes its conv state after every call; `kv_off_by_one` feeds every call
    after a sequence's first one position later (its keys and queries rotated, and written, one slot later than
    the cached ones; the slot skipped stays zero and unmasked), as a runtime that miscounts the position would,
    and declares a context one shorter so that the shifted positions stay within the cache."""
    import numpy as np

    from lfm_export.contract.session import SessionError
    from lfm_export.runtime.qnn import QnnSession

    class DropsConvState(QnnSession):
        def _prefill(self, ids: np.ndarray) -> np.ndarray:
            out = super()._prefill(ids)
            conv = {s.name for s in self._state_specs if s.role == "conv"}
            self._state = {k: np.zeros_like(v) if k in conv else v for k, v in self._state.items()}
            return out

    class KvOneOff(QnnSession):
        def _prefill(self, ids: np.ndarray) -> np.ndarray:
            if self._position == 0:
                return super()._prefill(ids)
            if self._position + 1 + ids.shape[1] > self.slots:
                raise SessionError(f"{self.name}: the shifted position runs past the context")
            self._position += 1
            try:
                return super()._prefill(ids)
            finally:
                self._position -= 1

    cls: Any = {"dropped_conv_state": DropsConvState, "kv_off_by_one": KvOneOff}[kind]
    session = cls(folder, threads=threads)
    session.name = f"qnn-htp-{kind}"
    if kind == "kv_off_by_one":
        # the static cache's length; the scenarios fit their prompts to one less, so the skipped slot fits
        session.slots = int(session.signature.max_seq_len)
        session.max_seq_len = session.slots - 1
    return session


def _export(backend: str, quant: str, model: str, folder: Path, threads: int) -> None:
    from lfm_export.pipeline import export_artifact
    from lfm_export.progress import Progress

    if not (folder / "manifest.json").is_file():
        export_artifact(
            backend,
            model,
            folder,
            _recipe(backend, quant),
            parity=False,
            threads=threads,
            progress=Progress(quiet=True),
            force=True,
        )


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
    session: Any = None,
    cache: dict[tuple, tuple] | None = None,
) -> dict[str, Any] | None:
    """Parity of the artifact in `folder` (or of `session` in its shim's place) against `model` with `matrix`
    of `layer` scaled by `scale`: the logits verdict, the stored-weights verdict apart, the pooled metrics;
    `cache`: replay the artifact's outputs from it (`replay_session`)."""
    import torch

    from lfm_export.backends import all_backends, open_session
    from lfm_export.loading import load_model
    from lfm_export.pipeline import check_artifact
    from lfm_export.progress import Progress

    all_backends()  # the gates backends add (QNN's) where the export was reused from --work
    if session is None and cache is not None:
        session = replay_session(open_session(folder, threads=threads), cache)
    loaded = load_model(model)
    if matrix is not None:
        at = _conv_layer(loaded.config, layer) if matrix == "in_proj" else layer
        w = _matrix(loaded.model, at, matrix)
        if w is None:
            return None
        with torch.no_grad():
            w.mul_(scale)
    r = check_artifact(
        folder, loaded, threads=threads, progress=Progress(quiet=True), scenarios=scenarios, session=session
    )
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
        "state": {
            row.name: {k: row.metrics[k] for k in STATE if k in row.metrics}
            for row in r.scenarios
            if any(k in row.metrics for k in STATE)
        },
        "resolved_prefill": r.exact("resolved_prefill"),
        "graph_prefill": r.exact("graph_prefill"),
        "runtime_rows_passed": not [c for c in logits if c.scenario != GRAPH],
        "fp16_program_prefill": r.exact("fp16_program_prefill"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="backend:recipe:model")
    ap.add_argument("--scales", nargs="+", type=float, default=[1.01, 1.02, 1.05, 1.10])
    ap.add_argument("--matrices", nargs="+", default=list(MATRICES))
    ap.add_argument("--wrong", nargs="*", default=list(WRONG), help="wrong-artifact kinds (none: skip)")
    ap.add_argument("--layer", type=int, default=None, help="default: the middle layer")
    ap.add_argument("--scenarios", nargs="+", default=["prefill"])
    ap.add_argument("--wrong-scenarios", nargs="+", default=list(WRONG_SCENARIOS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--work", type=Path, default=None, help="export folder, reused (default: a temporary one)"
    )
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--merge",
        action="store_true",
        help="add the --wrong columns to the rows --out holds (module doc)",
    )
    ap.add_argument(
        "--markdown",
        nargs="*",
        type=Path,
        default=None,
        help="print the docs table of --out (or FILES) and exit",
    )
    args = ap.parse_args()
    if args.markdown is not None:
        files = args.markdown or [args.out]
        print(markdown([json.loads(f.read_text()) for f in files]))
        return
    if args.out is None:
        ap.error("--out is required")

    import torch

    from lfm_export.loading import load_model

    torch.set_num_threads(args.threads)
    if args.merge:
        merge(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for run in args.runs:
            backend, quant, name = run.split(":")
            model = resolve_model(name, work)
            folder = work / f"{backend}-{quant}-{name}"
            _export(backend, quant, model, folder, args.threads)
            layers = load_model(model, lazy=True).config.num_hidden_layers
            layer = args.layer if args.layer is not None else layers // 2
            gate = json.loads((folder / "manifest.json").read_text())["recipe"].get("name")
            row: dict[str, Any] = {
                "backend": backend,
                "recipe": quant,
                "recipe_name": gate,
                "model": name,
                "checkpoint": checkpoint_kind(name),
                "layer": layer,
            }
            start = time.perf_counter()
            cache: dict[tuple, tuple] | None = {} if backend in REPLAYED else None
            row["replayed"] = cache is not None
            row["honest"] = check(folder, model, layer, None, 1.0, args.threads, args.scenarios, cache=cache)
            row["matrices"] = {}
            for matrix in args.matrices:
                tried = []
                for scale in sorted(args.scales):
                    res = check(
                        folder, model, layer, matrix, scale, args.threads, args.scenarios, cache=cache
                    )
                    if res is None:
                        break
                    tried.append({"scale": scale, **res})
                    if not res[
                        "runtime_rows_passed"
                    ]:  # with a graph row, on until the runtime's rows catch it
                        break
                if tried:
                    caught = [t["scale"] for t in tried if not t["passed"]]
                    row["matrices"][matrix] = {
                        "smallest_caught": caught[0] if caught else None,
                        "tried": tried,
                    }
            if args.wrong:
                row["wrong_scenarios"] = args.wrong_scenarios
                row["honest_wrong_scenarios"] = check(
                    folder, model, layer, None, 1.0, args.threads, args.wrong_scenarios
                )
                row["wrong"] = {
                    kind: wrong(kind, backend, quant, name, model, folder, layer, work, args)
                    for kind in args.wrong
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
    print(markdown([result]))


def merge(args: argparse.Namespace) -> None:
    """`--merge`: the `--wrong` columns of each of `--runs` added to its row in `--out` (module doc), the file
    rewritten after each run; the file's own header stays that of the run that made it."""
    result = json.loads(args.out.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for run in args.runs:
            backend, quant, name = run.split(":")
            row = next(
                (
                    r
                    for r in result["rows"]
                    if (r["backend"], r["recipe"], r["model"]) == (backend, quant, name)
                ),
                None,
            )
            if row is None:
                raise SystemExit(f"{args.out}: no row for {run} to merge into")
            model = resolve_model(name, work)
            folder = work / f"{backend}-{quant}-{name}"
            _export(backend, quant, model, folder, args.threads)
            start = time.perf_counter()
            layer = row["layer"]
            honest = check(folder, model, layer, None, 1.0, args.threads, args.wrong_scenarios)
            added = {**provenance(), "kinds": list(args.wrong), "wrong_scenarios": args.wrong_scenarios}
            row.setdefault("wrong", {})
            for kind in args.wrong:
                entry = wrong(kind, backend, quant, name, model, folder, layer, work, args)
                row["wrong"][kind] = (
                    None if entry is None else {**entry, "wrong_scenarios": args.wrong_scenarios}
                )
            added["honest_wrong_scenarios"] = honest
            added["seconds"] = round(time.perf_counter() - start, 1)
            added["load_average"] = provenance()["load_average"]  # at the end of the run, as the header's
            row.setdefault("added", []).append(added)
            print(json.dumps({"run": run, "seconds": added["seconds"]}), flush=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown([result]))


def wrong(
    kind: str,
    backend: str,
    quant: str,
    name: str,
    model: str,
    folder: Path,
    layer: int,
    work: Path,
    args: argparse.Namespace,
) -> dict[str, Any] | None:
    """One wrong artifact of `kind` (module doc) checked on the wrong-artifact scenarios; None: not applicable
    (no routing scale to drop)."""
    scenarios, threads = args.wrong_scenarios, args.threads
    if kind == "other_weights":
        other = resolve_model(f"{name}-other", work)
        return check(folder, other, layer, None, 1.0, threads, scenarios)
    if kind in ("dropped_conv_state", "kv_off_by_one"):
        if backend == "onnx-qnn":
            session = htp_broken_session(folder, kind, threads)
        else:
            session = broken_session(folder, model, kind, threads)
        return check(folder, model, layer, None, 1.0, threads, scenarios, session=session)
    if kind == "routing_scale_dropped":
        unscaled = without_routing_scale(name, work)
        if unscaled is None:
            return None
        bad = work / f"{backend}-{quant}-{name}-noscale"
        _export(backend, quant, unscaled, bad, threads)
        return check(bad, model, layer, None, 1.0, threads, scenarios)
    raise ValueError(kind)


def _cell(entry: dict[str, Any] | None) -> str:
    """`caught` / `NOT caught` by the logits checks, and whether the stored weights catch what they miss."""
    if entry is None:
        return "n/a"
    failed = [f for f in entry.get("failed", []) if not f.startswith(STORED)]
    if failed and all(f.endswith(":error") for f in failed):
        return "session error (" + ", ".join(failed) + ")"
    if not entry["passed"]:
        return "caught"
    sw = entry.get("stored_weights") or {}
    return "NOT caught" + {True: " (stored weights pass)", False: " (stored weights catch it)"}.get(
        sw.get("passed"), ""
    )


def _matrix_cell(entry: dict[str, Any] | None) -> str:
    """The smallest scale the logits checks catch (`> x S` where the largest tried passed), and the smallest
    the stored-weights check catches where that is smaller."""
    if entry is None:
        return "n/a"
    tried = entry["tried"]
    logits = entry["smallest_caught"]
    cell = f"x {logits:g}" if logits is not None else f"> x {max(t['scale'] for t in tried):g} (not caught)"
    stored = [t["scale"] for t in tried if (t.get("stored_weights") or {}).get("passed") is False]
    if stored and (logits is None or stored[0] < logits):
        cell += f" (stored weights: x {stored[0]:g})"
    if any(t.get("graph_prefill") for t in tried):
        runtime = [t["scale"] for t in tried if t.get("runtime_rows_passed") is False]
        largest = max(t["scale"] for t in tried)
        cell += f" (runtime rows: x {runtime[0]:g})" if runtime else f" (runtime rows: > x {largest:g})"
    return cell


def _honest_cell(honest: dict[str, Any], *wrong_scenarios: dict[str, Any] | None) -> str:
    """`yes`, or `NO` with the logits checks it failed (on the matrices' scenarios or any wrong artifacts');
    the stored-weights verdict where it fails."""
    failed = sorted(
        {
            f
            for r in (honest, *wrong_scenarios)
            for f in (r or {}).get("failed", [])
            if not f.startswith(STORED)
        }
    )
    cell = "yes" if not failed else "NO (" + ", ".join(failed) + ")"
    sw = honest.get("stored_weights")
    if sw is not None and sw["passed"] is False:
        cell += "; stored weights FAIL (" + ", ".join(sorted(sw["unmatched"])) + ")"
    return cell


def markdown(results: list[dict[str, Any]]) -> str:
    """One row per backend, recipe and model: whether the honest artifact passes (on the matrices' scenarios
    and the wrong artifacts'), its pooled median logit error and its tight row's error where the gate has one
    (`resolved_prefill` where activations are rounded to int8, `fp16_program_prefill` where the Core ML
    interpreter runs the artifact: the larger of its logit and state errors); the smallest scale the logits checks catch per matrix; each wrong artifact
    caught or not by the logits checks (`not run` in results that predate those columns)."""
    lines = [
        "| backend | recipe | model | honest passes | honest pooled median | honest tight row max | "
        + " | ".join(MATRICES)
        + " | "
        + " | ".join(w.replace("_", " ") for w in WRONG)
        + " |",
        "|---" * (6 + len(MATRICES) + len(WRONG)) + "|",
    ]
    for result in results:
        for row in result["rows"]:
            cells = [_matrix_cell(row["matrices"].get(m)) for m in MATRICES]
            if "wrong" in row:
                cells += [_cell(row["wrong"].get(w)) if w in row["wrong"] else "not run" for w in WRONG]
            else:
                cells += ["not run"] * len(WRONG)
            honest = row["honest"]
            added = [a.get("honest_wrong_scenarios") for a in row.get("added", [])]
            resolved = honest.get("resolved_prefill")
            program = honest.get("fp16_program_prefill")
            exact = "n/a" if not resolved else f"{resolved['logit_max_rel']:.1e}"
            if program:
                exact = f"{max(program['logit_max_rel'], program['state_max_rel']):.1e}"
            kind = row.get("checkpoint", "trained")
            lines.append(
                f"| {row['backend']} | {row['recipe']} | `{row['model']}` ({kind}, layer {row['layer']}) | "
                f"{_honest_cell(honest, row.get('honest_wrong_scenarios'), *added)} | "
                f"{honest['pooled']['logit_median_rel']:.1e} | {exact} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
