"""Core ML weights compressed as they are written (`compress.encoder` through `weights.fill`) against
coremltools' own compression passes run on the same program filled in fp16 (the former path): the same ops in
the same order, and bit-identical codes, scales, indices and tables. Also: placeholders stay placeholders
through the conversion's fp16 pass (no full-size fp16 copy of any weight before `fill`), and the 1-D k-means
palettization is deterministic and close to the best table it can find."""

from __future__ import annotations

import copy
import sys
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")

from lfm_export.backends.coreml.compress import configs, encoder, weight_values  # noqa: E402
from lfm_export.backends.coreml.convert import convert, trace  # noqa: E402
from lfm_export.backends.coreml.palette import kmeans_1d  # noqa: E402
from lfm_export.backends.coreml.recipes import make_recipe  # noqa: E402
from lfm_export.backends.coreml.weights import fill, placeholder_model, source_of  # noqa: E402
from lfm_export.loading import load_model  # noqa: E402
from lfm_export.model import STATEFUL  # noqa: E402
from lfm_export.signature import build_signature  # noqa: E402

CONTEXT = 16
MAX_PREFILL = 4


def converted(model: str, sparse: bool) -> tuple[Any, dict, Any, Any]:
    """`(program with placeholders, names, source, cfg)` of a bundled model."""
    torch.set_num_threads(2)
    loaded = load_model(model)
    cfg = loaded.config
    recipe = make_recipe("fp16", max_seq_len=CONTEXT, max_prefill=MAX_PREFILL)
    placeholders, names = placeholder_model(cfg, sparse_moe=sparse)
    traced = trace(placeholders, CONTEXT, MAX_PREFILL)
    sig = build_signature(cfg, STATEFUL, CONTEXT, "float16", max_prefill=MAX_PREFILL)
    return convert(traced, sig, recipe, (1, MAX_PREFILL)), names, source_of(loaded), cfg


@pytest.fixture(scope="module")
def moe_program() -> tuple[Any, dict, Any, Any]:
    """`tiny-moe` in the sparse form: linears, the tied embedding, the router, stacked experts."""
    return converted("tiny-moe", sparse=True)


