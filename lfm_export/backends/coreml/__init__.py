"""Core ML backend: one stateful ML Program (`model.mlpackage`, iOS 18 / macOS 15), KV caches and conv states
as Core ML states, fp16 compute, weights compressed by `coremltools.optimize.coreml`. Converted on any OS;
run by Core ML on macOS and by the numpy interpreter (`lfm_export.runtime.coreml_interpreter`) elsewhere.
`export` is the pipeline's entry point (torch and coremltools are imported when it runs); `simulation` and
`weight_values` say what an artifact computes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    `fp16` (`recipes.FP16_COMPUTE`)."""
    recipe = CoreMLRecipe.from_dict(recipe_dict)
    return recipe.recipe, recipe.activations


def weight_values(recipe_dict: dict[str, Any]) -> Any:
    """The values the program's compressed weights decode to (`compress.weight_values`), or None for fp16."""
    if not recipe_dict.get("bits"):
        return None
    from .compress import weight_values as values

    return values(recipe_dict)


__all__ = ["CoreMLRecipe", "export", "make_recipe", "simulation", "weight_values"]
