"""The canonical PyTorch model behind the `Session` protocol: the yardstick every backend is checked against.

fp32, growing KV form, no tricks. The thread count (`torch.set_num_threads`) is the caller's business.
Subclasses may override `_forward` to model a broken runtime (the parity tests do).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lfm_export.errors import ContextLimitError
from lfm_export.model import GROWING, Lfm2ForCausalLM
from lfm_export.signature import CONV, KEY, VALUE, past_name


class ReferenceSession:
    supports_batch = True

    def __init__(
        self, model: Lfm2ForCausalLM, name: str = "reference", max_seq_len: int | None = None
    ) -> None:
        bad = {p.dtype for p in model.parameters() if p.dtype != torch.float32}
        if bad:
            raise ValueError(
                f"the reference session needs an fp32 model, got parameters in {sorted(map(str, bad))}"
            )
        self.model = model.eval()
        self.config = model.config
        self.name = name
        self.vocab_size = self.config.vocab_size
        self.max_seq_len = max_seq_len
        self.reset(1)

    @property
    def position(self) -> int:
        return self._position

    @property
    def batch_size(self) -> int:
        return self._batch

    def reset(self, batch_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._batch = batch_size
        self._position = 0
        self.conv_states, self.keys, self.values = self.model.empty_state(batch_size, form=GROWING)

    def prefill(self, tokens: np.ndarray) -> np.ndarray:
        ids = np.asarray(tokens)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"{self.name}: prefill expects integer tokens [batch, seq], got {ids.shape} {ids.dtype}"
            )
        if ids.shape[0] != self._batch:
            raise ValueError(f"{self.name}: batch {ids.shape[0]} after reset({self._batch})")
        if ids.shape[1] < 1:
            raise ValueError(f"{self.name}: prefill needs at least one token")
        if self.max_seq_len is not None and self._position + ids.shape[1] > self.max_seq_len:
            raise ContextLimitError(
                f"{self.name}: {self._position} + {ids.shape[1]} tokens exceed max_seq_len {self.max_seq_len}"
            )
        with torch.no_grad():
            logits, self.conv_states, self.keys, self.values = self._forward(
                torch.from_numpy(ids.astype(np.int64)), self.conv_states, self.keys, self.values
            )
        self._position += ids.shape[1]
        return logits.float().numpy()

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        ids = np.asarray(tokens)
        if ids.ndim != 1:
            raise ValueError(f"{self.name}: decode expects one token per row [batch], got shape {ids.shape}")
        return self.prefill(ids[:, None])[:, 0]

    def state(self) -> dict[str, np.ndarray]:
        cfg = self.config
        out: dict[str, np.ndarray] = {}
        for layer, t in zip(cfg.conv_layers, self.conv_states, strict=True):
            out[past_name(CONV, layer)] = t.numpy().copy()
        for layer, k, v in zip(cfg.attn_layers, self.keys, self.values, strict=True):
            out[past_name(KEY, layer)] = k.numpy().copy()
            out[past_name(VALUE, layer)] = v.numpy().copy()
        return out

    def _forward(
        self, ids: Tensor, conv: list[Tensor], keys: list[Tensor], values: list[Tensor]
    ) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
        return self.model(ids, conv, keys, values, form=GROWING)
