"""Parity separates a wrong export from a lossy recipe, on trained models and on transformers-initialised ones.

Exactness compares a session with the recipe simulated in torch (`lfm_export.quant.simulate`): every broken
session below runs over the *simulated* model and must fail it, on the bundled trained models (peaked outputs)
and on checkpoints transformers writes with its own initialisation (flat outputs, where KL and top-1 say
nothing). Honest ONNX exports of every recipe pass both parts; a strict `max_kl` or gates file fails only the
quality part; bad gate input and a foreign tokenizer are refused before any work.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from broken_sessions import DropsConvState, KvOneOff

from lfm_export.check import small_shape
from lfm_export.contract.errors import UserError
from lfm_export.loading import LoadedModel, init_random, load_model
from lfm_export.parity import (
    EXACTNESS,
    QUALITY,
    ReferenceSession,
    ScenarioOptions,
    quality_gate,
    random_prompts,
    run_parity,
    to_markdown,
)
from lfm_export.parity.thresholds import RESOLVED_LIMIT
from lfm_export.quant import ACT_FLOAT, ACT_INT8_BLOCK, simulate
from lfm_export.recipes import parse_recipe

MAX_SEQ = 40
OPTS = ScenarioOptions(decode_steps=6, batch_decode_steps=2, fill_chunk=24)
INT4 = parse_recipe("int4-b32")
MODELS = ("tiny", "tiny-moe", "hf-default", "hf-0.08", "hf-moe")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These tiny models run faster on one thread than on two (tests run beside other work)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_hf(folder: Path, *, moe: bool, initializer_range: float | None, seed: int) -> Path:
    """A checkpoint written by transformers' `save_pretrained` (never by our code), seeded."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    init = {} if initializer_range is None else {"initializer_range": initializer_range}
    if moe:
        cfg = transformers.Lfm2MoeConfig(**small_shape("moe"), routed_scaling_factor=1.5, **init)
        model = transformers.Lfm2MoeForCausalLM(cfg)
        with torch.no_grad():  # a bias that changes which experts win, so ignoring it is visible
            for layer in model.model.layers[1:]:
                layer.feed_forward.expert_bias.copy_(torch.linspace(-0.05, 0.05, 4))
    else:
        cfg = transformers.Lfm2Config(**small_shape("dense"), **init)
        model = transformers.Lfm2ForCausalLM(cfg)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Transformers-written checkpoints: default initialisation (flat outputs) and initializer_range 0.08
    (the checkpoint whose honest int4 export had pooled KL 0.17), plus the same shapes with other seeds."""
    root = tmp_path_factory.mktemp("hf-gates")
    specs = {
        "hf-default": dict(moe=False, initializer_range=None, seed=1),
        "hf-0.08": dict(moe=False, initializer_range=0.08, seed=2),
        "hf-moe": dict(moe=True, initializer_range=None, seed=3),
    }
    out = {}
    for name, spec in specs.items():
        out[name] = save_hf(root / name, **spec)
        out[f"{name}-other"] = save_hf(root / f"{name}-other", **{**spec, "seed": spec["seed"] + 100})
    return out


@pytest.fixture(scope="module")
def loaded(checkpoints) -> dict[str, LoadedModel]:
    models = {name: load_model(str(path)) for name, path in checkpoints.items()}
    models["tiny"] = load_model("tiny")
    models["tiny-moe"] = load_model("tiny-moe")
    return models


# ---- broken sessions (over the simulated model) --------------------------------------------------------------
class MixesRows(ReferenceSession):
    """After a batched call, every row continues from row 0's conv state."""

    def prefill(self, tokens):
        out = super().prefill(tokens)
        if self.batch_size > 1:
            self.conv_states = [c[:1].expand_as(c).clone() for c in self.conv_states]
        return out


def altered(model, change: str):
    """A deep copy of the (simulated) model with one thing wrong."""
    bad = copy.deepcopy(model)
    layers = bad.model.layers
    with torch.no_grad():
        if change == "misscaled":  # one linear x1.05: the first conv layer's in_proj
            next(layer for layer in layers if not layer.is_attention).conv.in_proj.weight.mul_(1.05)
        for layer in layers:
            ff = layer.feed_forward
            if not hasattr(ff, "top_k"):
                continue
            if change == "expert_bias_ignored":
                ff.use_expert_bias = False
            elif change == "routing_scale_dropped":
                ff.scale = 1.0
            elif change == "top_k_changed":
                ff.top_k += 1
    return bad


