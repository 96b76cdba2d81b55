"""The quantized weights an ONNX artifact stores, dequantized in numpy (`Backend.stored_weights`).

Read from the initializers of the ops that hold them, one tensor at a time (external data included):
- `MatMulNBits`: B `[N, blocks, blob]` (4-bit codes low nibble first), scales `[N, blocks]`, zero points
  (packed like B at 4 bits) or the implicit `2^(bits-1)`;
- `QMoE`: per expert, fc1 / fc2 packed like MatMulNBits (`[E, N, K * bits / 8]`, scales `[E, N, blocks]`);
- `GatherBlockQuantized`: the embedding table `[V, blocks, blob]` with scales `[V, blocks, 1]`;
- `DequantizeLinear` with `block_size` (the `portable` op form): int4/uint4/int8/uint8 weights `[K, N]` (axis
  0, transposed back to `[N, K]`) or gathered embedding rows `[V, K]` (axis 1 / -1).

Every tensor is dequantized by `lfm_export.quant.Quantized.dequantize`, the call the simulation's weights come
from, so an honest artifact matches it bit for bit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lfm_export.quant import Quantized

from .convert import MODEL_FILE


def stored_weights(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """`(name, float32 [N, K])` of every quantized weight `folder/model.onnx` stores (a QMoE's per expert,
    `NAME[e]`)."""
    import onnx

    folder = Path(folder)
    model = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    gathered = {
        n.output[0]: n.input[0]
        for n in graph.node
        if n.op_type == "Gather" and n.input[0] in inits and _attr(n, "axis", 0) == 0
    }

    def array(name: str) -> np.ndarray | None:
        name = gathered.get(name, name)
        if not name or name not in inits:
            return None
        return np.asarray(onnx.numpy_helper.to_array(inits[name], base_dir=str(folder)))

    for node in graph.node:
        if node.op_type == "MatMulNBits":
            yield node.input[1], _matmulnbits(node, array)
        elif node.op_type == "QMoE":
            yield from _qmoe(node, array)
        elif node.op_type == "GatherBlockQuantized":
            yield node.input[0] + " (GatherBlockQuantized)", _gather_block_quantized(node, array)
        elif node.op_type == "DequantizeLinear" and _attr(node, "block_size", 0):
            w = _dequantize_linear(node, array)
            if w is not None:
                yield gathered.get(node.input[0], node.input[0]), w


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _input(node: Any, i: int, array: Any) -> np.ndarray | None:
    return array(node.input[i]) if len(node.input) > i and node.input[i] else None


def _unpack(packed: np.ndarray, bits: int, rows: int, count: int) -> np.ndarray:
    """Unsigned codes `[rows, count]` from bytes `[rows, ...]` (4 bits: two codes a byte, 2 bits: four, the
    first in the lowest bits)."""
    b = np.ascontiguousarray(packed, dtype=np.uint8).reshape(rows, -1)
    if bits in (2, 4):
        mask = (1 << bits) - 1
        b = np.stack([(b >> (bits * i)) & mask for i in range(8 // bits)], -1).reshape(rows, -1)
    elif bits != 8:
        raise ValueError(f"{bits}-bit weights are not read")
    return b[:, :count]


def _dequantize(
    packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, n: int, k: int
) -> np.ndarray:
    """Dequantized `[n, k]` of MatMulNBits-packed codes, scales `[n, blocks]` and packed zero points."""
    s = np.asarray(scales, dtype=np.float32).reshape(n, -1)
    blocks = s.shape[1]
    codes = _unpack(packed, bits, n, k)
    zp = None if zero_points is None else _unpack(zero_points, bits, n, blocks)
    return Quantized(codes, s, zp, bits, k // blocks).dequantize()


def _matmulnbits(node: Any, array: Any) -> np.ndarray:
    n, k, bits = _attr(node, "N", 0), _attr(node, "K", 0), _attr(node, "bits", 4)
    return _dequantize(_input(node, 1, array), _input(node, 2, array), _input(node, 3, array), bits, n, k)  # type: ignore[arg-type]


def _qmoe(node: Any, array: Any) -> Iterator[tuple[str, np.ndarray]]:
    bits = _attr(node, "expert_weight_bits", 4)
    for w_i, s_i, z_i in ((2, 3, 11), (5, 6, 12)):
        b, s, z = _input(node, w_i, array), _input(node, s_i, array), _input(node, z_i, array)
        if b is None or s is None:
            continue
        experts, n = b.shape[0], b.shape[1]
        k = b[0].size // n * 8 // bits
        s = s.reshape(experts, n, -1)
        for e in range(experts):
            ze = None if z is None else z[e]
            yield f"{node.input[w_i]}[{e}]", _dequantize(b[e], s[e], ze, bits, n, k)


def _gather_block_quantized(node: Any, array: Any) -> np.ndarray:
    bits = _attr(node, "bits", 4)
    data, scales, zp = _input(node, 0, array), _input(node, 2, array), _input(node, 3, array)
    assert data is not None and scales is not None
    v = data.shape[0]
    k = data[0].size * (8 // bits)
    return _dequantize(data, scales.reshape(v, -1), None if zp is None else zp.reshape(v, -1), bits, v, k)


def _dequantize_linear(node: Any, array: Any) -> np.ndarray | None:
    """`DequantizeLinear(x int, scales, zero points, block_size)` as `[N, K]` with K along the blocks."""
    x, scales, zp = _input(node, 0, array), _input(node, 1, array), _input(node, 2, array)
    if x is None or scales is None or x.ndim != 2:
        return None
    dtype = str(x.dtype)
    bits = 4 if "int4" in dtype else 8
    signed = dtype.startswith("int")
    x = x.astype(np.int16)
    if _attr(node, "axis", 1) == 0:  # weights [K, N] blocked along K
        x, scales = x.T, scales.T
        zp = None if zp is None else zp.T
    half = 2 ** (bits - 1)
    codes = (x + half if signed else x).astype(np.uint8)
    if zp is not None:
        zp = zp.astype(np.int16)
        zp = (zp + half if signed else zp).astype(np.uint8)
    elif not signed:
        zp = np.zeros(scales.shape, np.uint8)
    n, k = codes.shape
    s = np.ascontiguousarray(scales, dtype=np.float32)
    return Quantized(
        codes, s, None if zp is None else np.ascontiguousarray(zp), bits, k // s.shape[1]
    ).dequantize()
