"""The Core ML backend end to end: real `.mlpackage` files converted by coremltools from the bundled models, read
back from disk and run by the numpy interpreter through the `CoreMLSession` shim, checked by the parity gate.

Default suite: `tiny` and `tiny-moe` at fp16 (context 32), one deliberately wrong conversion, the
spec / metadata / inspect checks, bad input. Slow: `tiny-moe` int4 and its compression report, every recipe on both models, and checkpoints written by
transformers (dense and MoE) at fp16 and int4 with a wrong conversion of each."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")

from lfm_export.backends.coreml.recipes import make_recipe  # noqa: E402
from lfm_export.loading import load_model  # noqa: E402
from lfm_export.parity import ReferenceSession  # noqa: E402
from lfm_export.pipeline import check_artifact, export_artifact  # noqa: E402
from lfm_export.progress import Progress  # noqa: E402
from lfm_export.runtime.coreml import CoreMLSession  # noqa: E402
from lfm_export.runtime.coreml_interpreter import load_program  # noqa: E402

CONTEXT = 32


def export(model: str, out: Path, quant: str, **kw) -> Path:
    torch.set_num_threads(2)
    outcome = export_artifact(
        "coreml",
        model,
        out,
        make_recipe(quant, max_seq_len=kw.pop("context", CONTEXT), **kw),
        threads=2,
        progress=Progress(quiet=True),
    )
    assert outcome.passed, outcome.manifest["parity"]["verdict"]
    return out


@pytest.fixture(scope="module")
def tiny_fp16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export("tiny", tmp_path_factory.mktemp("cm") / "tiny-fp16", "fp16", max_prefill=8)


@pytest.fixture(scope="module")
def moe_fp16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export("tiny-moe", tmp_path_factory.mktemp("cm") / "moe-fp16", "fp16", prefill_lengths="1,4,8")


@pytest.fixture(scope="module")
def moe_int4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Compression adds about 40 s on loaded cores (coremltools' pass, and the same per weight for the
    simulation), so the tests that need it are slow."""
    return export("tiny-moe", tmp_path_factory.mktemp("cm") / "moe-int4", "int4", prefill_lengths="1,4,8")


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_tiny_fp16_passes_both_parts_under_the_interpreter(tiny_fp16: Path) -> None:
    m = manifest(tiny_fp16)
    p = m["parity"]
    assert m["backend"] == "coreml" and m["recipe"]["name"] == "fp16"
    assert p["exactness"]["gate"] == "fp16-fp16" and p["exactness"]["passed"] and p["quality"]["passed"]
    assert {k for k, v in p["scenarios"].items() if v == "ok"} >= {"prefill", "decode", "chunked_prefill"}
    assert p["scenarios"]["near_max_seq_len"] == "ok"
    # fp16 compute against an fp32 simulation holding the same weights: fp16 rounding, no more
    assert 1e-5 < p["exactness"]["worst"]["logit_max_rel"] < 5e-3
    assert p["quality"]["pooled"]["kl_mean"] < 1e-4
    assert "coreml-interpreter" in (tiny_fp16 / "parity" / "parity.md").read_text()


def test_moe_fp16_passes_with_enumerated_prefill_lengths(moe_fp16: Path) -> None:
    m = manifest(moe_fp16)
    p = m["parity"]
    assert m["recipe"]["name"] == "fp16" and m["recipe"]["moe"] is True
    assert p["exactness"]["gate"] == "fp16-fp16-moe" and p["passed"]
    assert m["coreml"]["prefill"] == {"enumerated": [1, 4, 8]}
    assert p["quality"]["pooled"]["kl_mean"] < 1e-4
    assert m["recipe"]["moe_form"] == "sparse" and "scatter_along_axis" not in m["coreml"]["ops"]


