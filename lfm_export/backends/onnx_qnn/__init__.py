"""`onnx-qnn`: the QNN-quantized step program (`lfm_export.backends.qnn`) as a static QDQ ONNX graph (`qdq.py`:
uint16 / uint8 activations, per-channel weights) that onnxruntime's QNN provider places whole on the Qualcomm
HTP, emulated on x86 by onnxruntime-qnn's host libraries, and run by `lfm_export.runtime.qnn.QnnSession`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lfm_export.backends.qnn import (
    QnnRecipe,
    context,
    make_recipe,
    require_quantizer,
    simulation,
    simulation_session,
    soc_model,
)
from lfm_export.backends.record import Backend, ExportResult, Option, Runner
from lfm_export.contract.errors import UserError
from lfm_export.runtime.qnn import stdout_to_stderr


def export(loaded: Any, folder: Path, recipe: QnnRecipe, progress: Any = None) -> ExportResult:
    """Quantize `loaded` (real weights are loaded for calibration), write the QDQ graph into `folder`, and check
    that onnxruntime's QNN provider places every node on the HTP."""
    from lfm_export.backends.qnn.quantize import calibration_prompts, quantize_step
    from lfm_export.progress import Progress

    from .qdq import MODEL_FILE, export_qdq

    progress = progress or Progress(quiet=True)
    folder = Path(folder)
    cfg = loaded.config
    max_seq_len = context(recipe, cfg)
    require_quantizer("qnn")
    try:
        import onnxruntime_qnn  # noqa: F401
    except ImportError as e:
        raise UserError(f"onnx-qnn needs onnxruntime-qnn ({e}); pip install 'lfm-export[qnn]'") from None
    prompts = calibration_prompts(cfg.vocab_size, loaded.tokenizer_file)
    with progress.step(f"QNN quantization ({recipe.quant}, QnnQuantizer, calibration)"), stdout_to_stderr():
        step = quantize_step(loaded.materialized().model, recipe.quant, max_seq_len, prompts)
    with progress.step("QDQ ONNX graph (static shapes, uint16 activations)"):
        graph = export_qdq(step, folder)
    qnn: dict[str, Any] = {"step_tokens": 1, "prefill": "token by token (one static single-token graph)"}
    with progress.step(f"Placing the graph on the HTP (QNN provider, {recipe.soc})"), stdout_to_stderr():
        qnn.update(_place_on_htp(folder / MODEL_FILE, recipe, folder))
    result_recipe = {
        **recipe.to_dict(),
        "max_seq_len": max_seq_len,
        "calibration": {
            "prompts": len(prompts),
            "tokens": step.calibration_tokens,
            "texts": "lfm_export/backends/qnn",
        },
    }
    extra = {"qnn": qnn, "ops": {"domains": [""], "op_types": graph["op_types"]}, "graph": graph}
    return ExportResult(step.signature, result_recipe, extra)


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


def cli_recipe(
    quant: str, max_seq_len: int | None, soc: str | None = None, context_binary: bool = False
) -> QnnRecipe:
    """The recipe `lfm-export onnx-qnn` builds from its options."""
    return make_recipe(quant, soc, max_seq_len, context_binary)


BACKEND = Backend(
    name="onnx-qnn",
    help="Export MODEL as a QNN-quantized static QDQ ONNX graph for the Qualcomm HTP (--quant 16a8w | 16a4w | "
    "8a8w), placed whole on onnxruntime's QNN provider, then check parity on the emulated HTP.",
    recipe=cli_recipe,
    export=export,
    session="lfm_export.runtime.qnn:QnnSession",
    install="qnn",
    quant_default="16a8w",
    options=(
        Option(
            "soc", str | None, None, "Snapdragon SoC the graph is prepared for (default SM8750; e.g. SM8650)."
        ),
        Option("context_binary", bool, False, "Also write the EPContext model (precompiled for --soc)."),
    ),
    simulation=simulation,
    simulation_session=simulation_session,
    stored_weights="lfm_export.backends.onnx_qnn.stored_weights:stored_weights",
    exact_row="lfm_export.backends.onnx_qnn.graph_check:exact_row",
    gates="lfm_export.backends.qnn.gates:QNN_GATES",
    sanity="lfm_export.backends.qnn.gates:QNN_SANITY_KL_MEAN",
    context_default="default: 128, or the model's if smaller",
    context_cost="The KV cache is a static input and output of that length: every token moves all of it.",
    runner=Runner(
        library="onnxruntime",
        name="onnxruntime's QNN execution provider",
        language="python",
        code="""import onnxruntime as ort

session = ort.InferenceSession(
    "{folder}/model.onnx",
    providers=["QNNExecutionProvider"],
    provider_options=[{"backend_path": "libQnnHtp.so"}],
)""",
    ),
)
