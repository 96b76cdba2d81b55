"""The canonical PyTorch model behind the `Session` protocol: the yardstick every backend is checked against.

fp32, growing KV form, no tricks. The thread count (`torch.set_num_threads`) is the caller's business.
Subclasses may override `_forward` (or `prefill` / `decode`) to model a broken runtime (the parity tests do).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lfm_export.contract.session import SessionBase, SessionError
from lfm_export.contract.signature import CONV, KEY, VALUE, past_name
from lfm_export.contract.snapshot import Snapshot
from lfm_export.model import GROWING, Lfm2ForCausalLM


class ReferenceSession(SessionBase):
    """State lives in `conv_states`, `keys` and `values` (torch tensors, one per conv / attention layer)."""

    def __init__(
        self, model: Lfm2ForCausalLM, name: str = "reference", max_seq_len: int | None = None
    ) -> None:
        # `lfm_export.quant.simulate(..., ACT_NATIVE)` marks a model that computes in half precision on purpose
        self.dtype = getattr(model, "compute_dtype", torch.float32)
        bad = {p.dtype for p in model.parameters() if p.dtype != self.dtype}
        if bad:
            raise SessionError(
                f"the reference session needs an fp32 model, got parameters in {sorted(map(str, bad))}"
            )
        self.model = model.eval()
        self.config = model.config
        self.name = name
        self.vocab_size = self.config.vocab_size
        self.max_seq_len = max_seq_len
        self.reset(1)

    def state(self) -> dict[str, np.ndarray]:
        cfg = self.config
        out: dict[str, np.ndarray] = {}
        for layer, t in zip(cfg.conv_layers, self.conv_states, strict=True):
            out[past_name(CONV, layer)] = t.float().numpy().copy()
        for layer, k, v in zip(cfg.attn_layers, self.keys, self.values, strict=True):
            out[past_name(KEY, layer)] = k.float().numpy().copy()
            out[past_name(VALUE, layer)] = v.float().numpy().copy()
        return out

    def _restore_state(self, snap: Snapshot) -> None:
        cfg = self.config

        def get(name: str, length: int | None = None) -> Tensor:
            if name not in snap.state:
                raise SessionError(f"{self.name}: the snapshot lacks {name}")
            t = torch.from_numpy(np.array(snap.state[name], dtype=np.float32)).to(self.dtype)
            if t.shape[0] != snap.batch_size or (length is not None and t.shape[2] != length):
                raise SessionError(f"{self.name}: snapshot tensor {name} has shape {list(t.shape)}")
            return t

        self.conv_states = [get(past_name(CONV, layer)) for layer in cfg.conv_layers]
        self.keys = [get(past_name(KEY, layer), snap.position) for layer in cfg.attn_layers]
        self.values = [get(past_name(VALUE, layer), snap.position) for layer in cfg.attn_layers]

    def _reset_state(self, batch_size: int) -> None:
        self.conv_states, self.keys, self.values = self.model.empty_state(
            batch_size, form=GROWING, dtype=self.dtype
        )

    def _prefill(self, ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits, self.conv_states, self.keys, self.values = self._forward(
                torch.from_numpy(ids), self.conv_states, self.keys, self.values
            )
        return logits.float().numpy()

    def _forward(
        self, ids: Tensor, conv: list[Tensor], keys: list[Tensor], values: list[Tensor]
    ) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
        return self.model(ids, conv, keys, values, form=GROWING)
