"""Qualcomm QNN: QNN-style static-shape quantization done once (`quantize`: ExecuTorch's PT2E `QnnQuantizer`,
16a8w / 16a4w / 8a8w) and its fake-quantized torch program (`session.FakeQuantSession`), shared by the ONNX QNN
target (`lfm_export.backends.onnx.qnn_target`, run by `lfm_export.runtime.qnn.QnnSession` on the HTP) and the
ExecuTorch QNN delegate (`lfm_export.backends.executorch.qnn`). `export` is the pipeline's entry point for
`lfm-export onnx --target qnn`; `simulation_session` gives parity the fake-quantized program to compare with."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lfm_export.contract.errors import UserError
from lfm_export.runtime.qnn import stdout_to_stderr

from .recipes import DEFAULT_MAX_SEQ_LEN, QnnRecipe, make_recipe, soc_model


def export(loaded: Any, folder: Path, recipe: QnnRecipe | str, progress: Any = None) -> Any:
    """Quantize `loaded` (real weights are loaded for calibration), write the QDQ graph and the tokenizer files
    into `folder`, and check that onnxruntime's QNN provider places every node on the HTP."""
    from lfm_export.backends.onnx.qnn_target import MODEL_FILE, export_qdq
    from lfm_export.progress import Progress

    from .quantize import calibration_prompts, quantize_step

    progress = progress or Progress(quiet=True)
    recipe = make_recipe(recipe) if isinstance(recipe, str) else recipe
    folder = Path(folder)
    cfg = loaded.config
    max_seq_len = recipe.max_seq_len or min(DEFAULT_MAX_SEQ_LEN, cfg.max_position_embeddings)
    if max_seq_len > cfg.max_position_embeddings:
        raise UserError(
            f"--max-seq-len {max_seq_len} exceeds the model's max_position_embeddings {cfg.max_position_embeddings}"
        )
    _require_quantizer()
    prompts = calibration_prompts(cfg.vocab_size, loaded.tokenizer_file)
    with progress.step(f"QNN quantization ({recipe.quant}, QnnQuantizer, calibration)"), stdout_to_stderr():
        step = quantize_step(loaded.materialized().model, recipe.quant, max_seq_len, prompts)
    with progress.step("QDQ ONNX graph (static shapes, uint16 activations)"):
        graph = export_qdq(step, folder)
    for f in loaded.tokenizer_files():
        shutil.copy2(f, folder / f.name)
    qnn: dict[str, Any] = {"step_tokens": 1, "prefill": "token by token (one static single-token graph)"}
    with progress.step(f"Placing the graph on the HTP (QNN provider, {recipe.soc})"), stdout_to_stderr():
        qnn.update(_place_on_htp(folder / MODEL_FILE, recipe, folder))
    result_recipe = {
        **recipe.to_dict(),
        "max_seq_len": max_seq_len,
        "calibration": {"prompts": len(prompts), "tokens": step.calibration_tokens, "texts": "lfm_export/backends/qnn"},
    }
    return SimpleNamespace(
        signature=step.signature,
        recipe=result_recipe,
        extra={"qnn": qnn, "ops": {"domains": [""], "op_types": graph["op_types"]}, "graph": graph},
    )


def _place_on_htp(model: Path, recipe: QnnRecipe, folder: Path) -> dict[str, Any]:
    """Create a QNN HTP session with CPU fallback disabled (onnxruntime refuses it if any node would fall back to
    its CPU provider); with `recipe.context_binary`, the provider writes the EPContext model (the precompiled
    context binary for the SoC, what an Android app loads) while doing so."""
    import onnxruntime as ort

    from lfm_export.runtime.qnn import htp_session_options

    opts = htp_session_options(soc_model(recipe.soc))
    out: dict[str, Any] = {}
    if recipe.context_binary:
        ctx = folder / "model_ctx.onnx"
        opts.add_session_config_entry("ep.context_enable", "1")
        opts.add_session_config_entry("ep.context_file_path", str(ctx))
        opts.add_session_config_entry("ep.context_embed_mode", "1")
        out["context_binary"] = ctx.name
    try:
        session = ort.InferenceSession(str(model), opts)
    except Exception as e:
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"onnxruntime's QNN provider does not place the whole graph on the HTP: {line}"
        ) from None
    out["partitioning"] = {
        "providers": session.get_providers(),
        "cpu_fallback": "disabled (session.disable_cpu_ep_fallback=1): every node is on the QNN provider",
        "backend_type": "htp",
        "soc": recipe.soc,
        "soc_model": soc_model(recipe.soc),
    }
    if recipe.context_binary and not (folder / out["context_binary"]).is_file():
        raise UserError("onnxruntime's QNN provider did not write the EPContext model")
    return out


def _require_quantizer() -> None:
    from lfm_export.backends.executorch import quiet_torchao

    quiet_torchao()
    try:
        import executorch.backends.qualcomm.quantizer.quantizer  # noqa: F401
        import onnxruntime_qnn  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"--target qnn needs executorch and onnxruntime-qnn ({e}); pip install 'lfm-export[qnn]'"
        ) from None


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


__all__ = ["QnnRecipe", "export", "make_recipe", "simulation", "simulation_session", "soc_model"]
