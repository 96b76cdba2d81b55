"""Which weight an artifact holds at which precision: one ordered rule list, read by the simulation
(`lfm_export.quant.simulate`), every backend and the manifest.

A quantized recipe holds each tensor as the first rule that matches its name says: the recipe's `bits`, its
`head_bits`, its `embedding_bits`, or float (the artifact's float type). A float recipe holds every tensor
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
from lfm_export.recipes import Recipe

BITS = "bits"
HEAD = "head_bits"
EMBEDDING = "embedding_bits"
FLOAT = "float"
HELD = (BITS, HEAD, EMBEDDING, FLOAT)
"""What a rule holds a tensor as: the recipe's field of that name, or float."""
EVERY = "*"
"""The pattern of the last rule: every name no rule before it matched."""


@dataclass(frozen=True)
class Rule:
    """`pattern`: the checkpoint name's words (`.`-separated, a regex each), or `EVERY` for every name;
    `held`: one of `HELD`; `why`: the reason, written to the manifest."""

    pattern: str
    held: str
    why: str

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


def rule_for(name: str) -> Rule:
    """The first rule of `RULES` matching tensor `name` (any spelling the module docstring lists)."""
    return next(rule for rule in RULES if rule.matches(name))


def held_as(name: str, recipe: Recipe) -> int | None:
    """The bits tensor `name` is held at in an artifact of `recipe`; None: float."""
    if not recipe.quantized:
        return None
    held = rule_for(name).held
    return None if held == FLOAT else getattr(recipe, held)


def label(bits: int | None, recipe: Recipe) -> str:
    """The manifest's word for a tensor held at `bits`: `int4-b32`, `int8-pc`, `int4-b64-asym`, or `float`."""
    if bits is None:
        return FLOAT
    block = "pc" if recipe.per_channel else f"b{recipe.block_size}"
    return f"int{bits}-{block}" + ("" if recipe.symmetric else "-asym")


def manifest_entry(names: Iterable[str], recipe: Recipe | dict[str, Any]) -> dict[str, Any]:
    """The manifest's `precision` (empty for a recipe dict that is no core recipe, e.g. the QNN targets', whose
    quantizer is their own): every tensor `names` lists with what it is held as (`label`), and the rules with
    their reasons."""
    if isinstance(recipe, dict):
        try:
            recipe = Recipe.from_dict(recipe)
        except (UnsupportedError, TypeError):
            return {}
    return {
        "tensors": {name: label(held_as(name, recipe), recipe) for name in names},
        "rules": [{"match": r.pattern, "held": r.held, "why": r.why} for r in RULES],
    }
