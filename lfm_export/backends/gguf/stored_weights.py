"""The quantized weights a GGUF artifact stores, dequantized in numpy (`Backend.stored_weights`): every Q8_0 /
Q4_0 tensor of `model.gguf` (MoE expert stacks as their rows), read by `gguf.GGUFReader` and dequantized by
`lfm_export.ggml_blocks.dequantize`, the call the simulation's weights come from (`weight_values`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lfm_export.ggml_blocks import BLOCK_TYPES, dequantize

from .convert import MODEL_FILE


def stored_weights(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """`(name, float32 [rows, K])` of every Q8_0 / Q4_0 tensor of `folder/model.gguf`."""
    import gguf

    reader = gguf.GGUFReader(Path(folder) / MODEL_FILE)
    for t in reader.tensors:
        kind = BLOCK_TYPES.get(t.tensor_type.name)
        if kind is None:
            continue
        data = np.asarray(t.data, dtype=np.uint8)
        yield t.name, dequantize(data.reshape(-1, data.shape[-1]), kind)
