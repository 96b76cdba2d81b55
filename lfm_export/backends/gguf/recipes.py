"""GGUF recipes: the core `Recipe` as a GGUF file holds it, with llama.cpp's type names as aliases.

| `--quant` | core recipe | linears | token embedding (tied output) | what llama.cpp's CPU computes |
|---|---|---|---|---|
| `f32` / `fp32` | `fp32` | F32 | F32 | float32 |
| `f16` / `fp16` | `fp16` | F16 | F16 | linears' inputs rounded to fp16 (`ACT_FP16`) |
| `bf16` | `bf16` | BF16 | BF16 | linears' inputs rounded to bf16 (`ACT_BF16`); the router F32 holding bf16 values |
| `q8_0` / `int8-b32` | `int8-b32` | Q8_0 | Q8_0 | inputs of Q8_0 matmuls rounded to Q8_0 blocks |
| `q4_0` / `int4-b32` | `int4-b32` | Q4_0 | Q6_K (Q8_0 where its row is not a multiple of 256), as llama.cpp | inputs rounded to Q8_0 blocks (Q8_K into a Q6_K output) |
| `q4_k_m` | `int4-b32-asym` | Q4_K; Q6_K for attn_v / ffn_down on use_more_bits layers | Q6_K | Q8_K blocks into K-quants, Q8_0 into the fallbacks |
| `q5_k_m` | `int4-b32-asym` | Q5_K; Q6_K as in `q4_k_m` | Q6_K | as `q4_k_m` |
| `q6_k` | `int8-b32` | Q6_K | Q6_K | as `q4_k_m` |

K-quant mixes (`q4_k_m`, `q5_k_m`, `q6_k`): the core recipe says which tensors are quantized and the rounding;
the type of each is `lfm_export.precision.ggml_mix_type` (llama.cpp's rules for the mix), falling back where a
row is not a multiple of 256 as llama.cpp does: Q4_K to Q5_0, Q6_K to Q8_0, the output to Q8_0. `tiny` (hidden
128, FFN 384) therefore holds no K-quant at all. `q5_k_m`'s fallback, Q5_1 (fed Q8_1 activations, whose fp16
block sums no simulation mode here reproduces), is refused in one line before any work: `q5_k_m` takes models
whose quantized rows are all multiples of 256.

`-mse` (the core quantizer's rounding search) is accepted with either quantized recipe. Norms, the conv weights,
the MoE router and expert bias are F32 in every recipe (`lfm_export.precision`).

Refused before any work, each in one line: block sizes other than 32 and per-channel int8 (ggml's Q8_0 / Q4_0
blocks hold 32 values), `-asym` (Q4_0 / Q8_0 have no zero point), `-a8` (llama.cpp rounds activations its own
way, to Q8_0 blocks, whatever the recipe says), and the `_s` mixes (not implemented).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from lfm_export import calibrated
from lfm_export.contract.errors import UnsupportedError
from lfm_export.precision import LINEAR, block_as, held_as, rule_for
from lfm_export.recipes import (
    ACT_BF16,
    ACT_FLOAT,
    ACT_FP16,
    ACT_GGML_K,
    ACT_GGML_Q8_0,
    CALIBRATED_ROUNDINGS,
    MIX_SUPER_BLOCK,
    Recipe,
    parse_recipe,
)

GGML_NAMES = {"f32": "fp32", "f16": "fp16", "bf16": "bf16", "q8_0": "int8-b32", "q4_0": "int4-b32"}
"""llama.cpp's type names (as `llama-quantize` spells them) and the core recipe each is."""
NOT_YET = ("q4_k_s", "q5_k_s", "q4_k", "q5_k")
K_MIXES = {"q4_k_m": "int4-b32-asym", "q5_k_m": "int4-b32-asym", "q6_k": "int8-b32"}
"""llama.cpp's K-quant mixes and the core recipe each quantizes from (which tensors, the rounding)."""
MIX_FILE_TYPES = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
"""`general.file_type` of the mixes (`LLAMA_FTYPE_MOSTLY_Q4_K_M`, `MOSTLY_Q5_K_M`, `MOSTLY_Q6_K`)."""
ROUNDING_SUFFIXES = ("nearest", "mse", "fit", "imat", "gptq")
"""What a llama.cpp type name takes after a dash: the rounding inside its blocks (`-nearest`: the block's
extreme at the end code, as llama.cpp's reference quantizers without an importance matrix; the others as the
core's, `-imat` being the fit weighted by the calibrated inputs' mean square; `-gptq` the `-imat` scales with
the codes chosen on ggml's own grid by GPTQ, `lfm_export.rounding.gptq_on_grid`)."""
DEFAULT_ROUNDING = {"q4_0": "fit", "q4_k_m": "fit"}
"""The rounding a bare llama.cpp type name means (the rest: `nearest`)."""
ACTIVATIONS_BY_TYPE = {
    "Q3_K": ACT_GGML_K,
    "Q4_K": ACT_GGML_K,
    "Q5_K": ACT_GGML_K,
    "Q6_K": ACT_GGML_K,
    "Q8_0": ACT_GGML_Q8_0,
    "Q4_0": ACT_GGML_Q8_0,
    "Q5_0": ACT_GGML_Q8_0,
}
"""What llama.cpp's CPU quantizes the input of a matmul of each ggml type to (ggml-cpu's `vec_dot_type`): Q8_K
blocks for the K-quants, Q8_0 blocks for the 32-value types. The one place the simulation's activation mode of
a quantized GGUF tensor is decided."""
MIX_TYPES = {
    (3, MIX_SUPER_BLOCK): "Q3_K",
    (4, MIX_SUPER_BLOCK): "Q4_K",
    (5, MIX_SUPER_BLOCK): "Q5_K",
    (6, MIX_SUPER_BLOCK): "Q6_K",
    (8, 32): "Q8_0",
    (5, 32): "Q5_0",
}
"""The ggml type a precision mix entry `(bits, block)` names in a GGUF file (`--budget`): the K-quants as
(bits, 256), Q8_0 and the Q5_0 fallback as 32-value blocks; the budget's candidates, in this order. Q4_0 is not
offered: Q4_K holds 4 bits in the same 4.5 bits per weight with a finer scale and a min."""
OUTPUT_GROUPS = ("head+embedding", "head")
"""Budget groups holding llama.cpp's output tensor (the tied token table, or the untied lm_head): held at the
mix's output type, as llama.cpp holds it (`GGML_MIXES`' `output`: Q6_K, Q8_0 where its rows are not a multiple
of 256), never chosen."""
DEFAULT_CONTEXT = 4096
"""Context the manifest declares (and the runtime shim allocates) when none is asked for: llama.cpp allocates
its KV cache for the whole context at load time."""


