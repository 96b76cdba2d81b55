"""`manifest.json`, the self-description every artifact carries, and the atomic output folder exporters write into."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from lfm_export.contract.errors import UserError
from lfm_export.contract.manifest import MANIFEST, SCHEMA_VERSION, read_manifest

CARD = "README.md"
"""The model card in an artifact folder (`lfm_export.card`): rendered from the manifest, so not listed in it."""

__all__ = [
    "CARD",
    "MANIFEST",
    "SCHEMA_VERSION",
    "atomic_output",
    "build_manifest",
    "read_manifest",
    "write_manifest",
]
_VERSIONED = (
    "lfm-export",
    "torch",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "onnx-ir",
    "executorch",
    "coremltools",
    "mlx",
)


def library_versions() -> dict[str, str]:
    out = {}
    for dist in _VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    out["python"] = platform.python_version()
    return out


def file_entries(folder: Path) -> list[dict[str, Any]]:
    """Every file under `folder` (the manifest and the model card, both derived from the others, excluded) with
    size and sha256."""
    entries = []
    derived = {folder / MANIFEST, folder / CARD}
    for path in sorted(
        p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST and p not in derived
    ):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        entries.append(
            {
                "path": path.relative_to(folder).as_posix(),
                "bytes": path.stat().st_size,
                "sha256": h.hexdigest(),
            }
        )
    return entries


def build_manifest(
    *,
    model_identity: dict[str, Any],
    config: dict[str, Any],
    backend: str,
    recipe: dict[str, Any],
    signature: dict[str, Any],
    folder: Path,
    runtime: dict[str, Any] | None = None,
    parity: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    files = file_entries(folder)
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool": {"name": "lfm-export", "versions": library_versions()},
        "model": model_identity,
        "config": config,
        "backend": backend,
        "recipe": recipe,
        "signature": signature,
        "max_seq_len": signature.get("max_seq_len"),
        "runtime": runtime or {},
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files),
        "parity": parity or {"status": "not run"},
        **(extra or {}),
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write `manifest.json` atomically (a reader never sees half a manifest)."""
    target = folder / MANIFEST
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, target)
    return target


_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EFBIG: "file size limit reached",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}
"""Errors that only writing can cause: reported as bad output (exit 2), not as an internal error."""
_SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")
"""numpy's `tofile` (how onnx_ir writes external data) reports a short write this way, without an errno."""


def write_error(e: OSError, out: Path) -> UserError | None:
    """A one-line UserError for an OSError raised while writing `out`, or None when it is not a write error.

    RLIMIT_FSIZE (EFBIG) is how the tests fill a disk without mounting one; ENOSPC and EDQUOT read the same."""
    reason = _WRITE_ERRNOS.get(e.errno or 0)
    if reason is None and e.errno is None and _SHORT_WRITE.search(str(e)):
        reason = "a write was cut short: disk full or file size limit reached"
    if reason is None:
        return None
    where = f" ({e.filename})" if e.filename else ""
    return UserError(f"cannot write {out}: {reason}{where}; nothing was left at {out}")


def _unwritable(out: Path, parent: Path, e: OSError) -> UserError:
    return UserError(f"cannot write {out}: {parent} is not writable ({e.strerror or e})")


def check_output_path(out: Path, force: bool) -> None:
    """Refuse an existing output path, or one under a folder that cannot be written, before any work is done.

    Writability is probed by creating (and removing) a folder in the nearest existing parent: permission bits
    say nothing for root, and an immutable or read-only folder refuses root as well."""
    if out.exists() and not force:
        raise UserError(f"{out} already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    for parent in out.resolve().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{parent} is not a folder; cannot write {out} under it")
            try:
                os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
            except OSError as e:
                raise _unwritable(out, parent, e) from None
            break


LIVE_TEMP_FOLDERS: set[Path] = set()
"""Temporary artifact folders being written (not yet renamed into place): the CLI's Ctrl-C handler removes
them before it exits at once."""


@contextlib.contextmanager
def atomic_output(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it is renamed to `out`, on any failure removed.

    A failed or interrupted export (KeyboardInterrupt included) leaves nothing at `out` (and, with `--force`,
    the previous artifact intact). Missing parent folders are created, like `mkdir -p`. A full disk or a
    file size limit hit while writing becomes a one-line UserError naming `out`.
    """
    out = Path(out)
    check_output_path(out, force)
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise write_error(e, out) or _unwritable(out, parent, e) from None
    LIVE_TEMP_FOLDERS.add(tmp)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the artifact gets the user's usual permissions
        yield tmp
        LIVE_TEMP_FOLDERS.discard(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / "artifact")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        LIVE_TEMP_FOLDERS.discard(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and (err := write_error(e, out)) is not None:
            raise err from None
        raise
