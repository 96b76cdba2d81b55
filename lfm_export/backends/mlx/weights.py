"""The weights in mlx-lm's layout, quantized by the core quantizer into MLX's affine format, and the binding
from the traced program's parameter names to them.

MLX's affine format is `w = scales * q + biases` per group along the input dimension, `q` unsigned. The core
quantizer's codes are unsigned with `w = (q - zero_point) * scale` (`lfm_export.quant`), so they fit as they
are: `scales = scale`, `biases = -scale * zero_point` (symmetric: zero point `2^(bits-1)`). The artifact
holds the very codes and scales `lfm_export.quant.simulate` dequantizes; the only difference is float32
rounding of `scale * q + bias` against `(q - zp) * scale` (at most 2.4e-7 relative per weight, measured on
`mx.dequantize`).

Names and layout are mlx-lm 0.32's `models/lfm2.py` / `lfm2_moe.py` after their `sanitize`: conv weight
`[H, L, 1]` (channels-last), MoE experts stacked as `feed_forward.switch_mlp.{gate,up,down}_proj` `[E, F, H]`,
dense FFNs of `lfm2_moe` named `gate_proj` / `up_proj` / `down_proj`, no `lm_head` (always tied: mlx-lm's
LFM2 has none).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from lfm_export.config import Lfm2Config
from lfm_export.contract.errors import UnsupportedError
from lfm_export.precision import block_as, held_as, rule_for
from lfm_export.quant import Quantized, quantize_weight
from lfm_export.recipes import Recipe

MOE_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


@dataclass(frozen=True)
class Binding:
    """Where the traced program's parameter finds its value among the MLX tensors: `name` (without the
    `.weight` / `.scales` / `.biases` suffix for a quantized weight), the expert row of a stacked MoE tensor,
    whether it is quantized (`bits`, `group_size`) and whether it is a conv weight (stored channels-last)."""

    name: str
    expert: int | None = None
    bits: int | None = None
    group_size: int | None = None
    conv: bool = False


def pack(q: Quantized) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(weight uint32 [N, K*bits/32], scales [N, K/g], biases [N, K/g])` in MLX's affine format from the core
    quantizer's codes: each row one little-endian bit stream, every code's `bits` bits low first, as
    `mx.quantize` packs (for 4 and 8 bits: whole codes per uint32; for 3: codes across word boundaries)."""
    n, k = q.codes.shape
    if 32 % q.bits:
        bits = np.unpackbits(q.codes[..., None], axis=-1, count=q.bits, bitorder="little")  # [N, K, bits]
        packed = np.packbits(bits.reshape(n, k * q.bits), axis=-1, bitorder="little").view("<u4")
    else:  # the same stream, a word at a time
        per = 32 // q.bits
        codes = q.codes.astype(np.uint32).reshape(n, k // per, per)
        shifts = (np.arange(per, dtype=np.uint32) * q.bits)[None, None, :]
        packed = np.bitwise_or.reduce(codes << shifts, axis=-1).astype(np.uint32)
    zp = q.zero_points.astype(np.float32) if q.zero_points is not None else np.float32(2 ** (q.bits - 1))
    biases = (-q.scales * zp).astype(np.float32)
    return packed, q.scales.astype(np.float32), biases


def mlx_name(cfg: Lfm2Config, name: str) -> tuple[str, int | None]:
    """mlx-lm's name for canonical tensor `name` and, for an expert's weight, its row in the stacked tensor."""
    m = re.match(r"(model\.layers\.\d+\.feed_forward)\.experts\.(\d+)\.(w[123])\.weight$", name)
    if m:
        return f"{m[1]}.switch_mlp.{MOE_NAMES[m[3]]}.weight", int(m[2])
    if cfg.is_moe:
        m = re.match(r"(model\.layers\.\d+\.feed_forward)\.(w[123])\.weight$", name)
        if m:
            return f"{m[1]}.{MOE_NAMES[m[2]]}.weight", None
    return name, None


def build(
    cfg: Lfm2Config, names: list[str], get: Callable[[str], Any], recipe: Recipe
) -> tuple[dict[str, np.ndarray], dict[str, Binding], list[dict[str, Any]]]:
    """The MLX tensors (numpy float32 / uint32; the caller casts floats to the recipe's dtype), the binding of
    every canonical name, and the tensors a quantized recipe leaves float, each with the reason."""
    if not cfg.tie_word_embeddings:
        raise UnsupportedError(
            "the MLX backend writes mlx-lm's LFM2 layout, which ties lm_head to the embedding"
        )
    if recipe.quantized and recipe.head_bits != recipe.embedding_bits:
        raise UnsupportedError(
            f"{recipe.name}: lm_head and embedding are one tied table in mlx-lm; their bits must be equal"
        )
    tensors: dict[str, np.ndarray] = {}
    bindings: dict[str, Binding] = {}
    stacked: dict[str, list[Any]] = {}
    kept: list[dict[str, Any]] = []
    for name in names:
        if name == "lm_head.weight":
            continue
        target, expert = mlx_name(cfg, name)
        bits = held_as(name, recipe)
        base = target.removesuffix(".weight")
        conv = ".conv.conv.weight" in name
        t = get(name)
        w = t.detach().float().numpy() if hasattr(t, "detach") else np.asarray(t, np.float32)
        block = block_as(name, recipe, w.shape[-1]) if bits else None
        bindings[name] = Binding(base if bits else target, expert, bits, block, conv)
        if bits:
            q = quantize_weight(w, recipe, bits, block=block)
            parts = dict(zip(("weight", "scales", "biases"), pack(q)))
        else:
            if conv:
                w = np.ascontiguousarray(w.transpose(0, 2, 1))
            parts = {"": w}
            if recipe.quantized:
                kept.append({"tensor": target, "why": rule_for(name).why})
        for suffix, value in parts.items():
            key = f"{base}.{suffix}" if suffix else target
            if expert is None:
                tensors[key] = value
            else:
                stacked.setdefault(key, [None] * cfg.num_experts)[expert] = value
    for key, rows in stacked.items():
        tensors[key] = np.stack(rows)
    bindings["lm_head.weight"] = bindings["model.embed_tokens.weight"]
    return tensors, bindings, kept


def bind(bindings: dict[str, Binding], weights: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(canonical name, value for `lower.MlxProgram.run`) for every binding, from the MLX arrays `weights`."""
    from .lower import ExpertWeight, QuantizedWeight

    stacks: dict[str, Any] = {}
    for name, b in bindings.items():
        if b.bits:
            value: Any = stacks.get(b.name)
            if value is None:
                parts = [weights[f"{b.name}.{s}"] for s in ("weight", "scales", "biases")]
                value = stacks[b.name] = QuantizedWeight(*parts, b.group_size, b.bits)
            yield name, value if b.expert is None else ExpertWeight(value, b.expert)
        else:
            w = weights[b.name]
            if b.expert is not None:
                yield name, ExpertWeight(w, b.expert)
                continue
            if b.conv:
                w = w.swapaxes(1, 2)  # back to torch's [C_out, C_in / groups, K]
            yield name, w