BREAKS = {
    # name: (session factory over the simulated model, scenarios that must fail exactness)
    "dropped_conv_state": (lambda m: DropsConvState(m, name="drop-conv", max_seq_len=MAX_SEQ), {"decode"}),
    "kv_off_by_one": (
        lambda m: KvOneOff(m, name="kv-off", max_seq_len=MAX_SEQ),
        {"decode", "chunked_prefill"},
    ),
    "batch_rows_mixed": (lambda m: MixesRows(m, name="mixed", max_seq_len=MAX_SEQ), {"batch2"}),
    "misscaled": (
        lambda m: ReferenceSession(altered(m, "misscaled"), name="x1.05", max_seq_len=MAX_SEQ),
        set(),  # some scenario: on tiny-moe at int8 activations, prefill's own rounding effect hides it there
    ),
}
MOE_BREAKS = ("expert_bias_ignored", "routing_scale_dropped", "top_k_changed")


@pytest.fixture(scope="module")
def simulated(loaded):
    """`get(model, recipe, activations)`: the model simulated for a recipe, built once."""
    cache: dict[tuple[str, str, str], torch.nn.Module] = {}

    def get(name: str, recipe: str = "int4-b32", activations: str = ACT_INT8_BLOCK) -> torch.nn.Module:
        key = (name, recipe, activations)
        if key not in cache:
            cache[key] = simulate(loaded[name].model, parse_recipe(recipe), activations)
        return cache[key]

    return get


def exactness(
    test,
    simulated,
    model: str,
    recipe: str = "int4-b32",
    activations: str = ACT_INT8_BLOCK,
    tokenizer: Path | None = None,
):
    """Exactness only: the simulation is the yardstick (the fp32 reference would add quality rows); where
    activations are rounded, the simulation without rounding measures the allowance for it. Two short random
    prompts, or the pipeline's prompts from `tokenizer`."""
    sim_model = simulated(model, recipe, activations)
    sim = ReferenceSession(sim_model, name="simulated", max_seq_len=MAX_SEQ)
    rounding = None
    if activations != ACT_FLOAT:
        rounding = ReferenceSession(
            simulated(model, recipe, ACT_FLOAT), name="unrounded", max_seq_len=MAX_SEQ
        )
    prompts = None if tokenizer else random_prompts(sim_model.config.vocab_size, count=2, lengths=(16, 12))
    return run_parity(
        test,
        sim,
        recipe,
        prompts,
        activations=activations,
        rounding=rounding,
        options=OPTS,
        tokenizer_file=tokenizer,
    )


def failed(result) -> set[str]:
    return {c.scenario for c in result.failures if c.part == EXACTNESS}


def _breaks(cfg) -> dict:
    breaks = dict(BREAKS)
    if cfg.is_moe:
        for change in MOE_BREAKS:
            breaks[change] = (
                lambda m, c=change: ReferenceSession(altered(m, c), name=c, max_seq_len=MAX_SEQ),
                set(),
            )
        if cfg.routed_scaling_factor == 1.0:
            del breaks["routing_scale_dropped"]  # tiny-moe's scale is 1: dropping it changes nothing
    return breaks


