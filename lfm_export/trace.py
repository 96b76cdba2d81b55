"""Trace the canonical model into a program whose flat inputs and outputs follow an `IOSignature`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lfm_export.model import Lfm2ForCausalLM
from lfm_export.signature import ATTENTION_MASK, CONV, GROWING, INPUT_IDS, INPUT_POS, KEY, VALUE, IOSignature


class SignatureModule(nn.Module):
    """`forward(input_ids, attention_mask | input_pos, *state)` -> `(logits, *new_state)` in signature order."""

    def __init__(self, model: Lfm2ForCausalLM, signature: IOSignature) -> None:
        super().__init__()
        self.model = model
        self.signature = signature
        roles = [s.role for s in signature.state_inputs()]
        self._conv = [i for i, r in enumerate(roles) if r == CONV]
        self._key = [i for i, r in enumerate(roles) if r == KEY]
        self._value = [i for i, r in enumerate(roles) if r == VALUE]
        out_roles = [s.role for s in signature.state_outputs()]
        self._out_order = [(r, out_roles[:j].count(r)) for j, r in enumerate(out_roles)]

    def forward(self, input_ids: Tensor, mask_or_pos: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        growing = self.signature.form == GROWING
        logits, conv, keys, values = self.model(
            input_ids,
            [state[i] for i in self._conv],
            [state[i] for i in self._key],
            [state[i] for i in self._value],
            attention_mask=mask_or_pos if growing else None,
            input_pos=None if growing else mask_or_pos,
            form=self.signature.form,
        )
        by_role = {CONV: conv, KEY: keys, VALUE: values}
        return (logits, *(by_role[r][n] for r, n in self._out_order))


def example_inputs(
    signature: IOSignature, batch: int = 2, seq: int = 3, past: int = 2, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, ...]:
    """Inputs for tracing: non-trivial sizes so no dynamic dimension is specialised to 0 or 1."""
    values = {
        "batch_size": batch,
        "sequence_length": seq,
        "past_sequence_length": past,
        "total_sequence_length": past + seq,
    }
    out = []
    for spec in signature.inputs:
        shape = [values[d] if isinstance(d, str) else d for d in spec.shape]
        if spec.role == INPUT_IDS:
            out.append(torch.randint(0, 8, shape, dtype=torch.int64))
        elif spec.role == ATTENTION_MASK:
            out.append(torch.ones(shape, dtype=torch.int64))
        elif spec.role == INPUT_POS:
            out.append(torch.tensor([past], dtype=torch.int64))
        else:
            out.append(torch.zeros(shape, dtype=dtype))
    return tuple(out)


def dynamic_shapes(signature: IOSignature) -> tuple[object, ...]:
    """Every symbolic axis is dynamic; `Dim.AUTO` lets export infer `total = past + seq`.
    Shaped like `SignatureModule.forward`'s arguments: two tensors, then the `*state` tuple."""
    dims = [{ax: torch.export.Dim.AUTO for ax in spec.dynamic_axes} for spec in signature.inputs]
    return (dims[0], dims[1], tuple(dims[2:]))


def export_program(model: Lfm2ForCausalLM, signature: IOSignature) -> torch.export.ExportedProgram:
    module = SignatureModule(model, signature).eval()
    args = example_inputs(signature, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes(signature), strict=False)
