"""Export a canonical LFM2 model to an onnxruntime-genai compatible ONNX folder.

Everything starts from the traced graph (`torch.export` -> `torch.onnx.export(dynamo=True)`); the passes below
only rewrite it. Stages:

1. trace: the program from `lfm_export.trace.export_program`, converted with `optimize=False` (the exporter's
   optimizer would constant-fold every `Transpose(weight)` into a transposed copy: two float32 copies of the
   weights in memory). Initializers stay views of the torch tensors.
2. clean: graph I/O and symbolic dims named as in the `IOSignature`, initializers named as in the checkpoint,
   onnxscript's optimizer with weight transposes kept symbolic.
3. fuse (`--ops ort`): `fusion.apply_ort_fusions`.
4. precision: fp16 conversion or block-wise int4/int8 (`quantize.py`); float weights become transposed
   initializers computed lazily at save time, one tensor at a time.
5. save: `model.onnx` + `model.onnx.data`, `genai_config.json`, tokenizer files.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch

from lfm_export.backends.record import ExportResult
from lfm_export.contract.signature import GROWING, IOSignature
from lfm_export.loading import LoadedModel
from lfm_export.progress import Progress
from lfm_export.signature import build_signature
from lfm_export.trace import export_program

from . import fusion, quantize
from .genai_config import write_genai_config
from .graph import MS_DOMAIN, remove_dead_nodes
from .recipes import ORT, OnnxRecipe

OPSET = 21
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def export_onnx(
    loaded: LoadedModel,
    out_dir: Path,
    recipe: OnnxRecipe,
    progress: Any = None,
    *,
    traced: ir.Model | None = None,
) -> ExportResult:
    """Write `model.onnx`, `model.onnx.data`, `genai_config.json` and the tokenizer files into `out_dir`.

    `progress` is an `lfm_export.progress.Progress` (its `timings` record the stages; None: a quiet one).
    `traced` is a graph from `trace_onnx(loaded)` to reuse across recipes (it is cloned, never changed).
    """
    cfg = loaded.config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe.check_model(cfg, _linear_weight_shapes(loaded.model))
    max_seq_len = recipe.context(cfg)
    state_dtype = "float16" if recipe.quant == "fp16" else "float32"
    signature = build_signature(cfg, GROWING, max_seq_len, state_dtype)
    progress = progress or Progress(quiet=True)

    if traced is None:
        with progress.step("Tracing to ONNX"):
            model = trace_to_ir(loaded.model, build_signature(cfg, GROWING))
        with progress.step("Cleaning the ONNX graph"):
            clean_graph(model, signature)
    else:
        model = traced.clone()
    fusions: dict[str, int] = {}
    if recipe.ops == ORT:
        with progress.step("Fusing onnxruntime contrib ops"):
            fusions = fusion.apply_ort_fusions(model, cfg, max_seq_len)
    with progress.step(f"Weights to {recipe.name}"):
        handling = quantize.apply_precision(model, recipe)
        finalize_graph(model, signature)
    ops = Counter((n.domain or "ai.onnx", n.op_type) for n in model.graph)
    with progress.step("Saving model.onnx"):
        save_model(model, out_dir)
        del model
        write_genai_config(
            out_dir, loaded, signature, MODEL_FILE, share_kv=(MS_DOMAIN, "GroupQueryAttention") in ops
        )
    weights: dict[str, Any] = {"embedding": handling.embedding, "lm_head": handling.lm_head}
    moe = _moe_handling(cfg, {**fusions, **handling.counts})
    if moe is not None:
        weights["moe"] = moe
    weights["rewrites"] = handling.counts
    ops_used = {
        "domains": dict(sorted(Counter(d for (d, _t) in ops.elements()).items())),
        "op_types": {f"{d}::{t}": c for (d, t), c in sorted(ops.items())},
    }
    return ExportResult(
        signature, recipe.to_dict(), {"ops": ops_used, "fusions": fusions, "weights": weights}
    )


# ---- stages -------------------------------------------------------------------------------------------------


def trace_onnx(loaded: LoadedModel) -> ir.Model:
    """The traced and cleaned float32 graph of `loaded.model`, before any recipe-specific pass: reusable across
    recipes with `export_onnx(traced=...)`."""
    signature = build_signature(loaded.config, GROWING)
    model = trace_to_ir(loaded.model, signature)
    clean_graph(model, signature)
    return model


def trace_to_ir(model: torch.nn.Module, signature: IOSignature) -> ir.Model:
    """The canonical model as an ONNX IR model whose I/O names follow `signature`."""
    program = export_program(model, signature)
    with _quiet_torch_onnx():
        onnx_program = torch.onnx.export(
            program,
            (),
            dynamo=True,
            input_names=signature.input_names,
            output_names=signature.output_names,
            opset_version=OPSET,
            optimize=False,
            verbose=False,
        )
    ir_model = onnx_program.model
    got_in = [v.name for v in ir_model.graph.inputs]
    got_out = [v.name for v in ir_model.graph.outputs]
    if got_in != signature.input_names or got_out != signature.output_names:
        raise RuntimeError(f"traced graph I/O {got_in} -> {got_out} does not follow the signature")
    bind_lazy_weights(ir_model, model)
    return ir_model


def bind_lazy_weights(ir_model: ir.Model, model: torch.nn.Module) -> None:
    """For a lazy model (`lfm_export.weights.lazy_model`), every traced weight becomes an `ir.LazyTensor` that
    asks the weight source for the tensor whenever a pass or the writer reads it (never kept). Names here
    carry SignatureModule's `model.` prefix."""
    from lfm_export.weights import lazy_source

    source = lazy_source(model)
    if source is None:
        return
    for name, value in ir_model.graph.initializers.items():
        key = name.removeprefix("model.")
        if key in source.shapes and value.const_value is not None:

            def make(key: str = key) -> ir.TensorProtocol:
                return ir.tensor(source.get(key).contiguous().numpy())

            value.const_value = ir.LazyTensor(
                make, dtype=value.const_value.dtype, shape=value.const_value.shape
            )


