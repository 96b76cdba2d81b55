"""ONNX export recipes: precision, block size, op set. Names read the same across backends (`int4-b32`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lfm_export.config import Lfm2Config
from lfm_export.errors import UnsupportedError

QUANTS = ("fp32", "fp16", "int8", "int4")
BLOCK_SIZES = (32, 64, 128)
OPS = ("ort", "portable")
ORT, PORTABLE = OPS
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
DEFAULT_CONTEXT_CAP = 32768
"""Context declared when none is asked for: the model's, capped at the trained context of the dense models."""


@dataclass(frozen=True)
class OnnxRecipe:
    """What an ONNX export produces.

    - `quant`: fp32 | fp16 (weights and activations; logits stay float32) | int8 | int4 (block-wise weights,
      float32 activations).
    - `block_size`: quantization block along each weight's input dimension (int8/int4 only).
    - `ops`: `ort` (onnxruntime contrib ops) or `portable` (standard ONNX ops only).
    - `symmetric`: no zero points (default) or per-block zero points.
    - `accuracy_level`: MatMulNBits' minimum compute precision (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8).
    - `max_seq_len`: the context the artifact declares (rotary caches, genai `context_length`); None = the
      model's, capped at 32768.
    """

    quant: str = "fp32"
    block_size: int = 32
    ops: str = ORT
    symmetric: bool = True
    accuracy_level: int = 4
    max_seq_len: int | None = None

    def __post_init__(self) -> None:
        if self.quant not in QUANTS:
            raise UnsupportedError(f"--quant {self.quant!r} is unknown; expected one of {', '.join(QUANTS)}")
        if self.ops not in OPS:
            raise UnsupportedError(f"--ops {self.ops!r} is unknown; expected one of {', '.join(OPS)}")
        if self.block_size not in BLOCK_SIZES:
            raise UnsupportedError(
                f"block size {self.block_size} is not supported; expected one of {', '.join(map(str, BLOCK_SIZES))}"
            )
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise UnsupportedError(f"accuracy_level must be 0-4, got {self.accuracy_level}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise UnsupportedError(f"max_seq_len must be positive, got {self.max_seq_len}")

    @property
    def bits(self) -> int | None:
        return {"int8": 8, "int4": 4}.get(self.quant)

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def name(self) -> str:
        """`fp32`, `fp16`, `int4-b32`, `int8-b128-asym`: the recipe name shared by every backend."""
        if not self.quantized:
            return self.quant
        return f"{self.quant}-b{self.block_size}" + ("" if self.symmetric else "-asym")

    def context(self, cfg: Lfm2Config) -> int:
        return self.max_seq_len or min(cfg.max_position_embeddings, DEFAULT_CONTEXT_CAP)

    def check_model(self, cfg: Lfm2Config, weight_shapes: dict[str, tuple[int, ...]]) -> None:
        """Refuse a recipe the model cannot take, before any tracing: a block size that does not divide a
        weight's input dimension (named), or a context beyond the model's."""
        if self.max_seq_len is not None and self.max_seq_len > cfg.max_position_embeddings:
            raise UnsupportedError(
                f"max_seq_len {self.max_seq_len} exceeds the model's max_position_embeddings "
                f"{cfg.max_position_embeddings}"
            )
        if not self.quantized:
            return
        for name, shape in weight_shapes.items():
            if len(shape) == 2 and shape[1] % self.block_size:
                raise UnsupportedError(
                    f"block size {self.block_size} does not divide the input dimension {shape[1]} of {name}; "
                    f"choose one of {', '.join(str(b) for b in BLOCK_SIZES if shape[1] % b == 0) or 'none'}"
                )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["name"] = self.name
        d["bits"] = self.bits
        return d


def make_recipe(
    quant: str = "fp32",
    block_size: int = 32,
    ops: str = ORT,
    symmetric: bool = True,
    accuracy_level: int = 4,
    max_seq_len: int | None = None,
) -> OnnxRecipe:
    return OnnxRecipe(quant, block_size, ops, symmetric, accuracy_level, max_seq_len)


def parse_recipe(name: str, **options: Any) -> OnnxRecipe:
    """`fp32`, `fp16`, `int4`, `int4-b64`, `int8-b128-asym` -> recipe (other fields from `options`)."""
    parts = name.strip().lower().split("-")
    quant, rest = parts[0], parts[1:]
    kw: dict[str, Any] = dict(options)
    kw["quant"] = quant
    for part in rest:
        if part.startswith("b") and part[1:].isdigit() and quant in ("int4", "int8"):
            kw["block_size"] = int(part[1:])
        elif part == "asym" and quant in ("int4", "int8"):
            kw["symmetric"] = False
        else:
            raise UnsupportedError(
                f"unknown recipe {name!r}; expected fp32, fp16, int8-bN or int4-bN (N in 32, 64, 128), "
                "optionally with -asym"
            )
    return OnnxRecipe(**kw)


RECIPES: dict[str, OnnxRecipe] = {
    r.name: r
    for r in [OnnxRecipe("fp32"), OnnxRecipe("fp16")]
    + [OnnxRecipe(q, b) for q in ("int8", "int4") for b in BLOCK_SIZES]
}
