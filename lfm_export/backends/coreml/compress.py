"""Weight compression with `coremltools.optimize.coreml`, from a `CoreMLRecipe`, and the values it leaves, for
the parity simulation (`weight_values`).

Which constants are compressed is decided per constant (`plan`): the weights of every linear
(`linear` / `matmul` consumers; the MoE experts included) get the recipe's compression; the tied
embedding / lm_head table (read by a `gather` and a `linear`) int8 per channel; what `lfm_export.precision`
holds float (the MoE router, the depthwise conv weights, norms) stays fp16, and so do rotary constants and
anything else. The report (`manifest["coreml"]["compression"]`) lists each constant with what it became and
why.

The compressed constants are built as the weights are written (`encoder`, called by `weights.fill` for each
placeholder constant in turn): the op coremltools' own pass would build (`constexpr_blockwise_shift_scale`
from `linear_quantize_weights.blockwise_compress_by_dtype` and `_create_constexpr_var`, `constexpr_lut_to_dense`
from `palettize_weights.blockwise_compress` and `_construct_constexpr_lut_op`), with the block sizes its
`infer_block_sizes` gives for the same config, from one tensor (or one expert of a stacked constant) at a
time. Why: compressing afterwards needs the whole program in fp16 first, 2 bytes per parameter (16.6 GB for
`random:lfm2-8b-a1b`). `tests/test_coreml_compress.py` checks ops, codes, scales and tables against
coremltools' passes run on the fp16 program. Stacked experts are quantized and palettized per expert (one
table per expert and 16 output channels: coremltools' palettization groups one axis only, the op itself
takes blocks on several).

`weight_values(recipe)` gives `lfm_export.quant.simulate` the values the program holds: the same coremltools
functions (`linear_quantize_weights.blockwise_compress`, `palettize_weights.blockwise_compress` with
`palette.lut_function`, then their `decompress`), on the fp16 weight. The interpreter decodes the saved
package's constexpr ops with its own code, which the exactness check compares.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lfm_export.contract.errors import UserError
from lfm_export.precision import EMBEDDING, FLOAT, rule_for

from .palette import NAME as PALETTE_NAME
from .palette import lut_function
from .recipes import PALETTE_GROUP, CoreMLRecipe

LINEAR_CONSUMERS = frozenset({"linear", "matmul"})


def _experts_config(recipe: CoreMLRecipe) -> Any:
    """The linear recipe on a stacked `[E, out, in]` constant: the same blocks as on each expert's `[out, in]`
    (one scale per expert and output row, over the whole row (int8) or per `block` inputs (int4))."""
    import coremltools.optimize.coreml as cto

    bits = recipe.recipe.bits or 8
    return cto.OpLinearQuantizerConfig(
        mode="linear_symmetric",
        dtype="int8" if bits == 8 else "int4",
        granularity="per_block",
        block_size=[1, 1, 0 if bits == 8 else recipe.recipe.block_size],
        weight_threshold=1,
    )


def _linear_config(recipe: CoreMLRecipe, bits: int) -> Any:
    import coremltools.optimize.coreml as cto

    if bits == 8:
        return cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=1
        )
    return cto.OpLinearQuantizerConfig(
        mode="linear_symmetric",
        dtype="int4",
        granularity="per_block",
        block_size=recipe.recipe.block_size,
        weight_threshold=1,
    )


def _palette_config(recipe: CoreMLRecipe) -> Any:
    """One look-up table per `PALETTE_GROUP` output channels, made by `palette.kmeans_1d`."""
    import coremltools.optimize.coreml as cto

    return cto.OpPalettizerConfig(
        mode="custom",
        lut_function=lut_function(recipe.palettize or 4),
        granularity="per_grouped_channel",
        group_size=PALETTE_GROUP,
        weight_threshold=1,
    )


def plan(program: Any) -> dict[str, tuple[str, str]]:
    """`{const name: (role, why)}` for every constant of 2 or more dimensions in the program's main function;
    role is `linear`, `embedding` or `keep`."""
    out: dict[str, tuple[str, str]] = {}
    for op in program.functions["main"].operations:
        if op.op_type != "const" or op.outputs[0].rank < 2:
            continue
        name = op.name.replace(".", "_")  # as the serializer will name it
        users = {c.op_type for c in op.outputs[0].child_ops}
        rule = rule_for(name)  # `lfm_export.precision`: a const is named after its checkpoint tensor
        if rule.held == EMBEDDING:
            out[name] = (
                "embedding",
                "tied embedding / lm_head table: int8 per channel in every quantized recipe",
            )
        elif rule.held == FLOAT:
            out[name] = ("keep", rule.why)
        elif users and users <= LINEAR_CONSUMERS:
            out[name] = ("linear", "linear weight")
        elif users == {"gather"} and op.outputs[0].rank == 3 and "feed_forward" in name:
            out[name] = (
                "experts",
                "stacked MoE expert weights [E, out, in], gathered per token (sparse form)",
            )
        else:
            why = (
                "depthwise conv weight"
                if "conv" in users
                else f"not a linear weight (read by {sorted(users)})"
            )
            out[name] = ("keep", why)
    return out


def configs(program: Any, recipe: CoreMLRecipe) -> dict[str, tuple[str, str, Any]]:
    """`{const op name: (role, why, coremltools op config or None)}` for every constant `plan` lists: the
    config coremltools' own pass would be given for it (None: it stays fp16)."""
    out: dict[str, tuple[str, str, Any]] = {}
    op_names = {
        op.name.replace(".", "_"): op.name
        for op in program.functions["main"].operations
        if op.op_type == "const"
    }
    quantized = recipe.recipe.quantized
    for name, (role, why) in plan(program).items():
        config = None
        if quantized and role == "embedding":
            config = _linear_config(recipe, 8)
        elif quantized and role == "linear":
            config = (
                _palette_config(recipe)
                if recipe.palettize
                else _linear_config(recipe, recipe.recipe.bits or 8)
            )
        elif quantized and role == "experts":
            config = _palette_config(recipe) if recipe.palettize else _experts_config(recipe)
        out[op_names[name]] = (role, why, config)
    return out


