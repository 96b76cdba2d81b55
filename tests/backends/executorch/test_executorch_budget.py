"""`--budget` on ExecuTorch: a per-group mix of what XNNPACK runs with dynamic int8 activations (int4 in blocks
of 32 / 64 / 128, int8 per output channel), chosen within a size, held by the program's linears as the
manifest lists, and judged by parity against the simulation of that mix.

On the two-layer trained slice of `tiny` (`model_slices.write_slice`, context 32, one-token calls: one export
of about 20 s, as `test_executorch_8da4w.py`), the budget halfway between every group at int4-b128 and every
group at int8 per channel."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("executorch")

from model_slices import copy_artifact, write_slice  # noqa: E402

from lfm_export.backends.executorch import weight_values  # noqa: E402
from lfm_export.backends.executorch.convert import MODEL_FILE  # noqa: E402
from lfm_export.backends.executorch.recipes import ExecuTorchRecipe, make_recipe  # noqa: E402
from lfm_export.budget import weight_bytes  # noqa: E402
from lfm_export.loading import load_model  # noqa: E402
from lfm_export.pipeline import check_artifact, export_artifact  # noqa: E402
from lfm_export.progress import Progress  # noqa: E402

CONTEXT = 32


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("et-budget")
    model = write_slice("tiny", root / "tiny-layers-1-2", (1, 2))
    recipe = make_recipe("int4-b128-a8", max_seq_len=CONTEXT, max_prefill=1)
    lazy = load_model(str(model), lazy=True)
    low = weight_bytes(lazy, recipe)
    high = weight_bytes(lazy, make_recipe("int8-pc-a8", max_seq_len=CONTEXT, max_prefill=1))
    size = (low + high) // 2
    out = root / "budget"
    outcome = export_artifact(
        "executorch",
        str(model),
        out,
        recipe,
        threads=2,
        budget=f"size={size / 1e6}",
        progress=Progress(quiet=True),
    )
    return {"outcome": outcome, "out": out, "model": model, "root": root, "size": size}


def test_budget_mix_is_within_the_size_held_as_listed_and_passes_parity(budgeted: dict[str, Any]) -> None:
    outcome = budgeted["outcome"]
    m = outcome.manifest
    budget = m["budget"]
    assert budget["candidates"] == ["int4-b32", "int4-b64", "int4-b128", "int8-pc"]
    assert budget["estimated_bytes"] <= budgeted["size"]
    chosen = {g["group"]: g["chosen"] for g in budget["groups"]}
    assert len(set(chosen.values())) >= 2, chosen  # halfway: a mix, not one precision
    # the manifest's per-tensor precision is each group's choice
    tensors = m["precision"]["tensors"]
    for g in budget["groups"]:
        for name, word in tensors.items():
            if any(p in name for p in g["match"]) and word != "float":
                assert word == g["chosen"], (name, word, g)
    # the budget's byte count is that of the recipe the manifest holds
    held = ExecuTorchRecipe.from_dict(m["recipe"])
    assert weight_bytes(load_model(str(budgeted["model"]), lazy=True), held) == budget["estimated_bytes"]
    # every quantized tensor the manifest lists is stored in the program with the values of its precision
    from lfm_export.backends.executorch.stored_weights import read_pte

    stored = [x for _, x in read_pte(budgeted["out"] / MODEL_FILE)]
    values = weight_values(m["recipe"])
    ref = load_model(str(budgeted["model"])).model
    for name, word in tensors.items():
        if word == "float":
            continue
        bits = int(word[3])
        want = values(ref.get_parameter(name).detach().numpy(), bits, name)
        assert any(x.shape == want.shape and np.array_equal(x, want) for x in stored), (name, word)
    p = m["parity"]
    assert outcome.passed and p["exactness"]["against"] == "simulated", p
    assert (
        p["exactness"]["stored_weights"]["passed"] and p["exactness"]["stored_weights"]["rows_unmatched"] == 0
    )


def test_a_manifest_naming_another_precision_for_one_group_fails_parity(budgeted: dict[str, Any]) -> None:
    """The same program judged as if one group held another candidate (its mix entry changed in the manifest):
    the simulation holds other values, and parity fails on that group's stored rows."""
    m = budgeted["outcome"].manifest
    group = next(g for g in m["budget"]["groups"] if g["group"] != "head+embedding")
    other = "int8-pc" if group["chosen"] != "int8-pc" else "int4-b32"
    bits, block = (8, 0) if other == "int8-pc" else (4, 32)
    wrong = copy_artifact(budgeted, "wrong-mix")
    manifest = json.loads((wrong / "manifest.json").read_text())
    mix = [list(e) for e in manifest["recipe"]["mix"]]
    for e in mix:
        if e[0] in group["match"]:
            e[1], e[2] = bits, block
    manifest["recipe"]["mix"] = mix
    (wrong / "manifest.json").write_text(json.dumps(manifest))
    result = check_artifact(wrong, threads=2, progress=Progress(quiet=True), scenarios=["prefill"])
    sw = result.stored_weights
    assert not result.passed and sw["rows_unmatched"] > 0, sw


def test_a_size_below_every_group_at_its_fewest_bytes_is_refused(budgeted: dict[str, Any]) -> None:
    from lfm_export.budget import BudgetError

    out: Path = budgeted["root"] / "refused"
    with pytest.raises(BudgetError, match="below the smallest mix"):
        export_artifact(
            "executorch",
            str(budgeted["model"]),
            out,
            make_recipe("int4-b128-a8", max_seq_len=CONTEXT, max_prefill=1),
            budget="size=0.1",
            progress=Progress(quiet=True),
        )
    assert not out.exists()


def test_a_kl_budget_picks_the_smallest_mix_of_xnnpack_precisions(budgeted: dict[str, Any]) -> None:
    """`kl=X` (no export: `budget.plan`): the smallest mix whose estimated KL is at most X, every group at an
    ExecuTorch candidate; a looser X never gives a larger mix, and the size budget's own estimated KL is met
    within that size."""
    from lfm_export.budget import parse_budget, plan

    lazy = load_model(str(budgeted["model"]), lazy=True)
    recipe = make_recipe("int4-b128-a8", max_seq_len=CONTEXT, max_prefill=1)
    mixed_kl = budgeted["outcome"].manifest["budget"]["estimated_kl"] + 1e-6  # the manifest rounds to 1e-6
    sizes = []
    for x in (mixed_kl, 10 * mixed_kl):
        core, entry = plan(lazy, recipe, parse_budget(f"kl={x}"))
        assert entry["estimated_kl"] <= x
        assert {g["chosen"] for g in entry["groups"]} <= {"int4-b32", "int4-b64", "int4-b128", "int8-pc"}
        assert ExecuTorchRecipe(core, 1).recipe.mix == core.mix  # the backend recipe takes the mix
        sizes.append(entry["estimated_bytes"])
    assert sizes[1] <= sizes[0] <= budgeted["size"]  # the size budget's mix meets that KL within its size
