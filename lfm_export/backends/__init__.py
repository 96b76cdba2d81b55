"""The backends: one package each, each declaring one `Backend` record (`record.py`) as `BACKEND`.

Adding a backend is one folder and one line of `REGISTRY`. Out-of-tree backends are named, comma-separated, in
the environment variable `LFM_EXPORT_BACKENDS` (module paths importable on `sys.path`). Loading a record
registers the parity gates it declares.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from lfm_export.contract.errors import UserError
from lfm_export.contract.manifest import read_manifest
from lfm_export.contract.session import DEFAULT_THREADS

from .record import Backend

REGISTRY = (
    "lfm_export.backends.onnx",
    "lfm_export.backends.executorch",
    "lfm_export.backends.mlx",
    "lfm_export.backends.coreml",
    "lfm_export.backends.onnx_qnn",
    "lfm_export.backends.executorch_qnn",
    "lfm_export.backends.gguf",
)
ENV = "LFM_EXPORT_BACKENDS"

_loaded: dict[str, Backend] = {}


def all_backends() -> dict[str, Backend]:
    """Every registered backend by name, in registry order (then `LFM_EXPORT_BACKENDS`'), records loaded once."""
    if not _loaded:
        extra = [m.strip() for m in os.environ.get(ENV, "").split(",") if m.strip()]
        for module in (*REGISTRY, *extra):
            record = getattr(importlib.import_module(module), "BACKEND", None)
            if not isinstance(record, Backend):
                raise UserError(f"{module}: a backend package defines BACKEND = Backend(...)")
            if record.gates or record.sanity:
                from lfm_export.parity.thresholds import register_gates

                register_gates(record.gate_table(), record.sanity_table())
            _loaded[record.name] = record
    return dict(_loaded)


def get(name: str) -> Backend:
    """The backend called `name`; a `UserError` naming the known ones otherwise."""
    backends = all_backends()
    if name not in backends:
        raise UserError(f"unknown backend {name!r}; known: {', '.join(backends)}")
    return backends[name]


def open_session(folder: Path, threads: int = DEFAULT_THREADS) -> Any:
    """The runtime shim session for an artifact folder, chosen by its manifest's backend (torch-free for the
    shims that are)."""
    backend = read_manifest(folder).get("backend")
    record = all_backends().get(str(backend))
    if record is None:
        raise UserError(f"{folder}: no backend {backend!r} in this install")
    return record.session_class()(folder, threads=threads)


__all__ = ["Backend", "REGISTRY", "all_backends", "get", "open_session"]
