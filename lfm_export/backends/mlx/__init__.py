"""MLX backend: an mlx-lm folder plus `.mlxfn` functions lowered from the traced program (see `convert.py`).
`export` is the pipeline's entry point (mlx and torch are imported when it runs); `simulation` says what an
artifact computes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lfm_export.backends.record import TABLE_OPTIONS, Backend, Option, Runner
from lfm_export.contract.errors import UserError

from .recipes import MlxRecipe, make_recipe


def export(loaded: Any, folder: Path, recipe: Any, progress: Any = None) -> Any:
    """Write the mlx-lm folder and the `.mlxfn` functions for `loaded` into `folder`."""
    try:
        import mlx.core  # noqa: F401
    except ImportError as e:
        raise UserError(f"the MLX backend needs mlx ({e}); pip install 'lfm-export[mlx]'") from None
    from .convert import export_mlx

    return export_mlx(loaded, Path(folder), MlxRecipe.coerce(recipe), progress)


def simulation(recipe_dict: dict[str, Any]) -> tuple[Any, str]:
    """The artifact holds the core quantizer's codes and scales (MLX affine format) and computes with float
    activations: the core recipe as recorded, `float`."""
    recipe = MlxRecipe.from_dict(recipe_dict)
    return recipe.recipe, recipe.activations


def cli_recipe(
    quant: str,
    max_seq_len: int | None,
    max_prefill: int | None = None,
    embedding_quant: str | None = None,
    head_bits: int | None = None,
) -> MlxRecipe:
    """The recipe `lfm-export mlx` builds from its options."""
    return make_recipe(quant, max_seq_len, max_prefill, embedding_quant, head_bits)


BACKEND = Backend(
    name="mlx",
    help="Export MODEL to MLX (mlx-lm folder plus prefill/decode .mlxfn functions lowered from the traced "
    "program), then check parity through the MLX runtime shim.",
    recipe=cli_recipe,
    export=export,
    session="lfm_export.runtime.mlx:MlxSession",
    install="mlx",
    options=(
        Option(
            "max_prefill",
            int | None,
            None,
            "Largest prefill chunk traced (default 128, at most the context).",
            min=1,
        ),
        *TABLE_OPTIONS,
    ),
    simulation=simulation,
    core_codes=True,
    mixes=True,
    stored_weights="lfm_export.backends.mlx.stored_weights:stored_weights",
    context_default="default: 4096, or the model's if smaller",
    context_cost="The KV cache is static and attention reads all of it every decode step, so every step costs "
    "the work of the whole context.",
    runner=Runner(
        library="mlx",
        name="mlx-lm",
        language="python",
        code="""from mlx_lm import generate, load

model, tokenizer = load("{folder}")
print(generate(model, tokenizer, prompt="Once upon a time", max_tokens=64))""",
    ),
)
