"""`lfm-export parity OUT --corpus FILE`: the artifact's session and the fp32 reference over a text file
(`lfm_export.parity.corpus` holds the protocol and the statistics)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lfm_export.contract.errors import UserError
from lfm_export.parity.corpus import DEFAULT_CTX, chunks, corpus_kl, corpus_tokens


def run_corpus(
    folder: Path, text_file: Path, ctx: int = DEFAULT_CTX, loaded: Any = None, threads: int = 2
) -> dict[str, Any]:
    """Open the artifact's session and the fp32 reference (the manifest's model unless `loaded`), tokenize
    `text_file` and return `corpus_kl`'s statistics with what was measured."""
    import torch

    from lfm_export.backends import open_session
    from lfm_export.loading import load_model
    from lfm_export.manifest import read_manifest
    from lfm_export.parity.reference import ReferenceSession
    from lfm_export.pipeline import check_tokenizer

    folder, text_file = Path(folder), Path(text_file)
    if ctx < 4:
        raise UserError(f"--ctx must be at least 4, got {ctx}")
    manifest = read_manifest(folder)
    ids, bos = corpus_tokens(folder, text_file)
    session = open_session(folder, threads=threads)
    if session.max_seq_len is not None and ctx > session.max_seq_len:
        raise UserError(f"--ctx {ctx} exceeds the artifact's max_seq_len {session.max_seq_len}")
    pieces = chunks(ids, bos, ctx)
    if not pieces:
        raise UserError(f"{text_file}: {len(ids)} tokens, fewer than one chunk of --ctx {ctx}")
    torch.set_num_threads(threads)
    if loaded is None:
        loaded = load_model(manifest["model"]["source"])
    check_tokenizer(folder, loaded)
    reference = ReferenceSession(loaded.model, max_seq_len=session.max_seq_len)
    with torch.inference_mode():
        stats = corpus_kl(session, reference, pieces)
    return {
        "artifact": str(folder),
        "backend": manifest["backend"],
        "recipe": manifest["recipe"].get("name"),
        "corpus": str(text_file),
        "corpus_tokens": len(ids),
        "ctx": ctx,
        "scored": "second half of each chunk (llama.cpp --kl-divergence)",
        **stats,
    }
