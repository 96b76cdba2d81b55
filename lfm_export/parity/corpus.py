"""`lfm-export parity OUT --corpus FILE [--ctx N]`: KL divergence of an artifact against the fp32 reference over
a text file, in the statistics llama.cpp's `perplexity --kl-divergence` reports (mean with its standard error,
median, 99th percentile, maximum, top-1 agreement), so a user can set our figures beside theirs.

The protocol is llama.cpp's: the file's tokens (the artifact's tokenizer, no BOS) are cut into chunks of `ctx`
tokens, each chunk fed from an empty state (BOS first, where the tokenizer has one, taking the chunk's first
slot), and only the second half of each chunk is scored, so every scored token has at least `ctx / 2` tokens
of context. Both models see the same chunks; the reference runs one chunk at a time, so memory holds one
chunk's logits. `first_top1_mismatch` is, per chunk, the first scored position (index in the chunk) where the
artifact's top-1 token differs from the reference's with both fed the corpus (teacher-forced: where greedy
decoding from that prefix would first part), None where none does.

This is a quality report, not a gate: it passes no verdict (the exactness and quality gates are `parity`'s).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from lfm_export.contract.errors import UserError
from lfm_export.parity.metrics import kl_divergence

DEFAULT_CTX = 512


def corpus_tokens(folder: Path, text_file: Path) -> tuple[list[int], int | None]:
    """The corpus's token ids (no BOS) by the artifact's tokenizer, and the tokenizer's BOS id."""
    from lfm_export.runtime.tokenizer import Tokenizer

    if not text_file.is_file():
        raise UserError(f"{text_file}: no such corpus file")
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"{folder} has no tokenizer.json; --corpus needs one")
    try:
        text = text_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{text_file}: not UTF-8 text") from None
    tokenizer = Tokenizer.from_folder(folder)
    return tokenizer.encode(text, add_bos=False), tokenizer.bos_token_id


def chunks(ids: list[int], bos: int | None, ctx: int) -> list[np.ndarray]:
    """`[1, ctx]` chunks of `ids` (BOS first where there is one); a remainder shorter than `ctx` is dropped."""
    body = ctx - (bos is not None)
    out = []
    for start in range(0, len(ids) - body + 1, body):
        piece = ids[start : start + body]
        out.append(np.asarray([([bos] if bos is not None else []) + piece], dtype=np.int64))
    return out


def corpus_kl(session: Any, reference: Any, pieces: list[np.ndarray]) -> dict[str, Any]:
    """The statistics over `pieces` (see the module doc) of `session` against `reference` (both `Session`s)."""
    kls, agree, first = [], [], []
    for piece in pieces:
        scored = slice(piece.shape[1] // 2, piece.shape[1])
        session.reset(1)
        test = session.prefill(piece)[0, scored]
        reference.reset(1)
        ref = reference.prefill(piece)[0, scored]
        kls.append(kl_divergence(ref, test))
        same = ref.argmax(-1) == test.argmax(-1)
        agree.append(same)
        miss = np.flatnonzero(~same)
        first.append(None if miss.size == 0 else int(miss[0]) + scored.start)
    kl = np.concatenate(kls)
    n = kl.size
    return {
        "chunks": len(pieces),
        "scored_positions": n,
        "kl_mean": float(kl.mean()),
        "kl_se": float(kl.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
        "kl_median": float(np.median(kl)),
        "kl_p99": float(np.percentile(kl, 99)),
        "kl_max": float(kl.max()),
        "top1_agreement": float(np.concatenate(agree).mean()),
        "first_top1_mismatch": first,
    }


def corpus_line(r: dict[str, Any]) -> str:
    """One line in llama.cpp's terms."""
    se = "" if r["kl_se"] is None else f" ± {r['kl_se']:.6f}"
    firsts = [f for f in r["first_top1_mismatch"] if f is not None]
    first = f"first top-1 mismatch at position {min(firsts)}" if firsts else "no top-1 mismatch"
    return (
        f"{r['backend']} {r['recipe']} on {r['corpus']} ({r['scored_positions']} positions, {r['chunks']} chunks "
        f"of {r['ctx']}): KLD mean {r['kl_mean']:.6f}{se}, median {r['kl_median']:.6f}, p99 "
        f"{r['kl_p99']:.6f}, max {r['kl_max']:.6f}; same top-1 {100 * r['top1_agreement']:.2f}%; {first}"
    )
