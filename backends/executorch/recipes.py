"""ExecuTorch recipes: a core `lfm_export.recipes.Recipe` plus the ExecuTorch knob `max_prefill`.

Supported: `fp32`, and `int4-bN-a8` (`8da4w` = `int4-b32-a8`), which XNNPACK runs with int8 activations
(torchao's 8da4w form, per-token asymmetric int8 activations: `lfm_export.quant`'s `int8-token`).

Refused with a pointer: fp16 / bf16 (not built yet); weight-only int4 / int8 (XNNPACK's quantized linears take
int8 activations: use `-a8`); `-asym` and `-mse` (the weights are torchao's symmetric int4 with bf16 scales, see
`quantize.py`); `int8-bN-a8` (`8da8w`): ExecuTorch 1.5.1's XNNPACK partitioner lowers int8
weights only per output channel, not in blocks ("Only 4b group quantization is supported", measured), and the
core recipe has no per-channel block.

The lm_head and the embedding table stay float32 (`head_bits` / `embedding_bits` None in the recipe the
artifact records, so the simulation holds what the artifact holds): an int8 lm_head in blocks of 32 is the
case XNNPACK refuses above, and the quantized embedding (`quantized_decomposed::embedding_byte`) is not built.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from lfm_export.errors import UnsupportedError
from lfm_export.recipes import ACT_FLOAT, ACT_INT8_TOKEN, Recipe, parse_recipe

DEFAULT_MAX_PREFILL = 128
"""Tokens one `forward` call takes at most (the runtime shim and ExecuTorch's runner chunk longer prompts).
Activations are planned for this many tokens, so it bounds the program's working memory (logits alone are
`max_prefill x vocab x 4` bytes)."""


@dataclass(frozen=True)
class ExecuTorchRecipe:
    """What an ExecuTorch export produces: the core `recipe` and `max_prefill` (None: `DEFAULT_MAX_PREFILL`,
    at most the context)."""

    recipe: Recipe = field(default_factory=Recipe)
    max_prefill: int | None = None

    def __post_init__(self) -> None:
        r = self.recipe
        if r.dtype != "fp32":
            raise UnsupportedError(f"{r.name}: the ExecuTorch backend exports fp32 or int4/int8 -a8 recipes")
        if r.quantized:
            if r.bits == 8:
                raise UnsupportedError(
                    f"{r.name}: ExecuTorch's XNNPACK lowers int8 weights per channel only, not in blocks; "
                    "use int4-b32-a8 (8da4w) or fp32"
                )
            if r.activations != "int8":
                raise UnsupportedError(
                    f"{r.name}: XNNPACK's quantized linears take int8 activations; use "
                    f"{r.with_options(activations='int8').name} (alias 8da{r.bits}w for block 32)"
                )
            if not r.symmetric or r.rounding != "nearest":
                raise UnsupportedError(
                    f"{r.name}: the ExecuTorch backend quantizes symmetric weights with plain rounding "
                    "(no -asym, no -mse)"
                )
        if r.head_bits is not None or r.embedding_bits is not None:
            raise UnsupportedError(f"{r.name}: the ExecuTorch backend keeps the lm_head and embedding float")
        if self.max_prefill is not None and self.max_prefill < 1:
            raise UnsupportedError(f"--max-prefill must be positive, got {self.max_prefill}")

    @classmethod
    def coerce(cls, recipe: ExecuTorchRecipe | Recipe | str) -> ExecuTorchRecipe:
        if isinstance(recipe, ExecuTorchRecipe):
            return recipe
        if isinstance(recipe, str):
            recipe = parse_recipe(recipe)
        return cls(float_head(recipe))

    # ---- what the pipeline reads ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def activations(self) -> str:
        """`int8-token` for `-a8` recipes (torchao / XNNPACK dynamic per-token int8), else `float`."""
        return ACT_INT8_TOKEN if self.recipe.quantized else ACT_FLOAT

    @property
    def simulated(self) -> Recipe:
        """The core recipe whose weights the artifact holds (the same as `recipe`: its head and embedding
        fields already say what the export did)."""
        return self.recipe

    def prefill_for(self, context: int) -> int:
        return min(self.max_prefill or DEFAULT_MAX_PREFILL, context)

    def with_recipe(self, **changes: Any) -> ExecuTorchRecipe:
        return replace(self, recipe=self.recipe.with_options(**changes))

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.recipe.to_dict(),
            "max_prefill": self.max_prefill,
            "delegate": "xnnpack",
            "activation_rounding": self.activations,
            "weight_values": "xnnpack-int4 (torchao symmetric, bf16 scales)"
            if self.recipe.quantized
            else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExecuTorchRecipe:
        return cls(Recipe.from_dict(d), d.get("max_prefill"))


def make_recipe(
    quant: str = "fp32", max_seq_len: int | None = None, max_prefill: int | None = None
) -> ExecuTorchRecipe:
    """The recipe `lfm-export executorch --quant QUANT [--max-seq-len N] [--max-prefill N]` builds."""
    return ExecuTorchRecipe(float_head(parse_recipe(quant, max_seq_len=max_seq_len)), max_prefill)


def float_head(recipe: Recipe) -> Recipe:
    """`recipe` with the lm_head and embedding float (what this backend holds; see the module doc)."""
    return recipe.with_options(head_bits=None, embedding_bits=None)
