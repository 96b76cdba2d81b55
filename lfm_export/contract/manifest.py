"""Read an exported artifact folder: its `manifest.json`, the I/O signature in it, and the model file it names.

Torch-free: runtime shims use this to open what a backend wrote.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lfm_export.contract.errors import UserError
from lfm_export.contract.signature import IOSignature

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
"""Version of the manifest layout this code writes and reads (bumped on incompatible changes)."""


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of artifact `folder` as a dict; `UserError` naming the folder if it is missing or malformed."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"artifact folder {folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"artifact {folder} is not a folder")
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder}: no {MANIFEST}; is this a folder written by lfm-export?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "schema_version" not in data:
        raise UserError(f"{path}: not an lfm-export manifest (no schema_version)")
    if not isinstance(data["schema_version"], int) or data["schema_version"] > SCHEMA_VERSION:
        raise UserError(
            f"{path}: schema_version {data['schema_version']!r} is newer than this tool reads ({SCHEMA_VERSION})"
        )
    return data


def manifest_signature(manifest: dict[str, Any], where: str | Path = MANIFEST) -> IOSignature:
    """The `IOSignature` stored under `manifest["signature"]`."""
    raw = manifest.get("signature")
    if not isinstance(raw, dict):
        raise UserError(f"{where}: manifest has no 'signature' object")
    try:
        return IOSignature.from_dict(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: malformed 'signature' in manifest ({e})") from None


def manifest_max_seq_len(manifest: dict[str, Any], signature: IOSignature | None = None) -> int | None:
    """`manifest["max_seq_len"]`, else the signature's; None when neither fixes a limit."""
    value = manifest.get("max_seq_len")
    if value is None and signature is not None:
        value = signature.max_seq_len
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"manifest max_seq_len must be a positive integer, got {value!r}")
    return value


def listed_files(manifest: dict[str, Any]) -> list[str]:
    """File names under `manifest["files"]`: a list of names, a list of objects with `path`/`name`/`file`,
    or an object keyed by name."""
    files = manifest.get("files")
    if isinstance(files, dict):
        return [str(k) for k in files]
    names: list[str] = []
    if isinstance(files, list):
        for entry in files:
            if isinstance(entry, str):
                names.append(entry)
            elif isinstance(entry, dict):
                name = entry.get("path") or entry.get("name") or entry.get("file")
                if isinstance(name, str):
                    names.append(name)
    return names


def model_file(
    folder: str | Path, manifest: dict[str, Any], suffix: str = ".onnx", default: str = "model.onnx"
) -> Path:
    """The model file of the artifact: the first `files` entry ending in `suffix`, else `default`."""
    folder = Path(folder)
    name = next((n for n in listed_files(manifest) if n.endswith(suffix)), default)
    path = folder / name
    if not path.is_file():
        raise UserError(f"{folder}: model file {name} is missing")
    return path
