"""Torch-free runtime: tokenizer, sampler, streaming generation and the runtime shims (sessions).

Names are resolved on first use, so `import lfm_export.runtime` loads neither onnxruntime nor torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ExecuTorchSession": "executorch",
    "MlxSession": "mlx",
    "CoreMLSession": "coreml",
    "Session": "session",
    "Tokenizer": "tokenizer",
    "IncrementalDetokenizer": "tokenizer",
    "LFM2_CHAT_TEMPLATE": "tokenizer",
    "GenerationConfig": "sampler",
    "Sampler": "sampler",
    "Conversation": "conversation",
    "Generation": "generate",
    "GenerationStats": "generate",
    "generate_text": "generate",
    "stream_generate": "generate",
    "OnnxSession": "onnx",
    "read_manifest": "artifact",
}

__all__ = [
    "LFM2_CHAT_TEMPLATE",
    "Conversation",
    "Generation",
    "GenerationConfig",
    "GenerationStats",
    "IncrementalDetokenizer",
    "OnnxSession",
    "Sampler",
    "Session",
    "Tokenizer",
    "generate_text",
    "read_manifest",
    "stream_generate",
]

if TYPE_CHECKING:
    from lfm_export.contract.manifest import read_manifest
    from lfm_export.contract.session import Session

    from .conversation import Conversation
    from .generate import Generation, GenerationStats, generate_text, stream_generate
    from .onnx import OnnxSession
    from .sampler import GenerationConfig, Sampler
    from .tokenizer import LFM2_CHAT_TEMPLATE, IncrementalDetokenizer, Tokenizer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
