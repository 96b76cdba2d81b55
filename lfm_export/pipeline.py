"""One export pipeline for every backend: load -> backend passes into a temp folder -> manifest -> parity through
the backend's runtime shim -> reports -> atomic rename. Backends only turn a model into files."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lfm_export.errors import UserError
from lfm_export.loading import LoadedModel, load_model
from lfm_export.manifest import (
    atomic_output,
    build_manifest,
    check_output_path,
    file_entries,
    read_manifest,
    write_manifest,
)
from lfm_export.progress import Progress

PARITY_DIR = "parity"


class BackendResult(Protocol):
    signature: Any
    recipe: dict[str, Any]
    extra: dict[str, Any]


BACKENDS: dict[str, str] = {"onnx": "lfm_export.backends.onnx"}
"""Backend name -> module exposing `export(loaded, folder, recipe, progress) -> BackendResult`."""

RUNTIMES: dict[str, tuple[str, str]] = {"onnx": ("lfm_export.runtime.onnx", "OnnxSession")}
"""Backend name -> (runtime shim module, Session class taking `(folder, threads=...)`)."""


@dataclass
class ExportOutcome:
    out: Path
    manifest: dict[str, Any]
    parity: Any | None  # ParityResult when parity ran

    @property
    def passed(self) -> bool | None:
        return None if self.parity is None else bool(self.parity.passed)


def open_session(folder: Path, threads: int = 2) -> Any:
    """The runtime shim session for an artifact folder, chosen by its manifest's backend."""
    manifest = read_manifest(folder)
    backend = manifest.get("backend")
    if backend not in RUNTIMES:
        raise UserError(f"{folder}: no runtime shim for backend {backend!r}")
    module, cls = RUNTIMES[backend]
    return getattr(importlib.import_module(module), cls)(folder, threads=threads)


def export_artifact(
    backend: str,
    model: str,
    out: Path,
    recipe: Any,
    *,
    force: bool = False,
    parity: bool = True,
    threads: int = 2,
    progress: Progress | None = None,
) -> ExportOutcome:
    progress = progress or Progress()
    check_output_path(out, force)
    exporter = importlib.import_module(BACKENDS[backend])
    with progress.step(f"Loading {model}"):
        loaded = load_model(model)
    if loaded.random:
        progress.note(f"[yellow]note:[/] {model} has RANDOM weights (for size and speed work only)")
    with atomic_output(out, force) as tmp:
        result = exporter.export(loaded, tmp, recipe, progress)
        manifest = build_manifest(
            model_identity=_identity(loaded),
            config=loaded.config.to_dict(),
            backend=backend,
            recipe=result.recipe,
            signature=result.signature.to_dict(),
            folder=tmp,
            runtime={"threads": threads},
            extra={**result.extra, "timings_s": dict(progress.timings)},
        )
        write_manifest(tmp, manifest)
        parity_result = None
        if parity:
            parity_result = check_artifact(tmp, loaded, threads=threads, progress=progress)
            manifest = read_manifest(tmp)
    return ExportOutcome(out, manifest, parity_result)


def _identity(loaded: LoadedModel) -> dict[str, Any]:
    ident = dict(loaded.identity())
    if loaded.path is not None and loaded.source not in ("tiny", "tiny-moe"):
        ident["source"] = str(loaded.path.resolve())
    return ident


LONG_CONTEXT_NOTE = 8192
"""Above this declared context the parity run says that its fill-to-the-limit scenario will take a while."""


def check_artifact(
    folder: Path,
    loaded: LoadedModel | None = None,
    *,
    threads: int = 2,
    progress: Progress | None = None,
    scenarios: list[str] | None = None,
) -> Any:
    """Parity of an artifact (through its runtime shim) against the fp32 reference; writes reports into
    `folder/parity/` and the summary into the manifest. Returns the ParityResult."""
    import torch

    from lfm_export.parity import ReferenceSession, run_parity, write_reports

    progress = progress or Progress()
    torch.set_num_threads(threads)
    manifest = read_manifest(folder)
    if loaded is None:
        source = manifest["model"]["source"]
        with progress.step(f"Loading reference model {source}"):
            loaded = load_model(source)
        if manifest["model"].get("weights_sha256") not in (None, loaded.identity().get("weights_sha256")):
            raise UserError(
                f"{source}: weights changed since the export (sha256 differs); cannot check parity"
            )
    recipe = manifest["recipe"].get("name", "fp32")
    context = manifest.get("max_seq_len")
    if (scenarios is None or "near_max_seq_len" in scenarios) and (context or 0) > LONG_CONTEXT_NOTE:
        progress.note(
            f"[yellow]note:[/] parity fills the whole {context}-token context (scenario near_max_seq_len); on a "
            "big model that takes many minutes. Export with --max-seq-len to declare less, or --no-parity."
        )
    with progress.step(f"Parity ({recipe}) through the {manifest['backend']} runtime"):
        session = open_session(folder, threads=threads)
        reference = ReferenceSession(loaded.model, max_seq_len=session.max_seq_len)
        tokenizer = folder / "tokenizer.json"
        result = run_parity(
            session,
            reference,
            recipe,
            tokenizer_file=tokenizer if tokenizer.is_file() else None,
            scenarios=scenarios,
            metadata={
                "backend": manifest["backend"],
                "artifact": folder.name,
                "model": manifest["model"]["source"],
                "random_weights": manifest["model"].get("random_weights", False),
            },
        )
    report_dir = folder / PARITY_DIR
    write_reports(result, report_dir)
    manifest["parity"] = result.summary()
    manifest["parity"]["reports"] = [f"{PARITY_DIR}/{p.name}" for p in sorted(report_dir.iterdir())]
    manifest["files"] = file_entries(folder)
    manifest["total_bytes"] = sum(f["bytes"] for f in manifest["files"])
    write_manifest(folder, manifest)
    return result