def ggml_type(recipe: Recipe, bits: int | None) -> str:
    """The GGUF type name of a weight held at `bits` (None: float) in an artifact of `recipe`."""
    if bits is None:
        return {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}[recipe.dtype]
    return {8: "Q8_0", 4: "Q4_0"}[bits]


@dataclass(frozen=True)
class GgufRecipe:
    recipe: Recipe = field(default_factory=Recipe)
    mix: str | None = None
    """A K-quant mix (`K_MIXES`), None for the one-type recipes."""

    def __post_init__(self) -> None:
        r = self.recipe
        name = r.name
        if self.mix is not None:
            if self.mix not in K_MIXES or not r.quantized or r.activations != "float":
                raise UnsupportedError(f"{self.mix}: not a GGUF K-quant mix over {name}")
            return
        if not r.quantized:
            return
        if r.dtype != "fp32":
            raise UnsupportedError(f"{name}: GGUF quantized recipes keep their float tensors in fp32")
        if r.per_channel or r.block_size != 32:
            raise UnsupportedError(f"{name}: ggml's Q8_0 / Q4_0 blocks hold 32 values; use {r.quant}-b32")
        if not r.symmetric:
            raise UnsupportedError(f"{name}: ggml's Q8_0 / Q4_0 blocks have no zero point; drop -asym")
        if r.activations != "float":
            raise UnsupportedError(
                f"{name}: llama.cpp rounds the activations itself (to Q8_0 blocks); drop -a8"
            )

    @property
    def calibration_keeps_factors(self) -> bool:
        """`-gptq`: the calibration keeps each input's Hessian Cholesky factor, from which the GGUF writer and
        the simulation choose the codes on ggml's blocks (`lfm_export.calibrate.keeps_factors`)."""
        return self.recipe.rounding == "gptq"

    @classmethod
    def coerce(cls, recipe: GgufRecipe | Recipe | str) -> GgufRecipe:
        if isinstance(recipe, GgufRecipe):
            return recipe
        return make_recipe(recipe) if isinstance(recipe, str) else cls(recipe)

    @property
    def name(self) -> str:
        """llama.cpp's name for quantized recipes (`q4_0`, `q8_0-mse`: their parity gates are the GGUF ones,
        `gates.py`), the core name for float ones (`fp32`, `fp16`)."""
        r = self.recipe
        if not r.quantized:
            return r.name
        head = self.mix or self.ggml_name
        return head + ("" if r.rounding == DEFAULT_ROUNDING.get(head, "nearest") else f"-{r.rounding}")

    @property
    def activations(self) -> str:
        """What llama.cpp's CPU kernels do to the input of every linear that is not F32, before the types are
        known: fp16 rounding (F16 weights), bf16 rounding (BF16), Q8_0 blocks (Q8_0 / Q4_0: `ACT_GGML_Q8_0`),
        Q8_K blocks (a K-quant mix: `ACT_GGML_K`), none (F32). A quantized file's own, per tensor by its ggml
        type, is `activation_rounding`."""
        if self.mix is not None:
            return ACT_GGML_K
        if self.recipe.quantized:
            return ACT_GGML_Q8_0
        return {"fp16": ACT_FP16, "bf16": ACT_BF16}.get(self.recipe.dtype, ACT_FLOAT)

    def activation_rounding(self, types: dict[str, str]) -> str | dict[str, str]:
        """The activation rounding of a quantized file whose checkpoint tensors are held as `types` (ggml type
        names, `ggml_tensor_types`), decided by each linear's type (`ACTIVATIONS_BY_TYPE`): one mode where every
        linear takes the same, else `activations` per role with each tensor that differs named (a tied lm_head
        takes its token table's type)."""
        held = dict(types)
        if "lm_head.weight" not in held and "model.embed_tokens.weight" in held:
            held["lm_head.weight"] = held["model.embed_tokens.weight"]  # tied: llama.cpp's output reads it
        held.pop("model.embed_tokens.weight", None)  # a lookup, not a matmul
        modes = {name: ACTIVATIONS_BY_TYPE[kind] for name, kind in held.items()}
        if len(set(modes.values())) == 1:
            return next(iter(modes.values()))
        base = self.activations
        return dict.fromkeys(("linears", "experts", "head"), base) | {
            name: mode for name, mode in sorted(modes.items()) if mode != base
        }

    @property
    def ggml_name(self) -> str:
        """llama.cpp's name of the recipe (`f32`, `f16`, `q8_0`, `q4_0`, `q4_k_m`, `q6_k`)."""
        if self.mix is not None:
            return self.mix
        r = self.recipe
        return ggml_type(r, r.bits).lower()

    budget_sequence: ClassVar[int] = 1024
    """Tokens per row over which `--budget` measures each group's KL (the calibration text's 2048 tokens as two
    rows, not eight of the calibration's 256): a mix chosen on 256-token rows held 0.80x llama.cpp q4_k_m's
    held-out KL on positions 128-255 but 1.25x on positions 256-511 (`benchmarks/results/
    gguf_kl_paired_q3k_budget_ctx256_small.json`, `gguf_kl_paired_q3k_budget_small.json`)."""

    @property
    def mix_candidates(self) -> tuple[tuple[int, int], ...]:
        """The (bits, block) mix entries a group may take under `--budget` (`MIX_TYPES`): a K-quant mix only."""
        return tuple(MIX_TYPES) if self.mix is not None else ()

    def candidate_name(self, bits: int, block: int) -> str:
        """The manifest's word for mix entry `(bits, block)`: its ggml type."""
        return MIX_TYPES[(bits, block)]

    def may_hold(self, group: Any, bits: int, block: int) -> bool:
        """Whether budget group `group` (`lfm_export.budget.Group`, whose rows `block` divides) may be held as
        `MIX_TYPES[(bits, block)]`: the output at llama.cpp's output type only (`OUTPUT_GROUPS`); Q5_0 (the
        32-value fallback of Q4_K) only where a row is not a multiple of 256. A K-quant needs every row a
        multiple of 256 (the budget checks that the block divides the rows); llama.cpp's Q3_K fallback,
        IQ4_NL, is not written here, so such a group keeps to the 32-value types."""
        kind = MIX_TYPES[(bits, block)]
        super_blocks = all(shape[-1] % MIX_SUPER_BLOCK == 0 for shape in group.tensors.values())
        if group.name in OUTPUT_GROUPS:
            return kind == ("Q6_K" if super_blocks else "Q8_0")
        return kind != "Q5_0" or not super_blocks

    def quantized_bytes(
        self, shape: tuple[int, ...], bits: int, block: int, symmetric: bool, tied_table: bool
    ) -> int:
        """GGUF bytes of a `[rows, K]` weight held as `MIX_TYPES[(bits, block)]` (Q3_K: 110 bytes per 256
        values, Q4_K 144, Q5_K 176, Q6_K 210, Q8_0 34 per 32, Q5_0 22 per 32); a tied table is one tensor."""
        from lfm_export import ggml_kquants
        from lfm_export.ggml_blocks import BLOCK_TYPES

        name = MIX_TYPES[(bits, block)]
        kind = BLOCK_TYPES[name] if name in BLOCK_TYPES else ggml_kquants.K_TYPES[name]
        return int(np.prod(shape)) // kind.block * kind.block_bytes

    def mix_values(self, w: np.ndarray, core: Recipe, name: str, bits: int, block: int) -> np.ndarray:
        """The float32 values a file of `core` (a mix holding checkpoint tensor `name` at `(bits, block)`) holds
        for `w`: `MIX_TYPES`' type by the recipe's rounding, with the active calibration's importance and
        factor (what the budget measures a candidate with)."""
        from lfm_export import ggml_kquants
        from lfm_export.contract.session import DEFAULT_THREADS
        from lfm_export.ggml_blocks import BLOCK_TYPES, held_values

        kind = MIX_TYPES[(bits, block)]
        imp, factor = importance_for(w, core, name), factor_for(w, core, name)
        if kind in BLOCK_TYPES:
            return held_values(w, BLOCK_TYPES[kind].bits, core.rounding, DEFAULT_THREADS, imp, factor)
        kt = ggml_kquants.K_TYPES[kind]
        return ggml_kquants.held_values(w, kt, core.rounding, DEFAULT_THREADS, imp, factor)

    def context(self, cfg: Any) -> int:
        return self.recipe.max_seq_len or min(cfg.max_position_embeddings, DEFAULT_CONTEXT)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.recipe.to_dict(),
            "name": self.name,
            "core_recipe": self.recipe.name,
            "ggml_type": self.ggml_name,
            "ggml_mix": self.mix,
            "activation_rounding": self.activations,
        } | ({"calibration_keeps_factors": True} if self.calibration_keeps_factors else {})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GgufRecipe:
        return cls(Recipe.from_dict(d), d.get("ggml_mix"))


