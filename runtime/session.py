"""The `Session` protocol every runtime shim implements, and the reference session speaks too.

Arrays are numpy at this boundary so shims stay torch-free. A session holds the streaming state (conv state
and KV cache) between calls: `prefill` appends tokens to it and returns their logits; chunked prefill is two
`prefill` calls; `decode` is a one-token `prefill`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Session(Protocol):
    name: str
    vocab_size: int
    max_seq_len: int | None
    """Tokens the session can hold in total (None: no fixed limit)."""
    supports_batch: bool

    @property
    def position(self) -> int:
        """Tokens consumed since the last `reset`."""
        ...

    def reset(self, batch_size: int = 1) -> None:
        """Drop all state; the next `prefill` starts a new sequence."""
        ...

    def prefill(self, tokens: np.ndarray) -> np.ndarray:
        """Feed `tokens` `[B, T]` int64 after the current state; return logits `[B, T, vocab]` float32."""
        ...

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row, `tokens` `[B]`; return logits `[B, vocab]`."""
        ...

    def state(self) -> dict[str, np.ndarray] | None:
        """Current state by signature name (`past.N.conv`, `past_key_values.N.key`, ...), or None if hidden."""
        ...
