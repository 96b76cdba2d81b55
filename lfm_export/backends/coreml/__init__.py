"""Core ML backend: one stateful ML Program (`model.mlpackage`, iOS 18 / macOS 15), KV caches and conv states
as Core ML states, fp16 compute, weights compressed by `coremltools.optimize.coreml`. Converted on any OS;
run by Core ML on macOS and by the numpy interpreter (`lfm_export.runtime.coreml_interpreter`) elsewhere.
`export` is the pipeline's entry point (torch and coremltools are imported when it runs); `simulation` and
`weight_values` say what an artifact computes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lfm_export.backends.record import Backend, Option, Runner

from .recipes import CoreMLRecipe, make_recipe


def export(loaded: Any, folder: Path, recipe: Any, progress: Any = None) -> Any:
    """Write `model.mlpackage` and the tokenizer files for `loaded` into `folder` (the pipeline writes the
    manifest). A core `Recipe` or a name gets the Core ML defaults (iOS18, prefill 1..64)."""
    from lfm_export.runtime.coreml_interpreter import import_coremltools

    recipe = CoreMLRecipe.coerce(recipe)
    import_coremltools()
    from .convert import export_coreml

    return export_coreml(loaded, Path(folder), recipe, progress)


def simulation(recipe_dict: dict[str, Any]) -> tuple[Any, str]:
    """From a manifest's `recipe`: the core recipe (its bits key `weight_values`) and the activation mode,
    `fp16` or `fp16-routed` (`CoreMLRecipe.activations`)."""
    recipe = CoreMLRecipe.from_dict(recipe_dict)
    return recipe.recipe, recipe.activations


def weight_values(recipe_dict: dict[str, Any]) -> Any:
    """The values the program's compressed weights decode to (`compress.weight_values`), or None for fp16."""
    if not recipe_dict.get("bits"):
        return None
    from .compress import weight_values as values

    return values(recipe_dict)


def cli_recipe(
    quant: str,
    max_seq_len: int | None,
    target: str = "iOS18",
    max_prefill: int | None = None,
    prefill_lengths: str | None = None,
    moe_form: str | None = None,
) -> CoreMLRecipe:
    """The recipe `lfm-export coreml` builds from its options."""
    return make_recipe(quant, max_seq_len, target, max_prefill, prefill_lengths, moe_form)


BACKEND = Backend(
    name="coreml",
    help="Export MODEL to a stateful Core ML ML Program (model.mlpackage, iOS 18 states, fp16 compute), then "
    "check parity through the Core ML runtime shim (Core ML on macOS, the numpy interpreter elsewhere).",
    recipe=cli_recipe,
    export=export,
    session="lfm_export.runtime.coreml:CoreMLSession",
    install="coreml",
    quant_default="fp16",
    options=(
        Option("target", str, "iOS18", "Deployment target: iOS18 | macOS15 (states need them)."),
        Option(
            "max_prefill",
            int | None,
            None,
            "Most tokens one prediction takes, any count 1..N (default 64).",
            min=1,
        ),
        Option(
            "prefill_lengths",
            str | None,
            None,
            "Enumerated token counts per prediction instead, e.g. 1,16,64 (1 required).",
        ),
        Option(
            "moe_form",
            str | None,
            None,
            "MoE experts: sparse (gather the top-k experts' weights; default) | dense (every expert on every token).",
        ),
    ),
    simulation=simulation,
    exact_row="lfm_export.parity.fp16_program:exact_row",
    weight_values=weight_values,
    stored_weights="lfm_export.backends.coreml.stored_weights:stored_weights",
    context_cost="The KV caches are fp16 Core ML states of that length (context x 2 x attention layers x KV "
    "heads x head_dim x 2 bytes), and attention reads every slot each step.",
    runner=Runner(
        library="coreml",
        name="Core ML (macOS 15 / iOS 18; untested here: no Mac)",
        language="python",
        code="""import coremltools as ct
import numpy as np

model = ct.models.MLModel("{folder}/model.mlpackage")
state = model.make_state()  # the KV cache and conv state, held by Core ML
ids = np.array([[1, 520, 3187]], dtype=np.int32)  # token ids from {folder}/tokenizer.json
out = model.predict({"input_ids": ids, "input_pos": np.array([0], dtype=np.int32)}, state=state)""",
    ),
)
