"""QNN-style quantization, once: the canonical model's single-token step in the static KV form (batch 1, one
token, KV cache and conv state as inputs and outputs at fixed size), quantized with ExecuTorch's PT2E
`QnnQuantizer` and calibrated on texts encoded with the artifact's tokenizer. The result is a fake-quantized
torch program (`quantized_decomposed` quantize / dequantize around every annotated op): the ONNX QNN target
writes it as a QDQ graph and parity runs it as the simulation the emulated HTP is compared with.

One program, one token: prefill runs token by token. A fixed chunk program would need the conv state taken at
the last real token of a padded chunk, which the canonical model does not do; and two programs (chunk and
decode) would be two calibrations with different scales."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lfm_export import model as canonical
from lfm_export.contract.signature import BATCH, SEQ, IOSignature
from lfm_export.model import STATIC, Lfm2ForCausalLM
from lfm_export.parity.prompts import random_prompts, tokenizer_prompts
from lfm_export.signature import build_signature
from lfm_export.trace import SignatureModule, apply_swaps

from .attention import MaskedProbsSDPA
from .recipes import QUANTS

CALIBRATION_TEXTS = (
    "Once upon a time a small fox lived at the edge of a wide green forest, and every morning she walked "
    "down to the lake to watch the birds.",
    "<|im_start|>user\nCan you explain how rain forms in the clouds?<|im_end|>\n<|im_start|>assistant\nRain "
    "forms when tiny water droplets join together until they are heavy enough to fall.",
    "import numpy as np\n\ndef mean(values):\n    total = 0\n    for v in values:\n        total += v\n    "
    "return total / len(values)\n",
    "Meeting notes, 14 March: the team agreed to ship version 2.3 on Friday; Anna will update the "
    "documentation and Ben will run the last tests.",
)
"""Calibration texts, on purpose not parity's (`lfm_export.parity.prompts.TEXTS`): the parity run measures the
quantization on text it was not calibrated on."""

CALIBRATION_SEED = 4321
"""Seed of the random-id calibration prompts used when the model has no tokenizer (parity's seed is 1234)."""


def calibration_prompts(vocab_size: int, tokenizer_file: Path | None) -> list[np.ndarray]:
    if tokenizer_file is not None:
        return tokenizer_prompts(tokenizer_file, vocab_size, CALIBRATION_TEXTS)
    return random_prompts(vocab_size, count=4, lengths=(32, 24, 32, 16), seed=CALIBRATION_SEED)


def step_signature(model: Lfm2ForCausalLM, max_seq_len: int) -> IOSignature:
    """The static signature with batch 1 and one new token made concrete: the HTP takes static shapes only."""
    sig = build_signature(model.config, STATIC, max_seq_len)

    def fixed(specs: Sequence[Any]) -> tuple[Any, ...]:
        sizes = {BATCH: 1, SEQ: 1}
        return tuple(dataclasses.replace(s, shape=tuple(sizes.get(d, d) for d in s.shape)) for s in specs)

    return dataclasses.replace(
        sig, inputs=fixed(sig.inputs), outputs=fixed(sig.outputs), dims={}, max_prefill=1
    )


def empty_state(signature: IOSignature) -> list[torch.Tensor]:
    return [torch.zeros(tuple(s.shape), dtype=torch.float32) for s in signature.state_inputs()]


def step_args(signature: IOSignature, token: int, position: int, state: Sequence[torch.Tensor]) -> tuple:
    return (torch.tensor([[token]], dtype=torch.int64), torch.tensor([position], dtype=torch.int64), *state)


@contextlib.contextmanager
def rope_table(cfg: Any, max_seq_len: int) -> Iterator[None]:
    """While tracing, the model's `rope_cos_sin(positions, ...)` reads rows of constant tables that the same
    function computed for every position 0..max_seq_len-1 before tracing, instead of computing `theta ** (i / d)`,
    the angles, cos and sin in the graph. Computed in the graph, the emulated HTP's `Sin` / `Cos` of angles up to
    `max_seq_len` radians put the new keys 0.5-1.7x their scale off from position 1 on (`tiny`, 16a8w; after
    the change every output is within 1.6% of onnxruntime's CPU provider on the same graph), and the quantizer
    would put `theta ** (i / d)` on a 16-bit grid spanning 1..theta. The same numbers in fp32 (tested)."""
    original = canonical.rope_cos_sin
    cos_table, sin_table = original(torch.arange(max_seq_len), cfg.head_dim, cfg.rope_theta)

    def lookup(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        return cos_table[positions], sin_table[positions]

    canonical.rope_cos_sin = lookup
    try:
        yield
    finally:
        canonical.rope_cos_sin = original


@dataclass
class QuantizedStep:
    """The fake-quantized single-token program: `module(input_ids [1, 1], input_pos [1], *state)` ->
    `(logits [1, 1, vocab], *next_state)` in `signature` order."""

    module: torch.fx.GraphModule
    signature: IOSignature
    quant: str
    calibration_tokens: int


def trace_step(model: Lfm2ForCausalLM, max_seq_len: int) -> tuple[torch.export.ExportedProgram, IOSignature]:
    """The float single-token program the quantizer annotates: the static form with `MaskedProbsSDPA`
    swapped in and RoPE read from a table (`rope_table`)."""
    signature = step_signature(model, max_seq_len)
    module = SignatureModule(apply_swaps(model, [MaskedProbsSDPA.swap]), signature).eval()
    with torch.no_grad(), rope_table(model.config, max_seq_len):
        program = torch.export.export(
            module, step_args(signature, 0, 0, empty_state(signature)), strict=False
        )
    return program, signature


def quantize_step(
    model: Lfm2ForCausalLM, quant: str, max_seq_len: int, prompts: Sequence[np.ndarray]
) -> QuantizedStep:
    """Trace the step, annotate it with `QnnQuantizer` (`quant` from `recipes.QUANTS`, per-channel weights for
    linears and the conv; for 16-bit activations the attention matmuls' second input at 8 bits, as
    ExecuTorch's `custom_annotate_matmul_16a8w` does: the HTP refused both inputs at 16 bits, error 3110),
    calibrate on `prompts` token by token from an empty state each, and convert."""
    # Building a QnnQuantizer sets up the Qualcomm SDK for its optional op checks: without QNN_SDK_ROOT it tries
    # to download one, printing to stdout (it broke `--json`); a QNN_SDK_ROOT that is set, even empty, means
    # "the caller takes charge of the SDK" to it (executorch 1.5.1, `qnn_sdk_setup`). No SDK is needed here.
    os.environ.setdefault("QNN_SDK_ROOT", "")
    from executorch.backends.qualcomm.quantizer.custom_annotation import custom_annotate_matmul_16a8w
    from executorch.backends.qualcomm.quantizer.quantizer import QnnQuantizer, QuantDtype
    from torchao.quantization.pt2e import MinMaxObserver
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    logging.getLogger("executorch").setLevel(logging.ERROR)
    program, signature = trace_step(model, max_seq_len)
    quantizer = QnnQuantizer()
    quantizer.set_default_quant_config(
        quant_dtype=getattr(QuantDtype, QUANTS[quant]),
        is_conv_per_channel=True,
        is_linear_per_channel=True,
        act_observer=MinMaxObserver,
    )
    if quant.startswith("16"):
        quantizer.add_custom_quant_annotations((custom_annotate_matmul_16a8w,))
    prepared = prepare_pt2e(program.module(), quantizer)
    tokens = 0
    with torch.no_grad():
        for prompt in prompts:
            state = empty_state(signature)
            for pos, token in enumerate(np.asarray(prompt).reshape(-1)[: max_seq_len - 1]):
                out = prepared(*step_args(signature, int(token), pos, state))
                state = list(out[1:])
                tokens += 1
        converted = convert_pt2e(prepared)
    return QuantizedStep(converted, signature, quant, tokens)