def _linear_var(op: Any, config: Any, parts: list[np.ndarray]) -> Any:
    """`constexpr_blockwise_shift_scale` of `parts` (one array, or the experts of a stacked constant, each
    quantized alone with the blocks of its own axes), as coremltools' `linear_quantize_weights` builds it."""
    from coremltools.optimize import _utils as optimize_utils
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights as lq

    blocks = optimize_utils.infer_block_sizes(op, config, op.outputs[0].val)
    stacked = len(blocks) == parts[0].ndim + 1
    each = blocks[1:] if stacked else blocks
    data = scale = None
    for i, part in enumerate(parts):
        params = lq.blockwise_compress_by_dtype(part, config.dtype, config.mode.upper(), each)
        if params is None or params.offset is not None:
            raise RuntimeError(f"{op.name}: coremltools cannot quantize it with blocks {blocks}")
        if not stacked:
            data, scale = params.data, params.scale
            break
        if data is None:
            data = np.empty((len(parts), *params.data.shape), params.data.dtype)
            scale = np.empty((len(parts), *params.scale.shape), params.scale.dtype)
        data[i], scale[i] = params.data, params.scale
        parts[i] = None  # type: ignore[call-overload]
    params = optimize_utils.QuantParams(data=data, scale=scale, offset=None, nbits=params.nbits)
    return lq._create_constexpr_var(op, params)


