"""The quantized weights a GGUF artifact stores, dequantized in numpy (`Backend.stored_weights`): every Q8_0 /
Q4_0 / K-quant (Q3_K, Q4_K, Q5_K, Q6_K, and the Q5_0 fallback) tensor of `model.gguf` (MoE expert stacks as their
rows), read by `gguf.GGUFReader` and dequantized by `lfm_export.ggml_blocks.dequantize` /
`lfm_export.ggml_kquants.dequantize`, the calls the simulation's weights come from (`weight_values`). Expert down
projections holding a folded routed scale are divided by it, as the simulation holds them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lfm_export import ggml_blocks, ggml_kquants

from .convert import EXPERT_DOWN_SCALE, MODEL_FILE


def stored_weights(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """`(name, float32 [rows, K])` of every block-quantized tensor of `folder/model.gguf`."""
    import gguf

    reader = gguf.GGUFReader(Path(folder) / MODEL_FILE)
    scale = np.float32(_recipe(Path(folder)).get(EXPERT_DOWN_SCALE, 1.0))
    for t in reader.tensors:
        name = t.tensor_type.name
        if name in ggml_blocks.BLOCK_TYPES:
            dequantize, kind = ggml_blocks.dequantize, ggml_blocks.BLOCK_TYPES[name]
        elif name in ggml_kquants.K_TYPES:
            dequantize, kind = ggml_kquants.dequantize, ggml_kquants.K_TYPES[name]
        else:
            continue
        data = np.asarray(t.data, dtype=np.uint8)
        values = dequantize(data.reshape(-1, data.shape[-1]), kind)
        if scale != 1 and t.name.endswith("ffn_down_exps.weight"):
            values = values / scale  # the folded routed scale, as the simulation holds it
        yield t.name, values


def _recipe(folder: Path) -> dict:
    """The artifact's recorded recipe (empty when the folder has no manifest)."""
    path = folder / "manifest.json"
    return json.loads(path.read_text()).get("recipe", {}) if path.is_file() else {}
