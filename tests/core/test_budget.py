"""Per-layer precision to a budget: the rule list holds the mix, the chooser meets the budget optimally, an
impossible budget is refused in one line before anything is written (CLI), and budgeted exports pass parity
while the same artifact judged without its mix fails exactness (slow)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lfm_export.budget import KL, MB, SIZE, Budget, BudgetError, choose, parse_budget
from lfm_export.contract.errors import UnsupportedError
from lfm_export.precision import CHOSEN, block_as, held_as, label, manifest_entry, rule_for
from lfm_export.recipes import Recipe, parse_recipe

pytestmark = pytest.mark.unit


def _mixed() -> Recipe:
    return parse_recipe("int4-b32").with_options(
        mix=(("layers.1.feed_forward", 8, 64), ("lm_head.weight", 4, 128))
    )


def test_the_rule_list_holds_the_mix() -> None:
    r = _mixed()
    assert held_as("model.layers.1.feed_forward.w2.weight", r) == 8
    assert block_as("model.layers.1.feed_forward.w2.weight", r, 256) == 64
    assert rule_for("model.layers.1.feed_forward.w2.weight", r).held == CHOSEN
    assert held_as("model.layers.10.feed_forward.w2.weight", r) == 4  # layers.1 is no prefix of layers.10
    assert block_as("model.layers.10.feed_forward.w2.weight", r, 256) == 32
    assert (held_as("lm_head.weight", r), block_as("lm_head.weight", r, 256)) == (4, 128)
    # the float rules come first: a mix never quantizes a norm or the MoE router
    assert held_as("model.layers.1.feed_forward.gate.weight", r) is None
    assert held_as("model.layers.1.ffn_norm.weight", r) is None
    assert label(8, r, 64) == "int8-b64"
    entry = manifest_entry(["model.layers.1.feed_forward.w1.weight", "model.embed_tokens.weight"], r)
    assert entry["tensors"] == {
        "model.layers.1.feed_forward.w1.weight": "int8-b64",
        "model.embed_tokens.weight": "int8-b32",
    }
    assert entry["mix"] == [
        {"match": "layers.1.feed_forward", "held": "int8-b64"},
        {"match": "lm_head.weight", "held": "int4-b128"},
    ]
    # the mix goes through the manifest and back
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert r.with_options(mix=(("layers.1.feed_forward", 8, 64),)).gate_family == "int4"
    assert parse_recipe("int8").with_options(mix=(("x", 8, 32),)).gate_family == "int8"


def test_candidates_are_what_the_backend_format_holds() -> None:
    from lfm_export.backends import get
    from lfm_export.budget import CANDIDATES, candidates

    assert {(8, 64), (8, 128), (4, 128)} <= set(CANDIDATES)
    # onnxruntime 1.32's MatMulNBits / GatherBlockQuantized: 2, 4 and 8 bits (3 refused); portable: 4 and 8
    assert candidates(get("onnx").recipe("int4", 64)) == (*CANDIDATES, (2, 32), (2, 64), (2, 128))
    assert candidates(get("onnx").recipe("int4", 64, ops="portable")) == CANDIDATES
    assert candidates(get("mlx").recipe("int4", 64)) == (*CANDIDATES, (3, 64), (3, 128))
    three = parse_recipe("int4-b64").with_options(mix=(("layers.1.feed_forward", 3, 128),))
    assert three.gate_family == "int4" and held_as("model.layers.1.feed_forward.w2.weight", three) == 3
    with pytest.raises(UnsupportedError, match="no block precision"):
        parse_recipe("int4-b64").with_options(mix=(("layers.1.feed_forward", 5, 128),))
    # GGUF: ggml's types as mix entries, K-quants as 256-value super-blocks; one-type files take no budget
    from lfm_export.backends.gguf.recipes import MIX_TYPES

    assert candidates(get("gguf").recipe("q4_k_m-gptq", 64)) == tuple(MIX_TYPES)
    assert [MIX_TYPES[c] for c in MIX_TYPES] == ["Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q5_0"]
    assert get("gguf").recipe("q4_0", 64).mix_candidates == ()
    k3 = parse_recipe("int4-b32").with_options(mix=(("layers.1.feed_forward", 3, 256),))
    assert held_as("model.layers.1.feed_forward.w2.weight", k3) == 3
    with pytest.raises(UnsupportedError, match="no block precision"):
        parse_recipe("int4-b64").with_options(mix=(("layers.1.feed_forward", 2, 256),))


def test_executorch_mixes_int4_blocks_and_int8_per_channel() -> None:
    """XNNPACK's dynamically quantized linears: int4 in blocks, int8 per output channel only (block 0 in a
    mix entry, `PER_CHANNEL`), counted as the `.pte` holds them."""
    from lfm_export.backends import get
    from lfm_export.budget import candidates, stored_bytes

    recipe = get("executorch").recipe("int4-b128-a8", 64)
    assert candidates(recipe) == ((4, 32), (4, 64), (4, 128), (8, 0))
    r = parse_recipe("int4-b128-a8").with_options(mix=(("layers.1.feed_forward", 8, 0),))
    w2 = "model.layers.1.feed_forward.w2.weight"
    assert (held_as(w2, r), block_as(w2, r, 384)) == (8, 384)  # one block: the whole row
    assert label(8, r, 0) == "int8-pc" and manifest_entry([w2], r)["tensors"] == {w2: "int8-pc"}
    assert manifest_entry([w2], r)["mix"] == [{"match": "layers.1.feed_forward", "held": "int8-pc"}]
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    with pytest.raises(UnsupportedError, match="no block precision"):  # int4 needs blocks
        parse_recipe("int4-b64").with_options(mix=(("layers.1.feed_forward", 4, 0),))
    # a 256 x 384 linear: int4-b32 codes + bf16 scales; int8 codes + a float32 scale per row; a tied table
    # twice (the lookup table's scales float32)
    assert stored_bytes(recipe, (256, 384), 4, 32, True) == 256 * 192 + 256 * 12 * 2
    assert stored_bytes(recipe, (256, 384), 8, 0, True) == 256 * 384 + 256 * 4
    assert stored_bytes(recipe, (256, 384), 4, 32, True, True) == 2 * 256 * 192 + 256 * 12 * (2 + 4)


def test_budget_text_is_checked() -> None:
    assert parse_budget("size=1.5") == Budget(SIZE, 1.5 * MB)
    assert parse_budget("kl=0.01") == Budget(KL, 0.01)
    for bad in ("size=", "size=-1", "bytes=3", "kl=abc", "kl=inf", "1.5"):
        with pytest.raises(BudgetError, match="expected size=MB or kl=X"):
            parse_budget(bad)


def _brute(costs: np.ndarray, sizes: np.ndarray, fixed: int, budget: Budget) -> tuple[float, float]:
    best: tuple[float, float] | None = None
    for pick in itertools.product(*(np.flatnonzero(np.isfinite(c)) for c in costs)):
        kl = sum(costs[g, c] for g, c in enumerate(pick))
        size = fixed + sum(sizes[g, c] for g, c in enumerate(pick))
        ok = size <= budget.value if budget.kind == SIZE else kl <= budget.value
        key = (kl, size) if budget.kind == SIZE else (size, kl)
        if ok and (best is None or key < best):
            best = key
    assert best is not None
    return best


def test_the_chooser_meets_the_budget_with_the_least_cost() -> None:
    rng = np.random.default_rng(0)
    for trial in range(20):
        groups = 5
        sizes = np.sort(rng.integers(1000, 9000, (groups, 4)), axis=1)[:, ::-1].astype(float)
        costs = np.sort(rng.random((groups, 4)), axis=1) * 1e-3
        if trial % 3 == 0:
            costs[0, 2], sizes[0, 2] = np.inf, np.inf  # a block that does not fit the group
        fixed = 500
        low, high = np.nanmin(np.where(np.isfinite(sizes), sizes, np.nan), 1).sum(), sizes[:, 0].sum()
        size = Budget(SIZE, fixed + low + (high - low) * rng.random())
        pick = choose(costs, sizes, fixed, size)
        got = fixed + sum(sizes[g, c] for g, c in enumerate(pick))
        assert got <= size.value
        kl_best, _ = _brute(costs, sizes, fixed, size)
        # the size steps round each item up by at most 1/4000 of the largest mix: near-optimal, never over
        assert sum(costs[g, c] for g, c in enumerate(pick)) <= kl_best + 1e-3 * 0.05
        kl = Budget(KL, costs.min(1).sum() + (costs[:, -1].sum() - costs.min(1).sum()) * rng.random())
        pick = choose(costs, sizes, fixed, kl)
        assert sum(costs[g, c] for g, c in enumerate(pick)) <= kl.value
        size_best, _ = _brute(costs, sizes, fixed, kl)
        assert fixed + sum(sizes[g, c] for g, c in enumerate(pick)) <= size_best + groups * high / 4000


def test_an_impossible_budget_is_refused() -> None:
    costs = np.array([[0.0, 1e-3], [0.0, 2e-3]])
    sizes = np.array([[2000.0, 1000.0], [2000.0, 1000.0]])
    with pytest.raises(BudgetError, match="below the smallest mix"):
        choose(costs, sizes, 100, Budget(SIZE, 2000))
    with pytest.raises(BudgetError, match="below the least estimated KL"):
        choose(costs + 1e-4, sizes, 100, Budget(KL, 1e-4))


def test_impossible_budget_is_refused_before_writing(tmp_path: Path) -> None:
    from lfm_export.backends import get
    from lfm_export.contract.errors import UnsupportedError
    from lfm_export.pipeline import export_artifact
    from lfm_export.progress import Progress

    out = tmp_path / "a"
    with pytest.raises(BudgetError, match="below the smallest mix"):
        export_artifact(
            "onnx",
            "tiny",
            out,
            get("onnx").recipe("int4", 64),
            budget="size=0.4",  # every group at int2-b128: 0.45 MB
            progress=Progress(quiet=True),
        )
    assert not out.exists()
    with pytest.raises(UnsupportedError, match="cannot hold a per-layer mix"):  # before loading anything
        export_artifact("coreml", "tiny", out, "int4", budget="size=1", progress=Progress(quiet=True))
    with pytest.raises(BudgetError, match="K-quant mix"):  # GGUF's one-type files: before loading anything
        export_artifact("gguf", "tiny", out, get("gguf").recipe("q4_0", 64), budget="size=1")
    with pytest.raises(BudgetError, match="quantized precisions"):
        export_artifact("onnx", "tiny", out, get("onnx").recipe("fp32", 64), budget="kl=0.01")
    assert not out.exists()


@pytest.mark.slow
def test_impossible_budget_is_refused_in_one_line_by_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "a"
    r = subprocess.run(
        [sys.executable, "-m", "lfm_export.cli", "onnx", "tiny", "-o", str(out), "--quant", "int4"]
        + ["--budget", "size=0.5", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "below the smallest mix" in r.stderr
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend,model,budget",
    [("onnx", "tiny", "size=1.3"), ("onnx", "tiny-moe", "kl=0.002"), ("mlx", "tiny", "size=1.3")],
)
def test_budgeted_exports_meet_the_budget_and_pass_parity(
    tmp_path: Path, backend: str, model: str, budget: str
) -> None:
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    from lfm_export.backends import get
    from lfm_export.pipeline import check_artifact, export_artifact
    from lfm_export.progress import Progress

    out = tmp_path / backend
    outcome = export_artifact(
        backend,
        model,
        out,
        get(backend).recipe("int4", 64),
        budget=budget,
        threads=1,
        progress=Progress(quiet=True),
    )
    assert outcome.passed, outcome.parity.verdict_line()
    m = outcome.manifest
    wanted = parse_budget(budget)
    if wanted.kind == SIZE:
        assert m["budget"]["estimated_bytes"] <= wanted.value
    else:
        assert m["budget"]["estimated_kl"] <= wanted.value
    mix = [list(e) for e in m["recipe"]["mix"]]  # as the JSON files hold it
    assert len({(b, bs) for _, b, bs in mix}) >= 2, mix
    assert [e["match"] for e in m["precision"]["mix"]] == [p for p, _, _ in mix]
    assert {g["chosen"] for g in m["budget"]["groups"]} == {e["held"] for e in m["precision"]["mix"]}
    report = json.loads((out / "parity" / "parity.json").read_text())
    assert report["metadata"]["precision_mix"] == mix
    # the same artifact judged as the recipe without its mix fails exactness
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["recipe"] = {**manifest["recipe"], "mix": []}
    (out / "manifest.json").write_text(json.dumps(manifest))
    wrong = check_artifact(out, threads=1, scenarios=["prefill", "decode"], progress=Progress(quiet=True))
    assert not wrong.part_passed("exactness"), wrong.verdict_line()


def test_a_measured_plan_meets_its_budget_and_the_manifest_lists_the_mix() -> None:
    import torch

    from lfm_export.budget import groups, measure, plan
    from lfm_export.config import Lfm2Config
    from lfm_export.loading import LoadedModel
    from lfm_export.weights import RandomWeights, materialize

    torch.set_num_threads(1)
    cfg = Lfm2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=("conv", "full_attention"),
    )
    model = materialize(cfg, RandomWeights(cfg, seed=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    loaded = LoadedModel(
        model=model, config=cfg, source="test", path=None, random=True, weights_dtype="float32"
    )
    base = parse_recipe("int4-b32")
    found, fixed = groups(loaded, base)
    assert [g.name for g in found] == [
        "head+embedding",
        "layers.0.conv",
        "layers.0.mlp",
        "layers.1.attention",
        "layers.1.mlp",
    ]
    # every group int4-b32's bytes, plus the size steps' rounding (each item rounded up by < 1/4000 of the largest mix)
    size = (fixed + sum(g.nbytes(4, 32, True) for g in found)) * 1.005
    core, entry = plan(loaded, base, Budget(SIZE, size), tokens=256)
    assert entry["estimated_bytes"] <= size
    costs = [g["kl"] for g in entry["groups"]]
    assert all(c["int8-b32"] < c["int4-b32"] for c in costs)  # measured: more bits, less KL
    listed = manifest_entry([n for g in found for n in g.tensors], core)["mix"]
    assert listed == [{"match": p, "held": f"int{b}-b{bs}"} for p, b, bs in core.mix]
    chosen = {g["group"]: g["chosen"] for g in entry["groups"]}
    assert {e["held"] for e in listed} == set(chosen.values())
    # as good as one precision for all at these bytes, on the estimate
    uniform = sum(c["int4-b32"] for c in costs)
    assert entry["estimated_kl"] <= uniform + 5e-6  # the entry's costs are rounded to 6 decimals
    with pytest.raises(BudgetError, match="below the least estimated KL"):
        plan(loaded, base, Budget(KL, min(c["int8-b32"] for c in costs) / 10), tokens=256)
    # a calibrated recipe's groups are measured with its own (GPTQ) codes, the head's included: less KL in all
    gptq, _ = measure(loaded, parse_recipe("int4-b32-gptq"), found, tokens=256, offered=((4, 32), (4, 64)))
    for ci, word in enumerate(("int4-b32", "int4-b64")):
        assert gptq[:, ci].sum() < 0.9 * sum(c[word] for c in costs), word


def test_a_mix_of_32_value_ggml_types_names_a_valid_recipe() -> None:
    """Rows not a multiple of 256 (`tiny`) leave GGUF's budget Q5_0 and Q8_0 only: a mix whose fewest bits are 5
    still gives a recipe (named int4, as a 3-bit mix is), not 'weight bits 5 not supported'."""
    from lfm_export.budget import name_bits

    mix = (("layers.0.feed_forward", 5, 32), ("layers.1.feed_forward", 8, 32))
    assert name_bits(mix) == 4
    assert name_bits((("layers.0.feed_forward", 8, 32),)) == 8
    assert name_bits((("layers.0.feed_forward", 3, 256), ("layers.1.feed_forward", 6, 256))) == 4
    recipe = parse_recipe("int4-b32-gptq").with_options(bits=name_bits(mix), mix=mix)
    assert held_as("model.layers.0.feed_forward.w2.weight", recipe) == 5
    assert held_as("model.layers.1.feed_forward.w1.weight", recipe) == 8
