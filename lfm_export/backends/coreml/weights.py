"""The program's weights: the model is traced and converted with placeholders, and the weight source's tensors
are written into the converted program one at a time.

Why: converting the real fp32 model of `random:lfm2-1.2b` peaks at 12.5 GB RSS: torch's fp32
parameters, coremltools' fp32 MIL constants and their fp16 copies were held at once, and compression then
read the whole saved package back from disk. Here each parameter is a zero-stride view of one scalar (4 bytes
per tensor in torch), distinct per tensor, so every weight constant of the converted program is found again
by its value. Within the conversion the fp16 pass's casts keep a placeholder a broadcast scalar
(`light_fp16_overflow_check`; coremltools' own cast made each an fp16 array of its full size, 2 bytes per
parameter, which was the peak until the weights were compressed). `fill` then replaces each placeholder by
the constant `compress.encoder` builds from the source's tensor (compressed as the recipe says, or fp16),
one tensor at a time, so the program only ever holds the weights in their final form. A placeholder left
after filling (a constant coremltools derived from a weight, which `fill` cannot map back) is an error naming
it, never a package with placeholder weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from lfm_export.config import Lfm2Config
from lfm_export.contract.errors import UnsupportedError
from lfm_export.model import Lfm2ForCausalLM, build_model
from lfm_export.trace import apply_swaps
from lfm_export.weights import CheckpointWeights, WeightSource, float_dtype_for

FIRST_PLACEHOLDER_BITS = 0x6000
"""fp16 bit pattern of the first placeholder (512.0); the next tensors take the following patterns, all
finite and exact in fp16 and fp32 (up to 0x7BFF: 7167 tensors), and none a value like 0 or 1 that constant
masks or biases hold."""
LAST_PLACEHOLDER_BITS = 0x7BFF


def placeholder(i: int) -> float:
    bits = FIRST_PLACEHOLDER_BITS + i
    if bits > LAST_PLACEHOLDER_BITS:
        raise ValueError(f"more than {LAST_PLACEHOLDER_BITS - FIRST_PLACEHOLDER_BITS + 1} weight tensors")
    return float(np.array([bits], dtype=np.uint16).view(np.float16)[0])


def source_of(loaded: Any) -> WeightSource:
    """The loaded model's weight source: its lazy source, or its real tensors (float32) as one."""
    if loaded.weights is not None:
        return loaded.weights
    return CheckpointWeights(loaded.config, dict(loaded.model.state_dict()), torch.float32)


def placeholder_model(
    cfg: Lfm2Config, sparse_moe: bool = False, moe_cls: Any = None
) -> tuple[Lfm2ForCausalLM, dict[float, Any]]:
    """The canonical model with one distinct zero-stride scalar per parameter and buffer, and `{value: name}`.
    `sparse_moe`: every MoE is a `modules.StackedMoE`, whose stacked `w1` / `w3` / `w2` map to the tuple of
    the experts' tensor names (stacked by `fill`); `moe_cls` replaces `StackedMoE` (the tests build a wrong
    conversion with it)."""
    from .modules import STACKED, StackedMoE, stacked_moe

    model = build_model(cfg)
    if sparse_moe:
        model = apply_swaps(model, [lambda m: stacked_moe(m, moe_cls or StackedMoE)])
    names: dict[float, Any] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for attr, p in list(module.named_parameters(recurse=False)):
            value = placeholder(len(names))
            if isinstance(module, StackedMoE) and attr in STACKED:
                names[value] = tuple(f"{prefix}experts.{e}.{attr}.weight" for e in range(p.shape[0]))
            else:
                names[value] = prefix + attr
            dtype = float_dtype_for(prefix + attr, torch.float32)
            setattr(module, attr, nn.Parameter(torch.full((), value, dtype=dtype).expand(p.shape), False))
        for attr, b in list(module.named_buffers(recurse=False)):
            value = placeholder(len(names))
            names[value] = prefix + attr
            module._buffers[attr] = torch.full((), value, dtype=torch.float32).expand(b.shape)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        names = {v: n for v, n in names.items() if n != "lm_head.weight"}
    return model.eval(), names


def _shape(source: WeightSource, name: Any) -> tuple[int, ...]:
    if isinstance(name, tuple):
        return (len(name), *source.shapes[name[0]])
    return tuple(source.shapes[name])


def _parts(source: WeightSource, name: Any, dtype: Any) -> list[np.ndarray]:
    """The source's tensor `name` as numpy `dtype` (a tuple: each expert's tensor), read one at a time."""
    out = []
    for n in name if isinstance(name, tuple) else (name,):
        part = source.get(n).detach().numpy().astype(dtype)
        if dtype == np.float16 and not np.isfinite(part).all():
            raise UnsupportedError(
                f"{n}: a weight beyond fp16's range (65504); the Core ML program holds weights in fp16"
            )
        out.append(part)
    return out


