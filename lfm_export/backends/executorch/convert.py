"""Export a canonical LFM2 model to an ExecuTorch program (`model.pte`, XNNPACK delegate).

Stages:

1. weights, as module swaps on a copy that shares the model's tensors (`lfm_export.trace.apply_swaps`: the
   fp32 weights are never held twice; each quantized weight is made from one float weight at a time):
   quantized recipes turn every linear but the MoE router into a torchao `IntxUnpackedToInt8Tensor` with
   per-token asymmetric int8 activations (torchao's 8da4w form, which XNNPACK's partitioner recognises):
   `quantize.xnnpack_int4`'s codes and scales (not the core quantizer's: XNNPACK takes no negative scale and
   holds scales as bf16), the lm_head at int8 per output channel (`quantize.xnnpack_int8`); the embedding
   table becomes `embedding.QuantizedEmbedding` (`--embedding-quant`); every attention's cache
   update, attend and RoPE become `attention.custom_op_attention`'s forms (ExecuTorch's `update_cache` +
   `custom_sdpa`, KV held seq-first).
2. trace: `lfm_export.trace.export_stateful_program` (state in mutable buffers, conv state cleared by the
   program at `input_pos == 0`, T dynamic in 1..max_prefill).
3. lower: `lowering.lower` (`to_edge_transform_and_lower` with XNNPACK on ExecuTorch's cheaper decomposition
   path, checked; no partitioner for `--delegate portable`) then `to_executorch()`. The KV cache is written in place by
   `update_cache`; the conv-state copies run as portable ops outside the delegate. ExecuTorch serialises no
   initial value for mutated buffers (its warning says "meaningless initial state"); the program does not
   depend on one: conv state is replaced at position 0 and `custom_sdpa` reads only positions up to the
   query's, each written before it is read.
4. check: the runner metadata methods are read back from the written `.pte` with `executorch.runtime` and
   compared with what was asked.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lfm_export.backends.record import ExportResult
from lfm_export.contract.errors import UnsupportedError
from lfm_export.loading import LoadedModel
from lfm_export.model import STATEFUL
from lfm_export.precision import block_as, held_as, mix_word
from lfm_export.progress import Progress
from lfm_export.signature import build_signature
from lfm_export.trace import Swap, apply_swaps, export_stateful_program, shared_copy
from lfm_export.weights import WeightSource

from .attention import custom_op_attention, load_custom_ops, seq_first_signature
from .composed_moe import composed_moe_swap
from .embedding import quantized_embedding
from .half import half_layers, half_model
from .layers import xnnpack_layers
from .lowering import lower
from .moe import sparse_moe_swap
from .quantize import quantized_linear
from .recipes import XNNPACK, ExecuTorchRecipe

MODEL_FILE = "model.pte"
STATE_DTYPES = {"fp32": "float32", "fp16": "float16"}
"""The type of the held state (KV caches, conv states) per recipe dtype: the parameters' (`half.py`)."""
FORWARD = "forward"
"""The program's one method (the runner's): the logits of the last position of the call only, `[1, 1, vocab]`.
Parity gets every position through the shim (`runtime/executorch.py`: one-token calls, then the whole call
again). A second method with every position's logits would double the lowering, which is most of an
export's time."""
FORWARD_LOGITS = "last"
"""Written to the manifest (`executorch.forward_logits`): `forward` returns the last position only."""


