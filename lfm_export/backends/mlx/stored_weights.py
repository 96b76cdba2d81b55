"""The quantized weights an MLX artifact stores, dequantized in numpy (`Backend.stored_weights`).

`model.safetensors` holds each quantized weight as MLX's affine triple (`weight` uint32 codes packed low bits
first, `scales`, `biases`; bits and group size from `config.json`'s `quantization` block, per-layer entries
first). `mx.dequantize` computes `scales * q + biases`, which differs from the simulation's `(q - zp) * scale`
by float32 rounding, so this reader recovers the core quantizer's form instead: `zp = rint(-biases / scales)`,
then `lfm_export.quant.Quantized.dequantize`, the call the simulation's weights come from. A block whose
biases are not exactly `-scales * zp` (what the export writes, `weights.pack`) is no core quantizer's output:
its row is returned as MLX computes it (`scales * q + biases`), which then matches no simulated row."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lfm_export.quant import Quantized

from .convert import WEIGHTS_FILE


def stored_weights(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """`(name, float32 [rows, K])` of every quantized weight of `folder/model.safetensors` (a stacked MoE
    tensor `[E, F, H]` as its `E * F` rows)."""
    from safetensors import safe_open

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text()).get("quantization") or {}
    with safe_open(str(folder / WEIGHTS_FILE), framework="numpy") as f:
        keys = set(f.keys())
        for key in sorted(k for k in keys if k.endswith(".scales")):
            name = key.removesuffix(".scales")
            if f"{name}.weight" not in keys or f"{name}.biases" not in keys:
                continue
            spec = _spec(config, name)
            yield (
                f"{name}.weight",
                _dequantize(
                    f.get_tensor(f"{name}.weight"),
                    f.get_tensor(key),
                    f.get_tensor(f"{name}.biases"),
                    int(spec["bits"]),
                ),
            )


def _spec(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The layer's own `quantization` entry, else the block's defaults."""
    own = config.get(name)
    return own if isinstance(own, dict) else config


def _dequantize(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int) -> np.ndarray:
    words = np.ascontiguousarray(np.asarray(packed, dtype="<u4").reshape(-1, packed.shape[-1]))
    rows = words.shape[0]
    if 32 % bits:  # `weights.pack`'s bit stream, codes across word boundaries
        stream = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
        codes = np.packbits(stream.reshape(rows, -1, bits), axis=-1, bitorder="little")[..., 0]
    else:
        per = 32 // bits
        shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
        codes = ((words[..., None] >> shifts) & np.uint32(2**bits - 1)).reshape(rows, -1).astype(np.uint8)
    s = np.asarray(scales, dtype=np.float32).reshape(rows, -1)
    b = np.asarray(biases, dtype=np.float32).reshape(rows, -1)
    safe = np.where(s == 0, np.float32(1), s)
    zp = np.clip(np.rint(-b / safe), 0, 2**bits - 1).astype(np.uint8)
    group = codes.shape[1] // s.shape[1]
    values = Quantized(codes, s, zp, bits, group).dequantize()
    consistent = ((-s * zp.astype(np.float32)).astype(np.float32) == b).all(axis=1)
    if not consistent.all():
        affine = codes.reshape(rows, -1, group).astype(np.float32) * s[..., None] + b[..., None]
        values[~consistent] = affine.reshape(rows, -1)[~consistent]
    return values
