"""Convert a canonical LFM2 model to a stateful Core ML ML Program (`model.mlpackage`).

Stages:

1. trace: the stateful form (`lfm_export.stateful`, with `modules.py`'s two swaps that coremltools' frontend
   needs, and `StackedMoE` for the sparse MoE form) of a model holding placeholder weights
   (`weights.placeholder_model`), traced with `torch.jit.trace` (coremltools' documented way to a stateful
   model: a registered buffer mutated in place becomes a state; its torch.export path was not tried).
2. convert: `ct.convert(..., states=[ct.StateType(...)] per KV cache and conv state (fp16: the only state
   dtype coremltools 9.0 allows), minimum_deployment_target=iOS18 / macOS15, compute_precision=
   FP16ComputePrecision(precision.fp16_selector), convert_to="milinternal")`. `input_ids [1, T]` takes T in
   1..max_prefill (`ct.RangeDim`) or one of `--prefill-lengths` (`ct.EnumeratedShapes`): one function for
   prefill and decode (why not a multifunction package: README, *Core ML backend*).
3. write the weights into the program (`weights.fill`), compress it in place (`compress.py`), serialize it
   once, then metadata (description, input / output / state descriptions, author, licence, version; the
   recipe and the weight hashes as user-defined metadata) and save.
4. check: the saved package is read back as Core ML would read it (spec + weight file, structure only): the
   spec declares every state and specification version 9 (iOS 18), the program's main function takes
   exactly the description's inputs and states, and every state is read and written back once.
"""

from __future__ import annotations

import gc
import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from lfm_export.backends.record import ExportResult
from lfm_export.contract.signature import CONV, KEY, IOSignature
from lfm_export.loading import LoadedModel
from lfm_export.model import STATEFUL
from lfm_export.progress import Progress
from lfm_export.signature import build_signature
from lfm_export.stateful import held_buffer_name
from lfm_export.weights import WeightSource

from .compress import encoder
from .memory import PeakRss
from .recipes import CoreMLRecipe
from .weights import fill, light_fp16_overflow_check, placeholder_model, source_of

MODEL_FILE = "model.mlpackage"
AUTHOR = "lfm-export"
STATE_SPEC_VERSION = 9
"""Core ML specification version of iOS 18 / macOS 15, the first with states."""


