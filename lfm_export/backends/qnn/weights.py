"""The quantized weights of a QNN step program, dequantized: what the fake-quantized torch program computes
with (`program_weights`), for parity's bit-exact weights check against the QDQ graph the ONNX target wrote
(`lfm_export.backends.onnx_qnn.stored_weights`, `lfm_export.parity.stored_weights`).

`QnnQuantizer` holds every weight as integer codes behind a dequantize op: linears, the conv and the `lm_head`
as int8 codes per output channel (16a4w: values in -7..7), RMSNorm weights, the embedding table and the RoPE
tables as 16-bit codes per tensor. Each is read as the dequantize op on its constant computes it, in float32,
and named by the checkpoint weight it holds (`checkpoint_name`, the same rule on both sides); a constant that
holds none (the RoPE tables) keeps its own name. 0-d constants (the attention scale) are not read: a row of one
value says nothing. A weight of N rows is compared as N rows (`[N, ...]` flattened after the first axis); a
1-d weight (a norm's) as one row."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

PREFIX = "model."
"""The traced program's name of the canonical model (`lfm_export.trace.SignatureModule.model`)."""

OWN_WEIGHT = {"linear": ".weight", "embedding": ".weight", "rms_norm": ".weight", "conv1d": ".conv.weight"}
"""Per consuming aten op, the suffix of its weight's checkpoint name after the calling module's path (the conv
is `F.conv1d(x, self.conv.weight, ...)` inside `ShortConv`)."""


def checkpoint_name(module_path: str, aten_op: str) -> str | None:
    """The checkpoint name of the weight that aten op `aten_op` (`linear`, `aten.linear.default`) called from
    module `module_path` of the traced program takes; None where the op takes no checkpoint weight."""
    op = aten_op.removeprefix("aten.").split(".")[0]
    suffix = OWN_WEIGHT.get(op)
    if suffix is None or not module_path.startswith(PREFIX):
        return None
    return module_path.removeprefix(PREFIX) + suffix


def as_rows(values: np.ndarray) -> np.ndarray | None:
    """`values` as the rows the matcher compares: `[N, -1]`, a 1-d weight as one row; None for a scalar."""
    if values.ndim == 0:
        return None
    return values.reshape(1, -1) if values.ndim == 1 else values.reshape(values.shape[0], -1)


def program_weights(module: Any) -> Iterator[tuple[str, np.ndarray]]:
    """`(name, float32 rows)` of every constant behind a dequantize op in the converted program `module` (a
    `torch.fx.GraphModule`), each computed by that op itself, so the values are the program's bit for bit."""
    import torch

    with torch.no_grad():
        for node in module.graph.nodes:
            if node.op != "call_function" or "dequantize_per_" not in str(node.target):
                continue
            source = node.args[0]
            if getattr(source, "op", None) != "get_attr":
                continue
            args = [
                getattr(module, a.target) if getattr(a, "op", None) == "get_attr" else a for a in node.args
            ]
            rows = as_rows(node.target(*args, **node.kwargs).float().numpy())
            if rows is None:
                continue
            yield _name(node, source.target), rows


def _name(node: Any, fallback: str) -> str:
    """The checkpoint name of the weight the dequantize `node` feeds (its first user's op and module)."""
    for user in node.users:
        stack = user.meta.get("nn_module_stack") or {}
        if not stack:
            continue
        path = list(stack.values())[-1][0]
        name = checkpoint_name(path, str(user.target))
        if name is not None:
            return name
    return fallback
