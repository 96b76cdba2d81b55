"""Write a canonical LFM2 model as one GGUF file llama.cpp loads as it is (architectures `lfm2`, `lfm2moe`).

Facts from llama.cpp's sources (`src/models/lfm2.cpp`, `lfm2moe.cpp`, `gguf-py/gguf/constants.py`):

- tensor names: `token_embd`, `token_embd_norm` (LFM2's final `embedding_norm`), `output` (absent when tied:
  llama.cpp then reads `token_embd`), per block `attn_norm` (operator_norm), `ffn_norm`, `ffn_gate` / `ffn_up` /
  `ffn_down` (w1 / w3 / w2), `shortconv.conv` (the depthwise kernel as `[hidden, L]`), `shortconv.in_proj`,
  `shortconv.out_proj`, `attn_q` / `attn_k` / `attn_v` / `attn_output`, `attn_q_norm` / `attn_k_norm`; MoE
  layers `ffn_gate_inp` (router), `exp_probs_b.bias` (expert bias) and the experts stacked per projection
  (`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`, `[E, out, in]`).
- metadata: `{arch}.context_length`, `embedding_length`, `block_count`, `feed_forward_length`,
  `attention.head_count`, `attention.head_count_kv` per layer (0 marks a conv layer: that is how llama.cpp
  reads the layer types), `rope.freq_base`, `attention.layer_norm_rms_epsilon`, `vocab_size`,
  `shortconv.l_cache`; MoE adds `expert_count`, `expert_used_count`, `expert_feed_forward_length`,
  `leading_dense_block_count` and `expert_gating_func` (sigmoid).
- llama.cpp's `lfm2moe` graph always divides the top-k sigmoid scores by their sum and reads no routed scaling
  factor: the factor is folded into every expert's down projection (exact: the expert output is linear in
  it), and a model with `norm_topk_prob` false is refused.

Tensors are streamed: the header lists every tensor's name, type and byte size from the shapes alone, then each
tensor is produced from the lazy weights, quantized, written and dropped, so peak memory is about two tensors
(two layers' stacked experts) beyond the writer's buffers: the next tensor is read (a checkpoint's, converted to
float32) or generated (`random:`) on a thread of its own while this one is quantized. The core quantizer makes every code (`ggml_blocks`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lfm_export import ggml_kquants
from lfm_export.backends.record import ExportResult
from lfm_export.contract.errors import UnsupportedError
from lfm_export.contract.signature import STATEFUL
from lfm_export.ggml_blocks import BLOCK_TYPES
from lfm_export.ggml_blocks import quantize as ggml_quantize
from lfm_export.loading import LoadedModel
from lfm_export.precision import CHOSEN, FLOAT, ROUTER, ggml_mix_type, held_as, rule_for
from lfm_export.progress import Progress
from lfm_export.recipes import ACT_FP16, ACT_FP16_ROUTED
from lfm_export.signature import build_signature

from .recipes import MIX_FILE_TYPES, MIX_TYPES, GgufRecipe, factor_for, ggml_type, importance_for
from .vocab import read_vocab, write_vocab

MODEL_FILE = "model.gguf"
FILE_TYPES = {"fp32": 0, "fp16": 1, "int4": 2, "int8": 7, "bf16": 32}
"""`general.file_type` (llama.cpp's `LLAMA_FTYPE_ALL_F32`, `MOSTLY_F16`, `MOSTLY_Q4_0`, `MOSTLY_Q8_0`,
`MOSTLY_BF16`)."""
QUANTIZATION_VERSION = 2

_LAYER = {
    "operator_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "conv.conv.weight": "shortconv.conv.weight",
    "conv.in_proj.weight": "shortconv.in_proj.weight",
    "conv.out_proj.weight": "shortconv.out_proj.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.out_proj.weight": "attn_output.weight",
    "self_attn.q_layernorm.weight": "attn_q_norm.weight",
    "self_attn.k_layernorm.weight": "attn_k_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.gate.weight": "ffn_gate_inp.weight",
    "feed_forward.expert_bias": "exp_probs_b.bias",
}
_EXPERTS = {"w1": "ffn_gate_exps.weight", "w3": "ffn_up_exps.weight", "w2": "ffn_down_exps.weight"}
_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.embedding_norm.weight": "token_embd_norm.weight",
    "lm_head.weight": "output.weight",
}


@dataclass
class Planned:
    """One GGUF tensor: its name, the canonical tensors it is made of (several for stacked experts), numpy
    shape `[.., out, in]`, what it is held at (`bits`, None: float) and its GGUF type name."""

    name: str
    sources: list[str]
    shape: tuple[int, ...]
    bits: int | None
    ggml: str


def gguf_name(name: str) -> str | None:
    """GGUF name of canonical tensor `name` (None for an expert's weight, which is stacked)."""
    if name in _TOP:
        return _TOP[name]
    m = re.match(r"model\.layers\.(\d+)\.(.+)$", name)
    if m and m[2] in _LAYER:
        return f"blk.{m[1]}.{_LAYER[m[2]]}"
    if m and re.match(r"feed_forward\.experts\.\d+\.w[123]\.weight$", m[2]):
        return None
    raise UnsupportedError(f"{name}: no GGUF tensor for it in llama.cpp's LFM2 layout")


def check_model(loaded: LoadedModel) -> None:
    """Refuse, before any work, a model llama.cpp's `lfm2` / `lfm2moe` graphs cannot compute."""
    cfg = loaded.config
    if cfg.conv_bias:
        raise UnsupportedError("conv_bias true: llama.cpp's LFM2 graph has no conv biases")
    if cfg.is_moe and not cfg.norm_topk_prob:
        raise UnsupportedError(
            "norm_topk_prob false: llama.cpp's lfm2moe graph always renormalises the top-k routing weights"
        )


def plan(loaded: LoadedModel, recipe: GgufRecipe) -> list[Planned]:
    """Every GGUF tensor in file order, from the canonical names and shapes alone."""
    cfg = loaded.config
    core = recipe.recipe
    source = loaded.weights
    shapes = (
        {n: tuple(source.shapes[n]) for n in source.names()}
        if source is not None
        else {n: tuple(t.shape) for n, t in loaded.model.state_dict().items()}
    )
    core.check_model(cfg, shapes)
    layer_types = list(cfg.layer_types)
    experts = int(cfg.num_experts) if cfg.is_moe else 0  # llama.cpp's `n_expert` (exactly 8: its own rules)

    def kind(name: str, shape: tuple[int, ...], bits: int | None) -> str:
        if bits is None:
            return ggml_type(core, bits)
        rule = rule_for(name, core)
        if rule.held == CHOSEN:  # a precision mix chosen to a budget: the type its entry names
            assert rule.bits is not None and rule.block is not None
            chosen = MIX_TYPES.get((rule.bits, rule.block))
            if chosen is None:
                raise UnsupportedError(f"{name}: mix entry int{rule.bits}-b{rule.block} is no GGUF type")
            if shape[-1] % rule.block:
                raise UnsupportedError(
                    f"{name}: its rows ({shape[-1]}) are not a multiple of {rule.block}, which {chosen} needs "
                    "(llama.cpp falls Q3_K back to IQ4_NL, which the GGUF backend does not write)"
                )
            return chosen
        mix = recipe.mix or recipe.ggml_name  # q8_0 / q4_0: llama.cpp's output type as well
        chosen = ggml_mix_type(name, mix, shape[-1], layer_types, bool(cfg.tie_word_embeddings), experts)
        if chosen not in ggml_kquants.K_TYPES and chosen not in BLOCK_TYPES:
            raise UnsupportedError(
                f"{name}: its rows ({shape[-1]}) are not a multiple of 256, where llama.cpp's {mix} "
                f"holds it as {chosen}, which the GGUF backend does not write; use q4_k_m or q6_k"
            )
        return chosen

    out: list[Planned] = []
    stacks: dict[str, Planned] = {}
    for name, shape in shapes.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        bits = held_as(name, core)  # None (float) for norms, vectors, the conv kernel and the router
        target = gguf_name(name)
        if target is None:
            m = re.match(r"model\.layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(w[123])\.weight$", name)
            assert m is not None
            key = f"blk.{m[1]}.{_EXPERTS[m[3]]}"
            if key not in stacks:
                stacks[key] = Planned(key, [], (cfg.num_experts, *shape), bits, kind(name, shape, bits))
                out.append(stacks[key])
            stacks[key].sources.append(name)
            continue
        if ".conv.conv." in name:
            shape = (shape[0], shape[2])
        fixed = len(shape) < 2 or ".conv.conv." in name or rule_for(name).held == FLOAT or core.quantized
        ggml = "F32" if bits is None and fixed else kind(name, shape, bits)
        out.append(Planned(target, [name], shape, bits, ggml))
    for p in stacks.values():
        p.sources.sort(key=lambda n: int(n.split(".experts.")[1].split(".")[0]))
    return sorted(out, key=_file_order)


def _file_order(p: Planned) -> tuple[int, int, str]:
    """llama.cpp's converter's tensor order: the token table and its norm, the blocks by layer number (names
    sorted within a block), then the rest (`output`): checkpoints list layers as text (0, 1, 10, 11, ...)."""
    m = re.match(r"blk\.(\d+)\.", p.name)
    if m:
        return (1, int(m[1]), p.name)
    return (0 if p.name.startswith("token_embd") else 2, 0, p.name)


def nbytes(p: Planned) -> int:
    n = int(np.prod(p.shape))
    if p.ggml == "F32":
        return 4 * n
    if p.ggml in ("F16", "BF16"):
        return 2 * n
    kind = block_type(p.ggml)
    return n // kind.block * kind.block_bytes


def block_type(ggml: str) -> Any:
    """The block layout (`block`, `block_bytes`) of quantized GGUF type `ggml`."""
    return BLOCK_TYPES[ggml] if ggml in BLOCK_TYPES else ggml_kquants.K_TYPES[ggml]


EXPERT_DOWN_SCALE = "expert_down_scale"
"""Recipe key of the routed scaling factor folded into the expert down projections of a quantized MoE file: the
simulation quantizes `w2 * s` as the file does and holds the result divided by `s` (`weight_values`), the
stored-weights reader divides the file's `ffn_down_exps` rows by the same `s`, so both compare the same values."""


def is_expert_down(name: str) -> bool:
    """Whether checkpoint tensor `name` is an MoE expert's down projection (where the routed scale is folded)."""
    return re.search(r"\.experts\.\d+\.w2\.weight$", name) is not None


def produce(
    p: Planned, get: Callable[[str], Any], recipe: GgufRecipe, scale_down: float, threads: int
) -> np.ndarray:
    """The bytes (or float array) of planned tensor `p`, as the GGUF writer takes them."""
    rows = []
    for name in p.sources:
        t = get(name)
        w = t.detach().float().numpy() if hasattr(t, "detach") else np.asarray(t, np.float32)
        if ".conv.conv." in name:
            w = w.reshape(w.shape[0], w.shape[-1])
        quantized = p.ggml in ggml_kquants.K_TYPES or p.ggml in BLOCK_TYPES
        imp = importance_for(w, recipe.recipe, name) if quantized else None  # by the checkpoint's own values
        factor = factor_for(w, recipe.recipe, name) if quantized else None
        if scale_down != 1.0 and is_expert_down(name):
            w = w * np.float32(scale_down)
        rounding = recipe.recipe.rounding
        if p.ggml in ggml_kquants.K_TYPES:
            w = ggml_kquants.quantize(w, ggml_kquants.K_TYPES[p.ggml], rounding, threads, imp, factor)
        elif p.ggml in BLOCK_TYPES:
            w = ggml_quantize(w, BLOCK_TYPES[p.ggml].bits, rounding, threads, imp, factor)
        elif p.ggml == "F16":
            w = w.astype(np.float16)
        elif p.ggml == "BF16":
            w = _bf16_bytes(w)
        elif recipe.recipe.dtype in ("fp16", "bf16") and rule_for(name) is ROUTER:
            w = _half_values(w, recipe.recipe.dtype)
        else:
            w = np.ascontiguousarray(w, dtype=np.float32)
        rows.append(w)
    return rows[0] if len(rows) == 1 else np.stack(rows)


def _bf16_bytes(w: np.ndarray) -> np.ndarray:
    """`w` as BF16 bytes `[..., 2 * K]` (the `gguf` package's conversion: round to nearest even, as ggml's)."""
    import gguf

    return gguf.quants.quantize(np.ascontiguousarray(w, np.float32), gguf.GGMLQuantizationType.BF16)


def _half_values(w: np.ndarray, dtype: str) -> np.ndarray:
    """`w` rounded to `dtype` (`fp16` / `bf16`, round to nearest even), as float32: the MoE router of an f16 /
    bf16 file, which llama.cpp holds in F32. The simulation of a float recipe holds every linear's weight at
    the recipe's type (`lfm_export.quant.simulate`), so the file holds the router's half-precision values in
    F32 (its input is not rounded: llama.cpp's F32 matmul)."""
    if dtype == "fp16":
        return np.asarray(w, np.float32).astype(np.float16).astype(np.float32)
    import gguf

    kind = gguf.GGMLQuantizationType.BF16
    return gguf.quants.dequantize(_bf16_bytes(w), kind).astype(np.float32)


def tensor_info(p: Planned) -> tuple[tuple[int, ...], Any, Any]:
    """(shape, numpy dtype, raw GGML type or None) for `GGUFWriter.add_tensor_info`."""
    import gguf

    if p.ggml == "F32":
        return p.shape, np.dtype(np.float32), None
    if p.ggml == "F16":
        return p.shape, np.dtype(np.float16), None
    if p.ggml == "BF16":
        return (*p.shape[:-1], 2 * p.shape[-1]), np.dtype(np.uint8), gguf.GGMLQuantizationType.BF16
    kind = block_type(p.ggml)
    byte_shape = (*p.shape[:-1], p.shape[-1] // kind.block * kind.block_bytes)
    return byte_shape, np.dtype(np.uint8), gguf.GGMLQuantizationType[kind.name]


SAMPLING = {
    "temperature": "add_sampling_temp",
    "top_k": "add_sampling_top_k",
    "top_p": "add_sampling_top_p",
    "min_p": "add_sampling_min_p",
    "repetition_penalty": "add_sampling_penalty_repeat",
}
"""`generation_config.json` keys and the `general.sampling.*` writers (llama.cpp's default sampling for the file)."""


def write_sampling(writer: Any, generation: dict[str, Any]) -> None:
    """The model card's recommended sampling as `general.sampling.*`, as llama.cpp's converter writes it."""
    for key, method in SAMPLING.items():
        value = generation.get(key)
        if value is not None and hasattr(writer, method):
            getattr(writer, method)(value)


def write_metadata(writer: Any, loaded: LoadedModel, recipe: GgufRecipe, context: int) -> dict[str, Any]:
    """The architecture and model keys; returns the tokenizer's provenance for the manifest."""
    import gguf

    cfg = loaded.config
    writer.add_type("model")
    writer.add_name(loaded.name)
    write_sampling(writer, loaded.generation_config)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(
        [cfg.num_key_value_heads if t == "full_attention" else 0 for t in cfg.layer_types]
    )
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_shortconv_l_cache(cfg.conv_L_cache)
    if cfg.is_moe:
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        writer.add_leading_dense_block_count(cfg.num_dense_layers)
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    writer.add_file_type(MIX_FILE_TYPES.get(recipe.mix or "", FILE_TYPES[recipe.recipe.quant]))
    writer.add_quantization_version(QUANTIZATION_VERSION)
    if loaded.tokenizer_file is None or loaded.path is None:
        # llama.cpp's `none` vocabulary: `vocab_size` placeholder tokens, token ids in and logits out only
        writer.add_tokenizer_model("none")
        return {"tokenizer": None, "chat_template": False, "add_bos": False}
    vocab = read_vocab(loaded.path, cfg.vocab_size, loaded.chat_template)
    write_vocab(writer, vocab)
    return {
        "tokenizer": "tokenizer.json",
        "chat_template": vocab.chat_template is not None,
        "add_bos": vocab.add_bos,
    }


def export_gguf(
    loaded: LoadedModel, out_dir: Path, recipe: GgufRecipe, progress: Progress | None = None, threads: int = 2
) -> ExportResult:
    import gguf

    progress = progress or Progress()
    check_model(loaded)
    cfg = loaded.config
    core = recipe.recipe
    context = recipe.context(cfg)
    planned = plan(loaded, recipe)
    source = loaded.weights
    state = loaded.model.state_dict() if source is None else None

    def get(name: str) -> Any:
        return source.get(name) if source is not None else state[name]  # type: ignore[index]

    scale_down = float(cfg.routed_scaling_factor) if cfg.is_moe else 1.0
    arch = "lfm2moe" if cfg.is_moe else "lfm2"
    path = out_dir / MODEL_FILE
    writer = gguf.GGUFWriter(path, arch)
    with progress.step(f"Writing GGUF ({recipe.ggml_name}, {len(planned)} tensors)"):
        info = write_metadata(writer, loaded, recipe, context)
        for p in planned:
            shape, dtype, raw = tensor_info(p)
            writer.add_tensor_info(p.name, shape, dtype, nbytes(p), raw_dtype=raw)
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with ThreadPoolExecutor(1) as reader:
            ahead: dict[str, Future[Any]] = {}

            def fetch(p: Planned) -> None:
                for name in p.sources:
                    ahead[name] = reader.submit(get, name)

            fetch(planned[0])
            for i, p in enumerate(planned):
                if i + 1 < len(planned):
                    fetch(planned[i + 1])  # read (or generate) the next tensor while this one is quantized
                writer.write_tensor_data(
                    produce(p, lambda n: ahead.pop(n).result(), recipe, scale_down, threads)
                )
        writer.close()
    signature = build_signature(cfg, STATEFUL, context)
    types: dict[str, int] = {}
    for p in planned:
        types[p.ggml] = types.get(p.ggml, 0) + 1
    extra = {
        "gguf": {
            "file": MODEL_FILE,
            "architecture": arch,
            "ggml_type": recipe.ggml_name,
            "tensor_types": types,
            "moe_routed_scaling_factor_folded": scale_down if cfg.is_moe else None,
            **info,
        },
        "weights": {
            "tensors": {p.name: p.ggml for p in planned},
            "unquantized": [
                {"tensor": p.name, "why": rule_for(p.sources[0]).why}
                for p in planned
                if core.quantized and p.bits is None
            ],
        },
    }
    recorded = recipe.to_dict()
    if (
        core.quantized
    ):  # what the simulation holds each quantized checkpoint tensor as, and rounds its input to
        recorded["ggml_tensor_types"] = {n: p.ggml for p in planned if p.bits is not None for n in p.sources}
        recorded["activation_rounding"] = recipe.activation_rounding(recorded["ggml_tensor_types"])
        if scale_down != 1.0:
            recorded[EXPERT_DOWN_SCALE] = scale_down
    if cfg.is_moe and recipe.activations == ACT_FP16:
        recorded["activation_rounding"] = ACT_FP16_ROUTED  # fp16 rounding may flip an expert: the -moe gate
    return ExportResult(signature, recorded, extra)
