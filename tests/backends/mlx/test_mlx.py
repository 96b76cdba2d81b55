"""The MLX backend end to end: the traced program lowered to MLX, `.mlxfn` functions run by MLX (CPU) through
our shim, by mlx-lm (the folder loaded unchanged) and by a fresh process that imports only mlx and numpy.

Five exports are shared by the module (`tiny` and `tiny-moe`, fp32 and int4, and `tiny` bf16; context 64,
prefill chunks up to 16), each with the full parity gate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from lfm_export.backends.mlx.recipes import make_recipe  # noqa: E402
from lfm_export.backends.mlx.weights import pack  # noqa: E402
from lfm_export.contract.errors import ContextLimitError, UnsupportedError, UserError  # noqa: E402
from lfm_export.parity import ReferenceSession  # noqa: E402
from lfm_export.pipeline import check_artifact, export_artifact  # noqa: E402
from lfm_export.progress import Progress  # noqa: E402
from lfm_export.quant import quantize_block  # noqa: E402
from lfm_export.runtime.mlx import MlxSession  # noqa: E402

CONTEXT, PREFILL = 64, 16
CASES = [("tiny", "fp32"), ("tiny", "int4"), ("tiny-moe", "fp32"), ("tiny-moe", "int4")]
BF16 = ("tiny", "bf16")
PROMPT = np.array([[1, 25, 420, 303, 272, 40, 99, 7, 6, 300, 12, 5, 77]], dtype=np.int64)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("mlx")
    out = {}
    for model, quant in [*CASES, BF16]:
        folder = root / f"{model}-{quant}"
        outcome = export_artifact(
            "mlx",
            model,
            folder,
            make_recipe(quant, max_seq_len=CONTEXT, max_prefill=PREFILL),
            progress=Progress(quiet=True),
        )
        assert outcome.passed, outcome.manifest["parity"]
        out[(model, quant)] = folder
    return out


def _safetensors_bytes(folder: Path) -> int:
    """Bytes of the tensors of `folder/model.safetensors` (its header read)."""
    with open(folder / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


@pytest.mark.parametrize("model", ["tiny", "tiny-moe"])
def test_budget_counts_the_bytes_the_folder_holds(artifacts, model) -> None:
    """`--budget size=`'s count of a recipe (`lfm_export.budget.weight_bytes`: codes, float32 scales and the
    float32 bias mlx-lm keeps per group, float tensors, MoE experts stacked) is the safetensors' tensor bytes."""
    from lfm_export.budget import weight_bytes
    from lfm_export.loading import load_model

    recipe = make_recipe("int4", max_seq_len=CONTEXT, max_prefill=PREFILL)
    assert weight_bytes(load_model(model, lazy=True), recipe) == _safetensors_bytes(
        artifacts[(model, "int4")]
    )


@pytest.mark.parametrize("case", CASES, ids=[f"{m}-{q}" for m, q in CASES])
def test_export_passes_parity(artifacts, case) -> None:
    folder = artifacts[case]
    m = json.loads((folder / "manifest.json").read_text())
    assert m["backend"] == "mlx" and m["signature"]["form"] == "static" and m["max_seq_len"] == CONTEXT
    assert m["mlx"]["mlx_version"] == mx.__version__ and m["mlx"]["prefill_chunks"] == [2, 4, 8, 16]
    p = m["parity"]
    assert p["passed"] and p["exactness"]["passed"] and p["scenarios"]["batch2"] == "skipped"
    assert {k for k, v in p["scenarios"].items() if v == "ok"} >= {
        "prefill",
        "decode",
        "chunked_prefill",
        "near_max_seq_len",
    }
    assert p["exactness"]["worst"]["logit_max_rel"] < 1e-5  # the gate allows 1e-4
    stored = json.loads((folder / "parity" / "parity.json").read_text())["exactness"]["stored_weights"]
    if (
        case[1] == "int4"
    ):  # every stored row equals the simulation's, bit for bit (the tied table stored once)
        assert stored["passed"] and 0 < stored["artifact_rows"] < stored["simulation_rows"], stored
    else:
        assert stored is None
    for f in ("model.safetensors", "decode.mlxfn", "prefill.mlxfn", "config.json", "tokenizer.json"):
        assert (folder / f).is_file(), f
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == ("lfm2_moe" if case[0] == "tiny-moe" else "lfm2")
    if case[1] == "int4":
        assert cfg["quantization"] == {
            "group_size": 32,
            "bits": 4,
            "mode": "affine",
            "model.embed_tokens": {"group_size": 32, "bits": 8},
        }
        kept = {k["tensor"] for k in m["weights"]["unquantized"]}
        assert "model.layers.0.conv.conv.weight" in kept or "model.layers.1.conv.conv.weight" in kept
        if case[0] == "tiny-moe":
            assert any(t.endswith("feed_forward.gate.weight") for t in kept)
        assert 0.01 < p["quality"]["pooled"]["kl_mean"] < 0.1  # int4 is lossy, not broken