def clean_graph(model: ir.Model, signature: IOSignature) -> None:
    rename_dims(model, signature)
    rename_initializers(model)
    optimize(model)
    rename_dims(model, signature)


SKIPPED_REWRITES = ("SlicesSplit",)
"""onnxscript's default rewrite rules minus these. `SlicesSplit` scales quadratically with the Slices of one
input: on a 6-layer MoE with 32 experts the cleaning took 123.5 s with it and 18.8 s without, same node count;
on random LFM2-8B-A1B it was 671 of the export's 1238 s. Our traced graphs give it nothing to do:
tiny and tiny-moe artifacts are byte-identical without it."""


def optimize(model: ir.Model) -> None:
    """onnxscript's `optimize_ir` pass sequence (constant folding, rewrite rules, dead-code removal, constants
    lifted to initializers, CSE), with weight transposes kept symbolic (folding them would make a transposed
    float copy of every weight) and the rewrite rules in `SKIPPED_REWRITES` left out."""
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding

    common = ir.passes.common

    def keep_weight_transposes(node: ir.Node) -> bool | None:
        if node.op_type == "Transpose" and any(v is not None and v.is_initializer() for v in node.inputs):
            return False
        return None

    rules = [r for r in rewriter._DEFAULT_REWRITE_RULES if getattr(r, "name", None) not in SKIPPED_REWRITES]
    loop = ir.passes.PassManager(
        [
            _constant_folding.FoldConstantsPass(
                shape_inference=True,
                input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
                should_fold=keep_weight_transposes,
            ),
            rewriter.RewritePass(rules),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
        ],
        steps=2,
        early_stop=True,
    )
    ir.passes.Sequential(
        common.InlinePass(),
        loop,
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def rename_dims(model: ir.Model, signature: IOSignature) -> None:
    """Symbolic dims named as in the signature (`batch_size`, `sequence_length`, `past_sequence_length`,
    `total_sequence_length`) on the graph I/O; the exporter's own symbols are mapped on every other value
    (an expression that maps to nothing known becomes an unnamed dim)."""
    graph = model.graph
    mapping: dict[str, str] = {}
    for values, specs in ((graph.inputs, signature.inputs), (graph.outputs, signature.outputs)):
        for value, spec in zip(values, specs):
            if value.shape is not None:
                for dim, want in zip(value.shape, spec.shape):
                    if isinstance(want, str) and isinstance(dim, ir.SymbolicDim) and dim.value:
                        mapping.setdefault(dim.value, want)
            value.shape = ir.Shape(list(spec.shape))
    derived = {frozenset(("past_sequence_length", "sequence_length")): "total_sequence_length"}

    def fix(dim: Any) -> Any:
        if not isinstance(dim, ir.SymbolicDim) or dim.value is None:
            return dim
        if dim.value in mapping or dim.value in signature.dims:
            return mapping.get(dim.value, dim.value)
        tokens = re.findall(r"[A-Za-z_]\w*", dim.value)
        ops = re.sub(r"[A-Za-z_]\w*|\s", "", dim.value)
        if tokens and set(ops) <= {"+"}:
            named = frozenset(mapping.get(t, t) for t in tokens)
            if named in derived and len(tokens) == 2:
                return derived[named]
        return None

    io = {id(v) for v in graph.inputs} | {id(v) for v in graph.outputs}
    for node in graph:
        for value in node.outputs:
            if id(value) not in io and value.shape is not None:
                value.shape = ir.Shape([fix(d) for d in value.shape])


def rename_initializers(model: ir.Model) -> None:
    """`model.model.layers.0...` (SignatureModule's prefix) -> checkpoint names `model.layers.0...`."""
    graph = model.graph
    renames = {name: name[len("model.") :] for name in graph.initializers if name.startswith("model.")}
    if "model.lm_head.weight" in renames and "model.model.embed_tokens.weight" not in graph.initializers:
        renames["model.lm_head.weight"] = "model.embed_tokens.weight"  # tied: one table, named as stored
    for old, new in renames.items():
        if new not in graph.initializers:
            value = graph.initializers.pop(old)
            value.name = new
            graph.register_initializer(value)


def finalize_graph(model: ir.Model, signature: IOSignature) -> None:
    remove_dead_nodes(model)
    ir.passes.common.RemoveUnusedOpsetsPass()(model)
    model.graph.sort()
    ir.passes.common.NameFixPass()(model)
    for value, spec in zip(model.graph.inputs, signature.inputs):
        value.shape = ir.Shape(list(spec.shape))
    for value, spec in zip(model.graph.outputs, signature.outputs):
        value.shape = ir.Shape(list(spec.shape))
    model.producer_name = "lfm-export"
    model.graph.name = "lfm2"


def save_model(model: ir.Model, out_dir: Path) -> None:
    ir.save(model, out_dir / MODEL_FILE, external_data=DATA_FILE, size_threshold_bytes=1024)


# ---- helpers ------------------------------------------------------------------------------------------------


def _moe_handling(cfg: Any, fusions: dict[str, int]) -> str | None:
    if not cfg.is_moe:
        return None
    fused = fusions.get("QMoE") or fusions.get("MoE")
    if fused:
        op = "QMoE" if fusions.get("QMoE") else "MoE"
        return (
            f"com.microsoft.{op} in {fused} layer(s): only the top-{cfg.num_experts_per_tok} experts run; "
            "routing (sigmoid, biased top-k, normalization, scaling) stays in the graph, float32"
        )
    return "dense expert form: every expert runs and the routing weights zero the unselected ones"


def _linear_weight_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Weights a quantizer blocks along the input dim: every 2-D parameter (Linear and embedding tables)."""
    seen: set[int] = set()
    out = {}
    for name, p in model.named_parameters():
        if p.dim() == 2 and id(p) not in seen:
            seen.add(id(p))
            out[name] = tuple(p.shape)
    return out


@contextlib.contextmanager
def _quiet_torch_onnx() -> Iterator[None]:
    """torch.onnx prints stage banners and warns about missing torchvision; neither concerns the user."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(_NullWriter()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


class _NullWriter:
    def write(self, _s: str) -> int:
        return 0

    def flush(self) -> None:
        pass


__all__ = ["export_onnx", "trace_onnx"]
