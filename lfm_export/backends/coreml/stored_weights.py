"""The compressed weights a Core ML package stores, decoded in numpy (`Backend.stored_weights`).

Read from the saved `model.mlpackage` by coremltools' own loader (the MIL program of the spec's protobuf, its
constants from `weights/weight.bin`), as the interpreter reads it (`lfm_export.runtime.coreml_interpreter`).
Every iOS 18 constexpr op the backend writes (`compress.py`) is decoded by the interpreter's own function for
it (`CONSTEXPR`: `constexpr_blockwise_shift_scale`, `(data - offset) * scale` per block, for int4 blocks and
int8 per channel; `constexpr_lut_to_dense`, the palettized look-up) and rounded to the op's output dtype
(fp16), then held as float32: the values the program computes with, which the simulation's
(`compress.weight_values`: coremltools' `decompress` of the same codes, in fp16) equal bit for bit.

A 2-D constant is `[out, in]` rows; a stacked MoE expert constant `[E, out, in]` is its `E * out` rows. Named
by the op (the checkpoint name with `.` as `_`, plus coremltools' suffix). fp16 constants (what a quantized
recipe holds float) are not read."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lfm_export.runtime.coreml_interpreter import CONSTEXPR, import_coremltools

from .convert import MODEL_FILE


def stored_weights(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """`(name, float32 [rows, in])` of every compressed constant of `folder/model.mlpackage`'s main function."""
    ct = import_coremltools()
    from coremltools.converters.mil.frontend.milproto.load import load

    mlmodel = ct.models.MLModel(str(Path(folder) / MODEL_FILE), skip_model_load=True)
    spec = mlmodel.get_spec()
    program = load(
        spec, specification_version=spec.specificationVersion, file_weights_dir=mlmodel.weights_dir
    )
    yield from program_weights(program)


def program_weights(program: Any) -> Iterator[tuple[str, np.ndarray]]:
    """`(name, float32 [rows, in])` of every compressed constant of a MIL program's main function (a loaded
    package's, or one being built: `compress.encoder` through `weights.fill`)."""
    from coremltools.converters.mil.mil import types

    for op in program.functions["main"].operations:
        decode = CONSTEXPR.get(op.op_type)
        if decode is None:
            continue
        out = op.outputs[0]
        args = {k: None if v.val is None else np.asarray(v.val) for k, v in op.inputs.items()}
        values = decode(**args).astype(types.nptype_from_builtin(out.dtype)).astype(np.float32)
        if values.ndim < 2:
            continue
        yield op.name, values.reshape(-1, values.shape[-1])