@pytest.mark.parametrize(
    "model,activations",
    [
        ("tiny", ACT_INT8_BLOCK),
        ("hf-default", ACT_INT8_BLOCK),
        ("hf-moe", ACT_INT8_BLOCK),
        ("tiny-moe", ACT_FLOAT),
        pytest.param("tiny-moe", ACT_INT8_BLOCK, marks=pytest.mark.slow),
        pytest.param("hf-0.08", ACT_INT8_BLOCK, marks=pytest.mark.slow),
    ],
)
def test_exactness_passes_honest_and_rejects_every_break(model, activations, loaded, simulated):
    """Mostly at int4 with int8-rounded activations, the loosest exactness gate (it allows for the rounding's
    own effect), so a break it catches, the tighter gates catch too (`test_every_gate_...`)."""
    sim_model = simulated(model, "int4-b32", activations)
    # tiny-moe at int8 activations: rounding alone flips experts (logit effect 0.13 on the short random
    # prompts), so a top-k change (0.11) hides under the allowance there; on the pipeline's own prompts
    # (bundled texts) it is caught, with state max rel 0.19 against an allowance of 0.16
    tokenizer = loaded[model].tokenizer_file if (model, activations) == ("tiny-moe", ACT_INT8_BLOCK) else None
    honest = exactness(
        ReferenceSession(sim_model, name="honest", max_seq_len=MAX_SEQ),
        simulated,
        model,
        activations=activations,
        tokenizer=tokenizer,
    )
    assert honest.passed, [c.describe() for c in honest.failures]
    assert honest.gate.name == ("int4" if activations == ACT_FLOAT else "int4-a8")
    for name, (make, must_fail) in _breaks(loaded[model].config).items():
        result = exactness(make(sim_model), simulated, model, activations=activations, tokenizer=tokenizer)
        assert not result.part_passed(EXACTNESS), (model, name)
        assert must_fail <= failed(result), (model, name, failed(result))
        assert result.verdict().startswith(
            "FAILED: exactness FAILED: the artifact does not compute its recipe"
        )


@pytest.mark.parametrize("model", ["tiny", "hf-default"])
@pytest.mark.parametrize(
    "recipe,activations,gate",
    [
        ("fp16", ACT_FLOAT, "fp16"),
        ("int8-b32", ACT_FLOAT, "int8"),
        ("int4-b64-asym", ACT_FLOAT, "int4"),
        ("int8-b32", ACT_INT8_BLOCK, "int8-a8"),
        ("fp16", "fp16", "fp16-fp16"),  # Core ML's fp16 compute
        ("int4-b32", "fp16", "int4-fp16"),
    ],
)
def test_every_gate_passes_honest_and_rejects_breaks(simulated, model, recipe, activations, gate):
    sim_model = simulated(model, recipe, activations)
    honest = exactness(
        ReferenceSession(sim_model, name="honest", max_seq_len=MAX_SEQ), simulated, model, recipe, activations
    )
    assert honest.passed and honest.gate.name == gate
    for name in ("dropped_conv_state", "misscaled"):
        make, must_fail = BREAKS[name]
        result = exactness(make(sim_model), simulated, model, recipe, activations)
        assert failed(result) and must_fail <= failed(result), (name, failed(result))


@pytest.mark.parametrize("model", [*MODELS[:3], pytest.param("hf-0.08", marks=pytest.mark.slow), "hf-moe"])
def test_exactness_rejects_other_weights(model, loaded, simulated):
    """The issue's case: on a default-initialised checkpoint the old int4 gate passed entirely different random
    weights (flat outputs: KL tiny, no decisive position)."""
    if model.startswith("hf"):
        other = loaded[f"{model}-other"].model
    else:
        other = init_random(loaded[model].config, seed=5)
    wrong = ReferenceSession(simulate(other, INT4, ACT_INT8_BLOCK), name="other-weights", max_seq_len=MAX_SEQ)
    result = exactness(wrong, simulated, model)
    assert {"prefill", "decode", "chunked_prefill", "batch2", "near_max_seq_len"} <= failed(result)
    assert result.scenario("prefill").metrics["logit_max_rel"] > 0.1


def test_flat_outputs_report_no_decisive_positions(loaded, simulated):
    """transformers' default initialisation gives flat distributions: top-1 on decisive positions is n/a, not
    1.0, and says so in the report."""
    ref = ReferenceSession(loaded["hf-default"].model, max_seq_len=MAX_SEQ)
    sim = ReferenceSession(
        simulated("hf-default", "int4-b32", ACT_FLOAT), name="simulated", max_seq_len=MAX_SEQ
    )
    test = ReferenceSession(
        simulated("hf-default", "int4-b32", ACT_FLOAT), name="artifact", max_seq_len=MAX_SEQ
    )
    result = run_parity(test, ref, "int4-b32", random_prompts(320), simulation=sim, options=OPTS)
    pooled = result.pooled()
    assert pooled["decisive"] == 0 and pooled["top1_decisive"] is None
    assert result.passed
    assert "n/a (no decisive positions)" in to_markdown(result)