def importance_for(w: np.ndarray, recipe: Recipe, name: str) -> np.ndarray | None:
    """The calibrated importance `[K]` that weighs the fit of `w` (checkpoint tensor `name`) under an `-imat`
    recipe (None otherwise, or for a weight the calibration did not see: it is fitted unweighted). Read from the
    calibration table that is active while an artifact is exported or checked (`lfm_export.calibrated`), by
    the weight's content; a tensor the calibration never sees (`precision.LINEAR` is what it sees: not the
    token table or the output) is not looked up, so a streamed calibration is not run ahead for it."""
    if recipe.rounding not in CALIBRATED_ROUNDINGS or recipe.bits is None or rule_for(name) is not LINEAR:
        return None
    return calibrated.importance(w, *_table_key(w, recipe, name))


def _table_key(w: np.ndarray, recipe: Recipe, name: str) -> tuple[int, int]:
    """(bits, block) under which the calibration table holds weight `name`: its mix entry's where `recipe`
    holds a mix (`lfm_export.calibrate.calibrated_table` keys it so), else the recipe's."""
    return held_as(name, recipe) or recipe.bits or 0, block_as(name, recipe, w.shape[-1])


def factor_for(w: np.ndarray, recipe: Recipe, name: str) -> np.ndarray | None:
    """The Hessian Cholesky factor `[K, K]` from which a `-gptq` recipe chooses the codes of `w` on ggml's blocks
    (None otherwise, or for a weight the calibration did not see: its codes are the fit's), read as
    `importance_for` reads the importance."""
    if recipe.rounding != "gptq" or recipe.bits is None or rule_for(name) is not LINEAR:
        return None
    return calibrated.factor(w, *_table_key(w, recipe, name))


