"""The quantized weights a QNN QDQ graph stores, dequantized in numpy (`Backend.stored_weights`).

Every constant behind a `DequantizeLinear` of `model.onnx` (+ `model.onnx.data`): int8 codes per output
channel (axis 0) for the linears, the conv and the `lm_head` (16a4w: values in -7..7), uint16 codes per tensor
for the RMSNorm weights, the embedding table and the RoPE tables. Dequantized as the op defines it, `(x -
zero_point) * scale` in float32 (exact: the codes and zero points are integers below 2^24, so one rounding, the
product's, as in the fake-quantized torch program's dequantize ops), shaped as rows by the QNN library's rule
(`lfm_export.backends.qnn.weights.as_rows`) and named by the checkpoint weight the consuming op takes (the
exporter's `pkg.torch.onnx.name_scopes` / `fx_node` metadata, `checkpoint_name`), else by the initializer.

Cost: one pass over the graph's nodes and the weight initializers (4.3 MB for `tiny`), no session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lfm_export.backends.qnn.weights import as_rows, checkpoint_name

from .qdq import MODEL_FILE


def stored_weights(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """`(name, float32 rows)` of every constant behind a `DequantizeLinear` of `folder/model.onnx`."""
    import onnx

    folder = Path(folder)
    graph = onnx.load(str(folder / MODEL_FILE), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    def array(name: str) -> np.ndarray:
        return np.asarray(onnx.numpy_helper.to_array(inits[name], base_dir=str(folder)))

    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        x = array(node.input[0])
        scale = array(node.input[1]).astype(np.float32)
        zero = array(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), x.dtype)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1:  # per channel along `axis`
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        values = (x.astype(np.float32) - zero.astype(np.float32)) * scale
        rows = as_rows(values)
        if rows is not None:
            yield _name(users.get(node.output[0], []), node.input[0]), rows


def _name(consumers: list[Any], fallback: str) -> str:
    """The checkpoint name of the weight the first consumer with exporter metadata takes (its aten op, from
    `pkg.torch.onnx.fx_node`, called from the innermost module of `pkg.torch.onnx.name_scopes`)."""
    import ast

    for node in consumers:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes, fx = meta.get("pkg.torch.onnx.name_scopes"), meta.get("pkg.torch.onnx.fx_node", "")
        if not scopes or "target=torch.ops." not in fx:
            continue
        path = [s for s in ast.literal_eval(scopes) if s][-2:-1]
        op = fx.split("target=torch.ops.", 1)[1].split("]", 1)[0]
        name = checkpoint_name(path[0], op) if path else None
        if name is not None:
            return name
    return fallback
