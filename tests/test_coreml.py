"""The Core ML backend end to end: real `.mlpackage` files converted by coremltools from the bundled models, read
back from disk and run by the numpy interpreter through the `CoreMLSession` shim, checked by the parity gate.

Default suite: `tiny` at int4-b32 and `tiny-moe` at fp16 (context 32), one deliberately wrong conversion, the
spec / metadata / inspect checks, bad input. Slow: every recipe on both models, and checkpoints written by
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
def tiny_int4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export("tiny", tmp_path_factory.mktemp("cm") / "tiny-int4", "int4", max_prefill=8)


@pytest.fixture(scope="module")
def moe_fp16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export("tiny-moe", tmp_path_factory.mktemp("cm") / "moe-fp16", "fp16", prefill_lengths="1,4,8")


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_tiny_int4_passes_both_parts_under_the_interpreter(tiny_int4: Path) -> None:
    m = manifest(tiny_int4)
    p = m["parity"]
    assert m["backend"] == "coreml" and m["recipe"]["name"] == "int4-b32"
    assert p["exactness"]["gate"] == "int4-fp16" and p["exactness"]["passed"] and p["quality"]["passed"]
    assert {k for k, v in p["scenarios"].items() if v == "ok"} >= {"prefill", "decode", "chunked_prefill"}
    assert p["scenarios"]["near_max_seq_len"] == "ok"
    # fp16 compute, compared with an fp32 simulation holding the same int4 weights: fp16 rounding, no more
    assert 1e-5 < p["exactness"]["worst"]["logit_max_rel"] < 5e-3
    assert 0.01 < p["quality"]["pooled"]["kl_mean"] < 0.1  # what int4 costs on tiny (ONNX int4: 0.042)
    assert "coreml-interpreter" in (tiny_int4 / "parity" / "parity.md").read_text()


def test_moe_fp16_passes_with_enumerated_prefill_lengths(moe_fp16: Path) -> None:
    m = manifest(moe_fp16)
    p = m["parity"]
    assert p["exactness"]["gate"] == "fp16-fp16-moe" and p["passed"]
    assert m["coreml"]["prefill"] == {"enumerated": [1, 4, 8]}
    assert p["quality"]["pooled"]["kl_mean"] < 1e-3
    assert {"topk", "sigmoid", "scatter_along_axis"} <= set(m["coreml"]["ops"])  # the dense MoE routing


def test_spec_declares_states_and_ios18(tiny_int4: Path) -> None:
    """The saved spec (what Core ML reads): specification version 9, one fp16 state per conv state and KV
    cache, each read once and written once by the main function (coremltools issue 2275 was a state the
    program did not take: the load fails then), and the same in the manifest."""
    program = load_program(tiny_int4 / "model.mlpackage")
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
    m = manifest(tiny_int4)
    assert m["coreml"]["specification_version"] == 9 and m["coreml"]["target"] == "iOS18"
    assert set(m["coreml"]["states"]) == want


def test_compression_report_and_constexpr_ops(tiny_int4: Path) -> None:
    m = manifest(tiny_int4)
    report = m["coreml"]["compression"]
    linears = {n: r for n, r in report.items() if r["why"] == "linear weight"}
    assert len(linears) == 6 * 3 + 4 * 2 + 2 * 4  # w1/w2/w3 per layer; conv in/out_proj; attention q/k/v/out
    assert all(r["as"].startswith("int4 per block of 32") for r in linears.values())
    embed = [r for n, r in report.items() if "embed_tokens" in n]
    assert embed == [{"as": "int8 per channel, symmetric", "why": embed[0]["why"]}]
    kept = {r["why"] for r in report.values() if r["as"] == "fp16"}
    assert any("conv weight" in why for why in kept)
    ops = m["coreml"]["ops"]
    assert ops["constexpr_blockwise_shift_scale"] == len(linears) + 1


def test_session_reset_and_state_readout_match_the_reference(tiny_int4: Path) -> None:
    """Chunked prefill (max_prefill 8), decode, then a new sequence: the fresh state gives the same logits."""
    session = CoreMLSession(tiny_int4)
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
    assert (first.argmax(-1) == ref.argmax(-1)).mean() > 0.8  # int4, so close, not equal


def test_metadata_in_the_package(tiny_int4: Path) -> None:
    import coremltools as ct

    model = ct.models.MLModel(str(tiny_int4 / "model.mlpackage"), skip_model_load=True)
    spec = model.get_spec()
    meta = spec.description.metadata
    assert meta.author == "lfm-export" and meta.license and meta.versionString
    assert "stateful" in meta.shortDescription
    assert json.loads(meta.userDefined["lfm_export.recipe"])["name"] == "int4-b32"
    assert meta.userDefined["lfm_export.weights_sha256"] == manifest(tiny_int4)["model"]["weights_sha256"]
    assert all(i.shortDescription for i in spec.description.input)
    assert all(s.shortDescription for s in spec.description.state)
    assert "conv state" in {s.name: s.shortDescription for s in spec.description.state}["past_0_conv"]


def test_wrong_conversion_fails_parity(tiny_int4: Path, tmp_path: Path) -> None:
    """The same artifact with its package replaced by a real Core ML conversion of a module that does not write
    its conv state back (how the short-conv state went wrong on another path, executorch issue 21855): the
    program still declares the states, and exactness fails on them and on the logits after the first call."""
    from lfm_export.backends.coreml import convert as cv
    from lfm_export.backends.coreml.compress import compress
    from lfm_export.backends.coreml.modules import CoreMLStatefulModule
    from lfm_export.model import STATEFUL
    from lfm_export.signature import build_signature

    class NoConvWrite(CoreMLStatefulModule):
        def forward(self, input_ids, input_pos):
            conv = [self.get_buffer(n) for n in self._names["conv"]]
            keys = [self.get_buffer(n) for n in self._names["key"]]
            values = [self.get_buffer(n) for n in self._names["value"]]
            logits, _, _, _ = self.model(input_ids, conv, keys, values, input_pos=input_pos, form=STATEFUL)
            return logits

    broken = tmp_path / "broken"
    shutil.copytree(tiny_int4, broken)
    shutil.rmtree(broken / "model.mlpackage")
    model = load_model("tiny").model
    traced = cv.trace(model, CONTEXT, 8, module_cls=NoConvWrite)
    recipe = make_recipe("int4", max_seq_len=CONTEXT, max_prefill=8)
    sig16 = build_signature(model.config, STATEFUL, CONTEXT, "float16", max_prefill=8)
    mlmodel, _ = compress(cv.convert(traced, sig16, recipe, (1, 8)), recipe)
    mlmodel.save(str(broken / "model.mlpackage"))
    result = check_artifact(broken, progress=Progress(quiet=True))
    assert not result.passed
    failed = (
        " ".join(result.summary()["failures"]) if "failures" in result.summary() else result.verdict_line()
    )
    assert "state_max_rel" in failed or "logit_max_rel" in failed


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lfm_export.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--target", "iOS17"], "states (KV cache and conv state held in the model) need iOS 18"),
        (["--quant", "fp32"], "holds Core ML states in fp16 only"),
        (["--max-seq-len", "16", "--max-prefill", "32"], "exceeds the context"),
        (["--prefill-lengths", "4,8"], "must include 1"),
        (["--quant", "int4-b32-asym"], "no -asym"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, args: list[str], fragment: str) -> None:
    out = tmp_path / "out"
    r = cli("coreml", "tiny", "-o", str(out), *args)
    assert r.returncode == 2, r.stderr
    assert fragment in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_inspect_shows_states_and_target(tiny_int4: Path) -> None:
    r = cli("inspect", str(tiny_int4), "--json")
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
def test_transformers_checkpoints_convert_and_pass(
    hf_checkpoints, name: str, quant: str, tmp_path: Path
) -> None:
    export(str(hf_checkpoints[name]), tmp_path / "a", quant)