def trace(model: Any, context: int, max_prefill: int, module_cls: Any = None) -> Any:
    """`torch.jit.trace` of the Core ML stateful module (fp32 buffers; converted to fp16 states).
    `module_cls` replaces `modules.CoreMLStatefulModule` (the tests build a wrong conversion with it)."""
    import torch

    from lfm_export.trace import apply_swaps

    from .modules import CoreMLStatefulModule, slice_write_attention

    sig = build_signature(model.config, STATEFUL, context, "float32", max_prefill=max_prefill)
    module_cls = module_cls or CoreMLStatefulModule
    module = module_cls(apply_swaps(model, [slice_write_attention]), sig).eval()
    seq = min(2, max_prefill)
    args = (torch.zeros(1, seq, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module, args, check_trace=False)


def state_types(signature: IOSignature) -> list[Any]:
    import coremltools as ct

    return [
        ct.StateType(
            wrapped_type=ct.TensorType(shape=tuple(int(d) for d in s.shape), dtype=np.float16),
            name=held_buffer_name(s.name),
        )
        for s in signature.held
    ]


def convert(traced: Any, signature: IOSignature, recipe: CoreMLRecipe, shapes: tuple[int, ...]) -> Any:
    """The MIL program (fp16 compute, not yet serialized or compressed) of a traced Core ML stateful module.
    Not serialized here: the weights are placeholders until `weights.fill` (see `weights.py`)."""
    import coremltools as ct

    from .precision import fp16_selector

    if recipe.prefill_lengths is not None:
        ids_shape: Any = ct.EnumeratedShapes(shapes=[(1, n) for n in shapes], default=(1, shapes[0]))
    else:
        ids_shape = (1, ct.RangeDim(lower_bound=1, upper_bound=shapes[-1], default=1))
    with warnings.catch_warnings(), light_fp16_overflow_check():
        warnings.simplefilter("ignore")
        program = ct.convert(
            traced,
            inputs=[
                ct.TensorType("input_ids", shape=ids_shape, dtype=np.int32),
                ct.TensorType("input_pos", shape=(1,), dtype=np.int32),
            ],
            outputs=[ct.TensorType("logits")],
            states=state_types(signature),
            minimum_deployment_target=getattr(ct.target, recipe.target),
            compute_precision=ct.transform.FP16ComputePrecision(op_selector=fp16_selector),
            convert_to="milinternal",
        )
    # The torch frontend requires every op to carry its TorchScript scope; the compression passes' new ops
    # carry none ("missing essential scopes"), so the requirement is lifted once the conversion is done.
    for function in program.functions.values():
        function._essential_scope_sources = []
    return program


def serialize(program: Any, recipe: CoreMLRecipe) -> Any:
    """The `ct.models.MLModel` of a filled (and compressed) program: coremltools' default passes and its
    ML Program serializer, no fp16 pass again (the program already computes in fp16 where it should)."""
    import coremltools as ct

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ct.convert(
            program,
            convert_to="mlprogram",
            minimum_deployment_target=getattr(ct.target, recipe.target),
            compute_precision=ct.precision.FLOAT32,
            skip_model_load=True,
        )


def build(
    cfg: Any,
    source: WeightSource,
    recipe: CoreMLRecipe,
    context: int,
    shapes: tuple[int, ...],
    progress: Progress,
    module_cls: Any = None,
    moe_cls: Any = None,
) -> tuple[Any, dict[str, dict[str, str]]]:
    """The compressed `MLModel` (not yet described or saved) and the compression report. The model is traced
    and converted with placeholder weights, and the source's tensors are written into the program one at a
    time (`weights.py`). `module_cls` replaces `modules.CoreMLStatefulModule` (the tests build a wrong
    conversion with it), and `moe_cls` `modules.StackedMoE`."""
    signature = build_signature(cfg, STATEFUL, context, "float16", max_prefill=shapes[-1])
    with progress.step("Tracing (torch.jit.trace, stateful form, placeholder weights)"):
        sparse = recipe.moe and recipe.moe_form == "sparse"
        model, names = placeholder_model(cfg, sparse_moe=sparse, moe_cls=moe_cls)
        traced = trace(model, context, shapes[-1], module_cls)
        del model
    with progress.step(f"Converting to a Core ML ML Program ({recipe.target}, fp16 compute)"):
        program = convert(traced, signature, recipe, shapes)
        del traced
    with progress.step(
        f"Writing the weights into the program, compressed as they are written ({recipe.name})"
    ):
        encode, report = encoder(program, recipe)
        fill(program, names, source, encode)
    with progress.step("Serializing the ML Program"):
        mlmodel = serialize(program, recipe)
    return mlmodel, report


def describe(mlmodel: Any, loaded: LoadedModel, signature: IOSignature, recipe: CoreMLRecipe) -> None:
    """Description, author, licence, version, input / output / state descriptions and user-defined metadata."""
    import lfm_export

    cfg = loaded.config
    ident = loaded.identity()
    mlmodel.short_description = (
        f"LFM2 causal language model ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab "
        f"{cfg.vocab_size}), stateful: KV caches and conv states are Core ML states; recipe {recipe.name}."
    )
    mlmodel.author = AUTHOR
    mlmodel.license = str(
        getattr(cfg, "license", None) or "see the source model's licence (LFM Open License)"
    )
    mlmodel.version = str(getattr(lfm_export, "__version__", "0"))
    mlmodel.input_description["input_ids"] = (
        "int32 [1, T] token ids, T tokens after the position input_pos (T = 1 decodes one token)"
    )
    mlmodel.input_description["input_pos"] = (
        "int32 [1] absolute position of the first token; 0 starts a new sequence (the conv state is cleared)"
    )
    mlmodel.output_description["logits"] = "fp16 [1, T, vocab] next-token logits for every input position"
    spec = mlmodel._spec
    by_name = {held_buffer_name(s.name): s for s in signature.held}
    for state in spec.description.state:
        s = by_name[state.name]
        if s.role == CONV:
            text = f"conv state of layer {s.layer}: the last L-1 inputs of its short convolution [1, hidden, L-1]"
        else:
            what = "keys" if s.role == KEY else "values"
            text = f"KV cache {what} of attention layer {s.layer} [1, kv_heads, max_seq_len, head_dim]"
        state.shortDescription = text
    meta = mlmodel.user_defined_metadata
    meta["lfm_export.recipe"] = json.dumps(recipe.to_dict(), sort_keys=True)
    meta["lfm_export.model_source"] = str(ident.get("source"))
    meta["lfm_export.weights_sha256"] = str(ident.get("weights_sha256"))
    meta["lfm_export.config_sha256"] = str(ident.get("config_sha256"))
    meta["lfm_export.max_seq_len"] = str(signature.max_seq_len)
    meta["lfm_export.random_weights"] = str(bool(loaded.random)).lower()


def check_package(path: Path, signature: IOSignature) -> dict[str, Any]:
    """Read the saved package back (spec + weights) and check what Core ML needs to load a stateful model
    (module docstring, stage 4). Returns what it found, for the manifest."""
    from lfm_export.runtime.coreml_interpreter import load_program

    program = load_program(path, decode=False)
    want = [held_buffer_name(s.name) for s in signature.held]
    problems = []
    if program.spec_version < STATE_SPEC_VERSION:
        problems.append(f"specification version {program.spec_version} < {STATE_SPEC_VERSION} (iOS 18)")
    if sorted(program.states) != sorted(want):
        problems.append(f"states {sorted(program.states)} != {sorted(want)}")
    if sorted(program.function_inputs) != sorted(program.inputs + program.states):
        problems.append(
            f"main function inputs {sorted(program.function_inputs)} are not the description's inputs and states"
        )
    for name in program.states:
        reads, writes = program.state_access(name)
        if reads != 1 or writes != 1:
            problems.append(f"state {name} is read {reads} and written {writes} times (expected once each)")
    if problems:
        raise RuntimeError(
            f"{path}: the saved program is not a loadable stateful model: {'; '.join(problems)}"
        )
    return {
        "specification_version": program.spec_version,
        "opset": program.opset,
        "states": {n: list(program.state_shapes[n]) for n in program.states},
        "ops": program.op_counts(),
    }


def export_coreml(
    loaded: LoadedModel, out_dir: Path, recipe: CoreMLRecipe, progress: Progress | None = None
) -> ExportResult:
    """Write `model.mlpackage` and the tokenizer files for `loaded` into `out_dir`."""
    import coremltools as ct

    progress = progress or Progress()
    cfg = loaded.config
    recipe = replace(recipe, moe=bool(getattr(cfg, "num_experts", 0)))
    core = recipe.recipe
    core.check_model(cfg, {})
    context = core.context(cfg)
    shapes = recipe.shapes(context)
    max_prefill = shapes[-1]

    source = source_of(loaded)
    if core.quantized:
        core.check_model(cfg, source.shapes)
    rss = PeakRss()
    mlmodel, compression = build(cfg, source, recipe, context, shapes, rss.watch(progress))
    signature = build_signature(cfg, STATEFUL, context, "float16", max_prefill=max_prefill)
    with rss.watch(progress).step("Saving"):
        describe(mlmodel, loaded, signature, recipe)
        path = out_dir / MODEL_FILE
        mlmodel.save(str(path))
    # the program's weights (int4 / int8 codes one byte each: 10.8 GB for random:lfm2-8b-a1b) are not needed
    # any more; alive during the read-back they made its peak 20.8 GB
    del mlmodel
    gc.collect()
    with rss.watch(progress).step("Reading the saved package back"):
        found = check_package(path, signature)
    info = {
        "package": MODEL_FILE,
        "target": recipe.target,
        "prefill": {"enumerated": list(shapes)}
        if recipe.prefill_lengths is not None
        else {"range": [1, max_prefill]},
        "compression": compression,
        "coremltools_version": ct.__version__,
        "peak_rss_gb": rss.peaks,
        **found,
    }
    return ExportResult(signature, recipe.to_dict(), {"coreml": info})
