"""`executorch-qnn`: the QNN-quantized step program (`lfm_export.backends.qnn`, calibrated as for `onnx-qnn`)
lowered by ExecuTorch's QNN partitioner into `model.pte` (`sdk.py`). It has no runtime shim here: a
QNN-delegated `.pte` runs only where ExecuTorch is built with the QNN backend, on a Snapdragon device
(`--no-parity`); without the QAIRT host libraries the command stops at the SDK boundary in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lfm_export.backends.qnn import QnnRecipe, context, make_recipe, simulation, simulation_session
from lfm_export.backends.record import Backend, ExportResult, Option, Runner

from .sdk import QAIRT_VERSION, lower, probe_libraries, sdk_root


def export(loaded: Any, folder: Path, recipe: QnnRecipe, progress: Any = None) -> ExportResult:
    """Quantize `loaded` once with the QNN quantizer, lower the static step with the QNN partitioner for
    `recipe.soc`, and write `model.pte` into `folder`. Past `sdk_root` / `probe_libraries` this path has not run
    here (no QAIRT 2.37 host libraries): it stops at the boundary with a `UserError`, before anything is
    written."""
    from lfm_export.backends.qnn.quantize import calibration_prompts, quantize_step
    from lfm_export.progress import Progress

    progress = progress or Progress(quiet=True)
    probe_libraries(sdk_root())
    cfg = loaded.config
    max_seq_len = context(recipe, cfg)
    prompts = calibration_prompts(cfg.vocab_size, loaded.tokenizer_file)
    with progress.step(f"QNN quantization ({recipe.quant}, QnnQuantizer, calibration)"):
        step = quantize_step(loaded.materialized().model, recipe.quant, max_seq_len, prompts)
    with progress.step(f"Lowering with the QNN partitioner ({recipe.soc})"):
        lower(step, recipe.soc, Path(folder) / "model.pte")
    return ExportResult(
        step.signature,
        {**recipe.to_dict(), "max_seq_len": max_seq_len, "delegate": "qnn"},
        {"qnn": {"soc": recipe.soc, "qairt": QAIRT_VERSION, "step_tokens": 1}},
    )


def cli_recipe(quant: str, max_seq_len: int | None, soc: str | None = None) -> QnnRecipe:
    """The recipe `lfm-export executorch-qnn` builds; the SDK boundary is checked here, before any model is
    loaded: without loadable QAIRT host libraries the command stops in one line naming the SDK version and
    `QNN_SDK_ROOT`, and nothing is written."""
    recipe = make_recipe(quant, soc, max_seq_len)
    probe_libraries(sdk_root())
    return recipe


BACKEND = Backend(
    name="executorch-qnn",
    help="Export MODEL as a QNN-quantized ExecuTorch program (model.pte, Qualcomm QNN delegate; --quant 16a8w | "
    "16a4w | 8a8w); needs the QAIRT SDK host libraries (QNN_SDK_ROOT).",
    recipe=cli_recipe,
    export=export,
    session=None,
    install="qnn",
    quant_default="16a8w",
    options=(Option("soc", str | None, None, "Qualcomm SoC, e.g. SM8750 (default SM8750)."),),
    simulation=simulation,
    simulation_session=simulation_session,
    gates="lfm_export.backends.qnn.gates:QNN_GATES",
    sanity="lfm_export.backends.qnn.gates:QNN_SANITY_KL_MEAN",
    context_default="default: 128, or the model's if smaller",
    context_cost="The KV cache is a static input and output of that length: every token moves all of it.",
    runner=Runner(
        library="executorch",
        name="ExecuTorch's LLM runner built with the QNN backend (QAIRT libraries on the device)",
        language="python",
        code="""from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

runner = TextLLMRunner("{folder}/model.pte", "{folder}/tokenizer.json")
runner.generate("Once upon a time", GenerationConfig(max_new_tokens=64, temperature=0.0), token_callback=print)""",
    ),
)