def test_core_codes_fit_mlx_affine_format() -> None:
    """`pack` of the core quantizer's codes dequantized by MLX equals the core's own dequantization (3 bits too:
    a precision mix's, packed across word boundaries; and 2, whole codes per word, which a mix may hold), and
    the stored-weights reader unpacks MLX's own."""
    from lfm_export.backends.mlx.stored_weights import _dequantize

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 128)).astype(np.float32)
    for bits, block, symmetric in ((3, 64, True), (3, 128, False), (2, 32, False), (2, 128, True)):
        q = quantize_block(w, bits, block, symmetric)
        packed, scales, biases = pack(q)
        assert packed.shape == (16, 128 * bits // 32)
        got = np.array(mx.dequantize(mx.array(packed), mx.array(scales), mx.array(biases), block, bits))
        assert np.abs(got - q.dequantize()).max() <= 1e-6 * np.abs(q.dequantize()).max()
        assert np.array_equal(_dequantize(packed, scales, biases, bits), q.dequantize())
        mq, ms, mb = mx.quantize(mx.array(w), group_size=block, bits=bits)
        theirs = np.array(mx.dequantize(mq, ms, mb, block, bits))
        assert np.abs(_dequantize(np.array(mq), np.array(ms), np.array(mb), bits) - theirs).max() < 1e-6
    for bits, block, symmetric in ((4, 32, True), (8, 64, False), (4, 128, False)):
        q = quantize_block(w, bits, block, symmetric)
        packed, scales, biases = pack(q)
        got = np.array(mx.dequantize(mx.array(packed), mx.array(scales), mx.array(biases), block, bits))
        want = q.dequantize()
        assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
        # and MLX's own quantizer packs the same way: its codes read back through our layout
        mq, ms, mb = mx.quantize(mx.array(w), group_size=block, bits=bits)
        per = 32 // bits
        codes = (np.array(mq)[..., None] >> (np.arange(per, dtype=np.uint32) * bits)) & (2**bits - 1)
        ours = codes.reshape(16, -1, block) * np.array(ms)[..., None] + np.array(mb)[..., None]
        assert np.abs(ours.reshape(16, 128) - np.array(mx.dequantize(mq, ms, mb, block, bits))).max() < 1e-6


def greedy_tokens(folder: Path, n: int) -> tuple[list[int], list[int]]:
    """`n` greedy tokens after `PROMPT[0]`: mlx-lm's own `generate_step` on `folder`, then our `MlxSession`."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(folder))
    steps = generate_step(mx.array(PROMPT[0]), model, max_tokens=n, sampler=lambda x: mx.argmax(x, axis=-1))
    theirs = [int(t) for t, _ in steps]
    session = MlxSession(folder)
    ours = [int(session.prefill(PROMPT)[0, -1].argmax())]
    while len(ours) < n:
        ours.append(int(session.decode(np.array([ours[-1]]))[0].argmax()))
    return theirs, ours


@pytest.mark.parametrize("case", [("tiny", "int4"), ("tiny-moe", "int4"), ("tiny", "fp32"), BF16])
def test_mlx_lm_loads_the_folder_and_generates_our_greedy_tokens(artifacts, case) -> None:
    theirs, ours = greedy_tokens(artifacts[case], 16)
    assert theirs == ours


def test_functions_run_in_a_process_with_only_mlx_and_numpy(artifacts, tmp_path) -> None:
    folder = artifacts[("tiny", "int4")]
    session = MlxSession(folder)
    want = session.prefill(PROMPT[:, :2])[0, -1]
    want_next = session.decode(PROMPT[0, 2:3])[0]
    script = tmp_path / "run.py"
    script.write_text(
        """
import sys, json
import numpy as np
import mlx.core as mx
folder = sys.argv[1]
m = json.load(open(folder + "/manifest.json"))
weights = mx.load(folder + "/model.safetensors")
state = [mx.zeros([1 if isinstance(d, str) else d for d in s["shape"]])
         for s in m["signature"]["inputs"] if s["role"] in ("conv", "key", "value")]
prefill = mx.import_function(folder + "/prefill.mlxfn")
decode = mx.import_function(folder + "/decode.mlxfn")
ids = mx.array([[1, 25]], dtype=mx.int64)
out = prefill(ids, mx.array([0], dtype=mx.int64), *state, **weights)
a = np.array(out[0][0, -1])
out = decode(mx.array([[420]], dtype=mx.int64), mx.array([2], dtype=mx.int64), *out[1:], **weights)
b = np.array(out[0][0, -1])
banned = [k for k in sys.modules if k.split(".")[0] in ("torch", "lfm_export", "mlx_lm", "transformers")]
assert not banned, banned
np.save(sys.argv[2], np.stack([a, b]))
"""
    )
    res = tmp_path / "logits.npy"
    r = subprocess.run([sys.executable, str(script), str(folder), str(res)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = np.load(res)
    np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[1], want_next, rtol=0, atol=1e-5)
    # and our shim itself runs without torch
    code = (
        "import sys, numpy as np; from lfm_export.runtime.mlx import MlxSession; "
        f"s = MlxSession({str(folder)!r}); s.prefill(np.array([[1, 25]])); s.decode(np.array([420])); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_session_chunks_state_and_restore(artifacts) -> None:
    """A 13-token prompt is fed as 8 + 4 + 1; two uneven calls give the same logits and state; a restored
    state continues as the original; the state matches the reference's."""
    folder = artifacts[("tiny-moe", "fp32")]
    a, b = MlxSession(folder), MlxSession(folder)
    whole = a.prefill(PROMPT)
    parts = np.concatenate([b.prefill(PROMPT[:, :5]), b.prefill(PROMPT[:, 5:])], axis=1)
    np.testing.assert_allclose(parts, whole, atol=1e-5)
    sa, sb = a.state(), b.state()
    assert sa.keys() == sb.keys() and all(np.allclose(sa[k], sb[k], atol=1e-5) for k in sa)
    c = MlxSession(folder)
    c.restore(a.snapshot())
    np.testing.assert_allclose(c.decode(np.array([3])), a.decode(np.array([3])), atol=1e-6)
    from lfm_export.loading import load_model

    ref = ReferenceSession(load_model("tiny-moe").model, max_seq_len=CONTEXT)
    np.testing.assert_allclose(ref.prefill(PROMPT), whole, atol=1e-4)
    for name, value in ref.state().items():
        mine = sa[name] if name.startswith("past.") else sa[name][:, :, : value.shape[2]]  # static KV cache
        np.testing.assert_allclose(mine, value, atol=1e-4, err_msg=name)
    with pytest.raises(ContextLimitError):
        a.prefill(np.ones((1, CONTEXT), dtype=np.int64))
    d = MlxSession(folder)  # generation's prefill: the last position's logits, the same state
    np.testing.assert_allclose(d.prefill_last(PROMPT), whole[:, -1], atol=1e-5)
    assert d.position == PROMPT.shape[1]
    assert all(np.allclose(d.state()[k], sa[k], atol=1e-5) for k in sa)


def test_a_wrong_artifact_fails_parity(artifacts, tmp_path) -> None:
    """The int4 artifact with one layer's out_proj scales 5% off: exactness fails (the manifest still claims
    the recipe)."""
    broken = tmp_path / "broken"
    shutil.copytree(artifacts[("tiny", "int4")], broken)
    weights = dict(mx.load(str(broken / "model.safetensors")))
    key = "model.layers.3.conv.out_proj.scales"
    weights[key] = weights[key] * 1.05
    mx.save_safetensors(str(broken / "model.safetensors"), weights, metadata={"format": "mlx"})
    result = check_artifact(broken, progress=Progress(quiet=True), scenarios=["prefill", "decode"])
    assert not result.passed
    summary = json.loads((broken / "manifest.json").read_text())["parity"]
    assert not summary["exactness"]["passed"]
    assert list(result.stored_weights["unmatched"]) == ["model.layers.3.conv.out_proj.weight"]


def test_recipes_mlx_cannot_express_are_refused() -> None:
    with pytest.raises(UnsupportedError, match="float activations"):
        make_recipe("int4-b32-a8")
    with pytest.raises(UnsupportedError, match="MLX quantizes in groups"):
        make_recipe("int8-pc")
    assert make_recipe("bf16").activations == "native" and make_recipe("fp16").half == "float16"
    four = make_recipe("int4-g64", head_bits=4, embedding_quant="4").recipe
    assert (four.head_bits, four.embedding_bits, four.block_size) == (4, 4, 64)
    for head, table in ((4, None), (None, "4"), (None, "none"), (8, "4")):
        with pytest.raises(UnsupportedError, match="one table, one precision"):
            make_recipe("int4", head_bits=head, embedding_quant=table)
    with pytest.raises(UnsupportedError, match="--embedding-quant 4 needs a quantized recipe"):
        make_recipe("fp32", embedding_quant="4")


def test_group_size_that_does_not_divide_a_weight_writes_nothing(hf_checkpoints, tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(UserError, match="block size 64 does not divide the input dimension 96"):
        export_artifact(
            "mlx",
            str(hf_checkpoints["dense_odd"]),
            out,
            make_recipe("int4-g64"),
            progress=Progress(quiet=True),
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_mlxfn_from_another_mlx_version_is_refused_at_load(artifacts, tmp_path) -> None:
    other = tmp_path / "other"
    shutil.copytree(artifacts[("tiny", "fp32")], other)
    m = json.loads((other / "manifest.json").read_text())
    m["mlx"]["mlx_version"] = "0.29.1"
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match=r"exported with mlx 0\.29\.1, this is mlx"):
        MlxSession(other)


def test_cli_refusals_are_one_line_exit_2(artifacts, tmp_path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "lfm_export.cli", *args], capture_output=True, text=True, timeout=300
        )

    r = cli("mlx", "tiny", "-o", str(tmp_path / "x"), "--quant", "int4-a8")
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "x").exists()
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")][0].count("float activations")
    long_prompt = " ".join(["once upon a time"] * 40)
    r = cli("run", str(artifacts[("tiny", "fp32")]), "-p", long_prompt, "--max-new-tokens", "4")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("error:")]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense_attn_first_hd32", "moe_b32"])
