"""Qualcomm QNN: the static single-token program and its QnnQuantizer quantization (fake-quantized torch program)
on the bundled `tiny`, the parity gate over it, the command line's refusals, and the ExecuTorch QNN delegate's
SDK boundary. The exports run on onnxruntime's emulated HTP (about 0.5 s per token on 2 loaded cores) are slow
tests: each parity run feeds some 500 tokens one at a time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("executorch")
pytest.importorskip("onnxruntime_qnn")

from lfm_export.backends import all_backends  # noqa: E402
from lfm_export.backends.qnn.quantize import (  # noqa: E402
    QuantizedStep,
    calibration_prompts,
    quantize_step,
    trace_step,
)
from lfm_export.backends.qnn.session import FakeQuantSession  # noqa: E402
from lfm_export.contract.errors import UserError  # noqa: E402
from lfm_export.loading import load_model  # noqa: E402

all_backends()  # the QNN gates are registered by the QNN targets' records
from lfm_export.parity import ReferenceSession, ScenarioOptions, run_parity  # noqa: E402
from lfm_export.parity.prompts import TEXTS, default_prompts  # noqa: E402
from lfm_export.parity.thresholds import gate_for, sanity_gate  # noqa: E402

CONTEXT = 64


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lfm_export.cli", *args], capture_output=True, text=True, timeout=1800, env=env
    )


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_model("tiny")


@pytest.fixture(scope="module")
def tiny_16a8w(tiny) -> QuantizedStep:
    return quantize_step(
        tiny.model, "16a8w", CONTEXT, calibration_prompts(tiny.config.vocab_size, tiny.tokenizer_file)
    )


class DropsConvState(FakeQuantSession):
    """The fake-quantized program with its conv state reset to zeros after every call."""

    def _prefill(self, ids: np.ndarray) -> np.ndarray:
        out = super()._prefill(ids)
        convs = {s.name for s in self.signature.state_inputs() if s.role == "conv"}
        self._state = [
            torch.zeros_like(t) if s.name in convs else t
            for s, t in zip(self.signature.state_inputs(), self._state, strict=True)
        ]
        return out


def test_the_traced_float_step_equals_the_reference(tiny) -> None:
    """RoPE from a table and the mask after the softmax (what the quantizer sees) are the same math."""
    program, signature = trace_step(tiny.model, CONTEXT)
    assert [s.shape[:2] for s in signature.inputs[:1]] == [(1, 1)] and signature.max_seq_len == CONTEXT
    step = FakeQuantSession(QuantizedStep(program.module(), signature, "fp32", 0), name="float-step")
    ref = ReferenceSession(tiny.model, max_seq_len=CONTEXT)
    prompt = default_prompts(tiny.config.vocab_size, tiny.tokenizer_file)[0][None]
    a, b = step.prefill(prompt), ref.prefill(prompt)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    for name, value in ref.state().items():
        got = step.state()[name]
        got = got[:, :, : value.shape[2]] if got.ndim == 4 else got
        assert np.abs(got - value).max() <= 1e-5 * max(1.0, np.abs(value).max())


def test_calibration_texts_are_not_the_parity_texts(tiny) -> None:
    from lfm_export.backends.qnn.quantize import CALIBRATION_TEXTS

    assert not set(CALIBRATION_TEXTS) & set(TEXTS)
    assert len(calibration_prompts(tiny.config.vocab_size, tiny.tokenizer_file)) == len(CALIBRATION_TEXTS)


def short_prompts(loaded) -> list[np.ndarray]:
    return [p[:12] for p in default_prompts(loaded.config.vocab_size, loaded.tokenizer_file)[:2]]


def test_fake_quantized_16a8w_passes_its_quality_gate(slice_16a8w: dict) -> None:
    """The quantization itself, before any lowering (a trained slice of `tiny`, a conv and an attention layer):
    quality against fp32 within the recipe's sanity bound and measurably lossy (it is quantized). Short prompts
    and 4 decode steps: the fake-quantized program runs its quantize / dequantize ops in Python, token by token
    (the full parity runs are in the slow tests)."""
    loaded, step = slice_16a8w["loaded"], slice_16a8w["simulation"].step
    assert step.calibration_tokens >= 4 * (SLICE_CONTEXT - 1)
    names = {str(n.target) for n in step.module.graph.nodes if n.op == "call_function"}
    assert "quantized_decomposed.quantize_per_tensor.default" in names
    assert "quantized_decomposed.dequantize_per_channel.default" in names
    honest = run_parity(
        FakeQuantSession(step),
        ReferenceSession(loaded.model, max_seq_len=SLICE_CONTEXT),
        gate_for("fp32"),
        short_prompts(loaded),
        ["prefill", "decode"],
        quality=sanity_gate("qnn-16a8w"),
        options=ScenarioOptions(decode_steps=4),
    )
    quality = honest.summary()["quality"]
    assert quality["passed"], quality
    assert 1e-4 < quality["pooled"]["kl_mean"] < 0.5, quality


@pytest.mark.slow
def test_the_qnn_exactness_gate_fails_a_fake_quantized_program_that_drops_its_conv_state(
    tiny, tiny_16a8w
) -> None:
    broken = run_parity(
        DropsConvState(tiny_16a8w),
        ReferenceSession(tiny.model, max_seq_len=CONTEXT),
        "qnn-16a8w",
        short_prompts(tiny),
        ["prefill", "decode"],
        simulation=FakeQuantSession(tiny_16a8w, name="simulated"),
        options=ScenarioOptions(decode_steps=4),
    )
    assert not broken.summary()["exactness"]["passed"]


def test_the_fake_quantized_weights_are_the_checkpoints_within_half_a_step(slice_16a8w: dict) -> None:
    """What parity's stored-weights check compares an artifact with (`FakeQuantSession.quantized_weights`):
    every linear and conv weight of the checkpoint (a trained slice of `tiny`), by its name, within half an
    int8 step (its row's largest magnitude / 127) of the float weight; the 16-bit per-tensor embedding table and
    norms too."""
    got = dict(slice_16a8w["simulation"].quantized_weights())
    params = dict(slice_16a8w["loaded"].model.named_parameters())
    matrices = [n for n, p in params.items() if n.endswith(".weight") and p.dim() >= 2]
    assert set(matrices) <= set(got), sorted(set(matrices) - set(got))
    for name in matrices:
        w = params[name].detach().reshape(params[name].shape[0], -1).numpy()
        half_step = np.abs(w).max(axis=1, keepdims=True) / 127 / 2
        assert got[name].shape == w.shape and (np.abs(got[name] - w) <= half_step * 1.0001).all(), name
        assert (got[name] != w).any(), name  # quantized, not the float weight
    norm = "model.layers.0.operator_norm.weight"
    assert np.abs(got[norm][0] - params[norm].detach().numpy()).max() < 1e-3


def test_unknown_soc_lists_the_known_ones(tmp_path: Path) -> None:
    out = tmp_path / "x"
    r = cli("onnx-qnn", "tiny", "-o", str(out), "--quant", "16a8w", "--soc", "SM1234")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "unknown SoC 'SM1234'" in r.stderr and "SM8650" in r.stderr and "SM8750" in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["onnx-qnn", "--quant", "int4"], "takes --quant 16a8w | 16a4w | 8a8w"),
        (["onnx-qnn", "--quant", "16a8w", "--ops", "portable"], "No such option: --ops"),
        (["onnx", "--quant", "int4", "--soc", "SM8650"], "No such option: --soc"),
        (["executorch-qnn", "--quant", "8da4w"], "takes --quant 16a8w | 16a4w | 8a8w, got '8da4w'"),
        (["executorch-qnn", "--quant", "16a8w", "--soc", "SM1"], "unknown SoC 'SM1'"),
        (["executorch-qnn", "--quant", "16a4w"], "needs the Qualcomm AI Engine Direct (QAIRT) SDK 2.37"),
        (["executorch", "--quant", "8da4w", "--soc", "SM8750"], "No such option: --soc"),
    ],
)
def test_target_options_are_checked(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "x"
    r = cli(args[0], "tiny", "-o", str(out), *args[1:])
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not out.exists()


def test_executorch_qnn_delegate_names_the_sdk_it_needs(tmp_path: Path, monkeypatch) -> None:
    from lfm_export.backends.executorch_qnn import sdk as et_qnn

    for unset in ("", None):
        if unset is None:
            monkeypatch.delenv("QNN_SDK_ROOT", raising=False)
        else:
            monkeypatch.setenv("QNN_SDK_ROOT", unset)
        with pytest.raises(UserError, match=r"QAIRT\) SDK 2\.37 .*QNN_SDK_ROOT is not set"):
            et_qnn.sdk_root()
    monkeypatch.setenv("QNN_SDK_ROOT", str(tmp_path))
    with pytest.raises(UserError, match=r"libQnnHtp\.so, libQnnSystem\.so not found under"):
        et_qnn.sdk_root()
    assert len(et_qnn.compile_specs("SM8650")) > 0  # the compile specs need no SDK


def test_host_libraries_that_cannot_load_are_a_one_line_error_not_an_abort(
    tmp_path: Path, monkeypatch
) -> None:
    """onnxruntime-qnn's libQnnHtp.so without the libc++ it links: the wheel's adaptor aborts its process (exit
    134); the probe runs it in a child and reports."""
    import onnxruntime_qnn

    from lfm_export.backends.executorch_qnn import sdk as et_qnn

    lib = tmp_path / et_qnn.HOST_LIB_DIR
    lib.mkdir(parents=True)
    for f in Path(onnxruntime_qnn.__file__).parent.glob("lib*.so"):
        (lib / f.name).symlink_to(f)
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    monkeypatch.setenv("QNN_SDK_ROOT", str(tmp_path))
    with pytest.raises(UserError, match=r"do not load \(exit -6: .*Fail to load Qnn library.*QAIRT 2\.37"):
        et_qnn.probe_libraries(et_qnn.sdk_root())


@pytest.mark.slow
def test_executorch_qnn_lowering_stops_at_the_boundary_with_the_packaged_qairt(
    tmp_path: Path, monkeypatch, tiny_16a8w
) -> None:
    """onnxruntime-qnn's QAIRT 2.51 host libraries (and their libc++) laid out as an SDK: the wheel's adaptor loads
    them, HTP device creation fails (error 14001), the command stops with the SDK named and writes nothing."""
    import onnxruntime_qnn

    from lfm_export.backends.executorch_qnn import sdk as et_qnn

    lib = tmp_path / "sdk" / et_qnn.HOST_LIB_DIR
    lib.mkdir(parents=True)
    pkg = Path(onnxruntime_qnn.__file__).parent
    for f in [*pkg.glob("lib*.so"), *(pkg.parent / "onnxruntime_qnn.libs").glob("lib*")]:
        (lib / f.name).symlink_to(f)
    monkeypatch.setenv("QNN_SDK_ROOT", str(tmp_path / "sdk"))
    monkeypatch.setenv("LD_LIBRARY_PATH", str(lib))
    pte = tmp_path / "model.pte"
    with pytest.raises(UserError, match=r"could not lower for SM8650 .*QAIRT 2\.37 host libraries"):
        et_qnn.lower(tiny_16a8w, "SM8650", pte)
    assert not pte.exists()


# ---- on the emulated HTP (slow) -------------------------------------------------------------------------------


def _export(model: str, out: Path, quant: str, *extra: str) -> dict:
    r = cli(
        "onnx-qnn",
        model,
        "-o",
        str(out),
        "--quant",
        quant,
        "--max-seq-len",
        str(CONTEXT),
        "--threads",
        "1",
        "--json",
        *extra,
    )
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    return json.loads(r.stdout)


def _assert_on_htp(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    assert m["backend"] == "onnx-qnn" and m["signature"]["form"] == "static"
    part = m["qnn"]["partitioning"]
    assert part["providers"][0] == "QNNExecutionProvider" and part["cpu_fallback"].startswith("disabled")
    ops = m["ops"]["op_types"]
    assert ops["QuantizeLinear"] > 100 and ops["DequantizeLinear"] > 100
    return m


@pytest.mark.slow
def test_tiny_16a8w_on_the_emulated_htp_passes_parity(tmp_path: Path) -> None:
    out = tmp_path / "tiny-16a8w"
    data = _export("tiny", out, "16a8w", "--soc", "SM8650", "--context-binary")
    m = _assert_on_htp(out)
    assert m["qnn"]["context_binary"] == "model_ctx.onnx" and m["recipe"]["soc_model"] == 57
    p = data["parity"]
    assert p["passed"] and p["exactness"]["passed"] and p["quality"]["passed"], p
    assert p["scenarios"]["near_max_seq_len"] == "ok" and p["scenarios"]["batch2"] == "skipped"
    import onnx

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    inits = {i.name: i.data_type for i in graph.initializer}
    zero_points = {inits.get(n.input[2]) for n in graph.node if n.op_type == "QuantizeLinear"}
    assert onnx.TensorProto.UINT16 in zero_points and onnx.TensorProto.INT32 not in zero_points
    assert [i.name for i in graph.input] == [s["name"] for s in m["signature"]["inputs"]]
    context = onnx.load(str(out / "model_ctx.onnx")).graph.node  # what parity ran: the precompiled binary
    assert [(n.op_type, n.domain) for n in context] == [("EPContext", "com.microsoft")]


@pytest.mark.slow
def test_transformers_checkpoint_16a8w_on_the_emulated_htp_passes_parity(tmp_path: Path) -> None:
    """A checkpoint transformers wrote (random weights, perturbed norms; no tokenizer: seeded random prompts)."""
    from conftest import HF_SHAPES, save_hf, stable_seed

    ckpt = save_hf(tmp_path / "ckpt", HF_SHAPES["dense_odd"][0], torch.float32, seed=stable_seed("qnn"))
    out = tmp_path / "hf-16a8w"
    data = _export(str(ckpt), out, "16a8w")
    _assert_on_htp(out)
    p = data["parity"]
    assert p["passed"] and p["exactness"]["passed"] and p["quality"]["passed"], p


@pytest.mark.slow
def test_the_exactness_gate_fails_an_htp_session_that_drops_its_conv_state(
    tmp_path: Path, tiny, tiny_16a8w
) -> None:
    from lfm_export.runtime.qnn import QnnSession

    class HtpDropsConvState(QnnSession):
        def _prefill(self, ids: np.ndarray) -> np.ndarray:
            out = super()._prefill(ids)
            self._state = {k: np.zeros_like(v) if k.endswith(".conv") else v for k, v in self._state.items()}
            return out

    out = tmp_path / "tiny-16a8w"
    _export("tiny", out, "16a8w", "--no-parity")
    result = run_parity(
        HtpDropsConvState(out, threads=1),
        ReferenceSession(tiny.model, max_seq_len=CONTEXT),
        "qnn-16a8w",
        simulation=FakeQuantSession(tiny_16a8w, name="simulated"),
        tokenizer_file=tiny.tokenizer_file,
        scenarios=["prefill"],
    )
    assert not result.summary()["exactness"]["passed"]


def test_fake_quantized_snapshots_pass_the_scenario_bitwise(slice_16a8w: dict, tmp_path: Path) -> None:
    """The fake-quantized step (of a trained slice of `tiny`); the HTP session shares its state checks
    (`runtime.qnn.restored_state`) and runs on the emulator in the slow tests only."""
    from snapshot_checks import check_snapshots

    check_snapshots(FakeQuantSession(slice_16a8w["simulation"].step), tmp_path, short=True)


@pytest.mark.slow
def test_htp_session_snapshots_pass_the_scenario_bitwise(tmp_path: Path) -> None:
    """The snapshot scenario on the emulated HTP (about 60 tokens, one at a time)."""
    from snapshot_checks import check_snapshots

    from lfm_export.runtime.qnn import QnnSession

    out = tmp_path / "tiny-16a8w"
    _export("tiny", out, "16a8w", "--soc", "SM8650", "--no-parity")
    check_snapshots(QnnSession(out, threads=1), tmp_path)


SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    layer_types=["conv", "full_attention"],
    block_auto_adjust_ff_dim=False,
)
"""A transformers-written checkpoint of one conv and one attention layer: the cheapest QNN artifact."""
SMALL_W2 = "model.layers.0.feed_forward.w2.weight"


@pytest.fixture(scope="module")
def small_16a8w(tmp_path_factory) -> Path:
    """The 2-layer checkpoint exported at 16a8w (context 32, no parity); its checkpoint folder beside it."""
    from conftest import save_hf, stable_seed

    from lfm_export.backends.qnn.recipes import make_recipe
    from lfm_export.pipeline import export_artifact
    from lfm_export.progress import Progress

    root = tmp_path_factory.mktemp("qnn-small")
    ckpt = save_hf(root / "ckpt", SMALL, torch.float32, seed=stable_seed("qnn-small"))
    out = root / "16a8w"
    recipe = make_recipe("16a8w", max_seq_len=32)
    export_artifact(
        "onnx-qnn", str(ckpt), out, recipe, parity=False, threads=1, progress=Progress(quiet=True)
    )
    return out


def _scale_weight_scales(folder: Path, module: str, factor: float) -> None:
    """Multiply, in place in `folder`'s QDQ graph, the per-channel scales of the weight `module`'s linear takes
    (found by the exporter's metadata on the op consuming the weight's `DequantizeLinear`)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    dq = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    scope = f"'model.{module}'"
    user = next(
        n
        for n in graph.node
        if any(i in dq for i in n.input)
        and any(p.key == "pkg.torch.onnx.name_scopes" and scope in p.value for p in n.metadata_props)
    )
    scale = inits[dq[next(i for i in user.input if i in dq)].input[1]]
    values = numpy_helper.to_array(scale, base_dir=str(folder)) * np.float32(factor)
    if scale.data_location == onnx.TensorProto.EXTERNAL:
        ext = {e.key: e.value for e in scale.external_data}
        with open(folder / ext["location"], "r+b") as f:
            f.seek(int(ext.get("offset", 0)))
            f.write(values.astype(np.float32).tobytes())
    else:
        scale.CopyFrom(numpy_helper.from_array(values.astype(np.float32), scale.name))
        onnx.save(model, str(folder / "model.onnx"))


@pytest.mark.slow
def test_stored_weights_pass_the_honest_qdq_graph_and_name_a_matrix_two_percent_off(
    small_16a8w: Path, tmp_path: Path
) -> None:
    """Through the emulated HTP and the pipeline's parity: the honest 2-layer artifact passes (logits, stored
    weights, and the graph row: its QDQ graph on onnxruntime's CPU provider within one activation code of the
    fake-quantized program); a copy with one w2's scales x1.02 edited in place, and the honest artifact checked
    against the checkpoint with that w2 x1.02 (an artifact of other weights), fail on the stored weights naming
    the matrix and on the graph row, whose largest code difference sits after that w2."""
    import shutil

    from lfm_export.loading import load_model
    from lfm_export.pipeline import check_artifact
    from lfm_export.progress import Progress

    quiet = Progress(quiet=True)
    honest = check_artifact(small_16a8w, threads=1, progress=quiet, scenarios=["decode"])
    sw = honest.stored_weights
    assert honest.passed, honest.verdict_line()
    assert sw["passed"] and sw["artifact_tensors"] >= 16 and sw["rows_unmatched"] == 0, sw
    graph = honest.exact("graph_prefill")
    assert (
        graph["passed"] and graph["values"]["activation_code_max_diff"] <= 1 and graph["positions"] >= 32
    ), graph
    w2 = SMALL_W2.removesuffix(".weight")

    broken = tmp_path / "broken"
    shutil.copytree(small_16a8w, broken)
    _scale_weight_scales(broken, SMALL_W2.removesuffix(".weight"), 1.02)
    result = check_artifact(broken, threads=1, progress=quiet, scenarios=["decode"])
    assert not result.passed and list(result.stored_weights["unmatched"]) == [SMALL_W2], result.verdict_line()
    assert f"stored_weights[{SMALL_W2}]: rows_unmatched" in result.verdict_line()
    graph = result.exact("graph_prefill")
    assert not graph["passed"] and graph["values"]["activation_code_max_diff"] > 100, graph
    assert w2 in graph["where"], graph

    copy = tmp_path / "copy"
    shutil.copytree(small_16a8w, copy)
    other = load_model(json.loads((copy / "manifest.json").read_text())["model"]["source"])
    with torch.no_grad():
        other.model.model.layers[0].feed_forward.w2.weight.mul_(1.02)
    result = check_artifact(copy, other, threads=1, progress=quiet, scenarios=["decode"])
    assert not result.passed and list(result.stored_weights["unmatched"]) == [SMALL_W2], result.verdict_line()
    graph = result.exact("graph_prefill")
    assert not graph["passed"] and w2 in graph["where"], graph


SLICE_CONTEXT = 16
SLICE_W2 = "model.layers.0.feed_forward.w2"


@pytest.fixture(scope="module")
def slice_16a8w(tmp_path_factory) -> dict:
    """`tiny`'s layers 1 and 2, a conv and an attention layer (trained weights, embedding, head, tokenizer), exported at 16a8w, context
    16, no parity: the cheapest real QDQ artifact of trained weights (its export is the cost: about 3 s of
    quantization and 7 s of torch's ONNX export on a loaded machine); `simulation`: the fake-quantized program
    parity compares its graph with."""
    from model_slices import write_slice

    from lfm_export.backends.onnx_qnn import simulation_session
    from lfm_export.backends.qnn.recipes import make_recipe
    from lfm_export.pipeline import export_artifact
    from lfm_export.progress import Progress

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("qnn-slice")
    ckpt = write_slice("tiny", root / "ckpt", [1, 2])
    out = root / "16a8w"
    recipe = make_recipe("16a8w", max_seq_len=SLICE_CONTEXT)
    export_artifact(
        "onnx-qnn", str(ckpt), out, recipe, parity=False, threads=1, progress=Progress(quiet=True)
    )
    loaded = load_model(str(ckpt))
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "root": root,
        "out": out,
        "ckpt": ckpt,
        "manifest": manifest,
        "loaded": loaded,
        "simulation": simulation_session(loaded, manifest),
    }


