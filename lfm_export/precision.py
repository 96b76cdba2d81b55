"""Which weight an artifact holds at which precision: one ordered rule list, read by the simulation
(`lfm_export.quant.simulate`), every backend and the manifest.

A quantized recipe holds each tensor as the first rule that matches its name says: the recipe's `bits`, its
`head_bits`, its `embedding_bits`, float (the artifact's float type), or, for a recipe with a precision mix
chosen to a budget (`Recipe.mix`, `lfm_export.budget`), the bits and block size its rule names (`CHOSEN`):
`rules(recipe)` puts those rules after the ones that keep a tensor float and before the rest. A float recipe holds every tensor
float. What a backend makes of "float" (fp32, Core ML's fp16) and of the bits (the core quantizer's blocks,
XNNPACK's bf16 scales, Core ML's per-channel table) is the backend's own and is said in its manifest section.

Names are the checkpoint's (`model.layers.3.feed_forward.gate.weight`). A pattern matches the name's words
joined by `.` or `_`, between word boundaries, so the names a backend derives from the checkpoint's match as
they are: ONNX initializers (`model.layers.3.feed_forward.gate.weight`, the transposed float copy
`....weight.T`), Core ML constants (`model_model_layers_3_feed_forward_gate_weight_to_fp16`). A weight a
backend finds by its place rather than its name (ONNX's lm_head, which reads the tied embedding table) is
asked for by its checkpoint name.

This module imports nothing that imports torch: the runtime-only installs and the recipe modules read it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lfm_export.contract.errors import UnsupportedError
from lfm_export.recipes import MIX_SUPER_BLOCK, PER_CHANNEL, Recipe

BITS = "bits"
HEAD = "head_bits"
EMBEDDING = "embedding_bits"
FLOAT = "float"
CHOSEN = "chosen"
HELD = (BITS, HEAD, EMBEDDING, FLOAT, CHOSEN)
"""What a rule holds a tensor as: the recipe's field of that name, float, or the rule's own `bits` and
`block` (a mix entry)."""
EVERY = "*"
"""The pattern of the last rule: every name no rule before it matched."""


@dataclass(frozen=True)
class Rule:
    """`pattern`: the checkpoint name's words (`.`-separated, a regex each), or `EVERY` for every name;
    `held`: one of `HELD`; `why`: the reason, written to the manifest; `bits` / `block`: a `CHOSEN` rule's."""

    pattern: str
    held: str
    why: str
    bits: int | None = None
    block: int | None = None

    def matches(self, name: str) -> bool:
        return self.pattern == EVERY or _compiled(self.pattern).search(name) is not None


def _compiled(pattern: str, _cache: dict[str, re.Pattern[str]] = {}) -> re.Pattern[str]:  # noqa: B006
    """`pattern` with each `.` matching `.` or `_`, bounded by a separator or the name's ends."""
    if pattern not in _cache:
        words = r"[._]".join(pattern.split("."))
        _cache[pattern] = re.compile(rf"(?:^|[._]){words}(?:$|[._])")
    return _cache[pattern]


ROUTER = Rule(
    "feed_forward.gate.weight",
    FLOAT,
    "MoE router: its top-k ranks the scores, which rounding would reorder (other experts chosen)",
)
EXPERT_BIAS = Rule(
    "feed_forward.expert_bias",
    FLOAT,
    "MoE expert bias: a float32 vector added to the router's scores before top-k",
)
CONV = Rule(
    "conv.conv.weight",
    FLOAT,
    "depthwise causal conv weight: 3 taps per channel, not a matmul",
)
NORM = Rule("[a-z_]*norm.weight", FLOAT, "RMSNorm weight: a vector, not a matmul")
BIAS = Rule("bias", FLOAT, "bias: a vector, not a matmul")
EMBEDDING_TABLE = Rule(
    "embed_tokens.weight",
    EMBEDDING,
    "embedding table: the recipe's embedding_bits (int8 in int4 recipes; only the rows looked up are read)",
)
LM_HEAD = Rule(
    "lm_head.weight",
    HEAD,
    "lm_head: the recipe's head_bits (int8 in int4 recipes: every logit reads all of it)",
)
LINEAR = Rule(EVERY, BITS, "linear weight (attention, conv projections, FFN, MoE experts): the recipe's bits")

