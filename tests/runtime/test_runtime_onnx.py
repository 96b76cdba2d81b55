"""`OnnxSession` against the canonical torch model, over artifacts exported here with `torch.onnx.export`
(dynamo) of `SignatureModule` plus a minimal manifest.json."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lfm_export.contract.errors import ContextLimitError, UserError
from lfm_export.contract.manifest import SCHEMA_VERSION
from lfm_export.contract.session import Session
from lfm_export.contract.signature import GROWING, STATIC
from lfm_export.loading import init_random
from lfm_export.runtime.generate import stream_generate
from lfm_export.runtime.onnx import IO_MODES, OnnxSession
from lfm_export.runtime.sampler import GenerationConfig
from lfm_export.signature import build_signature
from lfm_export.trace import SignatureModule, dynamic_shapes, example_inputs

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TOL = 1e-4
MAX_SEQ = 48


def export_artifact(model: torch.nn.Module, folder: Path, form: str) -> Path:
    sig = build_signature(model.config, form, MAX_SEQ)
    module = SignatureModule(model, sig).eval()
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            example_inputs(sig),
            dynamic_shapes=dynamic_shapes(sig),
            dynamo=True,
            input_names=sig.input_names,
            output_names=sig.output_names,
            optimize=False,
            verbose=False,
        )
    folder.mkdir(parents=True)
    program.save(str(folder / "model.onnx"))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "backend": "onnx",
        "signature": sig.to_dict(),
        "max_seq_len": MAX_SEQ,
        "files": ["model.onnx"],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def model(tiny_config) -> torch.nn.Module:
    return init_random(tiny_config, seed=3)


class Artifacts:
    """Artifacts exported on first use, one per KV form (each export takes ~15 s on 2 cores)."""

    def __init__(self, model: torch.nn.Module, root: Path) -> None:
        self.model, self.root, self.done = model, root, {}

    def __getitem__(self, form: str) -> Path:
        if form not in self.done:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                self.done[form] = export_artifact(self.model, self.root / form, form)
            finally:
                torch.set_num_threads(threads)
        return self.done[form]


@pytest.fixture(scope="module")
def artifacts(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    return Artifacts(model, tmp_path_factory.mktemp("onnx"))


class Reference:
    """The canonical model driven the way a session is (growing KV)."""

    def __init__(self, model: torch.nn.Module, batch: int = 1) -> None:
        self.model = model
        self.conv, self.keys, self.values = model.empty_state(batch)

    @torch.no_grad()
    def step(self, tokens: np.ndarray) -> np.ndarray:
        logits, self.conv, self.keys, self.values = self.model(
            torch.from_numpy(np.asarray(tokens, dtype=np.int64)), self.conv, self.keys, self.values
        )
        return logits.numpy()

    def state(self) -> dict[str, np.ndarray]:
        cfg = self.model.config
        out = {f"past.{i}.conv": c.numpy() for i, c in zip(cfg.conv_layers, self.conv, strict=True)}
        for i, k, v in zip(cfg.attn_layers, self.keys, self.values, strict=True):
            out[f"past_key_values.{i}.key"] = k.numpy()
            out[f"past_key_values.{i}.value"] = v.numpy()
        return out


def close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=TOL, rtol=0)


PROMPT = np.array([[5, 17, 99, 3, 250, 42, 8]])


@pytest.mark.parametrize("io", IO_MODES)
def test_growing_prefill_decode_and_chunked_prefill_match_the_model(model, artifacts, io: str) -> None:
    sess = OnnxSession(artifacts[GROWING], threads=1, io=io)
    assert isinstance(sess, Session)
    assert (sess.vocab_size, sess.max_seq_len, sess.supports_batch) == (
        model.config.vocab_size,
        MAX_SEQ,
        True,
    )
    ref = Reference(model)
    close(sess.prefill(PROMPT), ref.step(PROMPT))
    assert sess.position == PROMPT.shape[1]
    for t in (11, 0, 319):
        close(sess.decode(np.array([t])), ref.step(np.array([[t]]))[:, -1])
    state, want = sess.state(), ref.state()
    assert sorted(state) == sorted(want) == sorted(s.name for s in sess.signature.state_inputs())
    for name in want:
        close(state[name], want[name])
    assert state["past_key_values.1.key"].shape == (1, 2, PROMPT.shape[1] + 3, 16)

    sess.reset()
    full = sess.prefill(PROMPT)
    sess.reset()
    chunks = np.concatenate(
        [sess.prefill(PROMPT[:, :3]), sess.prefill(PROMPT[:, 3:4]), sess.prefill(PROMPT[:, 4:])], 1
    )
    close(chunks, full)


@pytest.mark.parametrize("io", ["ortvalue", "numpy"])
def test_state_round_trips(artifacts, io: str) -> None:
    sess = OnnxSession(artifacts[GROWING], threads=1, io=io)
    sess.prefill(PROMPT)
    snap = sess.state()
    kept = {k: v.copy() for k, v in snap.items()}
    first = sess.decode(np.array([9]))
    sess.decode(np.array([10]))
    for name, value in snap.items():  # a snapshot is a copy: later steps leave it alone
        np.testing.assert_array_equal(value, kept[name])
    sess.set_state(snap)
    assert sess.position == PROMPT.shape[1]
    np.testing.assert_array_equal(sess.decode(np.array([9])), first)
    after = sess.state()["past_key_values.4.value"]
    assert after.shape[2] == PROMPT.shape[1] + 1
    np.testing.assert_array_equal(after[:, :, : PROMPT.shape[1]], kept["past_key_values.4.value"])
    with pytest.raises(UserError, match="missing past.0.conv"):
        sess.set_state({})


def test_batch_rows_are_independent(model, artifacts) -> None:
    sess = OnnxSession(artifacts[GROWING], threads=1)
    tokens = np.array([[1, 2, 3, 4], [200, 100, 50, 25]])
    sess.reset(2)
    ref = Reference(model, batch=2)
    close(sess.prefill(tokens), ref.step(tokens))
    close(sess.decode(np.array([7, 8])), ref.step(np.array([[7], [8]]))[:, -1])
    with pytest.raises(UserError, match="batch 1"):
        sess.prefill(np.array([[1]]))
    with pytest.raises(UserError, match="token ids must be in 0..319"):
        sess.prefill(np.array([[1], [320]]))


def test_static_form_matches_and_enforces_max_seq_len(model, artifacts) -> None:
    sess = OnnxSession(artifacts[STATIC], threads=1)
    ref = Reference(model)
    close(sess.prefill(PROMPT), ref.step(PROMPT))
    close(sess.decode(np.array([13])), ref.step(np.array([[13]]))[:, -1])
    assert sess.state()["past_key_values.1.key"].shape == (1, 2, MAX_SEQ, 16)
    sess.reset()
    sess.prefill(np.zeros((1, MAX_SEQ - 1), dtype=np.int64))
    sess.decode(np.array([1]))
    with pytest.raises(ContextLimitError, match=f"max_seq_len {MAX_SEQ}"):
        sess.decode(np.array([1]))


def test_generation_over_onnx_matches_greedy_torch(model, artifacts, tmp_path: Path) -> None:
    from test_runtime import train_tokenizer

    tok = train_tokenizer(tmp_path / "tok", vocab_size=model.config.vocab_size)
    prompt = tok.encode_chat([{"role": "user", "content": "hello world"}])
    gen = stream_generate(
        OnnxSession(artifacts[GROWING], threads=1),
        tok,
        prompt,
        GenerationConfig(max_new_tokens=8, eos_token_ids=(10_000,)),
    )
    text = "".join(gen)
    ref = Reference(model)
    logits = ref.step(np.array([prompt]))[0, -1]
    ids = []
    for _ in range(8):
        ids.append(int(np.argmax(logits)))
        logits = ref.step(np.array([[ids[-1]]]))[0, -1]
    assert gen.token_ids == ids and text == tok.decode(ids)
    long_prompt = list(range(MAX_SEQ))
    with pytest.raises(ContextLimitError):
        stream_generate(OnnxSession(artifacts[GROWING], threads=1), tok, long_prompt, GenerationConfig())


def test_session_runs_without_torch(artifacts) -> None:
    code = (
        "import sys, numpy as np; from lfm_export.runtime.onnx import OnnxSession; "
        f"s = OnnxSession({str(artifacts[GROWING])!r}, threads=1); s.prefill(np.array([[1, 2, 3]])); "
        "print(s.decode(np.array([4])).shape); assert 'torch' not in sys.modules, 'torch imported'"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"(1, {artifacts.model.config.vocab_size})"


def test_bad_artifact_folders(artifacts, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        OnnxSession(tmp_path / "nope")
    with pytest.raises(UserError, match="no manifest.json"):
        OnnxSession(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(artifacts[GROWING], bad)
    (bad / "model.onnx").rename(bad / "other.onnx")
    with pytest.raises(UserError, match="model file model.onnx is missing"):
        OnnxSession(bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"] = [{"path": "other.onnx", "bytes": 1}]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert OnnxSession(bad, threads=1).model_path.name == "other.onnx"
    manifest["signature"]["inputs"][2]["name"] = "past.99.conv"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="input past.99.conv is missing"):
        OnnxSession(bad)
    del manifest["signature"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="no 'signature'"):
        OnnxSession(bad)
    (bad / "manifest.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        OnnxSession(bad)
    (bad / "manifest.json").write_text(
        json.dumps(
            {
                "schema_version": SCHEMA_VERSION,
                "signature": json.loads((artifacts[GROWING] / "manifest.json").read_text())["signature"],
                "files": ["other.onnx"],
            }
        )
    )
    (bad / "other.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match="onnxruntime cannot load it"):
        OnnxSession(bad)
    with pytest.raises(UserError, match="io mode"):
        OnnxSession(artifacts[GROWING], io="magic")
    with pytest.raises(UserError, match="kv mode"):
        OnnxSession(artifacts[GROWING], kv="magic")
    with pytest.raises(UserError, match="GroupQueryAttention"):  # plain attention: present = past + new
        OnnxSession(artifacts[GROWING], kv="shared")
    assert OnnxSession(artifacts[GROWING]).kv == "copy"


@pytest.mark.parametrize("form", [GROWING, STATIC])
def test_snapshots_pass_the_scenario_bitwise(artifacts, form: str, tmp_path: Path) -> None:
    from snapshot_checks import check_snapshots

    check_snapshots(OnnxSession(artifacts[form], threads=1), tmp_path)