# ---- quality: strict limits when asked, and their input ---------------------------------------------------
def test_quality_gate_inputs(tmp_path: Path):
    assert quality_gate("int4-b32").name == "int4 sanity bound"
    assert {lim.metric for lim in quality_gate("int4-b32", 0.05).limits} >= {"kl_mean"}
    good = tmp_path / "gates.json"
    good.write_text(
        json.dumps(
            {"gates": {"int4": {"kl_mean": 0.06}, "int4-b32": {"kl_mean": 0.05, "top1_decisive": 0.9}}}
        )
    )
    gate = quality_gate("int4-b32", gates_file=good)
    assert {(lim.metric, lim.value) for lim in gate.limits if lim.metric != "finite"} == {
        ("kl_mean", 0.05),
        ("top1_decisive", 0.9),
    }
    assert {(lim.metric, lim.value) for lim in quality_gate("int4-b64-asym", gates_file=good).limits} >= {
        ("kl_mean", 0.06)
    }
    bad_files = {
        "broken.json": "{not json",
        "shape.json": json.dumps({"int4": {"kl_mean": 0.05}}),
        "metric.json": json.dumps({"gates": {"int4": {"kl_mean_typo": 0.05}}}),
        "value.json": json.dumps({"gates": {"int4": {"kl_mean": "low"}}}),
        "missing.json": json.dumps({"gates": {"int8": {"kl_mean": 0.01}}}),
    }
    for name, text in bad_files.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=name):
            quality_gate("int4-b32", gates_file=tmp_path / name)
    with pytest.raises(UserError, match="nope.json"):
        quality_gate("int4-b32", gates_file=tmp_path / "nope.json")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(UserError, match="--max-kl"):
            quality_gate("int4-b32", bad)


def test_bad_gates_file_is_refused_before_the_export(tmp_path: Path):
    from lfm_export.pipeline import export_artifact

    bad = tmp_path / "gates.json"
    bad.write_text("[]")
    out = tmp_path / "never"
    with pytest.raises(UserError, match="gates.json"):
        export_artifact("onnx", "tiny", out, "int4-b32", gates_file=bad)
    with pytest.raises(UserError, match="--max-kl"):
        export_artifact("onnx", "tiny", out, "int4-b32", max_kl=-1.0)
    assert not out.exists() and not list(tmp_path.glob(".never*"))


# ---- honest ONNX exports -----------------------------------------------------------------------------------
ONNX_RECIPES = ("fp32", "fp16", "int8-b32", "int4-b32", "int4-b64-asym")
QUICK = ["prefill", "decode"]
"""Scenarios of the runs that test the quality verdict, not the artifact (the full runs are above)."""


class Artifacts:
    """ONNX artifacts written once per module (one trace per model, shared by its recipes)."""

    def __init__(self, root: Path, loaded: dict[str, LoadedModel]) -> None:
        self.root, self.loaded, self.traced, self.done = root, loaded, {}, {}

    def get(self, model: str, recipe: str, accuracy_level: int = 4) -> Path:
        key = (model, recipe, accuracy_level)
        if key not in self.done:
            from lfm_export.backends.onnx.convert import export_onnx, trace_onnx
            from lfm_export.backends.onnx.recipes import parse_recipe as onnx_recipe_named
            from lfm_export.manifest import build_manifest, write_manifest
            from lfm_export.pipeline import _identity

            loaded = self.loaded[model]
            if model not in self.traced:
                self.traced[model] = trace_onnx(loaded)
            folder = self.root / f"{model}-{recipe}-acc{accuracy_level}"
            onnx_recipe = onnx_recipe_named(recipe, accuracy_level=accuracy_level, max_seq_len=MAX_SEQ)
            result = export_onnx(loaded, folder, onnx_recipe, traced=self.traced[model])
            loaded.copy_tokenizer_files(folder)  # as the pipeline does after every export
            manifest = build_manifest(
                model_identity=_identity(loaded),
                config=loaded.config.to_dict(),
                backend="onnx",
                recipe=result.recipe,
                signature=result.signature.to_dict(),
                folder=folder,
                runtime={"threads": 2},
                extra=result.extra,
            )
            write_manifest(folder, manifest)
            self.done[key] = folder
        return self.done[key]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, loaded) -> Artifacts:
    pytest.importorskip("onnxruntime")
    return Artifacts(tmp_path_factory.mktemp("gates-onnx"), loaded)


