"""Trace the canonical model into a program whose flat inputs and outputs follow an `IOSignature`.

Backends may replace modules before tracing (their own attention, cache update or quantized linear) with
`swaps`: callables that take a module and return its replacement, or None to leave it (and look inside it).
They are applied to a copy of the module tree that shares every parameter and buffer with the model, so the
model itself is never changed and no weight is duplicated.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

from lfm_export.contract.signature import (
    ATTENTION_MASK,
    CONV,
    GROWING,
    INPUT_IDS,
    INPUT_POS,
    KEY,
    STATEFUL,
    VALUE,
    IOSignature,
)
from lfm_export.model import Lfm2ForCausalLM
from lfm_export.signature import build_signature
from lfm_export.stateful import StatefulModule

Swap = Callable[[nn.Module], nn.Module | None]
M = TypeVar("M", bound=nn.Module)


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


def shared_copy(module: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """A copy of `module`'s tree of modules whose parameters and buffers are the original tensors (tied
    weights stay tied): replacing a submodule of the copy leaves the original untouched."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    new = copy.copy(module)
    memo[id(module)] = new
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {k: None if m is None else shared_copy(m, memo) for k, m in module._modules.items()}
    return new


def rebind(module: nn.Module, cls: type[M]) -> M:
    """`module` as an instance of `cls` (a subclass that changes how it computes, not what it holds) over the
    same parameters, buffers and submodules: no tensor is copied, and replacing one of the new module's
    submodules leaves `module` untouched. The backends' module swaps build their variants with it."""
    new = cls.__new__(cls)
    new.__dict__ = dict(module.__dict__)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    return new


def apply_swaps(module: nn.Module, swaps: Sequence[Swap]) -> nn.Module:
    """`module` with its submodules replaced by `swaps`, in order (each over the tree the previous one left),
    on a `shared_copy`; the module itself is returned when there are no swaps."""
    if not swaps:
        return module
    root = shared_copy(module)
    for swap in swaps:
        _swap_children(root, swap)
    return root


def _swap_children(parent: nn.Module, swap: Swap) -> None:
    for name, child in parent._modules.items():
        if child is None:
            continue
        new = swap(child)
        if new is None:
            _swap_children(child, swap)
        else:
            parent._modules[name] = new


def export_program(
    model: Lfm2ForCausalLM, signature: IOSignature, swaps: Sequence[Swap] = ()
) -> torch.export.ExportedProgram:
    """The `growing` or `static` form of `model`, traced with every symbolic axis of `signature` dynamic."""
    if signature.form == STATEFUL:
        raise ValueError("a stateful signature is traced by export_stateful_program")
    module = SignatureModule(apply_swaps(model, swaps), signature).eval()
    args = example_inputs(signature, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        return torch.export.export(module, args, dynamic_shapes=dynamic_shapes(signature), strict=False)


def export_stateful_program(
    model: Lfm2ForCausalLM,
    max_seq_len: int,
    max_prefill: int,
    swaps: Sequence[Swap] = (),
    layout: Callable[[IOSignature], IOSignature] | None = None,
) -> torch.export.ExportedProgram:
    """The `stateful` form (`lfm_export.stateful`): `forward(input_ids [1, T], input_pos [1]) -> logits`,
    T dynamic in 1..`max_prefill`, state in buffers named by `held_buffer_name`; the signature is
    `build_signature(cfg, "stateful", max_seq_len, max_prefill=max_prefill)`, passed through `layout` when a
    backend's swapped modules hold the state in another shape (ExecuTorch's custom ops: KV seq-first)."""
    dtype = next(model.parameters()).dtype
    signature = build_signature(
        model.config, STATEFUL, max_seq_len, str(dtype).removeprefix("torch."), max_prefill=max_prefill
    )
    if layout is not None:
        signature = layout(signature)
    module = StatefulModule(apply_swaps(model, swaps), signature).eval()
    seq = min(2, max_prefill)  # 2, so the dynamic axis is not specialised to 1
    args = (torch.zeros(1, seq, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    seq_dim = torch.export.Dim("seq", min=1, max=max_prefill) if max_prefill > 1 else None
    with torch.no_grad():
        return torch.export.export(
            module, args, dynamic_shapes=({1: seq_dim} if seq_dim else None, None), strict=False
        )
