"""ONNX backend: onnxruntime-genai compatible folders, with onnxruntime contrib ops (`ort`) or standard ONNX
ops only (`portable`). `export` is the pipeline's entry point (torch and onnx are imported when it runs);
`convert.export_onnx` is the same with a typed result; `simulation` says what an artifact computes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lfm_export.backends.record import TABLE_OPTIONS, Backend, Option, Runner
from lfm_export.recipes import Recipe

from .recipes import OnnxRecipe, make_recipe, parse_recipe


def export(loaded: Any, folder: Path, recipe: OnnxRecipe | Recipe | str, progress: Any = None) -> Any:
    """Write the ONNX artifact files for `loaded` into `folder` (the pipeline writes the manifest). A core
    `Recipe` gets the ONNX defaults (`ops` ort, accuracy_level 4)."""
    from .convert import export_onnx

    if isinstance(recipe, str):
        recipe = parse_recipe(recipe)
    elif isinstance(recipe, Recipe):
        recipe = OnnxRecipe(recipe)
    return export_onnx(loaded, Path(folder), recipe, progress)


def simulation(recipe_dict: dict[str, Any]) -> tuple[Recipe, str | dict[str, str]]:
    """From a manifest's `recipe`: the core recipe and the activation rounding onnxruntime applies (`int8-block`
    for int4/int8 at accuracy_level 4 and in `portable` artifacts, else `float`; int8 MoE experts are
    `int8-block` at every level: `OnnxRecipe.activations`), for `lfm_export.quant.simulate`."""
    recipe = OnnxRecipe.from_dict(recipe_dict)
    return recipe.recipe, recipe.activations


def cli_recipe(
    quant: str,
    max_seq_len: int | None,
    block_size: int | None = None,
    ops: str = "ort",
    asymmetric: bool = False,
    accuracy_level: int = 4,
    embedding_quant: str | None = None,
    head_bits: int | None = None,
) -> OnnxRecipe:
    """The recipe `lfm-export onnx` builds from its options."""
    return make_recipe(
        quant, block_size, ops, not asymmetric, accuracy_level, max_seq_len, embedding_quant, head_bits
    )


BACKEND = Backend(
    name="onnx",
    help="Export MODEL to ONNX (onnxruntime-genai compatible folder), then check parity through the ONNX runtime "
    "shim.",
    recipe=cli_recipe,
    export=export,
    session="lfm_export.runtime.onnx:OnnxSession",
    install="onnx",
    options=(
        Option(
            "block_size",
            int | None,
            None,
            "Quantization block size: 32 | 64 | 128 (default: the recipe's, 32).",
        ),
        Option("ops", str, "ort", "ort (onnxruntime contrib ops) | portable (standard ONNX ops only)."),
        Option("asymmetric", bool, False, "Asymmetric (zero-point) int quantization."),
        Option("accuracy_level", int, 4, "MatMulNBits accuracy_level (0-4; 4 = int8 compute)."),
        *TABLE_OPTIONS,
    ),
    simulation=simulation,
    exact_row="lfm_export.parity.boundary:exact_row",
    core_codes=True,
    mixes=True,
    stored_weights="lfm_export.backends.onnx.stored_weights:stored_weights",
    context_cost="The KV cache grows with the tokens held (the shim doubles its buffers up to the context), so a "
    "long context costs memory only when used.",
    runner=Runner(
        library="onnxruntime-genai",
        name="onnxruntime-genai",
        language="python",
        code="""import onnxruntime_genai as og

model = og.Model("{folder}")
tokenizer = og.Tokenizer(model)
params = og.GeneratorParams(model)
params.set_search_options(max_length=128)
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode("Once upon a time"))
stream = tokenizer.create_stream()
while not generator.is_done():
    generator.generate_next_token()
    print(stream.decode(generator.get_next_tokens()[0]), end="", flush=True)""",
    ),
)
