"""Export a canonical LFM2 model to an ExecuTorch program (`model.pte`, XNNPACK delegate).

Stages:

1. weights, as module swaps on a copy that shares the model's tensors (`lfm_export.trace.apply_swaps`: the
   fp32 weights are never held twice; each quantized weight is made from one float weight at a time):
   quantized recipes turn every linear but the MoE router into a torchao `IntxUnpackedToInt8Tensor` with
   per-token asymmetric int8 activations (torchao's 8da4w form, which XNNPACK's partitioner recognises):
   `quantize.xnnpack_int4`'s codes and scales (not the core quantizer's: XNNPACK takes no negative scale and
   holds scales as bf16), the lm_head at int8 per output channel (`quantize.xnnpack_int8`); the embedding
   table becomes `embedding.QuantizedEmbedding` (`--embedding-quant`); every attention becomes
   `attention.CustomOpAttention` (ExecuTorch's `update_cache` + `custom_sdpa`, KV held seq-first).
2. trace: `lfm_export.trace.export_stateful_program` (state in mutable buffers, conv state cleared by the
   program at `input_pos == 0`, T dynamic in 1..max_prefill).
3. lower: `to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()], constant_methods=...)` (no
   partitioner for `--delegate portable`) then `to_executorch()`. The KV cache is written in place by
   `update_cache`; the conv-state copies run as portable ops outside the delegate. ExecuTorch serialises no
   initial value for mutated buffers (its warning says "meaningless initial state"); the program does not
   depend on one: conv state is replaced at position 0 and `custom_sdpa` reads only positions up to the
   query's, each written before it is read.
4. check: the runner metadata methods are read back from the written `.pte` with `executorch.runtime` and
   compared with what was asked.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lfm_export.loading import LoadedModel
from lfm_export.model import STATEFUL
from lfm_export.progress import Progress
from lfm_export.signature import IOSignature, build_signature
from lfm_export.trace import Swap, export_stateful_program

from .attention import custom_op_attention, load_custom_ops, seq_first_signature
from .embedding import quantized_embedding
from .moe import sparse_moe_swap
from .quantize import xnnpack_weight
from .recipes import XNNPACK, ExecuTorchRecipe

MODEL_FILE = "model.pte"
ROUTER_SUFFIX = "feed_forward.gate"


@dataclass
class ExecuTorchExportResult:
    """What `export_executorch` wrote (`recipe` / `extra` are what the pipeline puts in the manifest)."""

    signature: IOSignature
    recipe_obj: ExecuTorchRecipe
    metadata: dict[str, Any]
    weights: dict[str, Any]
    versions: dict[str, str]

    @property
    def recipe(self) -> dict[str, Any]:
        return self.recipe_obj.to_dict()

    @property
    def extra(self) -> dict[str, Any]:
        return {
            "executorch": {"program": MODEL_FILE, "metadata": self.metadata, **self.versions},
            "weights": self.weights,
        }


def runner_metadata(loaded: LoadedModel, context: int, max_prefill: int) -> dict[str, Any]:
    """The constant methods ExecuTorch's LLM runner reads. Its `get_max_seq_len` is the most tokens one
    `forward` call takes (the prefill chunk), `get_max_context_len` the KV cache length."""
    cfg = loaded.config
    eos = sorted({int(cfg.eos_token_id)})
    return {
        "get_max_seq_len": max_prefill,
        "get_max_context_len": context,
        "get_vocab_size": int(cfg.vocab_size),
        "get_bos_id": int(cfg.bos_token_id),
        "get_eos_ids": eos,
        "get_n_layers": int(cfg.num_hidden_layers),
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": True,
        "enable_dynamic_shape": max_prefill > 1,
    }


def quantized_linear(linear: nn.Linear, bits: int, block_size: int) -> nn.Linear:
    """A new linear (the input keeps its weight) whose weight is a torchao `IntxUnpackedToInt8Tensor` holding
    `quantize.xnnpack_weight`'s codes and scales (int4 in blocks, int8 per channel), with int8 per-token
    asymmetric activations: torchao's 8da4w / 8da8w form, which XNNPACK's partitioner lowers."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    codes, scale, group = xnnpack_weight(linear.weight.detach(), bits, block_size)
    weight = IntxUnpackedToInt8Tensor(
        qdata=codes,
        scale=scale,
        zero_point=torch.zeros_like(scale, dtype=torch.int8),
        target_dtype=torch.int4 if bits == 4 else torch.int8,
        block_size=(1, group),
        dtype=torch.float32,
        activation_quantization=IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN,
    )
    new = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=False)
    new.bias = linear.bias
    return new


def linear_swap(model: nn.Module, recipe: ExecuTorchRecipe, counts: dict[str, int]) -> Swap:
    """Swap for `lfm_export.trace.apply_swaps`: each linear of `model` (the MoE router excepted) becomes a
    `quantized_linear` at the recipe's bits (the lm_head at `head_bits`), counted in `counts`. Linears are
    recognised by their weight tensor, which the swapped copy shares."""
    core = recipe.recipe
    names = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Linear)}

    def swap(module: nn.Module) -> nn.Module | None:
        if not isinstance(module, nn.Linear):
            return None
        name = names.get(id(module.weight), "")
        bits = core.head_bits if name == "lm_head" else core.bits
        if name.endswith(ROUTER_SUFFIX) or bits is None:
            return module
        counts[f"int{bits}"] = counts.get(f"int{bits}", 0) + 1
        return quantized_linear(module, bits, core.block_size)

    return swap


