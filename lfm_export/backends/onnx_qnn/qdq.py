"""The QNN target of the ONNX backend: the fake-quantized step program (`lfm_export.backends.qnn.quantize`)
written as a static-shape QDQ graph that onnxruntime's QNN execution provider places on the HTP.

torch's ONNX exporter turns each `quantized_decomposed` quantize / dequantize into `QuantizeLinear` /
`DequantizeLinear`, but keeps the dtype torch computes in: `QnnQuantizer`'s 16-bit activations are int32 with the
range 0..65535, a type the HTP does not take and that ONNX saturates at the int32 limits, not at 65535. Those
pairs are rewritten to uint16 (and constants stored as int32 codes with them), which is what torch's clamp to
0..65535 computes. Weights stay int8 codes per output channel (4-bit weights: int8 storage of values in -7..7).
Opset 23, so that RMSNorm stays one `RMSNormalization` op for the QNN provider instead of float Pow / ReduceMean /
Sqrt nodes (on `tiny` the residual stream reaches 468, whose square overflows fp16, the HTP's float type).
Both were exported here; the decomposed form was not run on the HTP since the RoPE fix, so what it costs there
is not measured."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

U16_RANGE = ("0", "65535", "torch.int32")
"""The trailing `(quant_min, quant_max, dtype)` arguments of a 16-bit activation quantize / dequantize, as
torch's exporter records them in each node's `pkg.torch.onnx.fx_node` metadata."""

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def export_qdq(step: Any, folder: Path) -> dict[str, Any]:
    """Write `MODEL_FILE` (+ `DATA_FILE`) for the `QuantizedStep` `step` into `folder`; returns the graph's op
    counts and how many quantize / dequantize nodes were moved to uint16."""
    import onnx_ir as ir
    import torch

    from lfm_export.backends.qnn.quantize import empty_state, step_args

    for name in ("torch.onnx", "onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)  # an INFO line per deduplicated initializer
    args = step_args(step.signature, 0, 0, empty_state(step.signature))
    with torch.no_grad():
        program = torch.export.export(step.module, args, strict=False)
        onnx_program = torch.onnx.export(
            program, args, dynamo=True, optimize=True, opset_version=23, verbose=False
        )
    model = onnx_program.model
    moved = _to_uint16(model, ir)
    names_in = step.signature.input_names
    names_out = step.signature.output_names
    if len(model.graph.inputs) != len(names_in) or len(model.graph.outputs) != len(names_out):
        raise RuntimeError(
            f"the exported graph has {len(model.graph.inputs)} inputs / {len(model.graph.outputs)} outputs, the "
            f"signature {len(names_in)} / {len(names_out)}"
        )
    for value, name in zip(model.graph.inputs, names_in, strict=True):
        value.name = name
    for value, name in zip(model.graph.outputs, names_out, strict=True):
        value.name = name
    ir.save(model, folder / MODEL_FILE, external_data=DATA_FILE)
    ops = Counter(node.op_type for node in model.graph)
    return {"op_types": dict(sorted(ops.items())), "uint16_qdq_nodes": moved}


def _to_uint16(model: Any, ir: Any) -> int:
    graph = model.graph
    converted: dict[str, Any] = {}

    def u16(value: Any) -> Any:
        if value.name not in converted:
            codes = value.const_value.numpy()
            if codes.min() < 0 or codes.max() > 65535:
                raise RuntimeError(f"{value.name}: 16-bit codes outside 0..65535")
            new = ir.Value(name=f"{value.name}_u16", const_value=ir.tensor(codes.astype(np.uint16)))
            graph.register_initializer(new)
            converted[value.name] = new
        return converted[value.name]

    moved = 0
    for node in graph:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        fx = node.metadata_props.get("pkg.torch.onnx.fx_node", "")
        if "args = (" not in fx:
            raise RuntimeError(f"{node.name}: no fx_node metadata to tell its quantization range")
        fx_args = fx.split("args = (", 1)[1].split("), kwargs", 1)[0].split(", ")
        if tuple(fx_args[-3:]) != U16_RANGE:
            continue
        zero_point = node.inputs[2]
        if zero_point is None or zero_point.const_value is None:
            raise RuntimeError(f"{node.name}: a 16-bit zero point that is not a constant")
        node.replace_input_with(2, u16(zero_point))
        if node.op_type == "DequantizeLinear" and node.inputs[0].const_value is not None:
            node.replace_input_with(0, u16(node.inputs[0]))
        if node.op_type == "QuantizeLinear":
            node.outputs[0].dtype = ir.DataType.UINT16
        moved += 1
    return moved
