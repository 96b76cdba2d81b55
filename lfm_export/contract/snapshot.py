"""`Snapshot`: a session's streaming state at one position, as `Session.snapshot()` returns it and
`Session.restore(snap)` takes it back; saved to and loaded from a numpy `.npz` file.

A snapshot is opaque to callers: `state` holds named numpy arrays whose names and meaning belong to the session
that made it (signature names such as `past.0.conv` / `past_key_values.1.key` for the shims that expose their
tensors; a runtime with an opaque state may store it as one byte array). What every snapshot shares: the
position, the token ids it holds (`tokens` `[batch, position]`), the session name and the artifact it belongs
to (`artifact_id`, a hash of the artifact's files; None for sessions over an in-memory model). A snapshot is
restored only into a session of the same name and artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lfm_export.contract.errors import UserError

SNAPSHOT_FORMAT = 1
"""Version of the `.npz` layout `Snapshot.save` writes."""
_META = "__snapshot__"
_STATE = "state/"


class SnapshotError(UserError, ValueError):
    """A snapshot that cannot be restored here: another artifact or session, a malformed or foreign file."""


@dataclass(frozen=True)
class Snapshot:
    session: str
    """`Session.name` of the session that took it."""
    artifact_id: str | None
    position: int
    tokens: np.ndarray
    """int64 `[batch, position]`: every token the state holds, in order."""
    state: Mapping[str, np.ndarray] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    """JSON-able data of the caller's that travels with the snapshot (a conversation keeps its messages here)."""

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    def copy(self) -> Snapshot:
        """A deep copy (a snapshot's arrays are never shared with a running session either)."""
        return Snapshot(
            self.session,
            self.artifact_id,
            self.position,
            self.tokens.copy(),
            {k: np.array(v, copy=True) for k, v in self.state.items()},
            json.loads(json.dumps(self.extra)),
        )

    # ---- disk ------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the snapshot as one `.npz` file (written to a temporary name, then renamed)."""
        path = Path(path)
        meta = {
            "format": SNAPSHOT_FORMAT,
            "session": self.session,
            "artifact_id": self.artifact_id,
            "position": self.position,
            "extra": dict(self.extra),
        }
        arrays = {f"{_STATE}{k}": np.asarray(v) for k, v in self.state.items()}
        arrays["tokens"] = np.asarray(self.tokens, dtype=np.int64)
        arrays[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise UserError(f"cannot save the snapshot: folder {folder} does not exist")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> Snapshot:
        """Read a file `save` wrote; `SnapshotError` (one line) for anything else."""
        path = Path(path)
        if not path.is_file():
            raise SnapshotError(f"snapshot file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise SnapshotError(f"{path}: not a snapshot file ({str(e).splitlines()[0]})") from None
        try:
            meta = json.loads(arrays.pop(_META).tobytes().decode())
            tokens = arrays.pop("tokens")
            fmt, session, artifact, position = (
                meta["format"],
                meta["session"],
                meta["artifact_id"],
                meta["position"],
            )
        except (KeyError, ValueError, UnicodeDecodeError, TypeError):
            raise SnapshotError(f"{path}: not a snapshot file written by lfm-export") from None
        if fmt != SNAPSHOT_FORMAT:
            raise SnapshotError(f"{path}: snapshot format {fmt!r}, this tool reads {SNAPSHOT_FORMAT}")
        if tokens.ndim != 2 or tokens.shape[1] != position or not np.issubdtype(tokens.dtype, np.integer):
            raise SnapshotError(f"{path}: its tokens do not match its position {position}")
        state = {k[len(_STATE) :]: v for k, v in arrays.items() if k.startswith(_STATE)}
        extra = meta.get("extra") if isinstance(meta.get("extra"), dict) else {}
        return cls(str(session), artifact, int(position), tokens.astype(np.int64), state, extra)


def artifact_id(manifest: Mapping[str, Any], skip: Iterable[str] = ("parity/",)) -> str:
    """A short hash of the artifact's files as its manifest lists them (path and sha256; the parity report
    excluded, since `lfm-export parity` rewrites it): two artifacts with the same id hold the same model files."""
    files = manifest.get("files")
    entries = []
    if isinstance(files, list):
        for f in files:
            if isinstance(f, Mapping) and isinstance(f.get("path"), str):
                if not any(f["path"].startswith(s) for s in skip):
                    entries.append((f["path"], str(f.get("sha256", ""))))
    if not entries:  # an artifact written without hashes: the manifest's own identity is all there is
        entries = [("manifest", json.dumps(manifest.get("model"), sort_keys=True, default=str))]
    digest = hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()
    return f"sha256:{digest[:16]}"