@pytest.mark.parametrize("quant", ["fp32", "int4", "bf16", "fp16"])
def test_transformers_checkpoints_pass_and_a_wrong_export_fails(
    hf_checkpoints, tmp_path, name, quant
) -> None:
    """Checkpoints transformers wrote (dense, MoE with expert bias), not in the repo: parity passes; the same
    artifact with its first attention layer's v_proj 5% off (k_proj would not do: the k RMSNorm cancels a scale) fails exactness."""
    out = tmp_path / name
    outcome = export_artifact(
        "mlx",
        str(hf_checkpoints[name]),
        out,
        make_recipe(quant, max_seq_len=CONTEXT, max_prefill=PREFILL),
        progress=Progress(quiet=True),
    )
    assert outcome.passed, outcome.manifest["parity"]
    weights = dict(mx.load(str(out / "model.safetensors")))
    key = next(
        k for k in sorted(weights) if "v_proj" in k and k.endswith("scales" if quant == "int4" else "weight")
    )
    weights[key] = weights[key] * 1.05
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    result = check_artifact(out, progress=Progress(quiet=True), scenarios=["prefill", "decode"])
    assert not result.passed and not result.summary()["exactness"]["passed"]


def test_bf16_export_stores_and_computes_bf16(artifacts) -> None:
    """bf16: weights stored bf16 (the expert bias aside), state bf16, judged by the bf16-native gate against
    torch's bf16 run of the canonical model; quality against fp32 is small but not fp32's."""
    folder = artifacts[BF16]
    m = json.loads((folder / "manifest.json").read_text())
    assert m["signature"]["state_dtype"] == "bfloat16" and m["weights"]["linears"] == "bfloat16"
    weights = mx.load(str(folder / "model.safetensors"))
    assert {str(w.dtype) for w in weights.values()} == {"mlx.core.bfloat16"}
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    p = m["parity"]
    assert (
        p["passed"]
        and p["exactness"]["gate"] == "bf16-native"
        and p["quality"]["gate"] == "bf16 sanity bound"
    )
    assert p["exactness"]["pooled"]["logit_median_rel"] < 3e-3
    # bf16 rounding is visible against fp32 (2.3e-4 measured), far from fp32's 1e-12 and int4's 0.04
    assert 1e-5 < p["quality"]["pooled"]["kl_mean"] < 2e-3
    session = MlxSession(folder)
    logits = session.prefill(PROMPT)
    assert logits.dtype == np.float32 and all(v.dtype == np.float32 for v in session.state().values())


