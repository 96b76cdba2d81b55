"""GGUF backend: one `model.gguf` that an unmodified llama.cpp loads (architectures `lfm2` / `lfm2moe`, the
tokenizer and chat template inside), run here through llama-cpp-python (`lfm_export.runtime.gguf`). `export`
is the pipeline's entry point (the `gguf` package is imported when it runs); `simulation` and `weight_values`
say what llama.cpp's CPU computes with an artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lfm_export.backends.record import Backend, Runner
from lfm_export.contract.errors import UserError
from lfm_export.contract.session import DEFAULT_THREADS

from .recipes import GgufRecipe, make_recipe


def export(loaded: Any, folder: Path, recipe: Any, progress: Any = None) -> Any:
    """Write `model.gguf` for `loaded` into `folder`."""
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"the GGUF backend needs the gguf package ({e}); pip install 'lfm-export[gguf]'"
        ) from None
    from .convert import export_gguf

    return export_gguf(loaded, Path(folder), GgufRecipe.coerce(recipe), progress)


def simulation(recipe_dict: dict[str, Any]) -> tuple[Any, str | dict[str, str]]:
    """The core recipe as recorded, with llama.cpp's activation rounding: for a quantized file by each tensor's
    recorded ggml type (`GgufRecipe.activation_rounding`: Q8_0 blocks into Q8_0 / Q4_0 / Q5_0 matmuls, Q8_K
    blocks into K-quant ones), fp16 into F16 ones, bf16 into BF16 ones, none for F32."""
    recipe = GgufRecipe.from_dict(recipe_dict)
    types = recipe_dict.get("ggml_tensor_types")
    if types:
        return recipe.recipe, recipe.activation_rounding(types)
    return recipe.recipe, recipe_dict.get("activation_rounding", recipe.activations)


def weight_values(recipe_dict: dict[str, Any]) -> Any:
    """The values ggml reads from the artifact's blocks: the core quantizer's codes times its scales rounded to
    fp16 (`lfm_export.ggml_blocks.held_values`); an expert down projection with a folded routed scale `s` as
    the file's values divided by `s` (`convert.EXPERT_DOWN_SCALE`)."""
    recipe = GgufRecipe.from_dict(recipe_dict).recipe
    if not recipe.quantized:
        return None
    from lfm_export import ggml_kquants
    from lfm_export.ggml_blocks import BLOCK_TYPES, held_values

    from .convert import EXPERT_DOWN_SCALE, is_expert_down
    from .recipes import factor_for, importance_for

    types = recipe_dict.get("ggml_tensor_types")  # a K-quant mix: the type of each checkpoint tensor
    scale = np.float32(recipe_dict.get(EXPERT_DOWN_SCALE, 1.0))
    threads = DEFAULT_THREADS

    def held(w: Any, bits: int, name: str, imp: Any, factor: Any) -> Any:
        if types is None:
            return held_values(w, bits, recipe.rounding, threads, imp, factor)
        kind = types[name]
        if kind in BLOCK_TYPES:
            return held_values(w, BLOCK_TYPES[kind].bits, recipe.rounding, threads, imp, factor)
        kt = ggml_kquants.K_TYPES[kind]
        return ggml_kquants.held_values(w, kt, recipe.rounding, threads, imp, factor)

    def values(w: Any, bits: int, name: str = "") -> Any:
        imp, factor = (
            importance_for(w, recipe, name),
            factor_for(w, recipe, name),
        )  # by the checkpoint's values
        if scale != 1 and is_expert_down(name):  # the file holds w2 * s quantized (`EXPERT_DOWN_SCALE`)
            return held(np.asarray(w, np.float32) * scale, bits, name, imp, factor) / scale
        return held(w, bits, name, imp, factor)

    return values


def cli_recipe(quant: str, max_seq_len: int | None) -> GgufRecipe:
    """The recipe `lfm-export gguf` builds from its options."""
    return make_recipe(quant, max_seq_len)


BACKEND = Backend(
    name="gguf",
    help="Export MODEL to GGUF (one model.gguf for llama.cpp: lfm2 / lfm2moe, tokenizer and chat template "
    "inside; --quant f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k), then check parity through llama.cpp (llama-cpp-python).",
    recipe=cli_recipe,
    export=export,
    session="lfm_export.runtime.gguf:GgufSession",
    install="gguf",
    quant_default="f32",
    simulation=simulation,
    exact_row="lfm_export.parity.boundary:exact_row",
    weight_values=weight_values,
    core_codes=True,
    mixes=True,
    stored_weights="lfm_export.backends.gguf.stored_weights:stored_weights",
    gates="lfm_export.backends.gguf.gates:GGUF_GATES",
    sanity="lfm_export.backends.gguf.gates:GGUF_SANITY_KL_MEAN",
    context_default="default: 4096, or the model's if smaller",
    context_cost="llama.cpp allocates the KV cache of the whole context when a session opens.",
    runner=Runner(
        library="gguf",
        name="llama.cpp (`llama-cli`, or llama-cpp-python)",
        language="shell",
        code="""llama-cli -m {folder}/model.gguf -cnv -p "You are a helpful assistant."
# or, in Python: llama_cpp.Llama(model_path="{folder}/model.gguf").create_chat_completion(messages=[...])""",
    ),
)