RULES = (ROUTER, EXPERT_BIAS, CONV, NORM, BIAS, EMBEDDING_TABLE, LM_HEAD, LINEAR)
"""The precision policy, first match wins; the last rule matches every name."""
FLOAT_RULES = RULES[:5]
"""The rules that keep a tensor float whatever the recipe (a mix never overrides them)."""


def mix_rules(recipe: Recipe | None) -> tuple[Rule, ...]:
    """The `CHOSEN` rules of `recipe`'s precision mix (none without one)."""
    if recipe is None or not recipe.mix:
        return ()
    return tuple(
        Rule(pattern, CHOSEN, f"budget: {mix_word(bits, block)} chosen for this tensor group", bits, block)
        for pattern, bits, block in recipe.mix
    )


def mix_word(bits: int, block: int) -> str:
    """A mix entry's precision as the manifest writes it: `int4-b64`, `int8-pc` for block `PER_CHANNEL`, or the
    ggml K-quant a super-block entry names (`Q3_K`: `MIX_SUPER_BLOCK`)."""
    if block == MIX_SUPER_BLOCK:
        return f"Q{bits}_K"
    return f"int{bits}-" + ("pc" if block == PER_CHANNEL else f"b{block}")


def rules(recipe: Recipe | None = None) -> tuple[Rule, ...]:
    """The rule list of `recipe`: `RULES` with its mix rules after the float ones."""
    chosen = mix_rules(recipe)
    return (*FLOAT_RULES, *chosen, *RULES[len(FLOAT_RULES) :]) if chosen else RULES


def rule_for(name: str, recipe: Recipe | None = None) -> Rule:
    """The first rule of `rules(recipe)` matching tensor `name` (any spelling the module docstring lists)."""
    return next(rule for rule in rules(recipe) if rule.matches(name))


def held_as(name: str, recipe: Recipe) -> int | None:
    """The bits tensor `name` is held at in an artifact of `recipe`; None: float."""
    if not recipe.quantized:
        return None
    rule = rule_for(name, recipe)
    if rule.held == CHOSEN:
        return rule.bits
    return None if rule.held == FLOAT else getattr(recipe, rule.held)


def block_as(name: str, recipe: Recipe, k: int) -> int:
    """The block tensor `name` (input dimension `k`) is quantized in: its mix rule's (`k` for a per-channel
    one), else the recipe's."""
    rule = rule_for(name, recipe)
    if rule.held == CHOSEN and rule.block == PER_CHANNEL:
        return k
    return rule.block if rule.held == CHOSEN and rule.block else recipe.block_for(k)


def label(bits: int | None, recipe: Recipe, block: int | None = None) -> str:
    """The manifest's word for a tensor held at `bits` (in blocks of `block`, default the recipe's; a mix's
    `PER_CHANNEL`: per channel): `int4-b32`,
    `int8-pc`, `int4-b64-asym`, or `float`."""
    if bits is None:
        return FLOAT
    if block == MIX_SUPER_BLOCK:
        return mix_word(bits, block)
    if block == PER_CHANNEL:
        word = "pc"
    else:
        word = f"b{block}" if block else "pc" if recipe.per_channel else f"b{recipe.block_size}"
    return f"int{bits}-{word}" + ("" if recipe.symmetric else "-asym")