def test_moe_parity_reports_positions_judged_apart(moe_fp16: Path) -> None:
    """The `-fp16-moe` gate holds every position to the dense `-fp16` limits but those whose expert choice is
    within fp16 rounding (held to the `*_at_tie` limits); the report says how many and where, in both forms."""
    from lfm_export.parity.thresholds import GATES

    p = manifest(moe_fp16)["parity"]
    report = json.loads((moe_fp16 / "parity" / "parity.json").read_text())["exactness"]["judged_apart"]
    assert report["margin"] == GATES["fp16-fp16-moe"].router_margin
    assert p["exactness"]["judged_apart"] == report["count"]
    assert report["count"] == sum(len(v) for v in report["scenarios"].values())
    assert {"prefill", "decode"} <= set(report["scenarios"]) and report["count"] >= 1  # 36 of 186 here
    assert p["exactness"]["worst"]["logit_max_rel"] <= 5e-3
    assert (
        "judged apart: expert choice within the runtime's rounding"
        in (moe_fp16 / "parity" / "parity.md").read_text()
    )


def scaled_experts(model: str, layer: int, scale: float):
    """`model` loaded with every expert's w2 of `layer` scaled by `scale`: checked against it, an honest
    artifact is one whose experts are that much off."""
    loaded = load_model(model)
    with torch.no_grad():
        for expert in loaded.model.model.layers[layer].feed_forward.experts:
            expert.w2.weight.mul_(scale)
    return loaded


def test_moe_experts_off_by_5_percent_fail_the_fp16_moe_gate(moe_fp16: Path) -> None:
    """The honest fp16 package against the model whose layer-3 experts' w2 are 5% larger, judged as the
    pipeline judges it (the `-fp16-moe` gate, simulation with fp16-rounded inputs, its rounding effect), on the
    prefill scenario: what the old flip-tolerant limits (logit 0.15, KL 0.5) passed, the dense limits on the
    positions not judged apart catch. One prompt, to keep it cheap."""
    from lfm_export.backends import get
    from lfm_export.parity import default_prompts, run_parity
    from lfm_export.pipeline import simulation_for
    from lfm_export.quant import simulate

    loaded = scaled_experts("tiny-moe", 3, 1.05)
    recipe, activations = simulation_for(get("coreml"), manifest(moe_fp16)["recipe"])

    def sim(mode: str, name: str) -> ReferenceSession:
        return ReferenceSession(simulate(loaded.model, recipe, mode), name=name, max_seq_len=CONTEXT)

    result = run_parity(
        CoreMLSession(moe_fp16),
        ReferenceSession(loaded.model, max_seq_len=CONTEXT),
        "fp16",
        default_prompts(loaded.config.vocab_size, str(moe_fp16 / "tokenizer.json"))[:1],
        scenarios=["prefill"],
        simulation=sim(activations, "simulated"),
        activations=activations,
        rounding=sim("float", "unrounded"),
        snapshots=False,
    )
    assert result.gate.name == "fp16-fp16-moe" and result.judged_apart()["count"] >= 1
    assert not result.part_passed("exactness")
    assert result.worst("logit_max_rel") > 5e-3


def test_sparse_moe_reads_experts_only_through_a_gather_by_the_topk_indices(moe_fp16: Path) -> None:
    """The sparse form's structure in the saved program: per MoE layer, three stacked `[E, out, in]` expert
    constants, each read by one `gather` whose indices come from the router's `topk` (so one token reads k of
    the E experts), and no dense expert linears."""
    program = load_program(moe_fp16 / "model.mlpackage")
    cfg = load_model("tiny-moe").config
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    function = program_function(moe_fp16)
    stacked = [
        op
        for op in function.operations
        if op.op_type == "const" and op.outputs[0].rank == 3 and op.outputs[0].shape[0] == cfg.num_experts
    ]
    assert len(stacked) == 3 * moe_layers
    for op in stacked:
        (user,) = op.outputs[0].child_ops
        assert user.op_type == "gather" and user.inputs["x"] is op.outputs[0]
        assert "topk" in producers(user.inputs["indices"])
    assert program.op_counts()["linear"] < 3 * cfg.num_experts * moe_layers


