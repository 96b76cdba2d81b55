"""A whole int4 MoE `.mlpackage` in the default suite, read back from disk and run by the MIL interpreter
(Core ML cannot predict on Linux; parity runs the saved program through `lfm_export.runtime.coreml_interpreter`,
its stored weights decoded from `weights/weight.bin`): the honest export passes parity, the same package with
one stacked expert w2's stored scales x1.02 (edited in `weight.bin`) fails naming that constant, and the
honest package judged against another checkpoint's weights fails.

What makes it cheap (a whole `tiny-moe` int4 export with compression costs about 40 s on loaded cores): a
trained two-layer slice of `tiny-moe` (`model_slices.write_slice`: its dense conv layer 1 and MoE attention
layer 2, 8 experts top-2), context 32, prefill lengths 1 and 4. One package serves all three checks.

Which check catches what (measured 2026-12-07 on this slice, scenario `prefill`): both parts catch a x1.02.
The stored weights (every decoded row equal to one of the simulation's, bit for bit) name the constant; the
`int4-fp16-moe` logits limits see it too (the stacked expert w2: KL max 5.1e-4 against 2e-4; the dense
layer's w2: logit max rel 0.0105 against 0.005), and so does the `fp16_program_prefill` row, which the
interpreter engine adds (`lfm_export.parity.fp16_program`: honest bit for bit, limit 1e-4). The other checkpoint
fails every part (logit max rel 1.07, KL mean against fp32 4.4). A float-held weight (a norm x1.02) the stored
weights cannot see; the fp16 program row catches it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("coremltools")

from model_slices import copy_artifact, write_slice  # noqa: E402

from lfm_export.backends.coreml.recipes import make_recipe  # noqa: E402
from lfm_export.loading import load_model  # noqa: E402
from lfm_export.pipeline import check_artifact, export_artifact  # noqa: E402
from lfm_export.progress import Progress  # noqa: E402

CONTEXT = 32


@pytest.fixture(scope="module")
def sliced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("cm-int4")
    honest = write_slice("tiny-moe", root / "moe-l1-l2", (1, 2))
    other = write_slice("tiny-moe", root / "moe-l0-l4", (0, 4))
    out = root / "slice-int4"
    outcome = export_artifact(
        "coreml",
        str(honest),
        out,
        make_recipe("int4", max_seq_len=CONTEXT, prefill_lengths="1,4"),
        threads=2,
        progress=Progress(quiet=True),
    )
    return {"outcome": outcome, "out": out, "model": honest, "other": other, "root": root}


def test_honest_int4_moe_slice_passes_parity_with_every_stored_row_matched(sliced: dict[str, Any]) -> None:
    outcome = sliced["outcome"]
    p = outcome.manifest["parity"]
    assert outcome.passed and p["exactness"]["gate"] == "int4-fp16-moe", p
    assert {k for k, v in p["scenarios"].items() if v == "ok"} >= {"prefill", "decode", "chunked_prefill"}
    # every compressed constant (the stacked experts' as their rows, the int8 embedding) bit for bit
    assert p["exactness"]["stored_weights"] == {"passed": True, "artifact_rows": 6656, "rows_unmatched": 0}
    assert p["quality"]["passed"] and p["quality"]["pooled"]["kl_mean"] < 0.2  # measured 0.097
    # the interpreter ran it: the simulation rounded op by op as the program equals it bit for bit
    program = p["exactness"]["fp16_program_prefill"]
    assert program["passed"] and program["differing_positions"] == 0, program
    assert program["logit_max_rel"] == 0.0 and program["state_max_rel"] == 0.0, program


def test_one_stacked_expert_w2_x1_02_in_the_package_fails_parity_naming_it(sliced: dict[str, Any]) -> None:
    from package_edit import scale_op

    from lfm_export.backends.coreml.stored_weights import stored_weights

    stacked = [n for n, w in stored_weights(sliced["out"]) if "w2" in n and w.shape[0] > w.shape[1]]
    assert len(stacked) == 1, stacked  # the one MoE layer's experts, stacked
    tampered = copy_artifact(sliced, "tampered")
    scale_op(tampered / "model.mlpackage", stacked[0], 1.02)
    result = check_artifact(tampered, threads=2, progress=Progress(quiet=True), scenarios=["prefill"])
    sw = result.stored_weights
    assert not result.passed and list(sw["unmatched"]) == stacked, sw
    assert f"stored_weights[{stacked[0]}]: rows_unmatched" in result.verdict_line()
    assert "fp16_program_prefill" in {c.scenario for c in result.failures}, result.verdict_line()


def test_a_float_held_norm_x1_02_fails_the_fp16_program_row(sliced: dict[str, Any]) -> None:
    """What the stored weights cannot see (a weight held in float: the MoE layer's ffn_norm) the exact fp16
    row does: the honest package judged against the slice with that norm's weight x1.02."""
    model = load_model(str(sliced["model"]))
    with torch.no_grad():
        model.model.model.layers[1].ffn_norm.weight.mul_(1.02)
    judged = copy_artifact(sliced, "norm")
    result = check_artifact(judged, model, threads=2, progress=Progress(quiet=True), scenarios=["prefill"])
    assert result.stored_weights["passed"], result.stored_weights
    program = result.exact("fp16_program_prefill")
    assert not result.passed and program["over"], program
    assert "fp16_program_prefill" in {c.scenario for c in result.failures}, result.verdict_line()


def test_the_package_judged_against_another_checkpoint_fails(sliced: dict[str, Any]) -> None:
    """Against tiny-moe's layers 0 and 4 (same shapes, other trained weights, the same embedding and head):
    exactness fails, and the stored weights of every linear and expert stack of both layers are unmatched,
    the embedding's none."""
    judged = copy_artifact(sliced, "judged")
    other = load_model(str(sliced["other"]))
    result = check_artifact(judged, other, threads=2, progress=Progress(quiet=True), scenarios=["prefill"])
    assert not result.passed and not result.summary()["exactness"]["passed"]
    sw = result.stored_weights
    assert sw["rows_unmatched"] == 6656 - 2048, sw  # every row but the embedding's (2048 x 128)
    assert not [n for n in sw["unmatched"] if "embed" in n], sw