def quantize_linears(model: nn.Module, recipe: ExecuTorchRecipe) -> dict[str, int]:
    """Replace, in place, each linear of `model` as `linear_swap` does (one-linear tests). Returns how many
    linears got each bit width."""
    counts: dict[str, int] = {}
    swap = linear_swap(model, recipe, counts)
    for name, mod in list(model.named_modules()):
        new = swap(mod)
        if new is not None and new is not mod:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    return counts


def read_metadata(path: Path) -> dict[str, Any]:
    """Every constant method of the `.pte` at `path`, run by `executorch.runtime` (lists of one become the
    value; `get_eos_ids` stays a list)."""
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(str(path))
    out: dict[str, Any] = {}
    for name in sorted(program.method_names):
        if name == "forward":
            continue
        values = list(program.load_method(name).execute([]))
        out[name] = values if name == "get_eos_ids" else values[0]
    return out


def export_executorch(
    loaded: LoadedModel, out_dir: Path, recipe: ExecuTorchRecipe, progress: Progress | None = None
) -> ExecuTorchExportResult:
    """Write `model.pte` and the tokenizer files for `loaded` into `out_dir`."""
    import executorch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    progress = progress or Progress()
    cfg = loaded.config
    core = recipe.recipe
    core.check_model(cfg, {})
    context = core.context(cfg)
    recipe.check_context(cfg)
    max_prefill = recipe.prefill_for(context)
    load_custom_ops()
    weights: dict[str, Any] = {"lm_head": "float32", "embedding": "float32", "linears": "float32"}
    counts: dict[str, int] = {}

    with progress.step("Preparing weights"):
        model = loaded.materialized().model.eval()
        swaps: list[Swap] = []
        if cfg.num_experts and not core.quantized:
            swaps.append(sparse_moe_swap(None, core.block_size, counts))
            weights["experts"] = "sparse form, portable ops (moe.py)"
        elif cfg.num_experts:
            weights["experts"] = "dense form, every expert through the quantized linears (moe.py says why)"
        if core.quantized:
            core.check_model(cfg, {n: tuple(p.shape) for n, p in model.named_parameters()})
            swaps.append(linear_swap(model, recipe, counts))
            weights["linears"] = (
                f"int{core.bits} blocks of {core.block_size}, symmetric, torchao's scales rounded to bf16 "
                "(quantize.xnnpack_int4: XNNPACK refuses the core quantizer's negative scales); int8 per-token "
                "asymmetric activations (torchao IntxUnpackedToInt8Tensor)"
            )
            weights["lm_head"] = "int8 per output channel (fp32 scales), int8 per-token activations"
        if core.embedding_bits:
            swaps.append(quantized_embedding(core.embedding_bits, core.block_size))
            weights["embedding"] = (
                "int8 per row"
                if core.embedding_bits == 8
                else f"int4 in blocks of {core.block_size}, bf16 scales"
            ) + ", weight-only (embedding.QuantizedEmbedding)"
        swaps.append(custom_op_attention)
        weights["counts"] = counts

    with progress.step("Tracing (torch.export, stateful form)"):
        program = export_stateful_program(model, context, max_prefill, swaps, layout=seq_first_signature)

    metadata = runner_metadata(loaded, context, max_prefill)
    with progress.step("Lowering to ExecuTorch (XNNPACK)"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Mutation on a buffer")
            warnings.filterwarnings("ignore", category=FutureWarning)
            logging.getLogger("executorch").setLevel(logging.WARNING)
            edge = to_edge_transform_and_lower(
                program,
                partitioner=[XnnpackPartitioner()] if recipe.delegate == XNNPACK else [],
                constant_methods=metadata,
                compile_config=EdgeCompileConfig(_check_ir_validity=False),
            )
            et_program = edge.to_executorch()

    with progress.step("Saving"):
        path = out_dir / MODEL_FILE
        with open(path, "wb") as f:
            et_program.write_to_file(f)
        for f in loaded.tokenizer_files():
            shutil.copy2(f, out_dir / f.name)

    with progress.step("Reading back the runner metadata"):
        found = read_metadata(path)
        wrong = {k: (v, found.get(k)) for k, v in metadata.items() if found.get(k) != v}
        if wrong:
            raise RuntimeError(f"{path}: metadata methods read back differently (asked, found): {wrong}")

    signature = seq_first_signature(
        build_signature(cfg, STATEFUL, context, "float32", max_prefill=max_prefill)
    )
    versions = {"executorch_version": getattr(executorch, "__version__", "unknown")}
    done = replace(recipe, max_prefill=max_prefill)
    return ExecuTorchExportResult(signature, done, found, weights, versions)