def make_recipe(quant: str = "f32", max_seq_len: int | None = None) -> GgufRecipe:
    """The recipe `lfm-export gguf --quant QUANT [--max-seq-len N]` builds (llama.cpp names or core names)."""
    raw = quant.strip().lower()
    if raw in NOT_YET:
        raise UnsupportedError(
            f"--quant {quant}: not supported by the GGUF backend yet; supported: {', '.join([*GGML_NAMES, *K_MIXES])} "
            "(and the core names int8-b32, int4-b32, with -mse, -fit or -imat)"
        )
    head, dash, rest = raw.partition("-")
    quantized = head in K_MIXES or head in ("q8_0", "q4_0")
    if quantized and rest not in ("", *ROUNDING_SUFFIXES):
        raise UnsupportedError(
            f"--quant {quant}: a llama.cpp type takes only a rounding: -{', -'.join(ROUNDING_SUFFIXES)}"
        )
    rounding = rest or DEFAULT_ROUNDING.get(head, "nearest")
    suffix = "" if rounding == "nearest" else f"-{rounding}"
    if head in K_MIXES:
        if head == "q5_k_m" and rounding == "mse":
            raise UnsupportedError(
                f"--quant {quant}: the core has no 5-bit -mse grid; use q5_k_m or q5_k_m-fit"
            )
        core = K_MIXES[head]
        if (
            rounding in CALIBRATED_ROUNDINGS
        ):  # the calibration's statistics only: the K-quant packing is ggml's
            core = core.replace("-asym", "")
        return GgufRecipe(parse_recipe(core + suffix, max_seq_len=max_seq_len), head)
    if quantized:
        return GgufRecipe(parse_recipe(GGML_NAMES[head] + suffix, max_seq_len=max_seq_len))
    core = GGML_NAMES[head] + dash + rest if head in GGML_NAMES else raw
    if core.startswith("q") and head not in GGML_NAMES:
        raise UnsupportedError(
            f"--quant {quant}: unknown; llama.cpp types supported: {', '.join([*GGML_NAMES, *K_MIXES])}"
        )
    return GgufRecipe(parse_recipe(core, max_seq_len=max_seq_len))
