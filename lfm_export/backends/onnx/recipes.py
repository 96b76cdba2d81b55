"""ONNX recipes: a core `lfm_export.recipes.Recipe` plus the ONNX knobs (`ops`, `accuracy_level`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from lfm_export.config import Lfm2Config
from lfm_export.contract.errors import UnsupportedError
from lfm_export.recipes import ACT_FLOAT, ACT_INT8_BLOCK, Recipe, with_tables
from lfm_export.recipes import parse_recipe as parse_core_recipe

OPS = ("ort", "portable")
ORT, PORTABLE = OPS
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
INT8_ACTIVATIONS_LEVEL = 4
"""MatMulNBits' accuracy level with int8 activations (per block of `block_size` along K, see `lfm_export.quant`).
Levels 1-3 ask for float32/float16/bfloat16 compute; onnxruntime's CPU kernels compute those in float32."""


@dataclass(frozen=True)
class OnnxRecipe:
    """What an ONNX export produces: the core `recipe` (precision, blocks, rounding, head bits, context) and

    - `ops`: `ort` (onnxruntime contrib ops) or `portable` (standard ONNX ops only).
    - `accuracy_level`: MatMulNBits' minimum compute precision (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
      activations). It is the only way an ONNX artifact gets int8 activations: the core `-a8` (per-token)
      is refused. In `portable` artifacts onnxruntime applies its own session default (4) when it rewrites
      DequantizeLinear + MatMul into MatMulNBits.
    """

    recipe: Recipe = field(default_factory=Recipe)
    ops: str = ORT
    accuracy_level: int = INT8_ACTIVATIONS_LEVEL

    def __post_init__(self) -> None:
        if self.ops not in OPS:
            raise UnsupportedError(f"--ops {self.ops!r} is unknown; expected one of {', '.join(OPS)}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise UnsupportedError(f"--accuracy-level must be 0-4, got {self.accuracy_level}")
        r = self.recipe
        if r.dtype == "bf16":
            raise UnsupportedError("ONNX has no bf16 recipe here; use fp16 or fp32")
        if r.activations != "float":
            raise UnsupportedError(
                f"{r.name}: ONNX's int8 activations are --accuracy-level 4 (the default), per block; "
                f"use {r.with_options(activations='float').name}"
            )
        if r.quantized and r.dtype != "fp32":
            raise UnsupportedError(f"{r.name}: quantized ONNX recipes keep float32 activations")
        if r.quantized and r.per_channel:
            raise UnsupportedError(
                f"{r.name}: MatMulNBits quantizes in blocks; use {r.with_options(block_size=128).name} or a smaller block"
            )
        if self.ops == PORTABLE and r.embedding_bits not in (None, 8):
            raise UnsupportedError(
                "--ops portable: the embedding table is int8 or float (ONNX Gather takes no int4); "
                "use --ops ort (GatherBlockQuantized) for --embedding-quant 4"
            )

    # ---- the core recipe's fields, read by the passes --------------------------------------------------------
    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def quant(self) -> str:
        return self.recipe.quant

    @property
    def bits(self) -> int | None:
        return self.recipe.bits

    @property
    def quantized(self) -> bool:
        return self.recipe.quantized

    @property
    def block_size(self) -> int:
        return self.recipe.block_size

    @property
    def symmetric(self) -> bool:
        return self.recipe.symmetric

    @property
    def max_seq_len(self) -> int | None:
        return self.recipe.max_seq_len

    @property
    def activations(self) -> str | dict[str, str]:
        """How onnxruntime's CPU kernels round the inputs of the quantized linears (`lfm_export.quant`'s modes),
        measured with onnxruntime 1.32 against `lfm_export.quant.simulate` one op at a time (relative error
        <= 4e-7 where the mode matches, 5e-3 to 1e-2 where it does not):
        - MatMulNBits (int4 and int8): `int8-block` at accuracy_level 4, float at 0 to 3;
        - `portable`: onnxruntime rewrites DequantizeLinear + MatMul into MatMulNBits at its session default,
          accuracy level 4 (the runtime shim leaves it), so `int8-block` whatever the recipe says;
        - QMoE: int4 experts follow accuracy_level; int8 experts round their inputs to `int8-block` at every
          level, so int8 below level 4 is float for the linears and `int8-block` for the experts."""
        if not self.quantized:
            return ACT_FLOAT
        if self.ops == PORTABLE or self.accuracy_level == INT8_ACTIVATIONS_LEVEL:
            return ACT_INT8_BLOCK
        if self.bits == 8:
            return {"linears": ACT_FLOAT, "experts": ACT_INT8_BLOCK}
        return ACT_FLOAT

    def context(self, cfg: Lfm2Config) -> int:
        return self.recipe.context(cfg)

    # ---- what a precision mix may hold, and its bytes as written (`lfm_export.budget`) ----------------------
    @property
    def mix_bits(self) -> tuple[int, ...]:
        """Bits a group of a precision mix may take: onnxruntime 1.32's MatMulNBits and GatherBlockQuantized
        take 2, 4 and 8 (3 is refused at session creation); `portable`'s DequantizeLinear here packs 4 and 8."""
        return (2, 4, 8) if self.ops == ORT else (4, 8)

    expert_bits: ClassVar[tuple[int, ...]] = (4, 8)
    """Bits an MoE layer's experts may take in a mix: QMoE's `expert_weight_bits`."""

    def quantized_bytes(
        self, shape: tuple[int, ...], bits: int, block: int, symmetric: bool, tied_table: bool
    ) -> int:
        """Initializer bytes of a quantized `[rows, K]` weight as `quantize.py` writes it: codes packed
        `block * bits / 8` bytes a block, float32 scales `[rows, blocks]`, zero points packed like the codes
        (`-asym`). A tied table (`tied_table`) also feeds the embedding lookup: with `ort` GatherBlockQuantized
        reads the lm_head's packed codes and holds its own scales (and unpacked zero points); with `portable`
        the lookup is its own int8 table in the same blocks."""
        rows, k = int(np.prod(shape[:-1])), int(shape[-1])
        blocks = k // block
        total = rows * blocks * (block * bits // 8) + rows * blocks * 4
        if not symmetric:
            total += rows * -(-blocks * bits // 8)
        if tied_table and self.ops == ORT:
            total += rows * blocks * (4 + (0 if symmetric else 1))
        elif tied_table:
            total += rows * k + rows * blocks * (4 + (0 if symmetric else 1))
        return total

    def extra_bytes(self, cfg: Lfm2Config) -> int:
        """Weight bytes the export adds to the checkpoint's: with `ort`, the inputs of GroupQueryAttention's
        rotary tables (`fusion.rope_tables`: `head_dim / 2` float32 inverse frequencies; its int64 constants,
        like the graph's shape constants, are not counted), where the model has attention layers."""
        if self.ops != ORT or not cfg.attn_layers:
            return 0
        return (cfg.head_dim // 2) * 4

    def check_model(self, cfg: Lfm2Config, weight_shapes: dict[str, tuple[int, ...]]) -> None:
        self.recipe.check_model(cfg, weight_shapes)

    def to_dict(self) -> dict[str, Any]:
        """The core recipe's fields, the ONNX knobs, and `activation_rounding` (what accuracy_level means)."""
        return {
            **self.recipe.to_dict(),
            "ops": self.ops,
            "accuracy_level": self.accuracy_level,
            "activation_rounding": self.activations,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OnnxRecipe:
        """From a manifest's `recipe` (also the older ones that held only the ONNX fields and the name)."""
        if "dtype" in d:
            core = Recipe.from_dict(d)
        else:
            core = parse_core_recipe(d.get("name", "fp32"), max_seq_len=d.get("max_seq_len"))
        return cls(core, d.get("ops", ORT), d.get("accuracy_level", INT8_ACTIVATIONS_LEVEL))


def make_recipe(
    quant: str = "fp32",
    block_size: int | None = None,
    ops: str = ORT,
    symmetric: bool = True,
    accuracy_level: int = INT8_ACTIVATIONS_LEVEL,
    max_seq_len: int | None = None,
    embedding_quant: str | None = None,
    head_bits: int | None = None,
) -> OnnxRecipe:
    """The CLI's flags as a recipe: `quant` is any core recipe name (`int4`, `int4-b64-mse`, ...); `block_size`
    None means the name's (default 32); `embedding_quant` / `head_bits` as `lfm_export.recipes.with_tables`
    reads them (None: the int8 table and head of quantized recipes)."""
    core = parse_core_recipe(quant, block_size=block_size, asymmetric=not symmetric, max_seq_len=max_seq_len)
    return OnnxRecipe(with_tables(core, embedding_quant, head_bits), ops, accuracy_level)


def parse_recipe(
    name: str,
    *,
    block_size: int | None = None,
    asymmetric: bool = False,
    max_seq_len: int | None = None,
    ops: str = ORT,
    accuracy_level: int = INT8_ACTIVATIONS_LEVEL,
) -> OnnxRecipe:
    """`fp32`, `fp16`, `int4`, `int4-b64`, `int8-b128-asym`, `int4-b64-mse` -> recipe (see `lfm_export.recipes`)."""
    core = parse_core_recipe(name, block_size=block_size, asymmetric=asymmetric, max_seq_len=max_seq_len)
    return OnnxRecipe(core, ops, accuracy_level)