def test_the_qdq_graph_row_passes_the_honest_artifact_and_fails_a_matrix_two_percent_off_and_other_weights(
    slice_16a8w: dict,
) -> None:
    """The real QDQ graph of a trained slice on onnxruntime's CPU provider against the fake-quantized program
    (parity's graph row, `lfm_export.backends.onnx_qnn.graph_check`; the emulated HTP runs in the slow tests):
    honest, every activation code within one step; the same graph with one w2's scales x1.02, and the honest
    graph against the checkpoint with that w2 x1.02 (an artifact of other weights), hundreds of steps apart
    right after that w2. Two prompts of 8 tokens."""
    from model_slices import copy_artifact

    from lfm_export.backends.onnx_qnn import simulation_session
    from lfm_export.backends.onnx_qnn.graph_check import MAX_DIFF, graph_check

    loaded = slice_16a8w["loaded"]
    prompts = [p[None, :8] for p in short_prompts(loaded)]
    honest = graph_check(slice_16a8w["out"], slice_16a8w["simulation"], prompts)
    assert honest.passed and honest.values[MAX_DIFF] <= 1 and honest.positions == 16, honest.describe()

    scaled = copy_artifact(slice_16a8w, "w2-x1.02")
    _scale_weight_scales(scaled, SLICE_W2, 1.02)
    broken = graph_check(scaled, slice_16a8w["simulation"], prompts)
    assert not broken.passed and broken.values[MAX_DIFF] > 50 and SLICE_W2 in broken.where, broken.describe()

    other = load_model(str(slice_16a8w["ckpt"]))
    with torch.no_grad():
        other.model.model.layers[0].feed_forward.w2.weight.mul_(1.02)
    wrong = graph_check(slice_16a8w["out"], simulation_session(other, slice_16a8w["manifest"]), prompts)
    assert not wrong.passed and wrong.values[MAX_DIFF] > 50 and SLICE_W2 in wrong.where, wrong.describe()


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["16a4w", "8a8w"])
def test_tiny_16a4w_and_8a8w_on_the_emulated_htp_pass_parity(tmp_path: Path, quant: str) -> None:
    """The two other recipes exported and checked on the emulated HTP (prefill and decode: the scenarios their
    gates were measured on), the stored weights matching bit for bit; 16a4w's weight codes within -7..7."""
    from lfm_export.pipeline import check_artifact
    from lfm_export.progress import Progress

    out = tmp_path / f"tiny-{quant}"
    _export("tiny", out, quant, "--no-parity")
    _assert_on_htp(out)
    result = check_artifact(out, threads=1, progress=Progress(quiet=True), scenarios=["prefill", "decode"])
    assert result.passed, result.verdict_line()
    assert result.stored_weights["passed"] and result.stored_weights["artifact_rows"] > 10000
    if quant == "16a4w":
        import onnx

        graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
        codes = {t.name: t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
        assert len(codes) >= 30
        for t in codes.values():
            values = onnx.numpy_helper.to_array(t, base_dir=str(out))
            assert values.min() >= -7 and values.max() <= 7, t.name
