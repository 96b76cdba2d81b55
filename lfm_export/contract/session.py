"""The `Session` protocol every runtime shim implements (the reference session speaks it too), and
`SessionBase`, the bookkeeping they share.

Arrays are numpy at this boundary so shims stay torch-free. A session holds the streaming state (conv state
and KV cache) between calls: `prefill` appends tokens to it and returns their logits; chunked prefill is two
`prefill` calls; `decode` is a one-token `prefill`. `snapshot()` copies the state at the current position (with the tokens it
holds) and `restore(snap)` puts it back, so a conversation can branch or start from a shared prefix.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from lfm_export.contract.errors import ContextLimitError, UnsupportedError, UserError
from lfm_export.contract.snapshot import Snapshot, SnapshotError

DEFAULT_THREADS = 2
"""CPU threads of every command and shim unless told otherwise. Left to choose, onnxruntime-genai ran these
models on 1 thread on the 2-core development machine, at about half the decode speed."""


class SessionError(UserError, ValueError):
    """A call a session cannot take: token ids of the wrong shape, type or range, a batch it was not reset
    for, a batch it does not support. (A `ValueError` too: bad arguments to a Python call.)"""


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
        """Current state by signature name (`past.N.conv`, `past_key_values.N.key`, ...); None if hidden."""
        ...

    def snapshot(self) -> Snapshot:
        """A copy of the state at the current position: conv state and KV cache as after the last token fed,
        the position, the tokens held (`lfm_export.contract.snapshot.Snapshot`)."""
        ...

    def restore(self, snap: Snapshot) -> None:
        """Continue from `snap` (taken by a session of the same name over the same artifact): the next
        `prefill` follows its last token, whatever this session held before. A snapshot refused before any
        change (`SnapshotError`, `SessionError`) leaves the session as it was; one that fails while its state is
        written leaves it reset."""
        ...


class SessionBase:
    """What every session does the same way: batch size and position, token checks, the context limit.

    A subclass sets `name`, `vocab_size`, `max_seq_len` (None: no limit) and `supports_batch` (False: `reset`
    refuses batch > 1, as static-cache runtimes such as ExecuTorch, Core ML and MLX need), then implements
    `_reset_state(batch_size)` (allocate empty state) and `_prefill(ids)` (run `ids` `[B, T]` int64 after the
    state and return `[B, T, vocab]` logits; the position is advanced here after it returns). `state()`
    returns None unless the runtime exposes its state. Call `reset` at the end of `__init__`.

    Snapshots: `snapshot()` and `restore(snap)` do the checks (session name, `artifact_id`, batch, position)
    and keep the tokens held; a subclass implements `_snapshot_state()` (copies of its state as named numpy
    arrays; the default takes `state()`) and `_restore_state(snap)` (put `snap.state` back; batch, position and
    tokens are already set when it runs). A session that feeds tokens outside `prefill` calls `_advance(ids)`.
    """

    name: str = "session"
    vocab_size: int
    max_seq_len: int | None = None
    supports_batch: bool = True
    artifact_id: str | None = None
    """`lfm_export.contract.snapshot.artifact_id` of the artifact run (None: an in-memory model)."""
    _batch: int = 1
    _position: int = 0
    _history: list[np.ndarray] | None = None

    @property
    def position(self) -> int:
        return self._position

    @property
    def batch_size(self) -> int:
        return self._batch

    def reset(self, batch_size: int = 1) -> None:
        self._check_batch(batch_size)
        self._batch, self._position, self._history = batch_size, 0, []
        self._reset_state(batch_size)

    def prefill(self, tokens: np.ndarray) -> np.ndarray:
        ids = self._check_tokens(tokens)
        self._check_room(ids.shape[1])
        logits = self._prefill(ids)
        self._advance(ids)
        return logits

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        ids = np.asarray(tokens)
        if ids.ndim != 1:
            raise SessionError(
                f"{self.name}: decode expects one token per row [batch], got shape {list(ids.shape)}"
            )
        return self.prefill(ids[:, None])[:, -1]

    def state(self) -> dict[str, np.ndarray] | None:
        return None

    def tokens(self) -> np.ndarray:
        """The token ids the state holds, int64 `[batch, position]`."""
        if self._history is None:
            raise SessionError(f"{self.name}: the tokens held are unknown (the state was set without them)")
        if not self._history:
            return np.zeros((self._batch, 0), dtype=np.int64)
        return np.concatenate(self._history, axis=1)

    def snapshot(self) -> Snapshot:
        tokens = self.tokens()
        state = {k: np.array(v, copy=True) for k, v in self._snapshot_state().items()}
        return Snapshot(self.name, self.artifact_id, self._position, tokens, state)

    def restore(self, snap: Snapshot) -> None:
        if not isinstance(snap, Snapshot):
            raise SnapshotError(f"{self.name}: restore takes a Snapshot, got {type(snap).__name__}")
        if snap.session != self.name:
            raise SnapshotError(f"{self.name}: the snapshot was taken by a {snap.session} session")
        if snap.artifact_id != self.artifact_id:
            raise SnapshotError(
                f"{self.name}: the snapshot belongs to artifact {snap.artifact_id}, "
                f"this session runs {self.artifact_id}"
            )
        tokens = np.asarray(snap.tokens)
        if tokens.ndim != 2 or tokens.shape[1] != snap.position:
            raise SnapshotError(f"{self.name}: the snapshot's tokens do not match its position")
        self._restored(snap.batch_size, snap.position)
        self._history = [tokens.astype(np.int64, copy=True)]
        try:
            self._restore_state(snap)
        except BaseException:
            self.reset(self._batch)  # never half restored
            raise

    # ---- for subclasses ---------------------------------------------------------------------------------
    def _reset_state(self, batch_size: int) -> None:
        raise NotImplementedError

    def _prefill(self, ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _snapshot_state(self) -> dict[str, np.ndarray]:
        state = self.state()
        if state is None:
            raise UnsupportedError(
                f"{self.name}: this session cannot read its state, so it takes no snapshot"
            )
        return state

    def _restore_state(self, snap: Snapshot) -> None:
        raise UnsupportedError(f"{self.name}: this session cannot restore a snapshot")

    def _advance(self, ids: np.ndarray) -> None:
        """Record `ids` `[B, T]` as fed: the position moves on by T."""
        if self._history is not None:
            self._history.append(np.array(ids, dtype=np.int64, copy=True))
        self._position += ids.shape[1]

    def _restored(self, batch_size: int, position: int) -> None:
        """Take over the batch size and position of a restored state (after checking them); the tokens held
        are unknown until the caller sets `_history`."""
        self._check_batch(batch_size)
        if position < 0 or (self.max_seq_len is not None and position > self.max_seq_len):
            raise SessionError(f"{self.name}: state position {position} is outside 0..{self.max_seq_len}")
        self._batch, self._position, self._history = batch_size, position, None

    def _check_batch(self, batch_size: int) -> None:
        if batch_size < 1:
            raise SessionError(f"{self.name}: batch size must be >= 1, got {batch_size}")
        if batch_size > 1 and not self.supports_batch:
            raise SessionError(f"{self.name}: this session runs batch 1 only, got batch {batch_size}")

    def _check_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """`tokens` as contiguous int64 `[batch, T>=1]` ids in the vocabulary, batch as at the last reset."""
        ids = np.asarray(tokens)
        if ids.ndim != 2 or ids.shape[1] < 1 or not np.issubdtype(ids.dtype, np.integer):
            raise SessionError(
                f"{self.name}: prefill expects integer token ids shaped [batch, tokens], "
                f"got {list(ids.shape)} {ids.dtype}"
            )
        if ids.shape[0] != self._batch:
            raise SessionError(
                f"{self.name}: prefill got batch {ids.shape[0]}, "
                f"the session was reset for batch {self._batch}"
            )
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise SessionError(f"{self.name}: token ids must be in 0..{self.vocab_size - 1}, got {lo}..{hi}")
        return np.ascontiguousarray(ids, dtype=np.int64)

    def _check_room(self, new_tokens: int) -> None:
        if self.max_seq_len is not None and self._position + new_tokens > self.max_seq_len:
            raise ContextLimitError(
                f"{self.name} session: {self._position} tokens held + {new_tokens} new exceeds "
                f"max_seq_len {self.max_seq_len}"
            )
