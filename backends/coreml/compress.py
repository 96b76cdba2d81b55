"""Weight compression with `coremltools.optimize.coreml`, from a `CoreMLRecipe`, and the values it leaves, for
the parity simulation (`weight_values`).

Which constants are compressed is decided per constant (`plan`): the weights of every linear
(`linear` / `matmul` consumers; the MoE experts included) get the recipe's compression; the tied
embedding / lm_head table (read by a `gather` and a `linear`) int8 per channel; the MoE router stays fp16
(rounding must not change which experts are chosen), and so do the depthwise conv weights (3 values per
channel), norms, rotary constants and anything else. The report (`manifest["coreml"]["compression"]`) lists
each constant with what it became and why.

`weight_values(recipe)` gives `lfm_export.quant.simulate` the values the program holds: the same coremltools
functions the optimizer applies to each constant (`linear_quantize_weights.blockwise_compress`,
`palettize_weights.blockwise_compress`, then their `decompress`), on the fp16 weight the program holds
before compression. Palettization is k-means with scikit-learn's `random_state=0`, so it is repeatable. The
interpreter decodes the saved package's constexpr ops with its own code, which the exactness check compares.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .recipes import PALETTE_GROUP, CoreMLRecipe

EMBED_WEIGHT = "embed_tokens_weight"
ROUTER_WEIGHT = "feed_forward_gate_weight"
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
    import coremltools.optimize.coreml as cto

    return cto.OpPalettizerConfig(
        mode="kmeans",
        nbits=recipe.palettize,
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
        if EMBED_WEIGHT in name:
            out[name] = (
                "embedding",
                "tied embedding / lm_head table: int8 per channel in every quantized recipe",
            )
        elif ROUTER_WEIGHT in name:
            out[name] = ("keep", "MoE router: rounding must not change which experts are chosen")
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


def compress(program: Any, recipe: CoreMLRecipe) -> dict[str, dict[str, str]]:
    """Compress `program`'s weights in place as `recipe` says (coremltools' compression passes, applied to the
    program directly: `cto.linear_quantize_weights(mlmodel)` would first read the whole saved package back
    from disk); the report `{const: {"as": ..., "why": ...}}`. A float recipe leaves the program unchanged."""
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    roles = plan(program)
    op_names = {
        op.name.replace(".", "_"): op.name
        for op in program.functions["main"].operations
        if op.op_type == "const"
    }
    if not recipe.recipe.quantized:
        return {n: {"as": "fp16", "why": "float recipe"} for n in roles}
    linear_names = [n for n, (r, _) in roles.items() if r == "linear"]
    embed_names = [n for n, (r, _) in roles.items() if r == "embedding"]
    quant_configs: dict[str, Any] = {op_names[n]: _linear_config(recipe, 8) for n in embed_names}
    passes = []
    palette: dict[str, Any] = {}
    if recipe.palettize:
        palette = {op_names[n]: _palette_config(recipe) for n in linear_names}
        passes.append(("compression::palettize_weights", cto.OptimizationConfig(op_name_configs=palette)))
    else:
        quant_configs.update(
            {op_names[n]: _linear_config(recipe, recipe.recipe.bits or 8) for n in linear_names}
        )
    experts = [n for n, (r, _) in roles.items() if r == "experts"]
    quant_configs.update({op_names[n]: _experts_config(recipe) for n in experts})
    if quant_configs:
        passes.append(
            ("compression::linear_quantize_weights", cto.OptimizationConfig(op_name_configs=quant_configs))
        )
    for key, config in passes:
        graph_pass = PASS_REGISTRY[key]
        graph_pass.set_options([PassOption("config", config), PassOption("joint_compression", False)])
        graph_pass.apply(program)
    left = {op.name for op in program.functions["main"].operations if op.op_type == "const"}
    skipped = sorted(n for n in quant_configs if n in left) + sorted(
        n for n in (palette if recipe.palettize else {}) if n in left
    )
    if skipped:
        # coremltools skips a constant it cannot compress without an error (the stacked experts, before
        # their blocks were given per axis); the report would then claim what the package does not hold
        raise RuntimeError(f"coremltools left these weights uncompressed: {', '.join(skipped)}")
    report: dict[str, dict[str, str]] = {}
    for name, (role, why) in roles.items():
        if role in ("linear", "experts"):
            report[name] = {"as": recipe.linears, "why": why}
        elif role == "embedding":
            report[name] = {"as": "int8 per channel, symmetric", "why": why}
        else:
            report[name] = {"as": "fp16", "why": why}
    return report


def weight_values(recipe_dict: dict[str, Any]) -> Any:
    """`(w [N, K] float32, bits) -> values` for `lfm_export.quant.simulate`: bits 8 (the lm_head / embedding,
    and the linears of `int8`) int8 per channel; bits 4 the recipe's int4 blocks or palettization."""
    recipe = CoreMLRecipe.from_dict(recipe_dict)

    from lfm_export.runtime.coreml_interpreter import import_coremltools

    import_coremltools()

    def values(w: np.ndarray, bits: int) -> np.ndarray:
        from coremltools.optimize.coreml._quantization_passes import (
            linear_quantize_weights,
            palettize_weights,
        )

        w16 = np.asarray(w, dtype=np.float32).astype(np.float16)
        if bits == 4 and recipe.palettize:
            params = palettize_weights.blockwise_compress(w16, "KMEANS", recipe.palettize, [PALETTE_GROUP, 0])
            dense = palettize_weights.decompress(params)
        else:
            blocks = [1, 0] if bits == 8 else [1, recipe.recipe.block_size]
            params = linear_quantize_weights.blockwise_compress(
                w16, 8 if bits == 8 else 4, "LINEAR_SYMMETRIC", True, blocks
            )
            dense = linear_quantize_weights.decompress(params)
        return np.asarray(dense, dtype=np.float16).astype(np.float32)

    return values