def _placeholder_name(val: Any, names: dict[float, Any]) -> Any:
    if not isinstance(val, np.ndarray) or val.dtype.kind != "f" or val.size < 2:
        return None
    first = float(val.flat[0])
    if first not in names or float(val.flat[-1]) != first:
        return None
    return names[first]


def fill(program: Any, names: dict[float, Any], source: WeightSource, encode: Any) -> dict[str, Any]:
    """Replace every placeholder constant of `program` by `encode(op, parts)` (`compress.encoder`: the
    compressed or plain constant) of the source's tensor, one tensor at a time. Returns `{const name: tensor
    name}`."""
    from coremltools.converters.mil.mil.passes.helper import block_context_manager

    filled: dict[str, Any] = {}
    unmapped: list[str] = []

    @block_context_manager
    def fill_block(block: Any) -> None:
        for op in list(block.operations):
            for b in op.blocks:
                fill_block(b)
            if op.op_type != "const":
                continue
            val = op.val.val
            name = _placeholder_name(val, names)
            if name is None:
                continue
            if tuple(val.shape) != _shape(source, name):
                unmapped.append(
                    f"{op.name} {list(val.shape)} (placeholder of {name} {list(_shape(source, name))})"
                )
                continue
            new = encode(op, _parts(source, name, val.dtype))
            block.replace_uses_of_var_after_op(
                anchor_op=op, old_var=op.outputs[0], new_var=new, no_check_var_types=True
            )
            block.remove_ops([op])
            filled[op.name] = name

    for function in program.functions.values():
        fill_block(function)
    missing = sorted(str(n) for n in set(names.values()) - set(filled.values()))
    if unmapped or missing:
        raise RuntimeError(
            "weights not written into the Core ML program: "
            + "; ".join(unmapped + [f"{n} (no constant holds it)" for n in missing])
        )
    return filled


def _distinct(value: np.ndarray) -> np.ndarray:
    """The values of `value` without its broadcast copies: a zero-stride axis (a placeholder's) kept at length 1."""
    if value.ndim == 0 or 0 not in value.strides:
        return value
    return value[tuple(slice(0, 1) if s == 0 else slice(None) for s in value.strides)]


def _fp16_overflow(op: Any) -> bool:
    """coremltools' `FP16ComputePrecision.fp16_overflow` (does an fp32 const input of `op` hold a finite value
    beyond fp16's 65504?) with the same answer, computed on each input's distinct values. The original takes
    `np.abs` and `np.where` of the whole constant: for a placeholder that is a full-size copy plus int64
    indices, 16+ bytes per weight element; on `random:lfm2-350m` the fp16 pass's peak went from 0.86 to
    3.45 GB on the 65536 x 1024 embedding."""
    for inputs in op.inputs.values():
        for var in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
            if var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32"):
                a = np.abs(_distinct(np.asarray(var.op.val.val)))
                if np.max(a, where=a < 1e38, initial=0.0) > 65504:
                    return True
    return False


def _cast_value(original: Any) -> Any:
    """coremltools' `cast.get_cast_value`, keeping a placeholder a placeholder: a constant with a zero-stride
    axis is cast on its distinct values and broadcast back (read-only, a few bytes). The original casts the
    whole array: the fp16 pass gave every weight its own full fp16 array, 2 bytes per parameter (16.6 GB for
    `random:lfm2-8b-a1b`), all alive at once before `fill`."""

    def get_cast_value(cls: Any, input_var: Any, dtype_val: Any) -> Any:
        val = input_var.val
        if not isinstance(val, np.ndarray) or val.ndim == 0 or 0 not in val.strides:
            return original.__func__(cls, input_var, dtype_val)
        from coremltools.converters.mil.mil.types.type_mapping import string_to_nptype

        return np.broadcast_to(_distinct(val).astype(string_to_nptype(dtype_val)), val.shape)

    return classmethod(get_cast_value)


@contextlib.contextmanager
def light_fp16_overflow_check() -> Iterator[None]:
    """Within: coremltools' fp16 pass uses `_fp16_overflow`, and its casts of placeholders stay placeholders
    (`_cast_value`); both restored on exit."""
    from coremltools.converters.mil.mil.ops.defs.iOS15.elementwise_unary import cast
    from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision

    original = FP16ComputePrecision.__dict__["fp16_overflow"]
    original_cast = cast.__dict__["get_cast_value"]
    FP16ComputePrecision.fp16_overflow = staticmethod(_fp16_overflow)
    cast.get_cast_value = _cast_value(original_cast)
    try:
        yield
    finally:
        FP16ComputePrecision.fp16_overflow = original
        cast.get_cast_value = original_cast
