"""A whole 8da4w `.pte` in the default suite: the honest export passes parity through the ExecuTorch runtime,
the same file with one matrix's stored scales x1.02 (edited in place) fails naming that matrix, and the
honest file judged against another checkpoint's weights fails.

What makes it cheap (a whole `tiny` 8da4w export lowers for 60-160 s on 2 cores): a trained two-layer slice
of `tiny` (`model_slices.write_slice`: its conv layer 1 and attention layer 2), context 32 and `max_prefill`
1. One-token calls make the program's shapes static; with a dynamic prefill axis (`max_prefill` 8) the same
slice lowered in 63 s against 19 s (2026-12-07, load about 4.6 and 3). One artifact serves all three checks;
the edited and the judged ones are copies of its folder. Dynamic prefill at 8da4w is covered by the slow
tests of `test_executorch.py`.

Which check catches what (measured 2026-12-07 on this slice, scenario `prefill`): the stored-weights check
(every stored row equal to one of the simulation's, bit for bit) catches both wrong artifacts whatever the
weights are. The w2 x1.02 is also caught by the `-a8` gates' resolved-prefill row (`parity.boundary`: logit
max rel 0.025 against its limit 2e-5), not by the plain logits (0.0135 against the `int4-a8` limit 0.071).
The other checkpoint fails every part (logit max rel 1.04, KL mean against fp32 5.33): that needs weights
whose logits differ measurably, which the trained slice has."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("executorch")

from model_slices import copy_artifact, write_slice  # noqa: E402

from lfm_export.backends.executorch.convert import MODEL_FILE  # noqa: E402
from lfm_export.backends.executorch.recipes import make_recipe  # noqa: E402
from lfm_export.loading import load_model  # noqa: E402
from lfm_export.pipeline import check_artifact, export_artifact  # noqa: E402
from lfm_export.progress import Progress  # noqa: E402

CONTEXT = 32
W2 = "model.layers.1.feed_forward.w2.weight"
"""The matrix edited: the attention layer's MLP down projection."""


def export_slice(model: str, layers: tuple[int, int], other: tuple[int, int], root: Path) -> dict[str, Any]:
    """`model`'s layers `layers` as a checkpoint, exported at 8da4w (context 32, static prefill), and its
    layers `other` as the other checkpoint."""
    torch.set_num_threads(2)
    honest = write_slice(model, root / f"{model}-layers-{layers[0]}-{layers[1]}", layers)
    out = root / f"{honest.name}-8da4w"
    outcome = export_artifact(
        "executorch",
        str(honest),
        out,
        make_recipe("8da4w", max_seq_len=CONTEXT, max_prefill=1),
        threads=2,
        progress=Progress(quiet=True),
    )
    other_folder = write_slice(model, root / f"{model}-layers-{other[0]}-{other[1]}", other)
    return {"outcome": outcome, "out": out, "model": honest, "other": other_folder, "root": root}


@pytest.fixture(scope="module")
def sliced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return export_slice("tiny", (1, 2), (3, 4), tmp_path_factory.mktemp("et-8da4w"))


def test_honest_8da4w_slice_passes_parity_with_every_stored_row_matched(sliced: dict[str, Any]) -> None:
    outcome = sliced["outcome"]
    p = outcome.manifest["parity"]
    assert outcome.passed and p["gate"] == "int4-a8" and p["exactness"]["against"] == "simulated", p
    assert {k for k, v in p["scenarios"].items() if v == "ok"} >= {"prefill", "decode", "chunked_prefill"}
    assert outcome.manifest["weights"]["counts"] == {"int4": 5 + 7, "int8": 1}  # conv, attention, the head
    # 12 int4 linears (2688 rows), the int8 head and the int8 embedding (2048 rows each)
    assert p["exactness"]["stored_weights"] == {"passed": True, "artifact_rows": 6784, "rows_unmatched": 0}
    assert p["quality"]["passed"] and p["quality"]["pooled"]["kl_mean"] < 0.2  # measured 0.090


def test_one_matrix_x1_02_in_place_fails_parity_naming_it(sliced: dict[str, Any]) -> None:
    assert_one_matrix_x1_02_fails(sliced, W2)


def assert_one_matrix_x1_02_fails(sliced: dict[str, Any], matrix: str) -> None:
    """The stored bf16 scales of `matrix`, found in the `.pte` by its values, x1.02 in a copy: parity through
    the runtime fails on the stored weights and names the filter and the matrix it is nearest."""
    from pte_edit import scale_filter

    from lfm_export.backends.executorch import weight_values
    from lfm_export.backends.executorch.stored_weights import read_pte

    recipe = sliced["outcome"].manifest["recipe"]
    w = load_model(str(sliced["model"])).model.get_parameter(matrix).detach().numpy()
    held = weight_values(recipe)(w, int(recipe["bits"]))
    out = sliced["out"]
    names = [n for n, x in read_pte(out / MODEL_FILE) if x.shape == held.shape and np.array_equal(x, held)]
    assert len(names) == 1, names
    tampered = copy_artifact(sliced, f"tampered-{matrix.replace('.', '-')}")
    scale_filter(tampered / MODEL_FILE, names[0], 1.02)
    result = check_artifact(tampered, threads=2, progress=Progress(quiet=True), scenarios=["prefill"])
    sw = result.stored_weights
    assert not result.passed and list(sw["unmatched"]) == names, sw
    assert sw["unmatched"][names[0]]["rows"] == held.shape[0], sw
    assert f"stored_weights[{names[0]} ~{matrix}]: rows_unmatched" in result.verdict_line()


def test_the_artifact_judged_against_another_checkpoint_fails(sliced: dict[str, Any]) -> None:
    """Against tiny's layers 3 and 4 (same shapes, other trained weights; the same embedding and head): the
    logits exactness fails, and every row of the 12 linears is unmatched, the head's and the embedding's
    rows none."""
    sw = assert_other_checkpoint_fails(sliced)
    assert len(sw["unmatched"]) == 12 and sw["rows_unmatched"] == 2688, sw  # the linears' rows, all of them


def assert_other_checkpoint_fails(sliced: dict[str, Any]) -> dict[str, Any]:
    """A copy of the artifact judged against the other checkpoint fails exactness, on the logits too (not only
    the stored weights); returns the stored-weights report."""
    judged = copy_artifact(sliced, "judged")
    other = load_model(str(sliced["other"]))
    result = check_artifact(judged, other, threads=2, progress=Progress(quiet=True), scenarios=["prefill"])
    exactness = result.summary()["exactness"]
    assert not result.passed and not exactness["passed"]
    assert exactness["worst"]["logit_max_rel"] > 0.1, exactness["worst"]
    return result.stored_weights


@pytest.mark.slow
def test_moe_8da4w_slice_passes_and_an_expert_x1_02_and_other_weights_fail(tmp_path: Path) -> None:
    """The MoE form (each expert's linears an XNNPACK delegate of its own, `composed_moe.py`) on a slice of
    `tiny-moe` (dense conv layer 1, MoE attention layer 2; other: layers 0 and 4): the honest export passes,
    one expert's w2 x1.02 in place fails naming it, the other checkpoint fails."""
    sliced = export_slice("tiny-moe", (1, 2), (0, 4), tmp_path)
    outcome = sliced["outcome"]
    p = outcome.manifest["parity"]
    assert outcome.passed and p["gate"] == "int4-a8" and p["exactness"]["stored_weights"]["passed"], p
    assert_one_matrix_x1_02_fails(sliced, "model.layers.1.feed_forward.experts.3.w2.weight")
    assert assert_other_checkpoint_fails(sliced)["rows_unmatched"] > 0