def _check(folder: Path, loaded: LoadedModel, **kw):
    from lfm_export.pipeline import check_artifact

    return check_artifact(folder, loaded, threads=1, **kw)


@pytest.mark.parametrize(
    "model,recipe",
    [("tiny", r) for r in ONNX_RECIPES]
    + [("hf-0.08", "int4-b32")]
    + [pytest.param("hf-0.08", r, marks=pytest.mark.slow) for r in ONNX_RECIPES if r != "int4-b32"]
    + [pytest.param("tiny-moe", r, marks=pytest.mark.slow) for r in ONNX_RECIPES],
)
def test_honest_onnx_exports_pass_both_parts(artifacts, loaded, model: str, recipe: str):
    folder = artifacts.get(model, recipe)
    result = _check(folder, loaded[model])
    assert result.passed, [f"{c.part}: {c.describe()}" for c in result.failures]
    assert result.verdict().startswith("PASSED: exactness passed; quality passed")
    assert (result.simulation_name is None) == (recipe == "fp32")
    # int8 activations (accuracy_level 4, quantized recipes): the tight row, undecided codes resolved
    resolved = result.exact("resolved_prefill")
    assert (resolved is not None) == (recipe not in ("fp32", "fp16"))
    assert resolved is None or resolved["logit_max_rel"] <= RESOLVED_LIMIT / 5, resolved
    manifest = json.loads((folder / "manifest.json").read_text())
    summary = manifest["parity"]
    assert summary["passed"] and summary["recipe"] == recipe and summary["verdict"] == result.verdict()
    assert summary["exactness"]["passed"] and summary["quality"]["passed"]
    assert summary["quality"]["pooled"]["kl_mean"] == result.pooled()["kl_mean"]
    md = (folder / "parity" / "parity.md").read_text()
    assert md.startswith("**PASS**") and f"- artifact: {folder.name}" in md


def test_honest_int4_at_accuracy_level_0_passes_the_float_activation_gate(artifacts, loaded):
    result = _check(artifacts.get("tiny", "int4-b32", accuracy_level=0), loaded["tiny"], scenarios=QUICK)
    assert result.passed and result.gate.name == "int4"
    assert result.worst("logit_max_rel") < 1e-4


# out_proj is the slow tier's (the same path as w2; the default suite keeps w2 and the level-4 test below)
@pytest.mark.parametrize("matrix", ["w2", pytest.param("out_proj", marks=pytest.mark.slow)])
def test_one_matrix_two_percent_off_fails_the_int4_gate_through_onnxruntime(artifacts, matrix: str):
    """The honest int4 artifact at accuracy_level 0 (float activations), checked against `tiny` with one
    middle-layer matrix x 1.02 (weights other than the artifact's), fails exactness through onnxruntime; the
    report states the gate's measured detection limit."""
    folder = artifacts.get("tiny", "int4-b32", accuracy_level=0)
    other = load_model("tiny")
    layer = other.model.model.layers[3]  # conv
    weight = layer.feed_forward.w2.weight if matrix == "w2" else layer.conv.out_proj.weight
    with torch.no_grad():
        weight.mul_(1.02)
    result = _check(folder, other, scenarios=["prefill"])
    assert result.gate.name == "int4" and not result.part_passed(EXACTNESS)
    assert "Measured detection limit of the `int4` gate" in (folder / "parity" / "parity.md").read_text()


def test_one_matrix_two_percent_off_fails_the_int4_a8_gate_through_onnxruntime(artifacts):
    """At the default accuracy_level 4 (int8 activations) the honest int4 artifact, checked against `tiny` with
    one middle-layer w2 x 1.02, fails the `-a8` gate's tight row (`resolved_prefill`: the simulation with the
    codes that sit on an int8 rounding boundary resolved; the honest artifact is within 1e-6 there, see
    above), 50x and more over its limit; the scenario rows alone, which allow for the rounding, miss it."""
    folder = artifacts.get("tiny", "int4-b32")
    other = load_model("tiny")
    with torch.no_grad():
        other.model.model.layers[3].feed_forward.w2.weight.mul_(1.02)
    result = _check(folder, other, scenarios=["prefill"])
    assert result.gate.name == "int4-a8" and not result.part_passed(EXACTNESS)
    assert "resolved_prefill" in {c.scenario for c in result.failures}
    resolved = result.exact("resolved_prefill")
    assert resolved["logit_max_rel"] >= 50 * RESOLVED_LIMIT, resolved


