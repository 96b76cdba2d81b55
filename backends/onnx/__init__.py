"""ONNX backend: onnxruntime-genai compatible folders, with onnxruntime contrib ops (`ort`) or standard ONNX
ops only (`portable`). `export` is the pipeline's entry point; `export_onnx` the same with a typed result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .recipes import OnnxRecipe, make_recipe, parse_recipe


def export(loaded: Any, folder: Path, recipe: OnnxRecipe | str, progress: Any = None) -> Any:
    """Write the ONNX artifact files for `loaded` into `folder` (the pipeline writes the manifest)."""
    from .convert import export_onnx

    if isinstance(recipe, str):
        recipe = parse_recipe(recipe)
    return export_onnx(loaded, Path(folder), recipe, progress)


def export_onnx(loaded: Any, out_dir: Path, recipe: OnnxRecipe, progress: Any = None, **kw: Any) -> Any:
    """See `convert.export_onnx` (imports torch and onnx lazily)."""
    from .convert import export_onnx as _export_onnx

    return _export_onnx(loaded, out_dir, recipe, progress, **kw)


def trace_onnx(loaded: Any) -> Any:
    from .convert import trace_onnx as _trace_onnx

    return _trace_onnx(loaded)


__all__ = ["OnnxRecipe", "export", "export_onnx", "make_recipe", "parse_recipe", "trace_onnx"]