class LastPosition(nn.Module):
    """The lm_head applied to the last position only: at prefill the rest of the prompt never reaches it."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[:, -1:])


def last_position(model: nn.Module) -> Swap:
    """Swap for `lfm_export.trace.apply_swaps`: `model`'s lm_head (as swapped already) becomes `LastPosition`.
    Recognised by its weight: `apply_swaps` copies the modules, not their tensors."""
    weight = model.get_submodule("lm_head").weight

    def swap(module: nn.Module) -> nn.Module | None:
        return LastPosition(module) if isinstance(module, nn.Linear) and module.weight is weight else None

    return swap


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


def quantized_bits(name: str, recipe: ExecuTorchRecipe) -> int | None:
    """Bits the linear module `name` is held at (None: float), as `lfm_export.precision` says."""
    return held_as(f"{name}.weight", recipe.recipe)


def linear_swap(
    model: nn.Module, recipe: ExecuTorchRecipe, counts: dict[str, int], source: WeightSource | None = None
) -> Swap:
    """Swap for `lfm_export.trace.apply_swaps`: each linear of `model` (the MoE router excepted) becomes a
    `quantized_linear` at `quantized_bits`, in the block `lfm_export.precision.block_as` gives it (a
    `--budget` mix's per tensor group), counted in `counts`. Linears are recognised by their weight
    tensor, which the swapped copy shares. With `source` (a lazy model's), each float weight is fetched from
    it, quantized and dropped: the float linears are never all held at once."""
    names = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Linear)}

    def swap(module: nn.Module) -> nn.Module | None:
        if not isinstance(module, nn.Linear):
            return None
        name = names.get(id(module.weight), "")
        bits = quantized_bits(name, recipe)
        if bits is None:
            return module
        counts[f"int{bits}"] = counts.get(f"int{bits}", 0) + 1
        if source is not None:
            module = copy.copy(module)
            module._parameters = {**module._parameters, "weight": source.get(f"{name}.weight")}
        block = block_as(f"{name}.weight", recipe.recipe, module.in_features)
        return quantized_linear(module, bits, block, recipe.recipe.rounding)

    return swap


def float_part(loaded: LoadedModel, recipe: ExecuTorchRecipe) -> tuple[nn.Module, WeightSource | None]:
    """The model to swap and trace, and the source its quantized linears are read from (None: the model holds
    them). A lazy model with a quantized recipe gets real tensors for everything but those linears, which
    stay placeholders until `linear_swap` reads them: at LFM2-1.2B that leaves 4.4 GB of float32 linears
    unheld."""
    if not (loaded.lazy and recipe.recipe.quantized):
        return loaded.materialized().model.eval(), None
    source = loaded.weights
    assert source is not None
    model = shared_copy(loaded.model)
    linears = {
        f"{n}.weight"
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and quantized_bits(n, recipe)
    }
    for prefix, module in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            tensors = getattr(module, kind)
            for attr, t in list(tensors.items()):
                name = f"{prefix}.{attr}" if prefix else attr
                if t is None or name in linears:
                    continue
                real = source.get(name)
                tensors[attr] = nn.Parameter(real, requires_grad=False) if kind == "_parameters" else real
    return model.eval(), source


def held_word(name: str, core: Any, k: int) -> str:
    """`int4-b64` / `int8-pc`: how a mix holds tensor `name` (input dimension `k`)."""
    bits = held_as(name, core)
    block = block_as(name, core, k)
    return "float" if bits is None else mix_word(bits, 0 if bits == 8 or block == k else block)


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
        if name == FORWARD:
            continue
        values = list(program.load_method(name).execute([]))
        out[name] = values if name == "get_eos_ids" else values[0]
    return out


def export_executorch(
    loaded: LoadedModel, out_dir: Path, recipe: ExecuTorchRecipe, progress: Progress | None = None
) -> ExportResult:
    """Write `model.pte` and the tokenizer files for `loaded` into `out_dir`."""
    import executorch
    from executorch.exir import ExecutorchBackendConfig

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
        model, source = float_part(loaded, recipe)
        if core.dtype == "fp16":
            model = half_model(model)
            weights.update(lm_head="float16", embedding="float16", linears="float16", compute="float16")
        swaps: list[Swap] = []
        if cfg.num_experts and not core.quantized:
            swaps.append(sparse_moe_swap(None, core.block_size, counts))
            weights["experts"] = "sparse form, portable ops (moe.py)"
        elif cfg.num_experts:
            if core.mix:
                raise UnsupportedError(
                    "--budget: the ExecuTorch backend holds no precision mix for MoE models (its composed "
                    "experts take one precision); use --quant without --budget"
                )
            bits = core.bits
            swaps.append(
                composed_moe_swap(model, bits, core.block_size, max_prefill, counts, source, core.rounding)
            )
            weights["experts"] = (
                f"composed form: each expert's int{bits} linears one XNNPACK delegate, run under torch.cond "
                "only when a token selects it (composed_moe.py; delegates cloned from one lowering per "
                "expert shape, expert_delegates.py)"
            )
        if core.quantized:
            core.check_model(cfg, {n: tuple(p.shape) for n, p in model.named_parameters()})
            swaps.append(linear_swap(model, recipe, counts, source))
            weights["linears"] = (
                f"int4 blocks of {core.block_size}, symmetric, torchao's scales rounded to bf16 "
                "(quantize.xnnpack_int4: XNNPACK refuses the core quantizer's negative scales)"
                if core.bits == 4
                else "int8 per output channel, symmetric, fp32 scales (quantize.xnnpack_int8)"
            ) + "; int8 per-token asymmetric activations (torchao IntxUnpackedToInt8Tensor)"
            if core.rounding == "mse":
                weights["rounding"] = "each block's scale searched for the least squared error (-mse)"
            weights["lm_head"] = (
                "int8 per output channel (fp32 scales)"
                if core.head_bits == 8
                else f"int4 blocks of {core.block_size} (bf16 scales)"
            ) + ", int8 per-token activations"
        if core.mix:
            weights["linears"] = (
                "the --budget mix (manifest `precision`, `budget`): int4 blocks, symmetric, torchao's scales "
                "rounded to bf16 (quantize.xnnpack_int4) or int8 per output channel, fp32 scales "
                "(quantize.xnnpack_int8); int8 per-token asymmetric activations"
            )
            weights["lm_head"] = f"{held_word('lm_head.weight', core, cfg.hidden_size)} (the mix)"
        table = "model.embed_tokens.weight"
        table_bits = held_as(table, core)
        if table_bits:
            table_block = block_as(table, core, cfg.hidden_size)
            swaps.append(quantized_embedding(table_bits, table_block, core.rounding))
            weights["embedding"] = (
                "int8 per row" if table_bits == 8 else f"int4 in blocks of {table_block}, bf16 scales"
            ) + ", weight-only (embedding.QuantizedEmbedding)"
        swaps.append(custom_op_attention)
        if recipe.delegate == XNNPACK:
            swaps.append(xnnpack_layers)
        if core.dtype == "fp16":
            swaps.append(half_layers)
        weights["counts"] = counts
        swapped = apply_swaps(model, swaps)  # each weight quantized here, once

    with progress.step("Tracing (torch.export, stateful form)"):
        program = export_stateful_program(
            swapped, context, max_prefill, [last_position(swapped)], seq_first_signature
        )

    metadata = runner_metadata(loaded, context, max_prefill)
    with progress.step("Lowering to ExecuTorch (XNNPACK)"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Mutation on a buffer")
            warnings.filterwarnings("ignore", category=FutureWarning)
            logging.getLogger("executorch").setLevel(logging.WARNING)
            edge = lower({FORWARD: program}, recipe.delegate == XNNPACK, metadata)
            del program
    with progress.step("Planning memory and emitting (to_executorch)"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Mutation on a buffer")
            # named held buffers: the runtime shim reads and writes them for snapshots (`get_attribute`)
            et_program = edge.to_executorch(ExecutorchBackendConfig(emit_mutable_buffer_names=True))

    with progress.step("Saving"):
        path = out_dir / MODEL_FILE
        with open(path, "wb") as f:
            et_program.write_to_file(f)

    with progress.step("Reading back the runner metadata"):
        found = read_metadata(path)
        wrong = {k: (v, found.get(k)) for k, v in metadata.items() if found.get(k) != v}
        if wrong:
            raise RuntimeError(f"{path}: metadata methods read back differently (asked, found): {wrong}")

    signature = seq_first_signature(
        build_signature(cfg, STATEFUL, context, STATE_DTYPES[core.dtype], max_prefill=max_prefill)
    )
    versions = {"executorch_version": getattr(executorch, "__version__", "unknown")}
    done = replace(recipe, max_prefill=max_prefill)
    program = {"program": MODEL_FILE, "forward_logits": FORWARD_LOGITS, "metadata": found, **versions}
    return ExportResult(signature, done.to_dict(), {"executorch": program, "weights": weights})
