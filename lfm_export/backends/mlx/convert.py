"""Export a canonical LFM2 model to MLX: an mlx-lm folder plus ahead-of-time `.mlxfn` functions.

Stages:

1. weights: every tensor in mlx-lm's names and layout (`weights.py`), linears / embedding quantized by the
   core quantizer into MLX's affine format; written once as `model.safetensors`, which both mlx-lm and the
   `.mlxfn` functions read.
2. trace: `lfm_export.trace.export_program` in the static-KV form (state in and out, a `max_seq_len` KV
   cache written at `input_pos`), so every shape but the token count is fixed.
3. lower: `lower.MlxProgram` runs the traced graph on MLX arrays (one MLX function per aten op) inside
   `mx.exporter` (MoE experts traced as one op, `moe.py`, lowered to `mx.gather_qmm`): `decode.mlxfn` holds the trace for one token, `prefill.mlxfn` one trace per chunk size
   (2, 4, ..., `max_prefill`); a prompt is fed as a sum of those chunks (causal, so chunking is exact).
   The weights are inputs of the functions (keyword arguments by mlx-lm name), not constants inside them:
   one copy on disk serves mlx-lm and the functions, and the `.mlxfn` files stay a few hundred KB.
4. check: the functions are imported back (`mx.import_function`) and their traces listed.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from lfm_export.backends.record import ExportResult
from lfm_export.contract.signature import STATIC
from lfm_export.loading import LoadedModel
from lfm_export.progress import Progress
from lfm_export.signature import build_signature
from lfm_export.trace import export_program

from . import moe
from . import weights as mlx_weights
from .recipes import MlxRecipe

WEIGHTS_FILE = "model.safetensors"
PREFILL_FILE = "prefill.mlxfn"
DECODE_FILE = "decode.mlxfn"
PROGRAM_PREFIX = "model."
"""The traced `SignatureModule` holds the model as `.model`: parameter names carry this prefix."""


_TRACED: dict[tuple[str, int], Any] = {}
"""The last lowered program by (architecture, context). The traced graph depends on nothing else (weights are
its inputs), so exporting the same model at another recipe in the same process skips `torch.export`
(about 9 s of the 15 s an fp32 export of `tiny` takes on 2 cores)."""


def mlx_lm_config(loaded: LoadedModel, recipe: MlxRecipe) -> dict[str, Any]:
    """config.json that mlx-lm 0.32's `lfm2` / `lfm2_moe` accept: the transformers-style keys plus the Liquid
    keys its `lfm2.ModelArgs` requires (auto-adjust off, so `block_ff_dim` is the effective width), and the
    `quantization` block (the tied embedding / lm_head at `head_bits` as a per-layer entry)."""
    cfg = loaded.config
    d = cfg.to_hf_dict()
    d.update(
        block_dim=cfg.hidden_size,
        block_ff_dim=cfg.intermediate_size,
        block_multiple_of=256,
        block_ffn_dim_multiplier=1.0,
        block_auto_adjust_ff_dim=False,
    )
    core = recipe.recipe
    if recipe.half:
        d["torch_dtype"] = recipe.half
    if core.quantized:
        q: dict[str, Any] = {"group_size": core.block_size, "bits": core.bits, "mode": "affine"}
        if core.mix:
            q.update(mix_entries(loaded, core))
        elif core.embedding_bits != core.bits:
            q["model.embed_tokens"] = {"group_size": core.block_size, "bits": core.embedding_bits}
        d["quantization"] = q
        d["quantization_config"] = dict(q)
    return d


def mix_entries(loaded: LoadedModel, core: Any) -> dict[str, dict[str, int]]:
    """mlx-lm's per-layer `quantization` entries of a precision mix (`Recipe.mix`): every quantized module
    (mlx-lm's name, without `.weight`, the tied embedding included) whose bits or group differ from the
    block's defaults."""
    from lfm_export.precision import block_as, held_as

    from .weights import mlx_name

    out: dict[str, dict[str, int]] = {}
    shapes = loaded.model.state_dict()
    for name, t in shapes.items():
        bits = held_as(name, core)
        if not bits or t.dim() != 2 or name == "lm_head.weight":
            continue
        group = block_as(name, core, int(t.shape[1]))
        if (bits, group) != (core.bits, core.block_size):
            out[mlx_name(loaded.config, name)[0].removesuffix(".weight")] = {
                "group_size": group,
                "bits": bits,
            }
    return out


KEEP_FP32 = "expert_bias"
"""Stored float32 in every recipe: the MoE expert bias is a float32 buffer of the canonical model that only ranks
experts (routing is computed in float32); rounding it to bf16 could change which experts are chosen."""


def traced_model(model: Any, half: str | None) -> Any:
    """The model to trace: itself, or for fp16 / bf16 a copy cast to that type (its parameters; the MoE expert
    bias buffer stays float32), so the traced graph holds the model's own casts (norm statistics and softmax
    in float32) around half-precision matmuls. The copy costs one more set of weights in that type."""
    if half is None:
        return model
    import torch

    dtype = getattr(torch, half)
    out = copy.deepcopy(model)
    for mod in out.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[name] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
    if out.config.tie_word_embeddings:
        out.lm_head.weight = out.model.embed_tokens.weight
    return out


def _mx_tensor(mx: Any, name: str, value: Any, half: str | None) -> Any:
    """`value` (numpy) as an MLX array; float tensors in the recipe's half type, but the expert bias."""
    a = mx.array(value)
    if half and a.dtype == mx.float32 and not name.endswith(KEEP_FP32):
        a = a.astype(getattr(mx, half))
    return a


def export_mlx(
    loaded: LoadedModel, out_dir: Path, recipe: MlxRecipe, progress: Progress | None = None
) -> ExportResult:
    import mlx.core as mx

    from .lower import MlxProgram

    progress = progress or Progress()
    cfg = loaded.config
    core = recipe.recipe
    context = recipe.context(cfg)
    source = loaded.weights
    model = loaded.model
    names = source.names() if source is not None else list(model.state_dict().keys())
    shapes = (
        {n: tuple(source.shapes[n]) for n in names}
        if source is not None
        else {n: tuple(t.shape) for n, t in model.state_dict().items()}
    )
    core.check_model(cfg, shapes)
    state = model.state_dict()

    def get(name: str) -> Any:
        return source.get(name) if source is not None else state[name]

    half = recipe.half
    signature = build_signature(cfg, STATIC, context, state_dtype=half or "float32")
    key = (json.dumps(cfg.to_dict(), sort_keys=True), context, half)
    with progress.step(f"Tracing (torch.export, static KV form, {half or 'float32'})"):
        lowered = _TRACED.get(key) or MlxProgram(
            export_program(traced_model(model, half), signature, [moe.swap])
        )
        _TRACED.clear()  # one entry: the last architecture
        _TRACED[key] = lowered

    with progress.step(f"Weights ({core.name}, MLX affine format)" if core.quantized else "Weights"):
        tensors, bindings, kept = mlx_weights.build(cfg, names, get, core)
        arrays = {k: _mx_tensor(mx, k, tensors.pop(k), half) for k in list(tensors)}  # one copy at a time
        mx.save_safetensors(str(out_dir / WEIGHTS_FILE), arrays, metadata={"format": "mlx"})
        (out_dir / "config.json").write_text(json.dumps(mlx_lm_config(loaded, recipe), indent=2) + "\n")

    missing = [p for p in lowered.param_names if p.removeprefix(PROGRAM_PREFIX) not in bindings]
    if missing:
        raise RuntimeError(f"MLX lowering: no weight bound to {', '.join(missing)}")
    by_program = {p: bindings[p.removeprefix(PROGRAM_PREFIX)] for p in lowered.param_names}

    def forward(*inputs: mx.array, **weights: mx.array) -> list[mx.array]:
        params = dict(mlx_weights.bind(by_program, weights))
        return lowered.run(inputs, params)

    sizes = recipe.prefill_sizes(context)
    metadata = json.dumps({"mlx_version": mx.__version__, "inputs": signature.input_names})
    with progress.step(f"Lowering to MLX (.mlxfn: decode, prefill chunks {sizes})"):
        state0 = [
            mx.zeros([1 if d == "batch_size" else d for d in s.shape], dtype=getattr(mx, half or "float32"))
            for s in signature.state_inputs()
        ]
        pos = mx.array([0], dtype=mx.int64)

        def example(t: int) -> list[mx.array]:
            return [mx.zeros((1, t), dtype=mx.int64), pos, *state0]

        mx.export_function(str(out_dir / DECODE_FILE), forward, *example(1), metadata=metadata, **arrays)
        if sizes:
            with mx.exporter(str(out_dir / PREFILL_FILE), forward) as exporter:
                for t in sizes:
                    exporter(*example(t), **arrays)
            # metadata is per file in export_function only; the manifest records the chunk sizes

    info = {
        "mlx_version": mx.__version__,
        "weights": WEIGHTS_FILE,
        "decode": DECODE_FILE,
        "prefill": PREFILL_FILE if sizes else None,
        "prefill_chunks": sizes,
        "weights_as_inputs": True,
        "device": "cpu (exported on Linux; the functions run on any MLX device)",
        "moe_form": "gathered (mx.gather_qmm / gather_mm over the k selected experts per token)"
        if cfg.is_moe
        else None,
        "mlx_lm_model_type": cfg.model_type,
    }
    word = half or "float32"
    weights_info: dict[str, Any] = {"linears": word, "embedding": f"{word} (tied lm_head)"}
    if half:
        info["compute"] = (
            f"{half}: the canonical model traced at {half} (matmuls, residual stream, KV and conv state in "
            f"{half}; norm statistics, softmax, rotary tables and MoE routing in float32, as the model is written)"
        )
        if cfg.is_moe:
            weights_info["float32"] = [KEEP_FP32]
    if core.quantized:
        weights_info = {
            "linears": f"int{core.bits} affine, group {core.block_size} (core quantizer's codes: "
            "scales = scale, biases = -scale * zero_point)",
            "embedding": f"int{core.embedding_bits} affine, group {core.block_size}, tied lm_head",
            "unquantized": kept,
        }
    done = replace(recipe, max_prefill=max(sizes) if sizes else 1)
    return ExportResult(signature, done.to_dict(), {"mlx": info, "weights": weights_info})