CHAINED_PROMPT = (1677, 833, 87, 1863, 1927, 90, 1216, 1685, 1618, 851, 1761, 1699, 233, 22, 211, 748)
"""Random `tiny` ids on which onnxruntime 1.32 (MLAS on an AMD EPYC with AVX-512 VNNI) rounds one int8 activation
code of the honest int4 artifact the other way and, in a later layer, a second code that the first put on a
rounding boundary (found by running both searches on random prompts)."""


def test_a_flip_and_the_code_it_moves_onto_a_boundary_are_resolved_together(artifacts, loaded):
    """The honest int4 artifact at accuracy level 4 is within float32 rounding of its simulation at every
    position of `CHAINED_PROMPT` once its undecided codes are resolved, the second code of the chain included
    (listed only by a forward with the first flipped). Without it no choice among the codes undecided before
    explained position 12 (4.0e-3: a failed `resolved_prefill` on an honest export). On a CPU whose kernels sum
    in another order the prompt may hold no chain; the bound holds all the same."""
    import numpy as np

    from lfm_export.backends import open_session
    from lfm_export.backends.onnx import simulation
    from lfm_export.parity.boundary import TARGET, resolve

    folder = artifacts.get("tiny", "int4-b32")
    recipe, activations = simulation(json.loads((folder / "manifest.json").read_text())["recipe"])
    simulated = simulate(loaded["tiny"].model, recipe, activations, threads=1)
    row = resolve(open_session(folder, threads=1), simulated, [np.array([CHAINED_PROMPT], np.int64)])
    assert row.passed and row.max_rel <= TARGET, row.to_json()


def test_strict_quality_fails_only_quality(artifacts, loaded, tmp_path: Path):
    folder = artifacts.get("tiny", "int4-b32")
    result = _check(folder, loaded["tiny"], max_kl=0.01, scenarios=QUICK)
    assert result.part_passed(EXACTNESS) and not result.part_passed(QUALITY) and not result.passed
    assert (
        result.verdict()
        == "FAILED: exactness passed; quality FAILED: the recipe is too lossy for --max-kl 0.01"
    )
    assert {(c.scenario, c.metric) for c in result.failures} == {("pooled", "kl_mean")}
    assert json.loads((folder / "manifest.json").read_text())["parity"]["quality"]["passed"] is False
    md = (folder / "parity" / "parity.md").read_text()
    assert "quality FAILED: the recipe is too lossy for --max-kl 0.01" in md.splitlines()[0]
    gates = tmp_path / "ci-gates.json"
    gates.write_text(json.dumps({"gates": {"int4": {"kl_mean": 0.06, "top1_decisive": 0.93}}}))
    ok = _check(folder, loaded["tiny"], gates_file=gates, scenarios=QUICK)
    assert ok.passed and ok.quality_gate.name == "ci-gates.json[int4]"


def test_decode_greedy_match_is_explained(artifacts, loaded):
    """Greedy match against the simulation is what exactness checks; against fp32 the report explains it."""
    folder = artifacts.get("tiny", "int4-b32")
    result = _check(folder, loaded["tiny"], scenarios=["decode"])
    exact = result.scenario("decode").metrics
    assert exact["greedy_match"] == exact["greedy_steps"] == 17
    quality = result.quality_row("decode").metrics
    md = to_markdown(result)
    if quality["greedy_match"] < quality["greedy_steps"]:
        assert (
            f"first diverges from the fp32 reference at decode position {int(quality['greedy_match'])}" in md
        )
    else:
        assert "matches the fp32 reference on all 17 decode positions" in md


def test_foreign_tokenizer_is_refused_before_parity(artifacts, loaded, tmp_path: Path):
    folder = tmp_path / "artifact"
    shutil.copytree(artifacts.get("tiny", "fp32"), folder)
    shutil.rmtree(folder / "parity", ignore_errors=True)
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["added_tokens"] = tok["added_tokens"][:-1]
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UserError, match="tokenizer.json differs"):
        _check(folder, loaded["tiny"])
    assert not (folder / "parity").exists()
