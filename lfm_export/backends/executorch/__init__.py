"""ExecuTorch backend: one `.pte` program with the state held inside it (XNNPACK delegate), runnable by
`executorch.runtime` and by ExecuTorch's LLM runner (`TextLLMRunner`). `export` is the pipeline's entry point
(torch and executorch are imported when it runs); `simulation` says what an artifact computes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lfm_export.backends.record import Backend, Option, Runner
from lfm_export.contract.errors import UserError
from lfm_export.progress import quiet_torchao

from .recipes import ExecuTorchRecipe, make_recipe


def export(loaded: Any, folder: Path, recipe: Any, progress: Any = None) -> Any:
    """Write `model.pte` and the tokenizer files for `loaded` into `folder` (the pipeline writes the manifest).
    A core `Recipe` or a name gets the ExecuTorch defaults (`max_prefill`)."""
    recipe = ExecuTorchRecipe.coerce(recipe)
    recipe.check_context(loaded.config)
    recipe.recipe.check_model(loaded.config, {n: tuple(p.shape) for n, p in loaded.model.named_parameters()})
    quiet_torchao()
    try:
        import executorch  # noqa: F401
        import torchao  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"the ExecuTorch backend needs executorch ({e}); pip install 'lfm-export[executorch]'"
        ) from None
    from .convert import export_executorch

    return export_executorch(loaded, Path(folder), recipe, progress)


def simulation(recipe_dict: dict[str, Any]) -> tuple[Any, str]:
    """From a manifest's `recipe`: the core recipe whose weights the artifact holds and the activation rounding
    its kernels apply (`ExecuTorchRecipe.activations`), for `lfm_export.quant.simulate`."""
    recipe = ExecuTorchRecipe.from_dict(recipe_dict)
    return recipe.simulated, recipe.activations


def weight_values(recipe_dict: dict[str, Any]) -> Any:
    """The values XNNPACK multiplies for each quantized weight (`quantize.weight_values`; torch and torchao are
    imported when it is called), for `lfm_export.quant.simulate(..., weights=...)`."""
    quiet_torchao()
    from .quantize import weight_values as values

    return values(recipe_dict)


def cli_recipe(
    quant: str,
    max_seq_len: int | None,
    max_prefill: int | None = None,
    group_size: int | None = None,
    embedding_quant: str | None = None,
    head_bits: int | None = None,
    delegate: str = "xnnpack",
) -> Any:
    """The recipe `lfm-export executorch` builds from its options."""
    return make_recipe(quant, max_seq_len, max_prefill, group_size, embedding_quant, delegate, head_bits)


BACKEND = Backend(
    name="executorch",
    help="Export MODEL to an ExecuTorch program (model.pte, XNNPACK, state held inside), then check parity "
    "through the ExecuTorch runtime shim.",
    recipe=cli_recipe,
    export=export,
    session="lfm_export.runtime.executorch:ExecuTorchSession",
    install="executorch",
    options=(
        Option(
            "max_prefill",
            int | None,
            None,
            "Most tokens one forward call takes (default 128, at most the context).",
            min=1,
        ),
        Option(
            "group_size",
            int | None,
            None,
            "weight group size: 32 | 64 | 128 for int4; 0 = per channel (int8, 8da8w).",
        ),
        Option(
            "embedding_quant",
            str | None,
            None,
            "Embedding table, weight-only: 8 | 4 | none (default 8 when quantized).",
        ),
        Option(
            "head_bits",
            int | None,
            None,
            "lm_head: 8 (per channel) | 4 (groups of --group-size) (default 8).",
        ),
        Option("delegate", str, "xnnpack", "xnnpack | portable (fp32 only)."),
    ),
    simulation=simulation,
    exact_row="lfm_export.parity.boundary:exact_row",
    weight_values=weight_values,
    stored_weights="lfm_export.backends.executorch.stored_weights:stored_weights",
    mixes=True,
    context_cost="The KV caches are static buffers of that length in the program (context x 2 x attention layers "
    "x KV heads x head_dim values, fp32 or fp16), allocated at load.",
    runner=Runner(
        library="executorch",
        name="ExecuTorch's LLM runner (TextLLMRunner)",
        language="python",
        code="""from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401 (the program's custom ops)
from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

runner = TextLLMRunner("{folder}/model.pte", "{folder}/tokenizer.json")
config = GenerationConfig(echo=False, max_new_tokens=64, temperature=0.0, num_bos=1)
runner.generate("Once upon a time", config, token_callback=lambda piece: print(piece, end=""))""",
    ),
)
