"""Hugging Face ids as MODEL (`LiquidAI/LFM2-350M`, with a revision): the files the loader reads, fetched with
`huggingface_hub` into its own cache (`HF_HOME`, `HF_HUB_CACHE`), and the commit the revision resolved to.

Offline (`HF_HUB_OFFLINE=1`, or no network) an id is served from the cache; one that is not cached is a one-line
error naming it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lfm_export.contract.errors import UserError

LOADER_FILES = [
    "config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
]
"""What `lfm_export.loading` reads from a checkpoint folder: nothing else is downloaded."""

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HubModel:
    """A model fetched from the Hub: its snapshot folder and where it came from (the manifest's `model.hub`)."""

    folder: Path
    repo_id: str
    revision: str
    commit: str

    def record(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}


def is_hub_id(model: str) -> bool:
    """`org/name` that is not a local path: a Hugging Face model id."""
    return bool(_ID.match(model)) and not Path(model).exists()


def fetch(repo_id: str, revision: str | None = None, *, local_only: bool = False) -> HubModel:
    """The snapshot of `repo_id` at `revision` (default `main`) with the loader's files, downloading what the
    cache lacks (never, when `local_only` or `HF_HUB_OFFLINE` is set)."""
    try:
        from huggingface_hub import errors as hub_errors
        from huggingface_hub import snapshot_download
    except ModuleNotFoundError:
        raise UserError(
            f"model {repo_id}: Hugging Face ids need huggingface_hub (pip install huggingface_hub)"
        ) from None
    rev = revision or "main"
    # read at call time: huggingface_hub reads these once, when it is first imported
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        folder = Path(
            snapshot_download(
                repo_id,
                revision=rev,
                allow_patterns=LOADER_FILES,
                cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                local_files_only=local_only or offline,
                library_name="lfm-export",
            )
        )
    except hub_errors.LocalEntryNotFoundError:
        raise UserError(
            f"model {repo_id} (revision {rev}): not in the Hugging Face cache and the Hub cannot be reached "
            "(offline); download it once online, or give a local folder"
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise UserError(f"model {repo_id}: revision {rev} not found on the Hugging Face Hub") from None
    except hub_errors.GatedRepoError:
        raise UserError(
            f"model {repo_id}: gated on the Hugging Face Hub; accept its terms and log in (hf auth login)"
        ) from None
    except hub_errors.RepositoryNotFoundError:
        raise UserError(
            f"model {repo_id}: no such model on the Hugging Face Hub (or it is private)"
        ) from None
    except (hub_errors.HfHubHTTPError, OSError) as e:
        raise UserError(
            f"model {repo_id} (revision {rev}): download failed ({' '.join(str(e).split())[:200]})"
        ) from None
    commit = folder.name if _COMMIT.match(folder.name) else rev
    return HubModel(folder, repo_id, rev, commit)


def cached(repo_id: str, revision: str | None = None) -> Path | None:
    """The cached snapshot folder of `repo_id` at `revision`, or None (never downloads)."""
    try:
        return fetch(repo_id, revision, local_only=True).folder
    except UserError:
        return None