def test_simulating_bf16_compute_leaves_the_model_fp32(artifacts) -> None:
    """`simulate(..., ACT_NATIVE)` casts copies: the fp32 model it came from (whose norm and conv weights it
    would otherwise share) stays fp32, and its reference session runs with bf16 state."""
    import torch

    from lfm_export.loading import load_model
    from lfm_export.quant import simulate
    from lfm_export.recipes import ACT_NATIVE, parse_recipe

    model = load_model("tiny").model
    sim = simulate(model, parse_recipe("bf16"), ACT_NATIVE)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.dtype for p in sim.parameters()} == {torch.bfloat16}
    session = ReferenceSession(sim, name="simulated")
    assert session.keys[0].dtype == torch.bfloat16 and session.prefill(PROMPT).dtype == np.float32
    with pytest.raises(ValueError, match="fp16 / bf16"):
        simulate(model, parse_recipe("int4"), ACT_NATIVE)


def test_a_wrong_bf16_artifact_fails_parity(artifacts, tmp_path) -> None:
    """The bf16 artifact with one v_proj 5% off fails exactness (pooled KL mean 1.2e-3 against 2.9e-5 honest,
    measured 2026-11-29; the gate allows 1e-3)."""
    broken = tmp_path / "broken"
    shutil.copytree(artifacts[BF16], broken)
    weights = dict(mx.load(str(broken / "model.safetensors")))
    key = "model.layers.2.self_attn.v_proj.weight"
    weights[key] = (weights[key] * 1.05).astype(mx.bfloat16)
    mx.save_safetensors(str(broken / "model.safetensors"), weights, metadata={"format": "mlx"})
    result = check_artifact(broken, progress=Progress(quiet=True), scenarios=["prefill", "decode"])
    assert not result.passed and not result.summary()["exactness"]["passed"]