def program_function(folder: Path):
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    mlmodel = ct.models.MLModel(str(folder / "model.mlpackage"), skip_model_load=True)
    spec = mlmodel.get_spec()
    prog = load(spec, specification_version=spec.specificationVersion, file_weights_dir=mlmodel.weights_dir)
    return prog.functions["main"]


def producers(var, depth: int = 12) -> set[str]:
    """Op types upstream of `var`, up to `depth` ops back."""
    op = var.op
    if op is None or depth == 0:
        return set()
    out = {op.op_type}
    for v in op.inputs.values():
        for w in v if isinstance(v, list | tuple) else [v]:
            out |= producers(w, depth - 1)
    return out


def test_stacked_moe_matches_the_canonical_moe() -> None:
    """`StackedMoE` (gather the top-k experts' stacked weights) against the canonical dense form, eager fp32,
    on tiny-moe's trained layer 2 and 5 tokens."""
    from lfm_export.backends.coreml.modules import stacked_moe

    model = load_model("tiny-moe").model
    moe = model.model.layers[2].feed_forward
    x = torch.randn(1, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = moe(x)
        got = stacked_moe(moe)(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.slow
def test_moe_int4_passes(moe_int4: Path) -> None:
    p = manifest(moe_int4)["parity"]
    assert p["exactness"]["gate"] == "int4-fp16-moe" and p["passed"]
    assert 0.01 < p["quality"]["pooled"]["kl_mean"] < 0.1  # what int4 costs on tiny-moe (ONNX int4: 0.045)
    # every compressed constant, the stacked experts included, decodes to the simulation's values bit for bit
    assert p["exactness"]["stored_weights"] == {"passed": True, "artifact_rows": 18432, "rows_unmatched": 0}


@pytest.mark.slow
def test_moe_int4_with_one_expert_stack_two_percent_off_fails_parity(moe_int4: Path, tmp_path: Path) -> None:
    """A copy of the package with the stored scales of one MoE layer's stacked expert w2 x1.02 (rewritten in
    `weight.bin`) fails parity through the interpreter, naming that constant; the `int4-fp16-moe` logits gate
    (kl_max 0.5) passes a w2 x1.05 on its own (issue 19), so the stored weights are what catch it."""
    from package_edit import scale_op

    from lfm_export.backends.coreml.stored_weights import stored_weights

    stacked = [n for n, w in stored_weights(moe_int4) if "w2" in n and w.shape[0] > w.shape[1]]
    assert stacked, "no stacked expert w2 constant"
    tampered = tmp_path / "tampered"
    shutil.copytree(moe_int4, tampered)
    scale_op(tampered / "model.mlpackage", stacked[-1], 1.02)
    result = check_artifact(tampered, threads=2, progress=Progress(quiet=True), scenarios=["prefill"])
    sw = result.stored_weights
    assert not result.passed and list(sw["unmatched"]) == [stacked[-1]], sw
    assert f"stored_weights[{stacked[-1]}]: rows_unmatched" in result.verdict_line()


def test_spec_declares_states_and_ios18(tiny_fp16: Path) -> None:
    """The saved spec (what Core ML reads): specification version 9, one fp16 state per conv state and KV
    cache, each read once and written once by the main function (coremltools issue 2275 was a state the
    program did not take: the load fails then), and the same in the manifest."""
    program = load_program(tiny_fp16 / "model.mlpackage")
    cfg = load_model("tiny").config
    assert program.spec_version == 9
    want = {f"past_{i}_conv" for i in cfg.conv_layers}
    want |= {f"past_key_values_{i}_{kv}" for i in cfg.attn_layers for kv in ("key", "value")}
    assert set(program.states) == want and len(want) == 8
    assert set(program.function_inputs) == want | {"input_ids", "input_pos"}
    for name in want:
        assert program.state_access(name) == (1, 1)
        assert program.state_dtypes[name] == np.float16
    assert program.state_shapes["past_0_conv"] == (1, cfg.hidden_size, cfg.conv_L_cache - 1)
    assert program.state_shapes["past_key_values_2_key"] == (
        1,
        cfg.num_key_value_heads,
        CONTEXT,
        cfg.head_dim,
    )
    structure = load_program(tiny_fp16 / "model.mlpackage", decode=False)  # the export's read-back check
    assert structure.op_counts() == program.op_counts() and structure.states == program.states
    assert all(structure.state_access(n) == (1, 1) for n in want)
    with pytest.raises(RuntimeError, match="structure only"):
        structure.predict({}, structure.make_state())
    m = manifest(tiny_fp16)
    assert m["coreml"]["specification_version"] == 9 and m["coreml"]["target"] == "iOS18"
    assert set(m["coreml"]["states"]) == want


def next_expert_moe():
    """A `StackedMoE` that gathers the expert after each selected one (the routing weights unchanged)."""
    from lfm_export.backends.coreml.modules import StackedMoE

    class NextExpert(StackedMoE):
        def _route(self, x):
            scores, idx, w = super()._route(x)
            return scores, (idx + 1) % scores.shape[-1], w

    return NextExpert


@pytest.mark.slow
def test_wrong_sparse_moe_fails_parity(moe_fp16: Path, tmp_path: Path) -> None:
    """A sparse conversion that gathers the wrong experts (each selected index + 1) fails exactness, at the
    positions the `-fp16-moe` gate does not judge apart."""
    broken = convert_without_conv_write(moe_fp16, tmp_path / "broken", moe_cls=next_expert_moe())
    result = check_artifact(broken, progress=Progress(quiet=True), scenarios=["prefill", "decode"])
    exactness = result.summary()["exactness"]
    assert not result.passed and not exactness["passed"]
    assert exactness["worst"]["logit_max_rel"] > 0.15


@pytest.mark.slow
def test_moe_int4_with_experts_left_uncompressed_fails(tmp_path: Path, monkeypatch) -> None:
    """An int4 export whose stacked experts stayed fp16 (what coremltools once did silently) fails exactness
    against the int4 simulation, as it passed the old flip-tolerant limits."""
    from lfm_export.backends.coreml import compress

    monkeypatch.setattr(compress, "_experts_config", lambda recipe: None)
    folder = tmp_path / "uncompressed"
    export_artifact(
        "coreml",
        "tiny-moe",
        folder,
        make_recipe("int4", max_seq_len=CONTEXT, prefill_lengths="1,4,8"),
        parity=False,
        threads=2,
        progress=Progress(quiet=True),
    )
    monkeypatch.undo()
    report = manifest(folder)["coreml"]["compression"]
    assert any("stacked MoE" in r["why"] and r["as"] == "fp16" for r in report.values())
    result = check_artifact(folder, progress=Progress(quiet=True), scenarios=["prefill", "decode"])
    assert not result.part_passed("exactness")


@pytest.mark.slow
def test_compression_report_and_constexpr_ops(moe_int4: Path) -> None:
    m = manifest(moe_int4)
    cfg = load_model("tiny-moe").config
    report = m["coreml"]["compression"]
    linears = {n: r for n, r in report.items() if r["why"] == "linear weight" or "stacked MoE" in r["why"]}
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    ffn = 3 * (cfg.num_hidden_layers - moe_layers) + 3 * moe_layers  # sparse form: experts stacked
    assert len(linears) == ffn + 2 * len(cfg.conv_layers) + 4 * len(cfg.attn_layers)
    assert all(r["as"].startswith("int4 per block of 32") for r in linears.values())
    embed = [r for n, r in report.items() if "embed_tokens" in n]
    assert embed == [{"as": "int8 per channel, symmetric", "why": embed[0]["why"]}]
    kept = {r["why"] for r in report.values() if r["as"] == "fp16"}
    assert any("conv weight" in why for why in kept) and any("router" in why for why in kept)
    ops = m["coreml"]["ops"]
    assert ops["constexpr_blockwise_shift_scale"] == len(linears) + 1


def test_session_reset_and_state_readout_match_the_reference(tiny_fp16: Path) -> None:
    """Chunked prefill (max_prefill 8), decode, then a new sequence: the fresh state gives the same logits."""
    session = CoreMLSession(tiny_fp16)
    assert session.name == "coreml-interpreter" and session.chunks(19) == [8, 8, 3]
    ids = np.array([[1, 300, 51, 7, 99, 1000, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]], np.int64)
    first = session.prefill(ids)
    session.decode(np.array([5]))
    state = session.state()
    assert state is not None and state["past_key_values.2.key"].shape == (1, 2, CONTEXT, 32)
    assert np.abs(state["past_key_values.2.key"][:, :, 20:]).max() == 0  # nothing written past the position
    session.reset()
    again = session.prefill(ids)
    assert np.array_equal(first, again)
    ref = ReferenceSession(load_model("tiny").model, max_seq_len=CONTEXT).prefill(ids)
    assert np.abs(first - ref).max() < 5e-3 * np.abs(ref).max()  # fp16 rounding


def test_metadata_in_the_package(moe_fp16: Path) -> None:
    import coremltools as ct

    model = ct.models.MLModel(str(moe_fp16 / "model.mlpackage"), skip_model_load=True)
    spec = model.get_spec()
    meta = spec.description.metadata
    assert meta.author == "lfm-export" and meta.license and meta.versionString
    assert "stateful" in meta.shortDescription
    assert json.loads(meta.userDefined["lfm_export.recipe"])["name"] == "fp16"
    assert meta.userDefined["lfm_export.weights_sha256"] == manifest(moe_fp16)["model"]["weights_sha256"]
    assert all(i.shortDescription for i in spec.description.input)
    assert all(s.shortDescription for s in spec.description.state)
    assert "conv state" in {s.name: s.shortDescription for s in spec.description.state}["past_0_conv"]


def convert_without_conv_write(honest: Path, out: Path, moe_cls=None) -> Path:
    """A copy of the artifact `honest` whose package is a real Core ML conversion (same recipe, context and
    prefill) of a module that never writes its conv state back (how the short-conv state went wrong on another
    path, executorch issue 21855); the program still declares every state. With `moe_cls`: the conv state is
    written, and the MoE layers are `moe_cls` instead."""
    from lfm_export.backends.coreml import convert as cv
    from lfm_export.backends.coreml.modules import CoreMLStatefulModule
    from lfm_export.backends.coreml.recipes import CoreMLRecipe
    from lfm_export.backends.coreml.weights import source_of

    class NoConvWrite(CoreMLStatefulModule):
        def write_back(self, buf, new):
            pass

    m = manifest(honest)
    recipe = CoreMLRecipe.from_dict(m["recipe"])
    shapes = tuple(m["coreml"]["prefill"].get("enumerated") or m["coreml"]["prefill"]["range"])
    shutil.copytree(honest, out)
    shutil.rmtree(out / "model.mlpackage")
    loaded = load_model(m["model"]["source"])
    quiet = Progress(quiet=True)
    mlmodel, _ = cv.build(
        loaded.config, source_of(loaded), recipe, m["max_seq_len"], shapes, quiet, NoConvWrite
    )
    mlmodel.save(str(out / "model.mlpackage"))
    return out


def test_wrong_conversion_fails_parity(tiny_fp16: Path, tmp_path: Path) -> None:
    broken = convert_without_conv_write(tiny_fp16, tmp_path / "broken")
    result = check_artifact(broken, progress=Progress(quiet=True), scenarios=["prefill", "decode"])
    exactness = result.summary()["exactness"]
    assert not result.passed and not exactness["passed"]
    # far outside what fp16 rounding does (the honest export: logit 1.5e-3, state 6.8e-3, KL max 8e-5)
    assert exactness["worst"]["state_max_rel"] > 0.3 and exactness["worst"]["logit_max_rel"] > 0.05


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lfm_export.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"quant": "fp32"}, "holds Core ML states in fp16 only"),
        ({"max_seq_len": 16, "max_prefill": 32}, "exceeds the context"),
        ({"max_seq_len": 16, "prefill_lengths": "1,64"}, "exceeds the context"),
        ({"prefill_lengths": "4,8"}, "must include 1"),
        ({"prefill_lengths": "1,x"}, "comma-separated integers"),
        ({"quant": "int4-b32-asym"}, "no -asym"),
        ({"quant": "int8-b64"}, "per output channel"),
        ({"target": "macOS14"}, "need iOS 18 / macOS 15"),
        ({"moe_form": "index_add"}, "use one of sparse, dense"),
    ],
)
def test_recipes_the_target_cannot_express_are_refused(kwargs: dict, fragment: str) -> None:
    from lfm_export.contract.errors import UserError

    with pytest.raises(UserError, match=fragment):
        make_recipe(**kwargs)


