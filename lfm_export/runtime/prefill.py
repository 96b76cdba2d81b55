"""How generation prefills a prompt, shared by `lfm-export run` (`generate`) and `lfm-export bench`, so the
throughput `bench` reports is the one generation gets."""

from __future__ import annotations

import numpy as np

from lfm_export.contract.session import Session


def prefill_for_generation(session: Session, prompt: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """Feed `prompt` `[B, T]` after the session's state in chunks of `chunk` tokens (None: one call) and return
    the last position's logits `[B, vocab]`.

    A session may offer `prefill_last(tokens) -> [B, vocab]` (the last token's logits only: the lm_head runs
    for one row, and ExecuTorch's and MLX's programs skip the every-position pass parity needs); generation
    needs no more, so the final chunk goes through it when present, earlier chunks through `prefill`."""
    size = chunk or prompt.shape[1]
    prefill_last = getattr(session, "prefill_last", None)
    last = None
    for start in range(0, prompt.shape[1], size):
        piece = prompt[:, start : start + size]
        if prefill_last is not None and start + size >= prompt.shape[1]:
            last = prefill_last(piece)
        else:
            last = session.prefill(piece)[:, -1]
    if last is None:
        raise ValueError("prefill_for_generation needs at least one prompt token")
    return last