HALF_SLOW = [("tiny-moe", "bf16"), ("tiny-moe", "fp16"), ("tiny", "fp16")]


@pytest.mark.slow
@pytest.mark.parametrize("case", HALF_SLOW, ids=[f"{m}-{q}" for m, q in HALF_SLOW])
def test_half_exports_pass_and_a_wrong_one_fails(tmp_path, case) -> None:
    """tiny-moe at bf16 / fp16 (where an ulp flips an expert now and then: logit max rel 5e-2 honest, allowed)
    and tiny at fp16 pass; the same artifact with one v_proj 5% off fails exactness."""
    out = tmp_path / "out"
    outcome = export_artifact(
        "mlx",
        case[0],
        out,
        make_recipe(case[1], max_seq_len=CONTEXT, max_prefill=PREFILL),
        progress=Progress(quiet=True),
    )
    assert outcome.passed, outcome.manifest["parity"]
    weights = dict(mx.load(str(out / "model.safetensors")))
    key = "model.layers.2.self_attn.v_proj.weight"
    weights[key] = (weights[key] * 1.05).astype(weights[key].dtype)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    result = check_artifact(out, progress=Progress(quiet=True), scenarios=["prefill", "decode"])
    assert not result.passed and not result.summary()["exactness"]["passed"]


