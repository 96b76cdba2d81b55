"""Deliberately broken sessions over a canonical model, shared by the parity tests: each models a runtime bug
that a parity gate must catch."""

from __future__ import annotations

import torch

from lfm_export.parity.reference import ReferenceSession


class DropsConvState(ReferenceSession):
    """Conv state reset to zeros after every call."""

    def prefill(self, tokens):
        out = super().prefill(tokens)
        self.conv_states = [torch.zeros_like(c) for c in self.conv_states]
        return out


class KvOneOff(ReferenceSession):
    """New tokens' keys and queries are rotated one position later than the cached ones."""

    def _forward(self, ids, conv, keys, values):
        if keys[0].shape[2] == 0:
            return super()._forward(ids, conv, keys, values)
        pad = [torch.cat([k[:, :, :1] * 0, k], dim=2) for k in keys]
        padv = [torch.cat([v[:, :, :1] * 0, v], dim=2) for v in values]
        mask = torch.ones(ids.shape[0], pad[0].shape[2] + ids.shape[1], dtype=torch.int64)
        mask[:, 0] = 0
        logits, c, k2, v2 = self.model(ids, conv, pad, padv, attention_mask=mask)
        return logits, c, [k[:, :, 1:] for k in k2], [v[:, :, 1:] for v in v2]


class KeepsConvOnRestore(ReferenceSession):
    """`restore` puts back the snapshot's KV cache and position but keeps the conv state it holds: a new
    conversation started from a shared prefix carries the previous conversation's conv state."""

    def _restore_state(self, snap):
        conv = self.conv_states
        super()._restore_state(snap)
        self.conv_states = conv
