"""`Session` over a Core ML artifact folder (manifest.json + model.mlpackage).

Two engines behind one session, chosen when it is created (`engine`):
- `coreml` (macOS): Core ML itself, `coremltools.models.MLModel(package)`, `make_state()` and
  `predict(inputs, state)`.
- `interpreter` (elsewhere, or when asked): the numpy reference interpreter of the saved program
  (`lfm_export.runtime.coreml_interpreter`), with the same states; slow, for checks.
`name` says which ran (`coreml` / `coreml-interpreter`), so parity reports and `inspect` tell them apart.
`LFM_EXPORT_COREML_ENGINE=interpreter` forces the interpreter on macOS too.

The program holds its state (stateful form): `input_ids [1, T]` (int32), `input_pos [1]` -> `logits`, with
T in the range or among the lengths the package allows (the manifest's `coreml.prefill`): a longer prompt
is fed in chunks of the largest allowed length that fits. Batch 1 only. `reset` creates fresh states
(zeros, as `make_state()` does); the program also clears its conv state at `input_pos == 0`. `state()`
returns the held state by signature name (interpreter only; Core ML's Python API exposes none here).
`snapshot()` / `restore(snap)` copy the held states by Core ML state name, in their own dtype (bitwise): the
interpreter's arrays; on Core ML, `MLState.read_state` / `write_state` (coremltools 8.1+; not run here: no Mac).

coremltools (which imports torch when it is installed) is imported when a session is created.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from lfm_export.contract.errors import UserError
from lfm_export.contract.manifest import manifest_max_seq_len, manifest_signature, read_manifest
from lfm_export.contract.session import DEFAULT_THREADS, SessionBase, SessionError
from lfm_export.contract.snapshot import Snapshot, artifact_id

ENGINES = ("coreml", "interpreter")
ENGINE_ENV = "LFM_EXPORT_COREML_ENGINE"


def default_engine() -> str:
    """`coreml` on macOS with coremltools' native library, else `interpreter` (or what `ENGINE_ENV` says)."""
    asked = os.environ.get(ENGINE_ENV)
    if asked:
        if asked not in ENGINES:
            raise UserError(f"{ENGINE_ENV}={asked!r}; expected one of {', '.join(ENGINES)}")
        return asked
    if platform.system() != "Darwin":
        return "interpreter"
    try:
        import coremltools.libcoremlpython  # noqa: F401
    except ImportError:
        return "interpreter"
    return "coreml"


def held_buffer_name(name: str) -> str:
    """The Core ML state name of signature state `name` (`lfm_export.stateful.held_buffer_name`, which
    imports torch)."""
    return name.replace(".", "_")


class CoreMLSession(SessionBase):
    """`Session` over the Core ML artifact in `folder` (stateful form, batch 1)."""

    supports_batch = False

    def __init__(self, folder: str | Path, threads: int = DEFAULT_THREADS, engine: str | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        where = self.folder / "manifest.json"
        self.signature = manifest_signature(self.manifest, where)
        if self.signature.form != "stateful":
            raise UserError(f"{where}: a Core ML artifact has the stateful form, got {self.signature.form!r}")
        info = self.manifest.get("coreml") or {}
        self.package = self.folder / info.get("package", "model.mlpackage")
        if not self.package.is_dir():
            raise UserError(f"{self.folder}: Core ML package {self.package.name} is missing")
        prefill = info.get("prefill") or {"range": [1, int(self.signature.max_prefill or 1)]}
        self.lengths: tuple[int, ...] | None = (
            tuple(prefill["enumerated"]) if "enumerated" in prefill else None
        )
        self.max_prefill = max(self.lengths) if self.lengths else int(prefill["range"][1])
        self.max_seq_len: int | None = manifest_max_seq_len(self.manifest, self.signature)
        self.vocab_size = int(self.manifest["config"]["vocab_size"])
        self.threads = threads
        self.engine = engine or default_engine()
        if self.engine not in ENGINES:
            raise UserError(f"Core ML engine {self.engine!r}; expected one of {', '.join(ENGINES)}")
        self.name = "coreml" if self.engine == "coreml" else "coreml-interpreter"
        self.rounds_op_by_op = self.engine == "interpreter"
        """True where the numpy interpreter runs the program (every op in float32, rounded to its declared
        dtype): parity then adds its exact row (`lfm_export.parity.fp16_program`)."""
        self.artifact_id = artifact_id(self.manifest)
        if self.engine == "coreml":
            from .coreml_interpreter import import_coremltools

            ct = import_coremltools()
            try:
                self._model: Any = ct.models.MLModel(str(self.package))
            except Exception as e:  # noqa: BLE001 - Core ML's load errors come as several types
                raise UserError(
                    f"{self.package}: Core ML cannot load it ({str(e).splitlines()[0]})"
                ) from None
        else:
            from .coreml_interpreter import load_program

            self._model = load_program(self.package)
        self._state: Any = None
        self.reset(1)

    def _reset_state(self, batch_size: int) -> None:
        self._state = self._model.make_state()

    def chunks(self, n: int) -> list[int]:
        """Token counts of the predictions that feed `n` tokens: the largest allowed length that fits, in order."""
        out = []
        while n > 0:
            if self.lengths is None:
                step = min(n, self.max_prefill)
            else:
                step = max(length for length in self.lengths if length <= n)
            out.append(step)
            n -= step
        return out

    def _prefill(self, ids: np.ndarray) -> np.ndarray:
        out = []
        start = 0
        for step in self.chunks(ids.shape[1]):
            feeds = {
                "input_ids": ids[:, start : start + step].astype(np.int32),
                "input_pos": np.array([self._position + start], dtype=np.int32),
            }
            result = self._model.predict(feeds, self._state)
            out.append(np.asarray(result["logits"], dtype=np.float32))
            start += step
        return out[0] if len(out) == 1 else np.concatenate(out, axis=1)

    def _held_names(self) -> list[str]:
        return [held_buffer_name(s.name) for s in self.signature.held]

    def _snapshot_state(self) -> dict[str, np.ndarray]:
        if self.engine == "interpreter":
            return {n: self._state[n].copy() for n in self._held_names()}
        return {n: np.array(self._state.read_state(n), copy=True) for n in self._held_names()}

    def _restore_state(self, snap: Snapshot) -> None:
        fresh = self._model.make_state()
        for n in self._held_names():
            if n not in snap.state:
                raise SessionError(f"{self.name}: the snapshot lacks state {n}")
            value = np.asarray(snap.state[n])
            if self.engine == "interpreter":
                if value.shape != fresh[n].shape:
                    raise SessionError(f"{self.name}: snapshot state {n} has shape {list(value.shape)}")
                fresh[n][...] = value.astype(fresh[n].dtype)
            else:
                fresh.write_state(n, value)
        self._state = fresh

    def state(self) -> dict[str, np.ndarray] | None:
        if self.engine != "interpreter":
            return None
        return {s.name: self._state[held_buffer_name(s.name)].astype(np.float32) for s in self.signature.held}
