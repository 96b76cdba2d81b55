"""The exact rows' one interface (`lfm_export.parity.exact_row`): each backend record names the row its gate
uses, a row computed through it reaches the checks and both reports under its own name, and a row the reports
do not name is refused."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from lfm_export.backends import all_backends
from lfm_export.loading import load_model
from lfm_export.parity import boundary, fp16_program, run_parity, to_markdown
from lfm_export.parity.exact_row import ExactInputs
from lfm_export.parity.reference import ReferenceSession
from lfm_export.parity.report import EXACT_ROWS, ExactRow
from lfm_export.quant import simulate
from lfm_export.recipes import ACT_FLOAT, ACT_INT8_BLOCK, parse_recipe

pytestmark = pytest.mark.unit

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """The bundled trained `tiny` (fp32)."""
    return load_model("tiny").model


def test_each_record_names_the_exact_row_its_gate_uses() -> None:
    """int8 activations (ONNX accuracy level 4, ExecuTorch QD8, llama.cpp's Q8 blocks): the resolved row;
    Core ML: the fp16 program row; onnx-qnn: its graph row; MLX (float activations only) and executorch-qnn
    (no runtime here): none."""
    records = all_backends()
    named = {name: record.exact_row for name, record in records.items()}
    assert named == {
        "onnx": "lfm_export.parity.boundary:exact_row",
        "executorch": "lfm_export.parity.boundary:exact_row",
        "gguf": "lfm_export.parity.boundary:exact_row",
        "coreml": "lfm_export.parity.fp16_program:exact_row",
        "onnx-qnn": "lfm_export.backends.onnx_qnn.graph_check:exact_row",
        "mlx": None,
        "executorch-qnn": None,
    }, named
    for name, record in records.items():
        assert (record.exact_row_check() is None) == (named[name] is None), name


def _inputs(tmp_path: Path, artifact: torch.nn.Module, simulated: torch.nn.Module, activations: str):
    session = ReferenceSession(artifact, name="artifact")
    return ExactInputs(
        folder=tmp_path,
        manifest={"recipe": {}},
        session=session,
        activations=activations,
        simulation=ReferenceSession(simulated, name="simulated"),
        simulated=simulated,
        reference=None,
        prompts=boundary.prompts_for(artifact.config.vocab_size),
        threads=1,
    )


def test_a_row_reaches_the_checks_and_both_reports_under_its_own_name(model, tmp_path: Path) -> None:
    """The resolved row of an int8-activation `tiny` artifact (here its simulation, run as another session),
    through `run_parity`: its check comes first, `parity.json` holds it under `resolved_prefill` with the
    other two rows' keys null, the manifest summary keeps its headline, `parity.md` carries its note. An
    artifact of other weights (one w2 x1.02) fails the row at a named position."""
    recipe = parse_recipe("int4-b32")
    inputs = _inputs(
        tmp_path,
        simulate(model, recipe, ACT_INT8_BLOCK),
        simulate(model, recipe, ACT_INT8_BLOCK),
        ACT_INT8_BLOCK,
    )
    assert boundary.exact_row(replace(inputs, activations=ACT_FLOAT)) is None
    assert fp16_program.exact_row(inputs) is None  # not the Core ML interpreter
    row = boundary.exact_row(inputs)
    assert isinstance(row, ExactRow) and row.name == "resolved_prefill"
    assert row.passed and row.first_failure is None and row.positions == 64 and row.worst == 0.0, row

    result = run_parity(
        inputs.session,
        ReferenceSession(model, name="reference"),
        "int4-b32",
        simulation=inputs.simulation,
        activations=ACT_INT8_BLOCK,
        scenarios=["prefill"],
        snapshots=False,
        exact_rows=[row],
    )
    assert result.passed, result.verdict_line()
    first = result.checks[0]
    assert (first.scenario, first.metric, first.value, first.limit) == (
        "resolved_prefill",
        "logit_max_rel",
        0.0,
        boundary.LIMIT,
    )
    exactness = json.loads(json.dumps(result.to_json()))["exactness"]
    assert exactness["resolved_prefill"]["positions"] == 64 and exactness["resolved_prefill"]["passed"]
    assert [k for k in exactness if k in EXACT_ROWS] == list(EXACT_ROWS)
    assert exactness["graph_prefill"] is None and exactness["fp16_program_prefill"] is None
    summary = result.summary()["exactness"]
    assert summary["resolved_prefill"] == {
        "passed": True,
        "positions": 64,
        "logit_max_rel": 0.0,
        "codes_resolved": 0,
    }
    assert summary["graph_prefill"] is None and summary["fp16_program_prefill"] is None
    assert "\nResolved prefill ok: 64 positions against the simulation" in to_markdown(result)

    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.model.layers[1].feed_forward.w2.weight.mul_(1.02)
    bad = boundary.exact_row(
        _inputs(tmp_path, simulate(wrong, recipe, ACT_INT8_BLOCK), inputs.simulated, ACT_INT8_BLOCK)
    )
    assert bad is not None and not bad.passed and bad.worst > 10 * bad.limit, bad.describe()
    assert bad.first_failure is not None and bad.first_failure.startswith("prompt 0 position "), bad
    assert "Resolved prefill **FAIL**" in bad.note() and not bad.checks()[0].passed


def test_a_row_the_reports_do_not_name_is_refused() -> None:
    """Every run's `parity.json` lists each exact row's key (null where it did not run): a row outside
    `EXACT_ROWS` would be missing from every other report, so defining one fails."""
    with pytest.raises(TypeError, match="not one of"):

        @dataclass
        class Other(ExactRow):  # noqa: F841 (defining it is the test)
            name = "other_prefill"
