"""Prompts for parity runs, as token ids.

With a tokenizer file, a few bundled texts (prose, code, a chat turn, numbers) are encoded; without one,
deterministic pseudo-random ids are drawn within the vocabulary. Every prompt has at least `MIN_LEN` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lfm_export.contract.errors import UserError

MIN_LEN = 8
MAX_LEN = 64
SEED = 1234

TEXTS = (
    "The quick brown fox jumps over the lazy dog while the river keeps flowing toward the distant sea, "
    "carrying leaves and small branches past the old stone bridge.",
    "def fibonacci(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "<|im_start|>user\nWhat is the capital of France, and why is it famous?<|im_end|>\n<|im_start|>assistant\n",
    "Invoice 2024-0173: 3 x widgets at 12.50 EUR, 7 x gaskets at 0.85 EUR, total 43.45 EUR, due 2024-07-31.",
)


def random_prompts(
    vocab_size: int, count: int = 3, lengths: Sequence[int] = (24, 24, 16), seed: int = SEED
) -> list[np.ndarray]:
    """`count` prompts of pseudo-random ids in `[0, vocab_size)`, reproducible for a given seed."""
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, vocab_size, size=max(MIN_LEN, lengths[i % len(lengths)]), dtype=np.int64)
        for i in range(count)
    ]


def tokenizer_prompts(
    tokenizer_file: str | Path, vocab_size: int, texts: Sequence[str] = TEXTS
) -> list[np.ndarray]:
    """The bundled texts encoded with `tokenizer_file`, truncated to `MAX_LEN` tokens."""
    from tokenizers import Tokenizer

    path = Path(tokenizer_file)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        raise UserError(f"{path}: cannot load tokenizer ({e})") from None
    out = []
    for text in texts:
        ids = np.asarray(tok.encode(text).ids[:MAX_LEN], dtype=np.int64)
        if ids.size and int(ids.max()) >= vocab_size:
            raise UserError(
                f"{path}: tokenizer produced id {int(ids.max())}, the model's vocabulary is {vocab_size}"
            )
        if ids.size >= MIN_LEN:
            out.append(ids)
    if len(out) < 2:
        raise UserError(f"{path}: the tokenizer gives fewer than 2 prompts of {MIN_LEN}+ tokens")
    return out


def default_prompts(vocab_size: int, tokenizer_file: str | Path | None = None) -> list[np.ndarray]:
    if tokenizer_file is not None:
        return tokenizer_prompts(tokenizer_file, vocab_size)
    return random_prompts(vocab_size)


def check_prompts(prompts: Sequence[np.ndarray], vocab_size: int) -> list[np.ndarray]:
    """Validate user-given prompts: 1-D integer ids, at least `MIN_LEN` long, inside the vocabulary."""
    if not prompts:
        raise UserError("no prompts given for the parity run")
    out = []
    for i, p in enumerate(prompts):
        ids = np.asarray(p)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise UserError(
                f"prompt {i}: expected a 1-D sequence of token ids, got shape {ids.shape} {ids.dtype}"
            )
        if ids.size < MIN_LEN:
            raise UserError(f"prompt {i}: {ids.size} tokens, parity prompts need at least {MIN_LEN}")
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise UserError(
                f"prompt {i}: token ids must lie in [0, {vocab_size}), got {ids.min()}..{ids.max()}"
            )
        out.append(ids.astype(np.int64))
    return out
