"""Qualcomm QNN quantization, a library the two QNN targets share: QNN-style static-shape quantization done once
(`quantize`: ExecuTorch's PT2E `QnnQuantizer`, 16a8w / 16a4w / 8a8w), its fake-quantized torch program
(`session.FakeQuantSession`), the recipe (`recipes`) and the parity gates (`gates`). The targets are backends of
their own: `onnx-qnn` (`lfm_export.backends.onnx_qnn`, a QDQ ONNX graph run by onnxruntime's QNN provider) and
`executorch-qnn` (`lfm_export.backends.executorch_qnn`, ExecuTorch's QNN delegate)."""

from __future__ import annotations

from typing import Any

from lfm_export.contract.errors import UserError
from lfm_export.progress import quiet_torchao
from lfm_export.runtime.qnn import stdout_to_stderr

from .recipes import DEFAULT_MAX_SEQ_LEN, QnnRecipe, make_recipe, soc_model


def require_quantizer(install: str) -> None:
    """ExecuTorch's `QnnQuantizer` is importable; else a one-line error naming the extra to install."""
    quiet_torchao()
    try:
        import executorch.backends.qualcomm.quantizer.quantizer  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"QNN quantization needs executorch ({e}); pip install 'lfm-export[{install}]'"
        ) from None


def context(recipe: QnnRecipe, cfg: Any) -> int:
    """The static context of a QNN step program: `--max-seq-len`, else the default capped at the model's."""
    max_seq_len = recipe.max_seq_len or min(DEFAULT_MAX_SEQ_LEN, cfg.max_position_embeddings)
    if max_seq_len > cfg.max_position_embeddings:
        raise UserError(
            f"--max-seq-len {max_seq_len} exceeds the model's max_position_embeddings {cfg.max_position_embeddings}"
        )
    return max_seq_len


def simulation(recipe_dict: dict[str, Any]) -> tuple[Any, str]:
    """The pipeline's core-recipe simulation does not apply: `simulation_session` gives the QNN one."""
    from lfm_export.recipes import parse_recipe

    return parse_recipe("fp32"), "float"


def simulation_session(loaded: Any, manifest: dict[str, Any]) -> Any:
    """The fake-quantized torch program of the artifact's recipe, quantized again from the reference model with
    the same calibration (deterministic: the same texts, the same observers), as the session parity's exactness
    compares the artifact with."""
    from .quantize import calibration_prompts, quantize_step
    from .session import FakeQuantSession

    recipe = manifest["recipe"]
    prompts = calibration_prompts(loaded.config.vocab_size, loaded.tokenizer_file)
    with stdout_to_stderr():
        step = quantize_step(loaded.model, recipe["quant"], int(recipe["max_seq_len"]), prompts)
    return FakeQuantSession(step, name=f"simulated-{recipe['name']}")


__all__ = [
    "QnnRecipe",
    "context",
    "make_recipe",
    "require_quantizer",
    "simulation",
    "simulation_session",
    "soc_model",
]
