"""State held inside the program: conv states and KV caches as mutable buffers (batch 1, `max_seq_len`
positions), the form ExecuTorch's LLM runner and Core ML stateful models run.

`forward(input_ids [1, T], input_pos [1]) -> logits [1, T, vocab]`: prefill of T tokens and decode of one are
the same program. The math is the canonical model's `stateful` KV form (the static form with the KV written in
place into these buffers); the new conv state is copied into its buffer after each call.

At `input_pos == 0` the program starts a fresh sequence by itself: ExecuTorch's runtime does not reset mutable
buffers between runs, so the old conv state is replaced by zeros there (`where`, not a multiply, so no stale
value can leak through). The KV cache needs no clearing: positions past the query are masked, and every
position at or before it was written by the current sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lfm_export.contract.signature import CONV, KEY, VALUE, IOSignature
from lfm_export.model import STATEFUL, Lfm2ForCausalLM


def held_buffer_name(name: str) -> str:
    """Buffer of the held state a signature names `name` (`past.3.conv` -> `past_3_conv`): buffer names
    cannot contain dots."""
    return name.replace(".", "_")


class StatefulModule(nn.Module):
    """The canonical model with its state in buffers named by `held_buffer_name(spec.name)` for each
    `signature.held` spec; the new conv states are stored by `write_back`."""

    def __init__(self, model: Lfm2ForCausalLM, signature: IOSignature) -> None:
        super().__init__()
        if signature.form != STATEFUL:
            raise ValueError(f"StatefulModule needs a {STATEFUL!r} signature, got {signature.form!r}")
        self.model = model
        self.signature = signature
        dtype = getattr(torch, signature.state_dtype)
        for spec in signature.held:
            shape = tuple(int(d) for d in spec.shape)
            self.register_buffer(held_buffer_name(spec.name), torch.zeros(shape, dtype=dtype))
        self._names = {
            role: [held_buffer_name(s.name) for s in signature.held if s.role == role]
            for role in (CONV, KEY, VALUE)
        }

    def forward(self, input_ids: Tensor, input_pos: Tensor) -> Tensor:
        conv_bufs = [self.get_buffer(n) for n in self._names[CONV]]
        continuing = input_pos.reshape(1, 1, 1) > 0
        conv = [torch.where(continuing, c, torch.zeros_like(c)) for c in conv_bufs]
        keys = [self.get_buffer(n) for n in self._names[KEY]]
        values = [self.get_buffer(n) for n in self._names[VALUE]]
        logits, new_conv, _, _ = self.model(input_ids, conv, keys, values, input_pos=input_pos, form=STATEFUL)
        for buf, new in zip(conv_bufs, new_conv, strict=True):
            self.write_back(buf, new)
        return logits

    def write_back(self, buf: Tensor, new: Tensor) -> None:
        """Store the new conv state `new` in its buffer `buf`: the swap point of a backend whose converter takes
        another in-place form (Core ML's `modules.CoreMLStatefulModule`)."""
        buf.copy_(new)


def read_held_state(module: nn.Module, signature: IOSignature) -> dict[str, Tensor]:
    """The state `module` holds, by signature name (`past.0.conv`, `past_key_values.2.key`, ...).

    `module` is a `StatefulModule` or the module of its exported program (`ExportedProgram.module()`), which
    keeps the buffer names. The tensors are the buffers themselves: clone them to keep a snapshot."""
    return {s.name: module.get_buffer(held_buffer_name(s.name)) for s in signature.held}
