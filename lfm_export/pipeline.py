"""One export pipeline for every backend: load -> backend passes into a temp folder -> manifest -> parity through
the backend's runtime shim -> reports -> atomic rename. Backends only turn a model into files."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lfm_export.backends import all_backends, open_session
from lfm_export.backends import get as get_backend
from lfm_export.contract.errors import UnsupportedError, UserError
from lfm_export.contract.session import DEFAULT_THREADS
from lfm_export.loading import LoadedModel, load_model
from lfm_export.manifest import (
    CARD,
    atomic_output,
    build_manifest,
    check_output_path,
    file_entries,
    read_manifest,
    write_manifest,
)
from lfm_export.precision import manifest_entry as precision_entry
from lfm_export.progress import Progress
from lfm_export.runtime.tokenizer import chat_template_entry

PARITY_DIR = "parity"


@dataclass
class ExportOutcome:
    out: Path
    manifest: dict[str, Any]
    parity: Any | None  # ParityResult when parity ran

    @property
    def passed(self) -> bool | None:
        return None if self.parity is None else bool(self.parity.passed)


def export_artifact(
    backend: str,
    model: str,
    out: Path,
    recipe: Any,
    *,
    force: bool = False,
    parity: bool = True,
    threads: int = DEFAULT_THREADS,
    progress: Progress | None = None,
    max_kl: float | None = None,
    gates_file: Path | None = None,
    full_context: bool = False,
    calib: Path | None = None,
    budget: str | None = None,
    card: bool = True,
    revision: str | None = None,
) -> ExportOutcome:
    """Export, write the manifest, run parity (exactness against the simulated recipe, quality against fp32,
    gated strictly by `max_kl` / `gates_file` when given), write the model card (`README.md`, unless `card` is
    false) and move the artifact to `out`. A calibrated recipe (`-imat`, `-gptq`) first calibrates on `calib`
    (default: the bundled text; `lfm_export.calibrate`). `budget` (`size=MB` / `kl=X`) first chooses a precision
    mix from sensitivity measured on that text (`lfm_export.budget`); a budget no mix meets is refused before
    anything is written. `revision`: of a Hugging Face id (`lfm_export.hub`)."""
    from lfm_export.parity.thresholds import quality_gate

    progress = progress or Progress()
    check_output_path(out, force)
    record = get_backend(backend)
    if parity:
        require_parity_session(record)
    _refuse_calibrated(record, recipe)
    wanted = _refuse_budget(record, recipe, budget)
    quality = quality_gate(_recipe_name(recipe), max_kl, gates_file) if parity else None
    with progress.step(f"Loading {model}"):
        loaded = load_model(model, lazy=True, revision=revision)
    if parity and record.simulation_session is not None and use_streaming(loaded, 2):
        raise UnsupportedError(_OWN_SIMULATION_TOO_BIG.format(backend=backend, model=loaded.source))
    if loaded.random:
        progress.note(f"[yellow]note:[/] {model} has RANDOM weights (for size and speed work only)")
    budget_entry = None
    if wanted is not None:
        from lfm_export.budget import check_size_floor, plan, with_core

        check_size_floor(loaded, recipe, wanted)
        with progress.step(f"Choosing the precision mix for --budget {wanted.text}"):
            core, budget_entry = plan(loaded, recipe, wanted, calib)
        recipe = with_core(recipe, core)
        progress.note(
            f"mix: estimated KL {budget_entry['estimated_kl']:.4g}, "
            f"{budget_entry['estimated_bytes'] / 1e6:.3f} MB of weights"
        )
    scaled = loaded
    awq_entry = None
    if _awq(recipe):
        from lfm_export.awq import scaled_loaded, search
        from lfm_export.calibrate import core_recipe

        with progress.step(f"Activation-aware scales (-awq) on {calib or 'the bundled text'}"):
            scales, awq_entry = search(loaded, core_recipe(recipe), calib)
        scaled = scaled_loaded(loaded, scales)
    text_used = wanted is not None or awq_entry is not None
    calibration = _calibration(
        scaled, recipe, None if text_used and not _calibrated(recipe) else calib, progress, not parity
    )
    with _active(calibration), atomic_output(out, force) as tmp:
        result = record.export(scaled, tmp, recipe, progress)
        if calibration is not None:
            from lfm_export.calibrate import finish

            finish(calibration[0])  # a streamed calibration's remaining layers: its manifest entry complete
        if calibration is not None and calibration[0].rows_served == 0:
            raise UnsupportedError(
                f"{backend} does not pack its weights from the core quantizer: calibrated rounding "
                f"({_recipe_name(recipe)}) does not apply to it"
            )
        loaded.copy_tokenizer_files(tmp)
        manifest = build_manifest(
            model_identity=_identity(loaded),
            config=loaded.config.to_dict(),
            backend=backend,
            recipe=result.recipe,
            signature=result.signature.to_dict(),
            folder=tmp,
            runtime={"threads": threads},
            extra={
                **result.extra,
                "precision": precision_entry(loaded.model.state_dict(), result.recipe),
                "chat_template": chat_template_entry(tmp),
                "timings_s": dict(progress.timings),
                **({"calibration": calibration[1]} if calibration is not None else {}),
                **({"budget": budget_entry} if budget_entry is not None else {}),
                **({"awq": awq_entry} if awq_entry is not None else {}),
            },
        )
        write_manifest(tmp, manifest)
        parity_result = None
        if parity:
            parity_result = _check(
                tmp,
                loaded,
                threads,
                progress,
                None,
                quality,
                artifact_name=out.name,
                full_context=full_context,
                manifest=manifest,
            )
        if card:
            from lfm_export.card import write_card

            write_card(tmp, manifest)
    return ExportOutcome(out, manifest, parity_result)


def require_parity_session(record: Any) -> None:
    """Refuse parity up front, before anything is exported, for a backend whose artifacts no runtime shim here
    runs (`executorch-qnn`): parity would fail after the export and the finished artifact would be discarded."""
    if record.session is None:
        raise UnsupportedError(
            f"{record.name}: no runtime here runs its artifacts, so parity cannot check one; export with "
            "--no-parity (the same QNN quantization is checked on the emulated HTP by `lfm-export onnx-qnn`)"
        )


def _refuse_calibrated(record: Any, recipe: Any) -> None:
    from lfm_export.calibrate import needs_calibration

    if (needs_calibration(recipe) or _awq(recipe)) and not record.core_codes:
        raise UnsupportedError(
            f"{record.name} does not pack its weights from the core quantizer: calibrated rounding and -awq "
            f"({_recipe_name(recipe)}) do not apply to it; backends that take them: "
            + ", ".join(b.name for b in all_backends().values() if b.core_codes)
        )


def _refuse_budget(record: Any, recipe: Any, budget: str | None) -> Any:
    """The parsed `--budget` (None without one); refused in one line up front where the backend does not pack
    from the core quantizer or the recipe is not one a mix applies to."""
    if budget is None:
        return None
    from lfm_export.budget import check_recipe, parse_budget

    wanted = parse_budget(budget)
    if not record.mixes:
        raise UnsupportedError(
            f"--budget: {record.name} cannot hold a per-layer mix of the core precisions; backends that take it: "
            + ", ".join(b.name for b in all_backends().values() if b.mixes)
        )
    check_recipe(recipe)
    return wanted


def _awq(recipe: Any) -> bool:
    from lfm_export.calibrate import core_recipe

    core = core_recipe(recipe)
    return core is not None and core.awq


def _calibrated(recipe: Any) -> bool:
    from lfm_export.calibrate import needs_calibration

    return needs_calibration(recipe)


def _calibration(
    loaded: LoadedModel, recipe: Any, calib: Path | None, progress: Progress, stream: bool = False
) -> Any:
    """(table, manifest entry) of a calibrated recipe (`lfm_export.calibrate.table_for_export`), or None;
    `stream`: no parity check follows in this process, so a table that keeps GPTQ factors calibrates each layer
    when the export first reads it and drops each factor after use."""
    from lfm_export.calibrate import needs_calibration, table_for_export

    if not needs_calibration(recipe):
        return table_for_export(loaded, recipe, calib)
    with progress.step(f"Calibrating ({_recipe_name(recipe)}) on {calib or 'the bundled text'}"):
        return table_for_export(loaded, recipe, calib, stream=stream)


@contextmanager
def _active(calibration: Any) -> Iterator[None]:
    """The calibrated table active for the quantizer while the block runs (nothing without one)."""
    from lfm_export import calibrated

    with calibrated.active(calibration[0]) if calibration is not None else nullcontext():
        yield


def _check_calibration(loaded: LoadedModel, manifest: dict[str, Any], progress: Progress) -> Any:
    """The calibrated table a parity check of a calibrated artifact reads: the active one, or rebuilt from the
    manifest (same text, same tokens) when parity runs in another process than the export."""
    from lfm_export import calibrated
    from lfm_export.calibrate import needs_calibration, table_from_manifest

    if calibrated.current() is not None or not needs_calibration(_core(manifest)):
        return nullcontext()
    with progress.step("Rebuilding the calibrated codes from the manifest's calibration"):
        table = table_from_manifest(loaded, manifest)
    return calibrated.active(table) if table is not None else nullcontext()


def _core(manifest: dict[str, Any]) -> Any:
    from lfm_export.recipes import Recipe

    try:
        return Recipe.from_dict(manifest.get("recipe", {}))
    except (UserError, TypeError):
        return None


def _recipe_name(recipe: Any) -> str:
    return recipe if isinstance(recipe, str) else str(recipe.name)


def _identity(loaded: LoadedModel) -> dict[str, Any]:
    ident = dict(loaded.identity())
    if loaded.path is not None and loaded.source not in ("tiny", "tiny-moe") and loaded.hub is None:
        ident["source"] = str(loaded.path.resolve())
    return ident


LONG_CONTEXT_NOTE = 8192
"""Above this declared context the parity run says that its fill-to-the-limit scenario will take a while."""
FULL_CONTEXT_LIMIT = 32768
"""Parity fills a declared context up to this (`near_max_seq_len`: the default context, capped at 32768, is
always filled); above it, `long_context` fills past position 8192 instead, unless `full_context` asks for
the whole context."""


def check_artifact(
    folder: Path,
    loaded: LoadedModel | None = None,
    *,
    threads: int = DEFAULT_THREADS,
    progress: Progress | None = None,
    scenarios: list[str] | None = None,
    max_kl: float | None = None,
    gates_file: Path | None = None,
    full_context: bool = False,
    stream: bool = False,
    session: Any = None,
) -> Any:
    """Parity of an artifact (through its runtime shim) in two parts: exactness against its recipe simulated
    in torch, quality against the fp32 reference (gated strictly by `max_kl` / `gates_file` when given, else
    by the family's sanity bound). Writes reports into `folder/parity/` and the summary into the manifest.
    `stream`: compute the reference one layer at a time even where it fits in memory (`use_streaming`).
    `session`: a session judged in the runtime shim's place under the artifact's own gate, simulation and
    stored weights (a deliberately broken runtime: benchmarks/detection_limits.py); None: the shim.
    Returns the ParityResult."""
    from lfm_export.parity.thresholds import quality_gate

    folder = Path(folder)
    manifest = read_manifest(folder)
    quality = quality_gate(manifest["recipe"].get("name", "fp32"), max_kl, gates_file)
    return _check(
        folder,
        loaded,
        threads,
        progress or Progress(),
        scenarios,
        quality,
        artifact_name=folder.name,
        full_context=full_context,
        manifest=manifest,
        stream=stream,
        session=session,
    )


_OWN_SIMULATION_TOO_BIG = (
    "parity of a {backend} artifact needs its own simulation of the whole model in memory, and {model}'s "
    "float32 copies do not fit; export with --no-parity"
)


def use_streaming(loaded: LoadedModel, copies: int, stream: bool = False) -> bool:
    """Whether parity computes its reference (and simulation) one layer at a time from the lazy weights
    (`lfm_export.parity.streaming`): asked for, or where the `copies` float32 copies of the model it would
    hold do not fit in memory (`LoadedModel.reference_fits`). A model loaded with real weights in memory is
    never streamed unless asked: its weights are already there."""
    return stream or (loaded.lazy and not loaded.reference_fits(copies))


def simulation_for(record: Any, recipe: dict[str, Any]) -> tuple[Any, Any]:
    """(core `Recipe`, activation mode) that an artifact of `record`'s backend and `recipe` (its manifest entry)
    computes: the backend's own answer, else the core recipe of the name with float activations."""
    if record.simulation is not None:
        return record.simulation(recipe)
    from lfm_export.recipes import parse_recipe

    return parse_recipe(recipe.get("name", "fp32")), "float"


def check_tokenizer(folder: Path, loaded: LoadedModel) -> None:
    """Refuse an artifact whose tokenizer differs from the reference model's: parity prompts would be
    tokenized by one and mean something else to the other."""
    mine, theirs = folder / "tokenizer.json", loaded.tokenizer_file
    if mine.is_file() and theirs is not None and mine.read_bytes() != theirs.read_bytes():
        raise UserError(
            f"{mine} differs from the reference model's {theirs}: the artifact was not exported from this model"
        )


def _check(
    folder: Path,
    loaded: LoadedModel | None,
    threads: int,
    progress: Progress,
    scenarios: list[str] | None,
    quality: Any,
    artifact_name: str,
    full_context: bool = False,
    manifest: dict[str, Any] | None = None,
    stream: bool = False,
    session: Any = None,
) -> Any:
    """Parity of the artifact in `folder` (or of `session` in its runtime shim's place); its reports join the
    manifest (`manifest`, the one just written, or the folder's), whose other file entries and hashes stand:
    only the report files are hashed. A lazily loaded model is materialized where its float32 copies fit, else
    streamed (`use_streaming`)."""
    import torch

    from lfm_export.parity import ReferenceSession, run_parity, write_reports
    from lfm_export.parity.boundary import prompts_for
    from lfm_export.parity.exact_row import ExactInputs
    from lfm_export.parity.scenarios import ScenarioOptions
    from lfm_export.parity.stored_weights import compare as compare_stored_weights
    from lfm_export.parity.stored_weights import simulated_weights
    from lfm_export.parity.streaming import STREAM_FILL_LIMIT, StreamingReference
    from lfm_export.quant import simulate
    from lfm_export.weights import weights_of

    torch.set_num_threads(threads)
    manifest = read_manifest(folder) if manifest is None else manifest
    if loaded is None:
        source = manifest["model"]["source"]
        with progress.step(f"Loading reference model {source}"):
            loaded = load_model(
                source, lazy=True, revision=(manifest["model"].get("hub") or {}).get("commit")
            )
        if manifest["model"].get("weights_sha256") not in (None, loaded.identity().get("weights_sha256")):
            raise UserError(
                f"{source}: weights changed since the export (sha256 differs); cannot check parity"
            )
    check_tokenizer(folder, loaded)
    recipe = manifest["recipe"].get("name", "fp32")
    context = manifest.get("max_seq_len")
    limit = None if full_context else FULL_CONTEXT_LIMIT
    fills_all = limit is None or (context or 0) <= limit
    if (
        (scenarios is None or "near_max_seq_len" in scenarios)
        and (context or 0) > LONG_CONTEXT_NOTE
        and fills_all
    ):
        progress.note(
            f"[yellow]note:[/] parity fills the whole {context}-token context (scenario near_max_seq_len); on a "
            "big model that takes many minutes. Export with --max-seq-len to declare less, or --no-parity."
        )
    record = get_backend(manifest["backend"])
    sim_recipe, activations = simulation_for(record, manifest["recipe"])
    weights = record.weight_values(manifest["recipe"]) if record.weight_values else None
    # a backend whose simulation is not the core quantizer's gives its own session (QNN: the fake-quant program)
    own_simulation = record.simulation_session
    from lfm_export.awq import scaled_loaded, scales_from_manifest

    # one mode, or one per role (`lfm_export.quant.simulate`); `native` (half-precision compute) rounds none
    rounds = activations not in ("float", "native")
    simulates = own_simulation is None and (sim_recipe.quantized or sim_recipe.dtype != "fp32" or rounds)
    streaming = None
    if use_streaming(loaded, 1 + (own_simulation is not None or simulates) + rounds, stream):
        if own_simulation is not None:
            raise UnsupportedError(
                _OWN_SIMULATION_TOO_BIG.format(backend=manifest["backend"], model=loaded.source)
            )
        progress.note(
            f"[yellow]note:[/] parity streams the {loaded.source} reference one layer at a time (its float32 "
            "copies do not fit in memory, or --stream-reference): fills above "
            f"{STREAM_FILL_LIMIT} tokens are skipped"
        )
    elif loaded.lazy:
        loaded = loaded.materialized()
    reader = record.stored_weights_reader()
    # -awq: the simulation holds the folded weights, the fp32 reference the original ones
    scales = scales_from_manifest(manifest)
    if scales is not None and (stream or loaded.lazy):
        raise UnsupportedError(
            f"{recipe}: the streaming reference does not fold -awq scales yet; check parity on a machine where "
            f"the {loaded.source} float32 copies fit in memory"
        )
    folded = loaded if scales is None else scaled_loaded(loaded, scales)
    with (
        _check_calibration(folded, manifest, progress),
        progress.step(f"Parity ({recipe}) through the {manifest['backend']} runtime"),
    ):
        session = open_session(folder, threads=threads) if session is None else session
        simulation = rounding = simulated = None
        stored: Any = None
        if stream or loaded.lazy:
            streaming = StreamingReference(
                loaded.config,
                loaded.weights if loaded.weights is not None else weights_of(loaded.model),
                session.max_seq_len,
                recipe=sim_recipe if simulates else None,
                activations=activations,
                weights=weights,
                rounding=rounds,
                threads=threads,
                progress=lambda text: progress.note(f"streaming reference: {text}"),
            )
            reference, simulation, rounding = streaming.reference, streaming.simulation, streaming.rounding
            if reader is not None and sim_recipe.quantized and simulates:
                pool = streaming.pool
                stored = lambda: compare_stored_weights(reader(folder), pool)  # noqa: E731 (after the pass)
        else:
            reference = ReferenceSession(loaded.model, max_seq_len=session.max_seq_len)
            if own_simulation is not None:
                simulation = own_simulation(loaded, manifest)
            elif simulates:
                simulated = simulate(folded.model, sim_recipe, activations, threads=threads, weights=weights)
                simulation = ReferenceSession(simulated, name="simulated", max_seq_len=session.max_seq_len)
            if rounds:
                unrounded = simulate(folded.model, sim_recipe, "float", threads=threads, weights=weights)
                rounding = ReferenceSession(
                    unrounded, name="simulated-float-activations", max_seq_len=session.max_seq_len
                )
            if reader is not None and sim_recipe.quantized and own_simulation is None:
                stored = compare_stored_weights(reader(folder), simulated_weights(simulated, sim_recipe))
            elif reader is not None and own_simulation is not None:
                # a session of the backend's own holds its quantized weights (QNN: the fake-quant program's)
                stored = compare_stored_weights(reader(folder), simulation.quantized_weights())
        tokenizer = folder / "tokenizer.json"
        exact_rows = []
        # the backend's exact row needs the whole simulation in memory: not run with a streaming reference
        exact_row = record.exact_row_check()
        if exact_row is not None and streaming is None:
            known = tokenizer if tokenizer.is_file() else None
            inputs = ExactInputs(
                folder=folder,
                manifest=manifest,
                session=session,
                activations=activations,
                simulation=simulation,
                simulated=simulated,
                reference=folded.model,
                prompts=prompts_for(session.vocab_size, known, session.max_seq_len),
                threads=threads,
            )
            row = exact_row(inputs)
            exact_rows = [] if row is None else [row]
        result = run_parity(
            session,
            reference,
            recipe,
            simulation=simulation,
            activations=activations,
            rounding=rounding,
            quality=quality,
            tokenizer_file=tokenizer if tokenizer.is_file() else None,
            scenarios=scenarios,
            options=ScenarioOptions(full_context_limit=limit),
            stored_weights=stored,
            streaming=streaming,
            exact_rows=exact_rows,
            metadata={
                "backend": manifest["backend"],
                "artifact": artifact_name,
                "model": manifest["model"]["source"],
                "random_weights": manifest["model"].get("random_weights", False),
                "simulation": {"recipe": sim_recipe.name, "activations": activations},
                **(
                    {"precision_mix": [list(m) for m in sim_recipe.mix]}
                    if getattr(sim_recipe, "mix", ())
                    else {}
                ),
            },
        )
    report_dir = folder / PARITY_DIR
    write_reports(result, report_dir)
    manifest["parity"] = result.summary()
    manifest["parity"]["reports"] = [f"{PARITY_DIR}/{p.name}" for p in sorted(report_dir.iterdir())]
    kept = [f for f in manifest["files"] if not f["path"].startswith(f"{PARITY_DIR}/")]
    reports = [{**f, "path": f"{PARITY_DIR}/{f['path']}"} for f in file_entries(report_dir)]
    manifest["files"] = sorted(kept + reports, key=lambda f: f["path"])
    manifest["total_bytes"] = sum(f["bytes"] for f in manifest["files"])
    write_manifest(folder, manifest)
    if (folder / CARD).is_file():  # the card says what the manifest says
        from lfm_export.card import write_card

        write_card(folder, manifest)
    return result
