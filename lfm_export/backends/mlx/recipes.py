"""MLX recipes: the core `lfm_export.recipes.Recipe` as MLX can express it, plus `max_prefill`.

Supported: `fp32`; `int8-gN` / `int4-gN` (N = 32, 64, 128; `-asym` and `-mse` too: their codes are unsigned
with a per-group scale and zero point, which MLX's affine format `scales * q + biases` holds exactly). The
lm_head and the embedding are one tied table in mlx-lm, held at `head_bits` (8 in int4 recipes, as on every
backend; `--head-bits 4 --embedding-quant 4`: 4 bits in the recipe's groups, mlx-lm's q4 default; the two
options must agree, and `--embedding-quant none` is refused).

fp16 / bf16: every weight stored in that type (mlx-lm's folder too; the MoE expert bias stays float32) and the
model computed in it: the canonical model is traced at that dtype, so the functions hold its own casts (norm
statistics, attention softmax, rotary tables and MoE routing in float32, everything else in the half type,
state included), and the simulation is the same model run by torch in that type (activation mode `native`).

Refused with a reason: `-a8` (`mx.quantized_matmul` takes float activations; there is no int8-activation
kernel to simulate).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from lfm_export.contract.errors import UnsupportedError
from lfm_export.recipes import ACT_FLOAT, ACT_NATIVE, Recipe, parse_recipe, with_tables

DEFAULT_MAX_PREFILL = 128
"""Largest prefill chunk traced into `prefill.mlxfn` (chunks of 2, 4, ..., this; longer prompts are fed in
several calls). Each chunk size is one trace of the function in the file."""


DEFAULT_CONTEXT = 4096
"""Context declared when none is asked for (the model's if smaller). The KV cache is static (`max_seq_len`
positions, written at `input_pos`) and attention reads all of it every step, so a 32768-token default (the
core's) would cost every decode step the work of a 32k context; ask for more with `--max-seq-len`."""


@dataclass(frozen=True)
class MlxRecipe:
    recipe: Recipe = field(default_factory=Recipe)
    max_prefill: int | None = None
    mix_bits: ClassVar[tuple[int, ...]] = (3, 4, 8)
    """Bits a group of a precision mix may take (`lfm_export.budget.candidates`): `quantized_matmul` and
    `gather_qmm` take 2-6 and 8 bits; the budget offers 3 below the recipes' 4."""

    def quantized_bytes(
        self, shape: tuple[int, ...], bits: int, block: int, symmetric: bool, tied_table: bool
    ) -> int:
        """Safetensors bytes of a quantized `[rows, K]` weight as mlx-lm holds it: codes as one bit stream per
        row in uint32 words, a float32 scale and a float32 bias per group (symmetric or not); a tied table is
        one tensor (`tied_table` adds nothing)."""
        rows, k = int(np.prod(shape[:-1])), int(shape[-1])
        return rows * -(-k * bits // 32) * 4 + rows * (k // block) * 8

    def __post_init__(self) -> None:
        r = self.recipe
        if r.quantized and r.dtype != "fp32":
            raise UnsupportedError(
                f"{r.name}: MLX quantized recipes compute in fp32 here (the core quantizer's float32 scales)"
            )
        if r.activations != ACT_FLOAT:
            raise UnsupportedError(
                f"{r.name}: MLX's quantized_matmul takes float activations; "
                f"use {r.with_options(activations='float').name}"
            )
        if r.quantized and r.per_channel:
            raise UnsupportedError(
                f"{r.name}: MLX quantizes in groups of 32, 64 or 128; use {r.with_options(block_size=128).name}"
            )
        if r.quantized and r.head_bits != r.embedding_bits:
            raise UnsupportedError(
                f"{r.name}: mlx-lm ties the lm_head to the embedding (one table, one precision); give "
                f"--head-bits and --embedding-quant the same bits (got {r.head_bits} and "
                f"{r.embedding_bits or 'none'})"
            )
        if self.max_prefill is not None and self.max_prefill < 1:
            raise UnsupportedError(f"--max-prefill must be positive, got {self.max_prefill}")

    @classmethod
    def coerce(cls, recipe: MlxRecipe | Recipe | str) -> MlxRecipe:
        if isinstance(recipe, MlxRecipe):
            return recipe
        return cls(parse_recipe(recipe) if isinstance(recipe, str) else recipe)

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def activations(self) -> str:
        """`float` (fp32 compute), or `native` for fp16 / bf16: the whole model computes in that type."""
        return ACT_FLOAT if self.recipe.dtype == "fp32" else ACT_NATIVE

    @property
    def half(self) -> str | None:
        """`float16` / `bfloat16` (MLX's and torch's name) for fp16 / bf16 recipes, else None."""
        return {"fp16": "float16", "bf16": "bfloat16"}.get(self.recipe.dtype)

    def context(self, cfg: Any) -> int:
        """The declared context: `--max-seq-len`, else `DEFAULT_CONTEXT` capped at the model's."""
        return self.recipe.max_seq_len or min(cfg.max_position_embeddings, DEFAULT_CONTEXT)

    def prefill_sizes(self, context: int) -> list[int]:
        """Chunk sizes traced into `prefill.mlxfn`: powers of two from 2 up to `max_prefill` (and the context)."""
        top = min(self.max_prefill or DEFAULT_MAX_PREFILL, context)
        sizes, t = [], 2
        while t <= top:
            sizes.append(t)
            t *= 2
        return sizes

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.recipe.to_dict(),
            "max_prefill": self.max_prefill,
            "activation_rounding": self.activations,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MlxRecipe:
        return cls(Recipe.from_dict(d), d.get("max_prefill"))


def make_recipe(
    quant: str = "fp32",
    max_seq_len: int | None = None,
    max_prefill: int | None = None,
    embedding_quant: str | None = None,
    head_bits: int | None = None,
) -> MlxRecipe:
    """The recipe `lfm-export mlx --quant QUANT [--max-seq-len N] [--max-prefill N] [--embedding-quant 8|4]
    [--head-bits 8|4]` builds (the tables as `lfm_export.recipes.with_tables` reads those options)."""
    core = with_tables(parse_recipe(quant, max_seq_len=max_seq_len), embedding_quant, head_bits)
    return MlxRecipe(core, max_prefill)