def manifest_entry(names: Iterable[str], recipe: Recipe | dict[str, Any]) -> dict[str, Any]:
    """The manifest's `precision` (empty for a recipe dict that is no core recipe, e.g. the QNN targets', whose
    quantizer is their own): every tensor `names` lists with what it is held as (`label`), and the rules with
    their reasons (a mix's rules with their bits and block)."""
    if isinstance(recipe, dict):
        try:
            recipe = Recipe.from_dict(recipe)
        except (UnsupportedError, TypeError):
            return {}

    def block(name: str) -> int | None:
        rule = rule_for(name, recipe)
        return rule.block if rule.held == CHOSEN else None

    entry: dict[str, Any] = {
        "tensors": {name: label(held_as(name, recipe), recipe, block(name)) for name in names},
        "rules": [
            {"match": r.pattern, "held": r.held, "why": r.why}
            | ({"bits": r.bits, "block_size": r.block} if r.held == CHOSEN else {})
            for r in rules(recipe)
        ],
    }
    if recipe.mix:
        entry["mix"] = [{"match": p, "held": mix_word(b, bs)} for p, b, bs in recipe.mix]
    return entry


# ---- llama.cpp's K-quant mixes (GGUF) --------------------------------------------------------------------------
# A GGUF K-quant recipe quantizes the tensors the rules above quantize; which ggml type each one gets is the
# first of these rules that matches its name, as llama.cpp's `llama_tensor_get_type` decides for the mix
# (`src/llama-quant.cpp`), then the 32-value fallback where a row is not a multiple of 256.