def clone(program: Any) -> Any:
    """A deep copy (a MIL program is a deeply linked graph: Python's default recursion limit is too low)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 50_000))
    try:
        return copy.deepcopy(program)
    finally:
        sys.setrecursionlimit(limit)


def by_coremltools(program: Any, names: dict, source: Any, recipe: Any) -> Any:
    """The former path: every weight written in fp16, then coremltools' own passes, given the per-constant
    configs `configs` decides, on the whole program."""
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    decided = configs(program, recipe)
    encode, _ = encoder(program, make_recipe("fp16"))
    fill(program, names, source, encode)
    quant = {
        n + "_filled": c for n, (_, _, c) in decided.items() if isinstance(c, cto.OpLinearQuantizerConfig)
    }
    # coremltools palettizes a stacked constant along one axis only: ours (per expert) is checked against
    # the simulation instead
    palette = {
        n + "_filled": c
        for n, (role, _, c) in decided.items()
        if isinstance(c, cto.OpPalettizerConfig) and role != "experts"
    }
    for key, chosen in (
        ("compression::palettize_weights", palette),
        ("compression::linear_quantize_weights", quant),
    ):
        if chosen:
            graph_pass = PASS_REGISTRY[key]
            config = cto.OptimizationConfig(op_name_configs=chosen)
            graph_pass.set_options([PassOption("config", config), PassOption("joint_compression", False)])
            graph_pass.apply(program)
    return program


def ops(program: Any) -> list[tuple[str, str, dict]]:
    """`(type, name without the fp16 path's "_filled", {constexpr input: value})` per op of the main function."""
    out = []
    for op in program.functions["main"].operations:
        values = {}
        if op.op_type.startswith("constexpr_") or op.op_type == "const":
            values = {k: v.val for k, v in op.inputs.items() if v.val is not None and np.ndim(v.val) > 0}
            if op.op_type == "const":
                values = {"val": op.outputs[0].val}
        out.append((op.op_type, op.name.replace("_filled", ""), values))
    return out


def assert_same_programs(ours: Any, theirs: Any, skip: frozenset = frozenset()) -> int:
    """Same op types and names in order, bit-identical constants; `skip`: constants left out of both."""

    def kept(name: str) -> bool:
        return not any(name == n or name.startswith(n + "_palettized") for n in skip)

    a, b = ([o for o in ops(p) if kept(o[1])] for p in (ours, theirs))
    assert [(t, n) for t, n, _ in a] == [(t, n) for t, n, _ in b]
    compressed = 0
    for (kind, name, va), (_, _, vb) in zip(a, b, strict=True):
        assert va.keys() == vb.keys(), name
        for key in va:
            x, y = np.asarray(va[key]), np.asarray(vb[key])
            assert x.dtype == y.dtype and x.shape == y.shape, (name, key, x.dtype, y.dtype, x.shape, y.shape)
            assert np.array_equal(x, y), (name, key)
        compressed += kind.startswith("constexpr_")
    return compressed


def test_compressed_as_written_equals_coremltools_passes_int4(moe_program) -> None:
    """int4 blocks on the linears and, per expert, on the stacked experts; int8 per channel on the embedding."""
    program, names, source, _ = moe_program
    recipe = replace(make_recipe("int4", max_seq_len=CONTEXT, max_prefill=MAX_PREFILL), moe=True)
    ours = clone(program)
    encode, report = encoder(ours, recipe)
    filled = fill(ours, names, source, encode)
    theirs = by_coremltools(clone(program), names, source, recipe)
    compressed = assert_same_programs(ours, theirs)
    assert compressed == sum(1 for r in report.values() if r["as"] != "fp16")
    assert any("stacked" in r["why"] and r["as"].startswith("int4") for r in report.values())
    assert any(r["as"].startswith("int8 per channel") for r in report.values())
    assert_stored_weights_are_the_simulations(ours, filled, source, recipe)


def assert_stored_weights_are_the_simulations(program: Any, filled: dict, source: Any, recipe: Any) -> None:
    """The stored-weights reader decodes every compressed constant (stacked experts as their rows) to the
    simulation's values (`weight_values` of each checkpoint tensor) bit for bit; with one w2's scales x1.02 it
    names that constant and, by nearest values, the checkpoint tensor."""
    from lfm_export.backends.coreml.stored_weights import program_weights
    from lfm_export.parity.stored_weights import compare

    values = weight_values(recipe.to_dict())
    simulated = {}
    for tensors in filled.values():
        for name in tensors if isinstance(tensors, tuple) else (tensors,):
            w = source.get(name).float().numpy()
            if w.ndim == 2:
                simulated[name] = values(w, 8 if "embed_tokens" in name else 4)
    result = compare(program_weights(program), simulated)
    assert result.passed and result.artifact_tensors == 35 and result.artifact_rows == 18432, (
        result.describe()
    )
    op = next(
        o
        for o in program.functions["main"].operations
        if o.op_type == "constexpr_blockwise_shift_scale" and o.name.startswith(f"model.{W2}")
    )
    scale = op.inputs["scale"]
    scale._sym_val.val = (scale.val.astype(np.float32) * np.float32(1.02)).astype(scale.val.dtype)
    result = compare(program_weights(program), simulated)
    assert result.unmatched == {op.name: (128, 128)} and result.nearest == {op.name: W2}, result.describe()


W2 = "model.layers.0.feed_forward.w2.weight"


def test_palettized_as_written_equals_coremltools_pass_and_stacked_experts_the_simulation(
    moe_program,
) -> None:
    """The linears: the same ops and tables as coremltools' palettization pass given our table function.
    The stacked experts, which that pass cannot group per expert: one table per expert and 16 output
    channels, decoding to what the simulation gives each expert's own matrix."""
    from lfm_export.runtime.coreml_interpreter import constexpr_lut_to_dense

    program, names, source, cfg = moe_program
    recipe = replace(make_recipe("palettize4", max_seq_len=CONTEXT, max_prefill=MAX_PREFILL), moe=True)
    ours = clone(program)
    encode, _ = encoder(ours, recipe)
    filled = fill(ours, names, source, encode)
    stacked = {n: t for n, t in filled.items() if isinstance(t, tuple)}
    assert stacked
    theirs = by_coremltools(clone(program), names, source, recipe)
    assert assert_same_programs(ours, theirs, skip=frozenset(stacked)) > 0
    values = weight_values(recipe.to_dict())
    luts = {
        op.name.removesuffix("_palettized"): op
        for op in ours.functions["main"].operations
        if op.op_type == "constexpr_lut_to_dense"
    }
    for const, tensors in stacked.items():
        op = luts[const]
        dense = constexpr_lut_to_dense(op.indices.val, op.lut.val)
        assert op.lut.val.shape[:2] == (cfg.num_experts, dense.shape[1] // 16)
        for e, tensor in enumerate(tensors):
            want = values(source.get(tensor).float().numpy(), 4)
            assert np.array_equal(dense[e].astype(np.float32), want), (const, e)


def test_placeholders_stay_placeholders_through_the_fp16_pass(moe_program) -> None:
    """Every weight constant after conversion is still a broadcast scalar: the fp16 pass made no full copy."""
    program, names, _, _ = moe_program
    seen = 0
    for op in program.functions["main"].operations:
        val = op.outputs[0].val if op.op_type == "const" else None
        if isinstance(val, np.ndarray) and val.size > 1 and float(val.flat[0]) in names:
            assert 0 in val.strides, op.name
            seen += 1
    assert seen >= len(set(names.values()))


def test_kmeans_1d_is_deterministic_and_a_local_optimum() -> None:
    rng = np.random.default_rng(0)
    group = (rng.standard_normal((16, 256)) * 0.05).astype(np.float16)
    lut, idx = kmeans_1d(group, 4)
    again = kmeans_1d(group.copy(), 4)
    assert np.array_equal(lut, again[0]) and np.array_equal(idx, again[1])
    assert lut.dtype == np.float16 and lut.shape == (16,) and idx.shape == (group.size,)
    x = group.reshape(-1).astype(np.float64)
    table = lut.astype(np.float64)
    # every value sits at its nearest entry
    assert np.array_equal(np.abs(x[:, None] - table[None]).argmin(1), idx)
    # each entry is its cluster's mean (Lloyd's fixed point), up to the entry's fp16 rounding and the
    # members that rounding moved across a boundary
    for j in range(16):
        members = x[idx == j]
        assert members.size and abs(members.mean() - table[j]) <= 2 * np.spacing(np.float16(table[j]))
    # better than a uniform grid over the range
    grid = np.linspace(x.min(), x.max(), 16)
    uniform = np.min((x[:, None] - grid[None]) ** 2, 1).mean()
    assert ((x - table[idx]) ** 2).mean() < uniform


def test_kmeans_1d_with_fewer_distinct_values_than_entries() -> None:
    group = np.array([0.5, -1.0, 0.5, 2.0], dtype=np.float16)
    lut, idx = kmeans_1d(group, 4)
    assert np.array_equal(lut[idx], group)


def test_a_palettized_recipe_from_before_the_1d_kmeans_is_refused_for_simulation() -> None:
    from lfm_export.contract.errors import UserError

    old = make_recipe("palettize4").to_dict()
    old.pop("palette")
    with pytest.raises(UserError, match="export it again"):
        weight_values(old)


def test_router_choice_is_ranked_in_fp32(moe_program) -> None:
    """top-k ranks sigmoid(scores) + expert bias computed in fp32: an fp16 add tied experts whose fp32 choices
    differed by 3e-5..7e-4 (tiny-moe palettize6 chose other experts on 3 of 4 parity prompts)."""
    from coremltools.converters.mil.mil import types

    program, _, _, cfg = moe_program
    topks = [op for op in program.functions["main"].operations if op.op_type == "topk"]
    assert len(topks) == sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    for op in topks:
        producer = op.x.op
        assert producer.op_type == "add" and op.x.dtype == types.fp32, (op.name, producer.op_type)
        assert {v.op.op_type for v in producer.inputs.values() if v.op is not None} >= {"sigmoid"}
        assert all(v.dtype == types.fp32 for v in producer.inputs.values())
