"""Editing a written `.pte` in place, for wrong-artifact tests: scale the stored scales of one XNNPACK fully
connected filter (bf16 per block or float32 per channel, in the program's named data), leaving every other
byte, the keys and the program as they are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _named_data_spans(data: bytes) -> dict[str, tuple[int, int]]:
    """Named-data key -> (file offset, size), from the program's segment table."""
    from executorch.exir._serialize._flatbuffer_program import _flatbuffer_to_program
    from executorch.exir._serialize._program import _get_extended_header

    header = _get_extended_header(data)
    program = _flatbuffer_to_program(data[: header.program_size])
    return {
        e.key: (
            header.segment_base_offset + program.segments[e.segment_index].offset,
            program.segments[e.segment_index].size,
        )
        for e in program.named_data
    }


def scale_keys(data: bytes) -> dict[str, tuple[str, str]]:
    """`xnnpack[D].fc[J]` (the reader's names) -> (named-data key of its scales, XNNPACK datatype)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    from lfm_export.backends.executorch.stored_weights import XNNPACK_ID, _xnnpack_graphs

    program = deserialize_pte_binary(data).program
    out = {}
    for plan in program.execution_plan:
        blobs = [
            program.backend_delegate_data[d.processed.index].data
            for d in plan.delegates
            if d.id == XNNPACK_ID
        ]
        for d, graph in enumerate(_xnnpack_graphs(blobs)):
            fcs = [n for n in graph["xnodes"] if n["xnode_union_type"] == "XNNFullyConnected"]
            for j, node in enumerate(fcs):
                value = graph["xvalues"][node["xnode_union"]["filter_id"]]
                if value["xvalue_union_type"] == "XNNQuantizedTensorValue":
                    q = value["xvalue_union"]
                    key = graph["constant_data"][q["quant_params"]["scale_buffer_idx"]]["named_key"]
                    out[f"xnnpack[{d}].fc[{j}]"] = (key, q["tensor_value"]["datatype"])
    return out


def scale_filter(pte: Path, name: str, factor: float) -> None:
    """Multiply the stored scales of the filter `name` (`scale_keys`) by `factor`, rounded to their dtype."""
    data = bytearray(pte.read_bytes())
    key, datatype = scale_keys(bytes(data))[name]
    offset, size = _named_data_spans(bytes(data))[key]
    raw = bytes(data[offset : offset + size])
    if datatype == "xnn_datatype_qbint4":  # bf16
        values = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32) * np.float32(factor)
        new = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    else:
        new = (np.frombuffer(raw, np.float32) * np.float32(factor)).astype(np.float32).tobytes()
    assert new != raw and len(new) == size
    data[offset : offset + size] = new
    pte.write_bytes(bytes(data))