MIX_OUTPUT = "output"
MIX_MORE_BITS = "more_bits"
MIX_BASE = "base"
GGML_MIX_RULES = (
    Rule("lm_head.weight", MIX_OUTPUT, "output: every logit reads it; the mix's output type (Q6_K)"),
    Rule(
        "embed_tokens.weight",
        MIX_OUTPUT,
        "token embedding: llama.cpp quantizes a table tied to the output as the output",
    ),
    Rule(
        "self_attn.v_proj.weight",
        MIX_MORE_BITS,
        "attn_v: Q6_K on llama.cpp's use_more_bits attention layers (first and last eighth, every third "
        "between), counted over the attention layers",
    ),
    Rule(
        "w2.weight",
        MIX_MORE_BITS,
        "ffn_down (MoE experts' too): Q6_K on llama.cpp's use_more_bits layers, counted over all layers",
    ),
    Rule(EVERY, MIX_BASE, "the mix's base type"),
)
MIX_EIGHT_EXPERTS_KV = "eight_experts_kv"
MIX_EIGHT_EXPERTS_OUT = "eight_experts_out"
GGML_EIGHT_EXPERT_RULES = (
    Rule(
        "self_attn.k_proj.weight",
        MIX_EIGHT_EXPERTS_KV,
        "attn_k: Q8_0 in a model of exactly 8 experts, every mix (llama.cpp's `n_expert == 8` rule)",
    ),
    Rule(
        "self_attn.v_proj.weight",
        MIX_EIGHT_EXPERTS_KV,
        "attn_v: Q8_0 in a model of exactly 8 experts, every mix, use_more_bits layers too (llama.cpp's "
        "`n_expert == 8` rule)",
    ),
    Rule(
        "self_attn.out_proj.weight",
        MIX_EIGHT_EXPERTS_OUT,
        "attn_output: Q5_K in q4_k_m with exactly 8 experts (llama.cpp's `n_expert == 8` rule); where its row "
        "is not a multiple of 256 llama.cpp falls back to Q5_1, which this backend does not write: the base "
        "type's fallback (Q5_0, 2 bytes per 32 values smaller)",
    ),
)
"""llama.cpp's rules for a model of exactly 8 experts (`llama_tensor_get_type`, the non-IQ mixes), checked
before `GGML_MIX_RULES` (after the output / token table rules, which they never match)."""
_EIGHT = {MIX_EIGHT_EXPERTS_KV: "Q8_0"}
GGML_MIXES = {
    "q8_0": {MIX_BASE: "Q8_0", MIX_OUTPUT: "Q8_0", MIX_MORE_BITS: "Q8_0", MIX_EIGHT_EXPERTS_OUT: "Q8_0"}
    | _EIGHT,
    "q4_0": {MIX_BASE: "Q4_0", MIX_OUTPUT: "Q6_K", MIX_MORE_BITS: "Q4_0", MIX_EIGHT_EXPERTS_OUT: "Q4_0"}
    | _EIGHT,
    "q4_k_m": {MIX_BASE: "Q4_K", MIX_OUTPUT: "Q6_K", MIX_MORE_BITS: "Q6_K", MIX_EIGHT_EXPERTS_OUT: "Q5_K"}
    | _EIGHT,
    "q5_k_m": {MIX_BASE: "Q5_K", MIX_OUTPUT: "Q6_K", MIX_MORE_BITS: "Q6_K", MIX_EIGHT_EXPERTS_OUT: "Q5_K"}
    | _EIGHT,
    "q6_k": {MIX_BASE: "Q6_K", MIX_OUTPUT: "Q6_K", MIX_MORE_BITS: "Q6_K", MIX_EIGHT_EXPERTS_OUT: "Q6_K"}
    | _EIGHT,
}
"""Each mix's type per `GGML_MIX_RULES` / `GGML_EIGHT_EXPERT_RULES` hold (a `more_bits` tensor off the
use_more_bits layers: the base type).
`q8_0` / `q4_0` are llama.cpp's one-type files: every tensor at the base type but the output (and the token
table tied to it), which llama.cpp raises to Q6_K unless the mix's type is already Q8_0."""
GGML_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
"""llama.cpp's type for a row that is not a multiple of 256 (an output row: Q8_0 whatever the mix)."""
QK_K = 256
GGML_BLOCK = {"Q8_0": 32, "Q4_0": 32, "Q5_0": 32, "Q5_1": 32}
"""Values per block of the 32-value types (every other type in these mixes: `QK_K`)."""


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's `use_more_bits(i_layer, n_layers)`."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def ggml_mix_type(
    name: str, mix: str, row: int, layer_types: list[str], tied: bool = True, experts: int = 0
) -> str:
    """The ggml type of quantized tensor `name` (checkpoint name, row length `row`) in `mix` (a K-quant mix,
    or llama.cpp's one-type `q8_0` / `q4_0`) of a model whose layers are `layer_types` (`full_attention` /
    `conv`) with `experts` MoE experts (0: dense; exactly 8 adds `GGML_EIGHT_EXPERT_RULES`); an untied token
    table (`tied` False) is an ordinary tensor of the mix's base type, as llama.cpp holds it."""
    rules = GGML_MIX_RULES
    if experts == 8:
        rules = (*GGML_MIX_RULES[:2], *GGML_EIGHT_EXPERT_RULES, *GGML_MIX_RULES[2:])
    rule = next(r for r in rules if r.matches(name))
    held = rule.held
    if not tied and rule.pattern == "embed_tokens.weight":
        held = MIX_BASE
    if held == MIX_EIGHT_EXPERTS_OUT and row % QK_K:
        held = MIX_BASE  # llama.cpp's Q5_K -> Q5_1, not written here: the base type's fallback
    if held == MIX_MORE_BITS:
        m = re.search(r"layers\.(\d+)\.", name)
        layer = int(m[1]) if m else 0
        if "v_proj" in name:
            attention = [i for i, t in enumerate(layer_types) if t == "full_attention"]
            more = use_more_bits(attention.index(layer), len(attention)) if layer in attention else False
        else:
            more = use_more_bits(layer, len(layer_types))
        held = MIX_MORE_BITS if more else MIX_BASE
    kind = GGML_MIXES[mix][held]
    if row % GGML_BLOCK.get(kind, QK_K) == 0:
        return kind
    return "Q8_0" if held == MIX_OUTPUT else GGML_FALLBACK[kind]