def test_an_artifact_with_one_matrix_two_percent_off_fails_parity(artifacts, tmp_path) -> None:
    """The int4 artifact with a middle layer's w2 x 1.02 (its scales and biases: the dequantized matrix
    `scales * q + biases` scaled as a whole) fails exactness through MLX, as the honest one passes."""
    broken = tmp_path / "w2"
    shutil.copytree(artifacts[("tiny", "int4")], broken)
    weights = dict(mx.load(str(broken / "model.safetensors")))
    for part in ("scales", "biases"):
        key = f"model.layers.3.feed_forward.w2.{part}"
        weights[key] = weights[key] * 1.02
    mx.save_safetensors(str(broken / "model.safetensors"), weights, metadata={"format": "mlx"})
    result = check_artifact(broken, progress=Progress(quiet=True), scenarios=["prefill"])
    assert not result.passed and not result.part_passed("exactness")


def test_generation_prefills_through_prefill_last(artifacts) -> None:
    """`stream_generate` takes the last prompt chunk's logits from `prefill_last` when the session has it: the
    same greedy tokens as the session's own prefill + decode loop, and as generation without it."""
    from lfm_export.runtime.generate import stream_generate
    from lfm_export.runtime.sampler import GenerationConfig
    from lfm_export.runtime.tokenizer import Tokenizer

    folder = artifacts[("tiny", "int4")]
    tok = Tokenizer.from_folder(folder)
    config = GenerationConfig(max_new_tokens=8, eos_token_ids=(-1,))
    runs = []
    for chunk, has_last in ((None, True), (5, True), (None, False)):
        session = MlxSession(folder)
        if not has_last:
            session.prefill_last = None  # type: ignore[method-assign]  # a session without the method
        gen = stream_generate(session, tok, PROMPT[0].tolist(), config, prefill_chunk=chunk)
        for _ in gen:
            pass
        runs.append(gen.token_ids)
    session = MlxSession(folder)
    ours = [int(session.prefill(PROMPT)[0, -1].argmax())]
    while len(ours) < 8:
        ours.append(int(session.decode(np.array([ours[-1]]))[0].argmax()))
    assert runs == [ours, ours, ours]


@pytest.mark.parametrize("case", [("tiny", "fp32"), BF16], ids=["tiny-fp32", "tiny-bf16"])
def test_snapshots_pass_the_scenario_bitwise(artifacts, case, tmp_path: Path) -> None:
    from snapshot_checks import check_snapshots

    whole = 1e-4 if case[1] == "fp32" else 5e-2  # bf16: one prefill of P + B rounds differently
    check_snapshots(MlxSession(artifacts[case]), tmp_path, whole_rel=whole)