def _palette_var(op: Any, config: Any, parts: list[np.ndarray], nbits: int) -> Any:
    """`constexpr_lut_to_dense` of `parts` (one array, or the experts of a stacked constant: one table per
    expert and group of output channels, a block of 1 on the expert axis), as coremltools' `palettize_weights`
    builds it for one array."""
    from coremltools.converters.mil.frontend._utils import _construct_constexpr_lut_op
    from coremltools.optimize import _utils as optimize_utils
    from coremltools.optimize.coreml._quantization_passes import palettize_weights as pw

    stacked = op.outputs[0].rank == parts[0].ndim + 1
    if stacked:  # each expert as the dense form's linear: groups along its output channels
        blocks, axis = [PALETTE_GROUP, 0], 0
    else:
        blocks, axis = optimize_utils.infer_block_sizes(
            op, config, op.outputs[0].val, return_channel_axis=True
        )
    indices = lut = None
    for i, part in enumerate(parts):
        params = pw.blockwise_compress(part, "CUSTOM", None, blocks, lut_function(nbits), channel_axis=axis)
        if params is None:
            raise RuntimeError(f"{op.name}: coremltools cannot palettize it with blocks {blocks}")
        if not stacked:
            indices, lut = params.indices, params.lut
            break
        if indices is None:
            indices = np.empty((len(parts), *params.indices.shape), params.indices.dtype)
            lut = np.empty((len(parts), *params.lut.shape), params.lut.dtype)
        indices[i], lut[i] = params.indices, params.lut
        parts[i] = None  # type: ignore[call-overload]
    return _construct_constexpr_lut_op(indices, lut, None, name=op.name + "_palettized", before_op=op)


def encoder(program: Any, recipe: CoreMLRecipe) -> tuple[Any, dict[str, dict[str, str]]]:
    """`(encode, report)`: `encode(op, parts) -> Var` builds the compressed (or plain) constant that replaces
    the placeholder `op`, from `parts` (its tensor, or a stacked constant's experts, in the dtype the program
    holds it in), one constant at a time, so no uncompressed copy of the whole model is ever held; the report
    `{const: {"as": ..., "why": ...}}` for the manifest. Built before the weights are written (`plan` reads
    the program's consumers of each placeholder)."""
    from coremltools.converters.mil.mil import Builder as mb

    decided = configs(program, recipe)

    def encode(op: Any, parts: list[np.ndarray]) -> Any:
        role_why_config = decided.get(op.name)
        config = role_why_config[2] if role_why_config else None
        if config is None:
            value = parts[0] if len(parts) == 1 and op.outputs[0].rank == parts[0].ndim else np.stack(parts)
            return mb.const(val=value, before_op=op, name=op.name + "_filled")
        if recipe.palettize and role_why_config[0] in ("linear", "experts"):
            return _palette_var(op, config, parts, recipe.palettize)
        return _linear_var(op, config, parts)

    report: dict[str, dict[str, str]] = {}
    for name, (role, why, config) in decided.items():
        name = name.replace(".", "_")
        if config is None:
            report[name] = {"as": "fp16", "why": "float recipe" if not recipe.recipe.quantized else why}
        elif role == "embedding":
            report[name] = {"as": "int8 per channel, symmetric", "why": why}
        else:
            report[name] = {"as": recipe.linears, "why": why}
    return encode, report


def weight_values(recipe_dict: dict[str, Any]) -> Any:
    """`(w [N, K] float32, bits) -> values` for `lfm_export.quant.simulate`: bits 8 (the lm_head / embedding,
    and the linears of `int8`) int8 per channel; bits 4 the recipe's int4 blocks or palettization."""
    recipe = CoreMLRecipe.from_dict(recipe_dict)
    if recipe.palettize and recipe_dict.get("palette") != PALETTE_NAME:
        raise UserError(
            "this palettized package's look-up tables were made by scikit-learn's k-means (before "
            f"{PALETTE_NAME}); its parity cannot be simulated any more: export it again"
        )

    from lfm_export.runtime.coreml_interpreter import import_coremltools

    import_coremltools()

    def values(w: np.ndarray, bits: int, name: str = "") -> np.ndarray:
        from coremltools.optimize.coreml._quantization_passes import (
            linear_quantize_weights,
            palettize_weights,
        )

        w16 = np.asarray(w, dtype=np.float32).astype(np.float16)
        if bits == 4 and recipe.palettize:
            params = palettize_weights.blockwise_compress(
                w16, "CUSTOM", None, [PALETTE_GROUP, 0], lut_function(recipe.palettize)
            )
            dense = palettize_weights.decompress(params)
        else:
            blocks = [1, 0] if bits == 8 else [1, recipe.recipe.block_size]
            params = linear_quantize_weights.blockwise_compress(
                w16, 8 if bits == 8 else 4, "LINEAR_SYMMETRIC", True, blocks
            )
            dense = linear_quantize_weights.decompress(params)
        return np.asarray(dense, dtype=np.float16).astype(np.float32)

    return values
