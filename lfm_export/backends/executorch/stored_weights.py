"""The quantized weights an ExecuTorch `.pte` stores, dequantized in numpy (`Backend.stored_weights`).

Read with ExecuTorch's own deserialisation (`executorch.exir._serialize._program.deserialize_pte_binary`: the
program, its delegate blobs and its named data) and the XNNPACK delegate's flatbuffer schema
(`executorch/backends/xnnpack/serialization/schema.fbs`, decoded to JSON by the `flatc` ExecuTorch ships, all
blobs in one call). What ExecuTorch 1.5.1's XNNPACK serialiser writes (`operators/node_visitor.py`), and so what
this reads, for the filter of every `XNNFullyConnected` node:
- `xnn_datatype_qbint4` (8da4w, blocks): codes packed two per byte, `code + 8` as uint4, even column in the
  low nibble (`NodeVisitor.convert_to_qc4w`), `[N, K / 2]`; scales bfloat16, one per block, `[N, K / group]`
  (`PerChannelGroupQuant`); no zero point.
- `xnn_datatype_qcint8` (8da8w, the int8 lm_head): int8 codes `[N, K]`, float32 scales `[N]`
  (`PerChannelQuant`); no zero point.
Codes and scales are named-data entries (the delegate's `constant_data` names their keys, the SHA-256 of the
bytes as serialised; an older serialiser's offsets into the blob's own constant data are read too); the MoE expert delegates (`expert_delegates.py`) are the same blobs with other keys.
Outside the delegates, the quantized embedding table (`embedding.QuantizedEmbedding`, run by the portable
kernels) is a program constant pair: codes (int8 `[V, H]`, or uint8 `[V, H / 2]` packed by
`embedding.pack_int4`) and float32 scales `[V, H / group]`.

Every weight is dequantized as `code * scale` in float32 (`quantize.dequantize`, the call the simulation's
values come from), so an honest artifact matches the simulation bit for bit. Float filters (a weight the
recipe holds float) are not read: they are not quantized weights. Names: the `.pte` keeps no parameter
names, so a tensor is named by where it sits, `xnnpack[D].fc[J]` (the J-th fully connected node of the D-th
XNNPACK delegate in the program's order) or `embedding`."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .convert import MODEL_FILE

XNNPACK_ID = "XnnpackBackend"
CHAR, BYTE, FLOAT = 1, 0, 6
"""ExecuTorch's ScalarType codes of the embedding's int8 codes, packed uint4 codes and float32 scales."""


def stored_weights(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """`(name, float32 [N, K])` of every quantized weight `folder/model.pte` stores (`read_pte`)."""
    yield from read_pte(Path(folder) / MODEL_FILE)


def read_pte(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """`(name, float32 [N, K])` of every quantized weight the program at `path` stores: the filters of the
    XNNPACK delegates' fully connected nodes, then the quantized embedding table."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(Path(path).read_bytes())
    program = pte.program
    named = pte.named_data
    data = {key: named.buffers[entry.buffer_index] for key, entry in named.pte_data.items()} if named else {}
    for plan in program.execution_plan:
        blobs = [
            program.backend_delegate_data[d.processed.index].data
            for d in plan.delegates
            if d.id == XNNPACK_ID
        ]
        for d, (graph, inline) in enumerate(
            zip(_xnnpack_graphs(blobs), map(_inline_constants, blobs), strict=True)
        ):
            yield from _fully_connected(graph, data, inline, f"xnnpack[{d}]")
        yield from _embedding(plan, program.constant_buffer)


def _xnnpack_graphs(blobs: list[bytes]) -> list[dict[str, Any]]:
    """Each delegate blob's `XNNGraph` as JSON, decoded by ExecuTorch's `flatc` against the XNNPACK schema."""
    if not blobs:
        return []
    import importlib.resources

    import executorch.backends.xnnpack.serialization as schema_package
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
    from executorch.exir._serialize._flatbuffer import _get_flatc_path

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        schema = tmp / "schema.fbs"
        schema.write_bytes(importlib.resources.files(schema_package).joinpath("schema.fbs").read_bytes())
        bins = []
        for i, blob in enumerate(blobs):
            h = XNNHeader.from_bytes(blob[: XNNHeader.EXPECTED_LENGTH])
            path = tmp / f"d{i}.bin"
            path.write_bytes(blob[h.flatbuffer_offset : h.flatbuffer_offset + h.flatbuffer_size])
            bins.append(str(path))
        subprocess.run(
            [_get_flatc_path(), "--json", "--strict-json", "--defaults-json", "--raw-binary", "-o", d]
            + [str(schema), "--", *bins],
            check=True,
            capture_output=True,
        )
        return [json.loads((tmp / f"d{i}.json").read_text()) for i in range(len(bins))]