@pytest.mark.slow
def test_four_bit_table_passes_parity_loads_in_mlx_lm_and_a_wrong_table_fails(tmp_path) -> None:
    """`--head-bits 4 --embedding-quant 4`: the tied table in the recipe's groups at 4 bits (mlx-lm's own q4
    layout, no per-layer entry), every stored row the simulation's; mlx-lm loads the folder and generates our
    greedy tokens; the table's scales 3% off fail exactness."""

    folder = tmp_path / "t4"
    recipe = make_recipe(
        "int4-g64", max_seq_len=CONTEXT, max_prefill=PREFILL, head_bits=4, embedding_quant="4"
    )
    outcome = export_artifact("mlx", "tiny", folder, recipe, progress=Progress(quiet=True))
    assert outcome.passed, outcome.manifest["parity"]
    m = json.loads((folder / "manifest.json").read_text())
    assert (m["recipe"]["head_bits"], m["recipe"]["embedding_bits"]) == (4, 4)
    assert m["precision"]["tensors"]["model.embed_tokens.weight"] == "int4-b64"
    stored = json.loads((folder / "parity" / "parity.json").read_text())["exactness"]["stored_weights"]
    assert stored["passed"], stored
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    weights = dict(mx.load(str(folder / "model.safetensors")))
    assert (
        weights["model.embed_tokens.weight"].shape[1] * 8
        == weights["model.embed_tokens.scales"].shape[1] * 64
    )
    theirs, ours = greedy_tokens(folder, 8)
    assert theirs == ours
    weights["model.embed_tokens.scales"] = weights["model.embed_tokens.scales"] * 1.03
    weights["model.embed_tokens.biases"] = weights["model.embed_tokens.biases"] * 1.03
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    result = check_artifact(folder, progress=Progress(quiet=True), scenarios=["prefill", "decode"])
    assert not result.passed and not result.part_passed("exactness")


@pytest.mark.slow
def test_three_bit_mix_passes_parity_loads_in_mlx_lm_and_a_wrong_group_fails(tmp_path) -> None:
    """A precision mix with 3-bit groups (what `--budget` may choose on MLX, `lfm_export.budget.candidates`):
    per-layer `quantization` entries at 3 bits, every stored row the simulation's, mlx-lm loads the folder and
    generates our greedy tokens; a 3-bit group's scales 3% off fail exactness."""

    from lfm_export.backends.mlx.recipes import MlxRecipe

    folder = tmp_path / "mix3"
    base = make_recipe(
        "int4-g64-gptq", max_seq_len=CONTEXT, max_prefill=PREFILL, head_bits=4, embedding_quant="4"
    )
    core = base.recipe.with_options(
        mix=(
            ("model.embed_tokens.weight", 4, 64),
            ("lm_head.weight", 4, 64),
            ("layers.0.conv", 3, 64),
            ("layers.1.feed_forward", 3, 128),
            ("layers.2.self_attn", 4, 128),
        )
    )
    outcome = export_artifact("mlx", "tiny", folder, MlxRecipe(core, PREFILL), progress=Progress(quiet=True))
    assert outcome.passed, outcome.manifest["parity"]
    stored = json.loads((folder / "parity" / "parity.json").read_text())["exactness"]["stored_weights"]
    assert stored["passed"], stored
    from lfm_export.budget import weight_bytes
    from lfm_export.loading import load_model

    assert weight_bytes(load_model("tiny", lazy=True), MlxRecipe(core, PREFILL)) == _safetensors_bytes(folder)
    cfg = json.loads((folder / "config.json").read_text())["quantization"]
    assert cfg["model.layers.0.conv.in_proj"] == {"group_size": 64, "bits": 3}
    assert cfg["model.layers.1.feed_forward.w2"] == {"group_size": 128, "bits": 3}
    weights = dict(mx.load(str(folder / "model.safetensors")))
    w2 = weights["model.layers.1.feed_forward.w2.weight"]
    assert w2.shape[1] * 32 == weights["model.layers.1.feed_forward.w2.scales"].shape[1] * 128 * 3
    theirs, ours = greedy_tokens(folder, 8)
    assert theirs == ours
    for part in ("scales", "biases"):
        key = f"model.layers.1.feed_forward.w2.{part}"
        weights[key] = weights[key] * 1.03
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    result = check_artifact(folder, progress=Progress(quiet=True), scenarios=["prefill", "decode"])
    assert not result.passed and not result.part_passed("exactness")
