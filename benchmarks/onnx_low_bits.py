"""Which bit widths onnxruntime's CPU kernels take for MatMulNBits and GatherBlockQuantized: one-node graphs of
each width, run on the installed onnxruntime against numpy's dequantized product / rows.

    .venv/bin/python benchmarks/onnx_low_bits.py --json benchmarks/results/onnx_low_bits.json

Codes are packed as `lfm_export.backends.onnx.quantize.pack_codes` packs them (first code in the lowest bits);
no zero points (the implicit `2^(bits-1)`), float32 scales. A width counts as taken when the session is created
and the output matches numpy: MatMulNBits at accuracy level 0 (float inputs) within 1e-5 of the largest output,
GatherBlockQuantized exactly; at accuracy level 4 the inputs are rounded to int8 blocks: the error against float
inputs is recorded, and the error against the inputs rounded as the simulation rounds them
(`lfm_export.quant.fake_quant_int8_block`, `max_rel_error_vs_int8_block`). 3 bits cannot be packed in whole bytes per block of 32 by `pack_codes`; its codes are packed as one bit
stream per block here (the layout onnxruntime would need), to see whether the session takes it at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from provenance import provenance  # noqa: E402


def bit_stream(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes packed along the last axis as one bit stream, first code in the lowest bits."""
    *lead, count = codes.shape
    flat = codes.reshape(-1, count).astype(np.uint32)
    out = np.zeros((flat.shape[0], (count * bits + 7) // 8), np.uint8)
    for i in range(count):
        for j in range(bits):
            b = i * bits + j
            out[:, b // 8] |= (((flat[:, i] >> j) & 1) << (b % 8)).astype(np.uint8)
    return out.reshape(*lead, -1)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    from lfm_export.backends.onnx.quantize import pack_codes

    return pack_codes(codes, bits) if bits in (2, 4, 8) else bit_stream(codes, bits)


def session(nodes: list, inputs: list, outputs: list, inits: list) -> Any:
    import onnxruntime as ort
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def matmulnbits(bits: int, block: int, level: int, rng: np.random.Generator) -> dict[str, Any]:
    """`Y = A @ dequantize(B)^T` for A `[3, 256]`, B `[64, 256]` in blocks of `block`."""
    from onnx import TensorProto, helper, numpy_helper

    n, k = 64, 256
    codes = rng.integers(0, 2**bits, (n, k // block, block))
    scales = rng.uniform(0.01, 0.1, (n, k // block)).astype(np.float32)
    w = ((codes - 2 ** (bits - 1)) * scales[..., None]).reshape(n, k).astype(np.float32)
    x = rng.standard_normal((3, k)).astype(np.float32)
    node = helper.make_node(
        "MatMulNBits",
        ["A", "B", "scales"],
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=level,
    )
    try:
        s = session(
            [node],
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, [3, k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, n])],
            [
                numpy_helper.from_array(pack(codes, bits), "B"),
                numpy_helper.from_array(scales.reshape(-1), "scales"),
            ],
        )
        y = s.run(None, {"A": x})[0]
    except Exception as e:  # noqa: BLE001 - a refusal is the result
        return {"runs": False, "error": " ".join(str(e).split())[-400:]}
    ref = x @ w.T
    rel = float(np.abs(y - ref).max() / np.abs(ref).max())
    out = {"runs": True, "max_rel_error": rel, "exact_at_float_inputs": rel <= 1e-5 if level == 0 else None}
    if level == 4:  # against the inputs rounded as `lfm_export.quant.fake_quant_int8_block` rounds them
        import torch

        from lfm_export.quant import fake_quant_int8_block

        xq = fake_quant_int8_block(torch.from_numpy(x), block).numpy().astype(np.float64)
        sim = xq @ w.T.astype(np.float64)
        out["max_rel_error_vs_int8_block"] = float(np.abs(y - sim).max() / np.abs(sim).max())
    return out


def gather_block_quantized(bits: int, block: int, rng: np.random.Generator) -> dict[str, Any]:
    """Rows of a `[50, 128]` table in blocks of `block` gathered by ids."""
    from onnx import TensorProto, helper, numpy_helper

    v, d = 50, 128
    codes = rng.integers(0, 2**bits, (v, d))
    scales = rng.uniform(0.01, 0.1, (v, d // block)).astype(np.float32)
    w = ((codes.reshape(v, d // block, block) - 2 ** (bits - 1)) * scales[..., None]).reshape(v, d)
    ids = np.array([[0, 5, 49]], np.int64)
    node = helper.make_node(
        "GatherBlockQuantized",
        ["data", "ids", "scales"],
        ["Y"],
        domain="com.microsoft",
        bits=bits,
        block_size=block,
        gather_axis=0,
        quantize_axis=1,
    )
    try:
        s = session(
            [node],
            [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(pack(codes, bits), "data"), numpy_helper.from_array(scales, "scales")],
        )
        y = s.run(None, {"ids": ids})[0]
    except Exception as e:  # noqa: BLE001
        return {"runs": False, "error": " ".join(str(e).split())[-400:]}
    return {"runs": True, "exact": bool(np.array_equal(y.reshape(3, d), w[ids[0]].astype(np.float32)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    out: dict[str, Any] = {**provenance(), "onnxruntime": ort.__version__, "matmulnbits": {}, "gather": {}}
    for bits in (2, 3, 4, 8):
        for block in (32, 64, 128):
            for level in (0, 4):
                out["matmulnbits"][f"bits{bits}-b{block}-level{level}"] = matmulnbits(bits, block, level, rng)
            out["gather"][f"bits{bits}-b{block}"] = gather_block_quantized(bits, block, rng)
    text = json.dumps(out, indent=1) + "\n"
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
