"""Core ML recipes: a core `lfm_export.recipes.Recipe` plus the Core ML knobs (target, prefill shapes) and the
compression `coremltools.optimize.coreml` applies to the converted program.

| name | weights in the package | compute |
|---|---|---|
| `fp16` | fp16 | fp16, RMSNorm statistics and softmax fp32 |
| `int8` | int8 per output channel, symmetric (`constexpr_blockwise_shift_scale`) | fp16 (as above) |
| `int4-b32` (`int4`), `-b64`, `-b128` | int4 per block along the input dimension, symmetric; lm_head and embedding int8 per channel | fp16 |
| `palettize4`, `palettize6` | 4- / 6-bit k-means look-up tables per group of 16 output channels (`constexpr_lut_to_dense`); lm_head and embedding int8 per channel | fp16 |

Refused: `fp32` and `bf16` (coremltools 9.0 holds Core ML states in fp16 only: "State only support fp16
dtype", measured; an fp32 program would round its KV and conv state to fp16 between calls), `-asym`, `-mse`,
`-a8` (the compression is coremltools' own, symmetric, weight-only).

The lm_head and the embedding are one tied table in LFM2 and one constant in the program (read by the
`gather` of the embedding and the `linear` of the head), so they are compressed together, at int8 per channel
in every quantized recipe (the core recipes' `head_bits` / `embedding_bits` = 8).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from lfm_export.contract.errors import UnsupportedError
from lfm_export.recipes import ACT_FP16, ACT_FP16_ROUTED, Recipe, parse_recipe

from .palette import NAME as PALETTE_NAME

TARGETS = ("iOS18", "macOS15")
"""Deployment targets with Core ML states (iOS 18 / macOS 15 and later: `ct.StateType` needs them)."""
OLD_TARGETS = ("iOS15", "iOS16", "iOS17", "macOS12", "macOS13", "macOS14")
PALETTIZE = {"palettize4": 4, "palettize6": 6}
MOE_FORMS = ("sparse", "dense")
PALETTE_GROUP = 16
"""Output channels sharing one look-up table (`per_grouped_channel`)."""
DEFAULT_MAX_PREFILL = 64
"""Tokens one prediction takes at most when neither `--max-prefill` nor `--prefill-lengths` is given."""


@dataclass(frozen=True)
class CoreMLRecipe:
    """What a Core ML export produces: the core `recipe` (the weights' bits and block), `palettize` bits (4 / 6)
    or None, the deployment `target`, and the prefill shapes: `prefill_lengths` (enumerated shapes) or
    `max_prefill` (a range 1..N); neither: a range 1..`DEFAULT_MAX_PREFILL`."""

    recipe: Recipe = field(default_factory=lambda: Recipe(dtype="fp16"))
    palettize: int | None = None
    target: str = "iOS18"
    max_prefill: int | None = None
    prefill_lengths: tuple[int, ...] | None = None
    moe: bool = False
    """The model routes tokens to experts (set by the export): parity's gate allows a flipped expert."""
    moe_form: str = "sparse"
    """How a MoE model's experts run in the program: `sparse` (`modules.StackedMoE`: each token gathers its
    top-k experts' stacked weights) or `dense` (every expert on every token, the canonical dense form)."""

    def __post_init__(self) -> None:
        r = self.recipe
        if self.target not in TARGETS:
            why = "Core ML states (KV cache and conv state held in the model) need iOS 18 / macOS 15"
            raise UnsupportedError(f"--target {self.target}: {why}; use one of {', '.join(TARGETS)}")
        if r.dtype in ("fp32", "bf16") and not r.quantized:
            raise UnsupportedError(
                f"{r.dtype}: coremltools 9.0 holds Core ML states in fp16 only, so the Core ML backend exports "
                "fp16 compute; use fp16, int8, int4-b32, palettize4 or palettize6"
            )
        if r.quantized:
            if not r.symmetric or r.rounding != "nearest" or r.activations != "float":
                raise UnsupportedError(
                    f"{r.name}: Core ML compression here is coremltools' symmetric weight-only quantization "
                    "(no -asym, -mse, -a8)"
                )
        if self.moe_form not in MOE_FORMS:
            raise UnsupportedError(f"--moe-form {self.moe_form}: use one of {', '.join(MOE_FORMS)}")
        if self.max_prefill is not None and self.max_prefill < 1:
            raise UnsupportedError(f"--max-prefill must be positive, got {self.max_prefill}")
        if self.prefill_lengths is not None:
            if self.max_prefill is not None:
                raise UnsupportedError("give --prefill-lengths or --max-prefill, not both")
            if not self.prefill_lengths or min(self.prefill_lengths) < 1:
                raise UnsupportedError(
                    f"--prefill-lengths must be positive, got {list(self.prefill_lengths)}"
                )
            if 1 not in self.prefill_lengths:
                raise UnsupportedError(
                    "--prefill-lengths must include 1 (single-token decode; longer prompts are split into "
                    "the lengths given)"
                )

    # ---- what the pipeline reads ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        if self.palettize:
            return f"palettize{self.palettize}"
        if self.recipe.quantized and self.recipe.bits == 8:
            return "int8"
        return self.recipe.name

    @property
    def activations(self) -> str:
        """`simulation()`'s activation mode: a Core ML program computes in fp16 (`lfm_export.quant` rounds the
        quantized linears' inputs to fp16; the parity gates are the `-fp16` ones); `fp16-routed` for a model
        with MoE routing (gates `-fp16-moe`: an expert chosen differently under fp16 rounding is allowed, see
        `lfm_export.parity.thresholds`)."""
        return ACT_FP16_ROUTED if self.moe else ACT_FP16

    @property
    def linears(self) -> str:
        """How the linears' weights are held (for the manifest and the report)."""
        r = self.recipe
        if self.palettize:
            return f"palettized {self.palettize}-bit (k-means LUT per {PALETTE_GROUP} output channels)"
        if r.quantized and r.bits == 8:
            return "int8 per output channel, symmetric"
        if r.quantized:
            return f"int4 per block of {r.block_size} along the input dimension, symmetric"
        return "fp16"

    def shapes(self, context: int) -> tuple[int, ...]:
        """Allowed token counts per prediction: the enumerated lengths, or (1, N) for a range 1..N."""
        if self.prefill_lengths is not None:
            too_long = [n for n in self.prefill_lengths if n > context]
            if too_long:
                raise UnsupportedError(
                    f"--prefill-lengths {max(too_long)} exceeds the context ({context} tokens, --max-seq-len)"
                )
            return tuple(sorted(set(self.prefill_lengths)))
        if self.max_prefill is not None and self.max_prefill > context:
            raise UnsupportedError(
                f"--max-prefill {self.max_prefill} exceeds the context ({context} tokens, --max-seq-len)"
            )
        return (1, min(self.max_prefill or DEFAULT_MAX_PREFILL, context))

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.recipe.to_dict(),
            "name": self.name,
            "palettize": self.palettize,
            "palette": PALETTE_NAME if self.palettize else None,
            "linears": self.linears,
            "head_and_embedding": "int8 per channel" if self.recipe.quantized else "fp16",
            "compute": "fp16 (RMSNorm statistics, softmax and MoE routing fp32)",
            "target": self.target,
            "max_prefill": self.max_prefill,
            "prefill_lengths": list(self.prefill_lengths) if self.prefill_lengths else None,
            "activation_rounding": self.activations,
            "moe": self.moe,
            "moe_form": self.moe_form,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CoreMLRecipe:
        lengths = d.get("prefill_lengths")
        return cls(
            Recipe.from_dict(d),
            d.get("palettize"),
            d.get("target", "iOS18"),
            d.get("max_prefill"),
            tuple(lengths) if lengths else None,
            bool(d.get("moe", False)),
            d.get("moe_form", "dense"),
        )

    @classmethod
    def coerce(cls, recipe: CoreMLRecipe | Recipe | str) -> CoreMLRecipe:
        if isinstance(recipe, CoreMLRecipe):
            return recipe
        if isinstance(recipe, str):
            return make_recipe(recipe)
        return cls(recipe)


def make_recipe(
    quant: str = "fp16",
    max_seq_len: int | None = None,
    target: str = "iOS18",
    max_prefill: int | None = None,
    prefill_lengths: str | None = None,
    moe_form: str | None = None,
) -> CoreMLRecipe:
    """The recipe `lfm-export coreml --quant QUANT [--target T] [--max-seq-len N] [--max-prefill N |
    --prefill-lengths 1,16,64]` builds."""
    key = quant.strip().lower()
    lengths = _lengths(prefill_lengths) if prefill_lengths is not None else None
    longest = max(lengths or [max_prefill or 0])
    if max_seq_len is not None and longest > max_seq_len:
        flag = "--prefill-lengths" if lengths else "--max-prefill"
        raise UnsupportedError(f"{flag} {longest} exceeds the context ({max_seq_len} tokens, --max-seq-len)")
    if key in PALETTIZE:
        core = parse_recipe("int4-b32", max_seq_len=max_seq_len)
        return CoreMLRecipe(core, PALETTIZE[key], target, max_prefill, lengths, moe_form=moe_form or "sparse")
    core = parse_recipe(quant, max_seq_len=max_seq_len)
    if core.quantized and core.bits == 8 and key not in ("int8", "q8"):
        raise UnsupportedError(f"{quant}: Core ML int8 is per output channel here; use --quant int8")
    return CoreMLRecipe(core, None, target, max_prefill, lengths, moe_form=moe_form or "sparse")


def _lengths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise UnsupportedError(
            f"--prefill-lengths {text!r}: expected comma-separated integers such as 1,16,64"
        ) from None


def with_shapes(recipe: CoreMLRecipe, **changes: Any) -> CoreMLRecipe:
    return replace(recipe, **changes)
