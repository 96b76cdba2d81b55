"""ExecuTorch backend: one `.pte` program with the state held inside it (XNNPACK delegate), runnable by
`executorch.runtime` and by ExecuTorch's LLM runner (`TextLLMRunner`). `export` is the pipeline's entry point
(torch and executorch are imported when it runs); `simulation` says what an artifact computes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lfm_export.contract.errors import UserError

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


def quiet_torchao() -> None:
    """torchao 0.18 logs a warning per CUDA-only kernel library it cannot load on import ("Failed to load
    ..._C_mxfp8...", "..._C_cutlass_90a..."): nothing this CPU backend uses; and torch warns that an enum
    torchao registers is natively supported now. Both loggers are set to ERROR."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


__all__ = ["ExecuTorchRecipe", "export", "make_recipe", "quiet_torchao", "simulation", "weight_values"]