def test_moe_form_defaults() -> None:
    assert make_recipe("int4").moe_form == "sparse" and make_recipe("palettize6").moe_form == "sparse"
    assert make_recipe("fp16", moe_form="dense").to_dict()["moe_form"] == "dense"


def test_bad_input_through_the_cli_is_one_line_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = cli("coreml", "tiny", "-o", str(out), "--target", "iOS17")
    assert r.returncode == 2, r.stderr
    assert (
        "--target iOS17: Core ML states (KV cache and conv state held in the model) need iOS 18" in r.stderr
    )
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_inspect_shows_states_and_target(tiny_fp16: Path) -> None:
    r = cli("inspect", str(tiny_fp16), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    text = json.dumps(data)
    assert "iOS18" in text and "past_key_values_2_key" in text and '"specification_version": 9' in text


# ---- slow: every recipe, transformers-written checkpoints ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("quant", ["fp16", "int8", "int4", "palettize4", "palettize6"])
def test_every_recipe_passes(model: str, quant: str, tmp_path: Path) -> None:
    export(model, tmp_path / "a", quant, context=64)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense_attn_first_hd32", "moe_b32"])
@pytest.mark.parametrize("quant", ["fp16", "int4"])
def test_transformers_checkpoints_pass_and_a_wrong_conversion_fails(
    hf_checkpoints, name: str, quant: str, tmp_path: Path
) -> None:
    honest = export(str(hf_checkpoints[name]), tmp_path / "a", quant)
    broken = convert_without_conv_write(honest, tmp_path / "broken")
    result = check_artifact(broken, progress=Progress(quiet=True), scenarios=["prefill", "decode"])
    assert not result.summary()["exactness"]["passed"]


@pytest.mark.parametrize(
    ("const", "overflows"),
    [
        (np.broadcast_to(np.float32(7e4), (3, 4)), True),  # a placeholder-like broadcast beyond fp16
        (np.broadcast_to(np.float32(512.0), (3, 4)), False),
        (np.array([[1.0, np.inf, -2.0, 65504.0]], dtype=np.float32), False),  # inf allowed, 65504 fits
        (np.array([[1.0, -65520.0, 3.0, 0.0]], dtype=np.float32), True),
    ],
)
def test_light_fp16_overflow_check_answers_as_coremltools_does(const: np.ndarray, overflows: bool) -> None:
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    from lfm_export.backends.coreml.weights import _fp16_overflow

    @mb.program(input_specs=[mb.TensorSpec(shape=const.shape)])
    def prog(x):
        return mb.add(x=x, y=const)

    (add,) = [op for op in prog.functions["main"].operations if op.op_type == "add"]
    assert _fp16_overflow(add) == FP16ComputePrecision.fp16_overflow(add) == overflows


def test_snapshots_of_the_held_states_pass_the_scenario_bitwise(tiny_fp16: Path, tmp_path: Path) -> None:
    from snapshot_checks import check_snapshots

    session = CoreMLSession(tiny_fp16, engine="interpreter")
    # fp16 compute: one prefill of P + B rounds otherwise
    report = check_snapshots(session, tmp_path, whole_rel=1e-2, short=True)
    assert {v.dtype for v in session.snapshot().state.values()} == {np.dtype(np.float16)}
    assert report.checks[1].max_rel == 0.0
