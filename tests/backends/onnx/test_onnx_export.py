"""ONNX exporter: real onnxruntime sessions against the canonical torch model, on small random models.

Each model is traced once (the slow part) and every recipe reuses that graph (`export_onnx(traced=...)`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import genai_greedy

from lfm_export.config import Lfm2Config
from lfm_export.contract.errors import UnsupportedError
from lfm_export.loading import LoadedModel, init_random
from lfm_export.quant import quantize_block, simulate
from lfm_export.recipes import parse_recipe as parse_core_recipe

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from lfm_export.backends.onnx import make_recipe, parse_recipe  # noqa: E402
from lfm_export.backends.onnx.convert import export_onnx, trace_onnx  # noqa: E402

torch.set_num_threads(2)
LAYERS = ("conv", "full_attention", "conv", "full_attention")
DENSE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    layer_types=LAYERS,
)
MOE = dict(
    DENSE,
    layer_types=("conv", "full_attention", "conv"),
    model_type="lfm2_moe",
    num_dense_layers=1,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    use_expert_bias=True,
    routed_scaling_factor=1.5,
)
MAX_SEQ = 64


def _loaded(cfg: Lfm2Config, seed: int = 0) -> LoadedModel:
    """Random weights large enough that logits spread out (greedy tokens vary) and norm weights are not ones."""
    model = init_random(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
            elif "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=gen))
    return LoadedModel(
        model=model, config=cfg, source="test", path=None, random=True, weights_dtype="float32"
    )


@pytest.fixture(scope="module")
def dense() -> tuple[LoadedModel, object]:
    loaded = _loaded(Lfm2Config(**DENSE))
    return loaded, trace_onnx(loaded)


@pytest.fixture(scope="module")
def moe() -> tuple[LoadedModel, object]:
    loaded = _loaded(Lfm2Config(**MOE), seed=3)
    return loaded, trace_onnx(loaded)


def _export(model_and_graph, tmp_path: Path, **recipe) -> tuple[LoadedModel, object, Path]:
    loaded, traced = model_and_graph
    out = tmp_path / "onnx"
    result = export_onnx(loaded, out, make_recipe(max_seq_len=MAX_SEQ, **recipe), traced=traced)
    return loaded, result, out


def _session(folder: Path, accuracy_level: int | None = None) -> object:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    if accuracy_level is not None:  # onnxruntime's own DequantizeLinear+MatMul -> MatMulNBits rewrite
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    return ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])


def _run_both(
    session, signature, model, batch: int = 2, prompt: int = 5, steps: int = 3, seed: int = 0
) -> tuple[float, float, list[np.ndarray], list[np.ndarray]]:
    """Prefill + greedy decode with state carried, through onnxruntime and torch; (max |diff|, max |logit|)."""
    dtypes = {"float32": np.float32, "float16": np.float16}
    state = {
        s.name: np.zeros(
            [batch if d == "batch_size" else 0 if isinstance(d, str) else d for d in s.shape], dtypes[s.dtype]
        )
        for s in signature.state_inputs()
    }
    conv, keys, values = model.empty_state(batch)
    ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, (batch, prompt))
    pos, worst, scale = 0, 0.0, 0.0
    got, want = [], []
    with torch.no_grad():
        for _ in range(steps + 1):
            pos += ids.shape[1]
            feeds = {"input_ids": ids, "attention_mask": np.ones((batch, pos), np.int64), **state}
            outs = dict(zip(signature.output_names, session.run(signature.output_names, feeds)))
            state = {s.name: outs[signature.present_for(s.name)] for s in signature.state_inputs()}
            ref, conv, keys, values = model(
                torch.tensor(ids),
                conv,
                keys,
                values,
                attention_mask=torch.ones(batch, pos, dtype=torch.int64),
            )
            ref = ref.numpy()
            assert outs["logits"].dtype == np.float32
            worst = max(worst, float(np.abs(outs["logits"] - ref).max()))
            scale = max(scale, float(np.abs(ref).max()))
            got.append(outs["logits"])
            want.append(ref)
            ids = ref[:, -1].argmax(-1)[:, None]
    return worst, scale, got, want


# ---- float32: exact parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ops", ["ort", "portable"])
def test_fp32_matches_canonical_model(dense, tmp_path: Path, ops: str) -> None:
    loaded, result, out = _export(dense, tmp_path, ops=ops)
    sess = _session(out)
    worst, scale, _, _ = _run_both(sess, result.signature, loaded.model)
    assert scale > 1.0
    assert worst <= 1e-4, f"{ops}: max |logits diff| {worst}"
    ins = {i.name: i for i in sess.get_inputs()}
    assert [i.name for i in sess.get_inputs()] == result.signature.input_names
    assert [o.name for o in sess.get_outputs()] == result.signature.output_names
    assert ins["past_key_values.1.key"].shape == ["batch_size", 2, "past_sequence_length", 16]
    assert ins["past.0.conv"].shape == ["batch_size", 64, 2]
    assert ins["attention_mask"].shape == ["batch_size", "total_sequence_length"]
    outs = {o.name: o for o in sess.get_outputs()}
    assert outs["present.3.value"].shape == ["batch_size", 2, "total_sequence_length", 16]
    assert outs["logits"].shape == ["batch_size", "sequence_length", 256]
    written = sorted(p.name for p in out.iterdir() if p.is_file())
    assert written == [
        "genai_config.json",
        "model.onnx",
        "model.onnx.data",
    ]  # tokenizer files: the pipeline's
    # genai may append to one KV buffer only where GroupQueryAttention does the appending
    search = json.loads((out / "genai_config.json").read_text())["search"]
    assert search["past_present_share_buffer"] is (ops == "ort")
    if ops == "portable":
        assert set(result.extra["ops"]["domains"]) == {"ai.onnx"}, result.extra["ops"]["domains"]
        return
    ops_used = result.extra["ops"]["op_types"]
    assert ops_used["com.microsoft::CausalConvWithState"] == 2
    assert ops_used["com.microsoft::GroupQueryAttention"] == 2
    assert ops_used["com.microsoft::SkipSimplifiedLayerNormalization"] == 8  # every norm after a residual add
    assert ops_used["ai.onnx::SimplifiedLayerNormalization"] == 5  # first norm + per-head q/k norms
    for gone in ("ai.onnx::Conv", "ai.onnx::Softmax", "ai.onnx::Pow", "ai.onnx::Sqrt"):
        assert gone not in ops_used, gone
    assert result.extra["fusions"]["GroupQueryAttention"] == 2
    assert result.extra["fusions"]["CausalConvWithState"] == 2
    assert "Gemm" in result.extra["weights"]["lm_head"] and "tied" in result.extra["weights"]["lm_head"]


def test_batch_of_one_with_chunked_prefill(dense, tmp_path: Path) -> None:
    """A second multi-token call on a non-empty past (GroupQueryAttention's chunked-prefill path)."""
    loaded, result, out = _export(dense, tmp_path, ops="ort")
    worst, _, _, _ = _run_both(_session(out), result.signature, loaded.model, batch=1, prompt=4, steps=0)
    assert worst <= 1e-4
    # prompt of 4, then 3 more tokens in one call
    sess, sig, model = _session(out), result.signature, loaded.model
    state = {
        s.name: np.zeros(
            [1 if d == "batch_size" else 0 if isinstance(d, str) else d for d in s.shape], np.float32
        )
        for s in sig.state_inputs()
    }
    conv, keys, values = model.empty_state(1)
    ids = np.arange(7)[None] * 13 % 256
    pos = 0
    with torch.no_grad():
        for chunk in (ids[:, :4], ids[:, 4:]):
            pos += chunk.shape[1]
            outs = dict(
                zip(
                    sig.output_names,
                    sess.run(
                        sig.output_names,
                        {"input_ids": chunk, "attention_mask": np.ones((1, pos), np.int64), **state},
                    ),
                )
            )
            state = {s.name: outs[sig.present_for(s.name)] for s in sig.state_inputs()}
            ref, conv, keys, values = model(
                torch.tensor(chunk), conv, keys, values, attention_mask=torch.ones(1, pos, dtype=torch.int64)
            )
            assert np.abs(outs["logits"] - ref.numpy()).max() <= 1e-4


# ---- quantized: exact against a fake-quantized reference, close to float ----------------------------------


@pytest.mark.parametrize(
    "quant,ops,symmetric",
    [("int4", "ort", True), ("int8", "ort", False), ("int4", "portable", False), ("int8", "portable", True)],
)
def test_quantized_matches_dequantized_reference(
    dense, tmp_path: Path, quant: str, ops: str, symmetric: bool
) -> None:
    loaded, result, out = _export(
        dense, tmp_path, quant=quant, ops=ops, symmetric=symmetric, accuracy_level=0
    )
    ref = simulate(loaded.model, parse_core_recipe(f"{quant}-b32", asymmetric=not symmetric), "float")
    worst, _, _, _ = _run_both(_session(out, accuracy_level=0), result.signature, ref)
    assert worst <= 1e-4, f"{quant} {ops} sym={symmetric}: {worst}"
    if ops == "ort":
        # 25 linears; q/k/v (2 attention layers) and w1/w3 (4 layers) each read one input: 8 fewer kernels
        assert result.extra["ops"]["op_types"]["com.microsoft::MatMulNBits"] == 17
        assert result.extra["weights"]["rewrites"]["MatMulNBits sharing an input, fused along N"] == 14
        assert result.extra["ops"]["op_types"]["com.microsoft::GatherBlockQuantized"] == 1
        assert "shares the tied lm_head" in result.extra["weights"]["embedding"]
    else:
        assert result.extra["ops"]["op_types"]["ai.onnx::DequantizeLinear"] == 26
        assert set(result.extra["ops"]["domains"]) == {"ai.onnx"}, result.extra["ops"]["domains"]


@pytest.mark.parametrize("quant,bound,agreement", [("int8", 0.08, 0.85), ("int4", 0.6, 0.3)])
def test_quantized_stays_close_to_float(
    dense, tmp_path: Path, quant: str, bound: float, agreement: float
) -> None:
    """Default recipe (accuracy_level 4: int8 activations in MatMulNBits) against the float32 model. Random
    weights amplify rounding (measured relative RMS: int8 0.037, int4 0.37; unrelated logits give ~1.4), so
    the bounds are loose; the exact check is `test_quantized_matches_dequantized_reference`."""
    loaded, result, out = _export(dense, tmp_path, quant=quant)
    _, _, got, want = _run_both(_session(out), result.signature, loaded.model)
    err = np.sqrt(np.mean([((g - w) ** 2).mean() for g, w in zip(got, want)]))
    rel = err / np.sqrt(np.mean([(w**2).mean() for w in want]))
    assert rel <= bound, f"{quant}: relative RMS error {rel}"
    agree = np.mean([(g.argmax(-1) == w.argmax(-1)).mean() for g, w in zip(got, want)])
    assert agree >= agreement
    size = (out / "model.onnx.data").stat().st_size
    assert size < (0.45 if quant == "int8" else 0.3) * sum(p.numel() * 4 for p in loaded.model.parameters())


def test_block_size_that_does_not_divide_is_refused(tmp_path: Path) -> None:
    cfg = Lfm2Config(**{**DENSE, "intermediate_size": 96})
    loaded = LoadedModel(
        model=init_random(cfg), config=cfg, source="t", path=None, random=True, weights_dtype="float32"
    )
    with pytest.raises(UnsupportedError, match=r"block size 64 .* 96 of model\.layers\.0\.feed_forward\.w2"):
        export_onnx(loaded, tmp_path / "x", make_recipe(quant="int4", block_size=64))
    assert not (tmp_path / "x" / "model.onnx").exists()


def test_recipes() -> None:
    assert parse_recipe("int4-b64").name == "int4-b64"
    assert parse_recipe("int8-b128-asym").symmetric is False
    assert parse_recipe("fp16").name == "fp16"
    assert make_recipe(quant="int4").name == "int4-b32"
    for bad in ("int3", "int4-b48", "fp16-b32", "int4-x"):
        with pytest.raises(UnsupportedError):
            parse_recipe(bad)
    with pytest.raises(UnsupportedError, match="block size 48"):
        make_recipe(quant="int4", block_size=48)
    with pytest.raises(UnsupportedError, match="--ops"):
        make_recipe(ops="tensorrt")
    assert make_recipe(quant="int4-b64-mse").name == "int4-b64-mse"
    assert make_recipe(quant="int4", block_size=128, symmetric=False).name == "int4-b128-asym"
    with pytest.raises(UnsupportedError, match="--accuracy-level 4"):
        make_recipe(quant="8da4w")
    with pytest.raises(UnsupportedError, match="bf16"):
        parse_recipe("bf16")
    with pytest.raises(UnsupportedError, match="MatMulNBits quantizes in blocks"):
        make_recipe(quant="int8-pc")
    d = make_recipe(quant="int8", block_size=64, max_seq_len=128).to_dict()
    assert {k: d[k] for k in ("name", "quant", "block_size", "symmetric", "bits", "ops")} == {
        "name": "int8-b64",
        "quant": "int8",
        "block_size": 64,
        "symmetric": True,
        "bits": 8,
        "ops": "ort",
    }
    assert (d["accuracy_level"], d["max_seq_len"], d["head_bits"]) == (4, 128, 8)
    tables = make_recipe(quant="int4", head_bits=4, embedding_quant="4").recipe
    assert (tables.head_bits, tables.embedding_bits) == (4, 4)
    assert make_recipe(quant="int4", embedding_quant="none").recipe.embedding_bits is None
    with pytest.raises(UnsupportedError, match="ONNX Gather takes no int4"):
        make_recipe(quant="int4", ops="portable", embedding_quant="4")
    with pytest.raises(UnsupportedError, match="--head-bits 4 needs a quantized recipe"):
        make_recipe(head_bits=4)
    with pytest.raises(UnsupportedError, match="--head-bits 2 is unknown; expected 4 or 8"):
        make_recipe(quant="int4", head_bits=2)


def test_simulation_hook_reads_the_manifest_recipe() -> None:
    """What the parity check simulates for an artifact: int8 activations exactly at accuracy_level 4."""
    from lfm_export.backends.onnx import simulation

    recipe, act = simulation(make_recipe(quant="int4", block_size=64).to_dict())
    assert (recipe.name, recipe.head_bits, act) == ("int4-b64", 8, "int8-block")
    assert simulation(make_recipe(quant="int4", accuracy_level=0).to_dict())[1] == "float"
    assert (
        simulation(make_recipe(quant="int4", ops="portable", accuracy_level=0).to_dict())[1] == "int8-block"
    )
    experts_too = {"linears": "float", "experts": "int8-block"}  # int8 QMoE quantizes its inputs at any level
    assert simulation(make_recipe(quant="int8", accuracy_level=0).to_dict())[1] == experts_too
    assert simulation(make_recipe(quant="fp16").to_dict()) == (parse_core_recipe("fp16"), "float")
    old = {"name": "int8-b128-asym", "quant": "int8", "block_size": 128, "accuracy_level": 4, "ops": "ort"}
    recipe, act = simulation(old)  # a manifest written before the core recipe existed
    assert (recipe.name, recipe.symmetric, act) == ("int8-b128-asym", False, "int8-block")


# ---- float16 --------------------------------------------------------------------------------------------------


def test_rotary_tables_are_computed_in_the_graph_and_folded_by_onnxruntime(dense, tmp_path: Path) -> None:
    """The file holds the inverse frequencies, not `[context, head_dim / 2]` tables: its weight bytes do not grow
    with the context, and onnxruntime folds the tables at load time to torch's values within one ulp."""
    import onnx

    from lfm_export.model import rope_cos_sin

    loaded, traced = dense
    cfg = loaded.config
    sizes, folders = {}, {}
    for context in (1000, 8192):
        folder = tmp_path / str(context)
        export_onnx(loaded, folder, make_recipe(max_seq_len=context), traced=traced)
        graph = onnx.load(str(folder / "model.onnx")).graph
        sizes[context] = sum(
            onnx.numpy_helper.to_array(t, base_dir=str(folder)).nbytes for t in graph.initializer
        )
        assert not [t.name for t in graph.initializer if context in t.dims], context
        folders[context] = folder
    assert sizes[8192] == sizes[1000]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(folders[8192] / "folded.onnx")  # beside the external data
    ort.InferenceSession(str(folders[8192] / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    folded = onnx.load(str(folders[8192] / "folded.onnx"))
    assert not [n.op_type for n in folded.graph.node if n.op_type in ("Cos", "Sin", "Range")]
    tables = {t.name: onnx.numpy_helper.to_array(t) for t in folded.graph.initializer if 8192 in t.dims}
    cos, sin = rope_cos_sin(torch.arange(8192), cfg.head_dim, cfg.rope_theta)
    half = cfg.head_dim // 2
    for name, want in (("rotary.cos_cache", cos), ("rotary.sin_cache", sin)):
        got, want = tables[name], want[:, :half].numpy()
        assert got.shape == want.shape
        assert float(np.abs(got - want).max()) <= float(np.spacing(np.float32(1.0)))


@pytest.mark.parametrize("ops", ["ort", "portable"])
def test_fp16(dense, tmp_path: Path, ops: str) -> None:
    loaded, result, out = _export(dense, tmp_path, quant="fp16", ops=ops)
    assert {s.dtype for s in result.signature.state_inputs()} == {"float16"}
    sess = _session(out)
    types = {i.name: i.type for i in sess.get_inputs()} | {o.name: o.type for o in sess.get_outputs()}
    assert types["past.0.conv"] == types["present.1.key"] == "tensor(float16)"
    assert types["logits"] == "tensor(float)"
    worst, scale, _, _ = _run_both(sess, result.signature, loaded.model)
    assert worst <= 5e-3 * scale, worst
    assert (out / "model.onnx.data").stat().st_size < 0.55 * sum(
        p.numel() * 4 for p in loaded.model.parameters()
    )


# ---- MoE -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant,ops", [("fp32", "ort"), ("int4", "ort"), ("int8", "portable")])
def test_moe(moe, tmp_path: Path, quant: str, ops: str) -> None:
    loaded, result, out = _export(moe, tmp_path, quant=quant, ops=ops, accuracy_level=0)
    bits = {"int4": 4, "int8": 8}.get(quant)
    ref = simulate(loaded.model, parse_core_recipe(quant), "float")
    worst, _, _, _ = _run_both(_session(out, accuracy_level=0), result.signature, ref)
    assert worst <= 1e-4, worst
    if ops == "ort":
        op = "QMoE" if bits else "MoE"
        assert result.extra["ops"]["op_types"][f"com.microsoft::{op}"] == 2
        assert f"com.microsoft.{op} in 2 layer(s)" in result.extra["weights"].get("moe", "")
        assert "ai.onnx::TopK" in result.extra["ops"]["op_types"]  # biased top-k selection stays in the graph
    else:
        assert "dense expert form" in result.extra["weights"].get("moe", "")
    if bits:
        assert result.extra["weights"]["rewrites"]["MoE router kept float"] == 2


# ---- onnxruntime-genai -------------------------------------------------------------------------------------------


def _torch_greedy(model, prompt: list[int], new: int) -> list[int]:
    conv, keys, values = model.empty_state(1)
    ids, out, pos = torch.tensor([prompt]), [], 0
    with torch.no_grad():
        for _ in range(new):
            pos += ids.shape[1]
            logits, conv, keys, values = model(
                ids, conv, keys, values, attention_mask=torch.ones(1, pos, dtype=torch.int64)
            )
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.tensor([[nxt]])
    return out


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_genai_loads_folder_and_greedy_tokens_match(dense, tmp_path: Path) -> None:
    og = pytest.importorskip("onnxruntime_genai")
    loaded, _, out = _export(dense, tmp_path, ops="ort")
    cfg = json.loads((out / "genai_config.json").read_text())
    assert cfg["model"]["type"] == "lfm2"
    assert cfg["model"]["decoder"]["conv_cache_size"] == 2
    assert cfg["model"]["decoder"]["layer_types"] == list(LAYERS)
    assert cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 2
    assert cfg["model"]["decoder"]["inputs"]["past_conv_names"] == "past.%d.conv"
    prompt, new = [3, 17, 99, 5, 200, 11], 12
    want = _until_eos(_torch_greedy(loaded.model, prompt, new), loaded.config.eos_token_id)
    assert genai_greedy(og, out, prompt, new) == want
    assert len(set(want)) > 2  # the model does not just repeat one token


def test_genai_with_tokenizer_on_tiny(tmp_path: Path) -> None:
    """The bundled trained `tiny` model: the folder carries its tokenizer, genai tokenizes, generates the
    canonical model's greedy tokens and decodes text."""
    og = pytest.importorskip("onnxruntime_genai")
    from lfm_export.loading import BUNDLED, load_model

    if not (BUNDLED["tiny"] / "tokenizer.json").is_file():
        pytest.skip("bundled tiny model not present")
    loaded = load_model("tiny")
    out = tmp_path / "tiny"
    export_onnx(loaded, out, make_recipe())
    loaded.copy_tokenizer_files(out)  # what the pipeline does after every backend's export
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    search = json.loads((out / "genai_config.json").read_text())["search"]
    assert (
        search["temperature"] == 0.3 and search["repetition_penalty"] == 1.05
    )  # from generation_config.json
    tok = og.Tokenizer(og.Model(str(out)))
    prompt = [
        int(t)
        for t in tok.encode(
            "<|startoftext|><|im_start|>user\nTell me a story.<|im_end|>\n<|im_start|>assistant\n"
        )
    ]
    tokens = genai_greedy(og, out, prompt, 24)
    assert tokens == _until_eos(_torch_greedy(loaded.model, prompt, 24), loaded.config.eos_token_id)
    assert tok.decode(np.array(tokens, np.int32)).strip()


# ---- 1.2B: memory and time ---------------------------------------------------------------------------------------

BIG_SCRIPT = """
import json, resource, sys, time, torch
torch.set_num_threads(2)
from pathlib import Path
from lfm_export.loading import load_model
from lfm_export.backends.onnx import make_recipe
from lfm_export.backends.onnx.convert import export_onnx
from lfm_export.progress import Progress
t0 = time.perf_counter()
loaded = load_model("random:lfm2-1.2b")
t1 = time.perf_counter()
progress = Progress(quiet=True)
res = export_onnx(loaded, Path(sys.argv[1]), make_recipe(quant="int4"), progress)
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "export_s": t2 - t1, "stages": progress.timings, "fusions": res.fusions,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                  "bytes": {f.name: f.stat().st_size for f in res.files}}))
"""


@pytest.mark.slow
def test_lfm2_1_2b_int4_export_memory_and_time(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", BIG_SCRIPT, str(tmp_path / "big")],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(stats, indent=1))
    assert stats["peak_rss_gb"] <= 7.0
    assert stats["fusions"]["GroupQueryAttention"] == 6 and stats["fusions"]["CausalConvWithState"] == 10
    assert stats["bytes"]["model.onnx.data"] < 1.0e9


def test_backend_entry_point_survives_its_lazy_imports() -> None:
    """`export` stays the function after the submodules it imports lazily are loaded (a submodule named
    `export` once replaced it, so a second export in one process failed)."""
    import lfm_export.backends.onnx as onnx_backend
    import lfm_export.backends.onnx.convert  # noqa: F401

    assert callable(onnx_backend.export) and onnx_backend.export.__module__ == "lfm_export.backends.onnx"


@pytest.mark.slow  # 44-62 s; ONNX MoE int4 stays in the default suite (test_parity_gates hf-moe, the genai greedy test)
def test_bundled_tiny_moe_int4_passes_its_gate(tmp_path: Path) -> None:
    """The trained MoE at int4 (QMoE experts, int8 tied embedding/lm_head) through the whole pipeline."""
    from lfm_export.pipeline import export_artifact

    outcome = export_artifact("onnx", "tiny-moe", tmp_path / "moe-int4", make_recipe("int4"))
    result = outcome.parity
    assert result.passed, [c.describe() for c in result.failures]
    pooled = result.pooled()
    assert pooled["positions"] > 300 and pooled["kl_mean"] <= 0.06
    assert outcome.manifest["ops"]["op_types"]["com.microsoft::QMoE"] == 4


# ---- calibrated rounding: the calibrated codes reach the artifact, exactly simulated ----------------------


def test_calibrated_export_holds_its_codes_and_matches_its_simulation(dense, tmp_path: Path) -> None:
    from lfm_export import calibrated
    from lfm_export.calibrate import calibrated_table

    loaded, traced = dense
    recipe = make_recipe("int4-b32-gptq", max_seq_len=MAX_SEQ, accuracy_level=0)
    table, entry = calibrated_table(loaded, recipe.recipe, tokens=256)
    assert entry["corpus"] == "random ids" and entry["output_error_vs_nearest"] < 0.8
    # the tied head is calibrated too: its codes (the int8 table's) are GPTQ's, with less output error
    head = loaded.model.lm_head.weight.detach().float().numpy()
    hit = table.find(head, 8, 32)
    assert hit is not None and hit[2].all() and (hit[0] != quantize_block(head, 8, 32).codes).any()
    assert entry["head_output_error_vs_nearest"] < 1.0
    with calibrated.active(table):
        result = export_onnx(loaded, tmp_path / "onnx", recipe, traced=traced)
        served = table.rows_served
        ref = simulate(loaded.model, recipe.recipe, "float")
    assert served >= sum(codes.shape[0] for codes, _ in table.matrices)  # every calibrated row was packed
    worst, _, got, _ = _run_both(_session(tmp_path / "onnx", accuracy_level=0), result.signature, ref)
    assert worst <= 1e-4, worst
    plain = simulate(loaded.model, parse_core_recipe("int4-b32"), "float")
    _, _, _, other = _run_both(_session(tmp_path / "onnx", accuracy_level=0), result.signature, plain)
    assert max(float(np.abs(g - o).max()) for g, o in zip(got, other)) > 1e-2  # not plain rounding's artifact


# ---- a precision mix chosen to a budget: every op holds its group's precision, exactly simulated ----------


def test_budgeted_mix_is_held_per_group_and_matches_its_simulation(dense, tmp_path: Path) -> None:
    import onnx

    from lfm_export.precision import block_as, held_as

    loaded, traced = dense
    # a mix as `lfm_export.budget.plan` writes one (its choice from measured KL is tested slow, end to end)
    core = parse_core_recipe("int4-b32").with_options(
        mix=(
            ("model.embed_tokens.weight", 8, 64),
            ("lm_head.weight", 8, 64),
            ("layers.0.conv", 8, 32),
            ("layers.1.self_attn", 4, 64),
            ("layers.1.feed_forward", 8, 64),
            ("layers.3.feed_forward", 4, 32),
        )
    )
    recipe = make_recipe(max_seq_len=MAX_SEQ, accuracy_level=0)
    recipe = type(recipe)(core, recipe.ops, 0)
    result = export_onnx(loaded, tmp_path / "onnx", recipe, traced=traced)
    model = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False)
    held = set()
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            name = node.input[1].removesuffix(".qweight").split("+")[0]
            name = "lm_head" if "lm_head" in name or "embed_tokens" in name else name
            held.add((attrs["bits"], attrs["block_size"]))
            want = f"{name}.weight" if name != "lm_head" else "lm_head.weight"
            if want.startswith("model.layers"):
                assert (attrs["bits"], attrs["block_size"]) == (
                    held_as(want, core),
                    block_as(want, core, attrs["K"]),
                ), want
    assert len(held) >= 2
    ref = simulate(loaded.model, core, "float")
    worst, _, got, _ = _run_both(_session(tmp_path / "onnx", accuracy_level=0), result.signature, ref)
    assert worst <= 1e-4, worst
    plain = simulate(loaded.model, parse_core_recipe("int4-b32"), "float")  # the recipe without its mix
    _, _, _, other = _run_both(_session(tmp_path / "onnx", accuracy_level=0), result.signature, plain)
    assert max(float(np.abs(g - o).max()) for g, o in zip(got, other)) > 1e-2


def test_two_bit_mix_is_exact_read_back_and_counted_as_written(dense, tmp_path: Path) -> None:
    """A mix with 2-bit groups (what `--budget` may choose on ONNX: onnxruntime 1.32's MatMulNBits and
    GatherBlockQuantized take 2 bits), the tied table among them: onnxruntime's logits equal the mix's
    simulation and not the all-int4 one's, the stored-weights read gives every 2-bit row bit for bit, and the
    budget's byte count (`lfm_export.budget.weight_bytes`) is the bytes of the written weight initializers."""
    import onnx

    from lfm_export.backends.onnx.stored_weights import stored_weights
    from lfm_export.budget import weight_bytes
    from lfm_export.quant import quantize_weight

    loaded, traced = dense
    core = parse_core_recipe("int4-b32").with_options(
        head_bits=4,
        embedding_bits=4,
        mix=(
            ("model.embed_tokens.weight", 2, 64),
            ("lm_head.weight", 2, 64),
            ("layers.0.conv", 2, 32),
            ("layers.1.self_attn", 4, 64),
            ("layers.1.feed_forward", 2, 64),
            ("layers.2.feed_forward", 8, 64),
        ),
    )
    recipe = make_recipe(max_seq_len=MAX_SEQ, accuracy_level=0)
    recipe = type(recipe)(core, recipe.ops, 0)
    folder = tmp_path / "onnx"
    result = export_onnx(loaded, folder, recipe, traced=traced)
    assert "GatherBlockQuantized int2 b64" in result.extra["weights"]["embedding"]
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    bits = {
        n.input[1]: {a.name: a.i for a in n.attribute}["bits"]
        for n in graph.node
        if n.op_type == "MatMulNBits"
    }
    assert bits["model.layers.1.feed_forward.w1+w3.qweight"] == 2 and 8 in bits.values()
    ref = simulate(loaded.model, core, "float")
    worst, _, got, _ = _run_both(_session(folder, accuracy_level=0), result.signature, ref)
    assert worst <= 1e-4, worst
    plain = simulate(loaded.model, core.with_options(mix=()), "float")
    _, _, _, other = _run_both(_session(folder, accuracy_level=0), result.signature, plain)
    assert max(float(np.abs(g - o).max()) for g, o in zip(got, other)) > 1e-2
    stored = dict(stored_weights(folder))
    w2 = loaded.model.state_dict()["model.layers.1.feed_forward.w2.weight"].numpy()
    want = quantize_weight(w2, core, 2, block=64).dequantize()
    assert np.array_equal(stored["model.layers.1.feed_forward.w2.qweight"], want)
    table = loaded.model.state_dict()["model.embed_tokens.weight"].numpy()
    want = quantize_weight(table, core, 2, block=64).dequantize()
    (gathered,) = (v for k, v in stored.items() if k.endswith("(GatherBlockQuantized)"))
    assert np.array_equal(gathered, want)
    weights = sum(
        onnx.numpy_helper.to_array(t, base_dir=str(folder)).nbytes
        for t in onnx.load(str(folder / "model.onnx")).graph.initializer
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8)  # not the int64 shape constants
    )
    assert weight_bytes(loaded, recipe) == weights


# ---- the token table and the lm_head at 4 bits (`--head-bits 4 --embedding-quant 4`) -----------------------


@pytest.mark.parametrize("head", [4, pytest.param(8, marks=pytest.mark.slow)])
def test_four_bit_table_is_held_and_simulated(dense, tmp_path: Path, head: int) -> None:
    """The table as GatherBlockQuantized bits 4 (sharing the tied lm_head's packed MatMulNBits table when the
    head is at 4 bits too, its own table otherwise), the lm_head MatMulNBits at `head` bits; onnxruntime's
    logits equal the simulation of that recipe and not the simulation of the default int8 tables."""
    import onnx

    loaded, traced = dense
    recipe = make_recipe("int4", max_seq_len=MAX_SEQ, accuracy_level=0, head_bits=head, embedding_quant="4")
    result = export_onnx(loaded, tmp_path / "onnx", recipe, traced=traced)
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    gathers = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert [{a.name: a.i for a in n.attribute}["bits"] for n in gathers] == [4]
    heads = [n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1] == gathers[0].input[0]]
    assert [{a.name: a.i for a in n.attribute}["bits"] for n in heads] == ([4] if head == 4 else [])
    shared = "shares the tied lm_head" in result.extra["weights"]["embedding"]
    assert shared == (head == 4) and "int4" in result.extra["weights"]["embedding"]
    ref = simulate(loaded.model, recipe.recipe, "float")
    worst, _, got, _ = _run_both(_session(tmp_path / "onnx", accuracy_level=0), result.signature, ref)
    assert worst <= 1e-4, worst
    int8_tables = simulate(loaded.model, recipe.recipe.with_options(head_bits=8, embedding_bits=8), "float")
    _, _, _, other = _run_both(_session(tmp_path / "onnx", accuracy_level=0), result.signature, int8_tables)
    assert max(float(np.abs(g - o).max()) for g, o in zip(got, other)) > 1e-2