def _inline_constants(blob: bytes) -> bytes:
    """The constant data a delegate blob carries after its flatbuffer (older serialisers put weights there;
    ExecuTorch 1.5.1 names them in the program's named data instead)."""
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader

    h = XNNHeader.from_bytes(blob[: XNNHeader.EXPECTED_LENGTH])
    return blob[h.constant_data_offset : h.constant_data_offset + h.constant_data_size]


def _fully_connected(
    graph: dict[str, Any], data: dict[str, bytes], inline: bytes, prefix: str
) -> Iterator[tuple[str, np.ndarray]]:
    constants = graph.get("constant_data") or []
    values = graph.get("xvalues") or []

    def constant(index: int) -> bytes:
        entry = constants[index]
        if entry.get("named_key"):
            return data[entry["named_key"]]
        offset, size = int(entry["offset"]), int(entry["size"])
        return inline[offset : offset + size]

    fc = 0
    for node in graph.get("xnodes") or []:
        if node.get("xnode_union_type") != "XNNFullyConnected":
            continue
        j, fc = fc, fc + 1
        value = values[node["xnode_union"]["filter_id"]]
        if value.get("xvalue_union_type") != "XNNQuantizedTensorValue":
            continue
        q = value["xvalue_union"]
        tensor, params = q["tensor_value"], q["quant_params"]
        if not tensor.get("constant_buffer_idx"):
            continue
        n, k = (int(x) for x in tensor["dims"])
        raw = constant(tensor["constant_buffer_idx"])
        scale_bytes = constant(params["scale_buffer_idx"])
        if tensor["datatype"] == "xnn_datatype_qbint4":
            codes = _unpack_qc4w(np.frombuffer(raw, np.uint8), n, k)
            scales = _bf16(np.frombuffer(scale_bytes, np.uint16)).reshape(n, -1)
        elif tensor["datatype"] == "xnn_datatype_qcint8":
            codes = np.frombuffer(raw, np.int8).reshape(n, k)
            scales = np.frombuffer(scale_bytes, np.float32).reshape(n, 1)
        else:
            continue
        yield f"{prefix}.fc[{j}]", _dequantize(codes, scales)


def _embedding(plan: Any, constant_buffer: list[Any]) -> Iterator[tuple[str, np.ndarray]]:
    """The program's quantized embedding: an int8 / packed uint8 constant `[V, .]` and the float32 constant
    `[V, blocks]` of its scales (the only constants of one leading size `V` with these types)."""
    consts = []
    for v in plan.values:
        t = v.val
        if type(t).__name__ == "Tensor" and t.data_buffer_idx > 0 and t.allocation_info is None:
            if len(t.sizes) == 2:
                consts.append((int(t.scalar_type), tuple(int(s) for s in t.sizes), t.data_buffer_idx))
    for kind, (rows, width), idx in consts:
        if kind not in (CHAR, BYTE):
            continue
        scales = [c for c in consts if c[0] == FLOAT and c[1][0] == rows]
        if len(scales) != 1:
            continue
        raw = np.frombuffer(constant_buffer[idx].storage, np.uint8)
        blocks = scales[0][1][1]
        s = np.frombuffer(constant_buffer[scales[0][2]].storage, np.float32)[: rows * blocks].reshape(
            rows, blocks
        )
        if kind == CHAR:
            codes = raw[: rows * width].view(np.int8).reshape(rows, width)
        else:
            codes = _unpack_qc4w(raw[: rows * width], rows, 2 * width)
        yield "embedding", _dequantize(codes, s)


def _unpack_qc4w(packed: np.ndarray, n: int, k: int) -> np.ndarray:
    """Codes -8..7 `[n, k]` from bytes holding `code + 8` two per byte, the even column in the low nibble
    (XNNPACK's `convert_to_qc4w`, `embedding.pack_int4`)."""
    p = packed[: n * k // 2].reshape(n, k // 2)
    codes = np.empty((n, k), np.int8)
    codes[:, 0::2] = (p & 0x0F).astype(np.int8) - 8
    codes[:, 1::2] = (p >> 4).astype(np.int8) - 8
    return codes


def _bf16(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _dequantize(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """`code * scale` in float32, one scale per block of `K / blocks` columns (`quantize.dequantize`)."""
    n, k = codes.shape
    blocks = scales.shape[1]
    out = codes.reshape(n, blocks, k // blocks).astype(np.float32) * scales.astype(np.float32)[..., None]
    return out.reshape(n, k)
