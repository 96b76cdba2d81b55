"""`FakeQuantSession`: the fake-quantized torch step program (`quantize.QuantizedStep`) behind the `Session`
protocol, fed token by token with a static state. It is what `lfm-export onnx --target qnn` writes as a QDQ graph,
so parity runs it as the simulation an HTP artifact is compared with, and on its own against fp32 to prove the
quantization before any lowering."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from lfm_export.contract.session import SessionBase
from lfm_export.contract.snapshot import Snapshot
from lfm_export.runtime.qnn import restored_state

from .quantize import QuantizedStep, empty_state, step_args
from .weights import program_weights

DEQUANTIZE_PER_TENSOR = "quantized_decomposed.dequantize_per_tensor.default"


class FakeQuantSession(SessionBase):
    supports_batch = False

    def __init__(self, step: QuantizedStep, name: str = "qnn-fake-quant") -> None:
        self.step = step
        self.signature = step.signature
        self.name = name
        self.vocab_size = int(self.signature.outputs[0].shape[-1])
        self.max_seq_len = self.signature.max_seq_len
        self.reset(1)

    def _reset_state(self, batch_size: int) -> None:
        self._state = empty_state(self.signature)

    def _prefill(self, ids: np.ndarray) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i, token in enumerate(ids[0]):
                result = self.step.module(
                    *step_args(self.signature, int(token), self._position + i, self._state)
                )
                self._state = list(result[1:])
                out.append(result[0].float().numpy()[:, -1:])
        return np.concatenate(out, axis=1)

    def _restore_state(self, snap: Snapshot) -> None:
        state = restored_state(self.name, self.signature.state_inputs(), snap)
        self._state = [torch.from_numpy(state[s.name]) for s in self.signature.state_inputs()]

    def quantized_weights(self) -> Iterator[tuple[str, np.ndarray]]:
        """The program's quantized weights as it computes with them (`weights.program_weights`): what parity
        compares an artifact's stored weights with, bit for bit."""
        return program_weights(self.step.module)

    def state_steps(self) -> dict[str, float]:
        """State input name -> the quantization step (the scale of the per-tensor dequantize that produces its
        `present` output) of the grid the program writes that state on, and the QDQ graph with it: the unit
        parity counts a QNN artifact's state error in (`lfm_export.parity.metrics.state_max_abs`)."""
        output = next(n for n in self.step.module.graph.nodes if n.op == "output")
        produced = dict(zip(self.signature.output_names, output.args[0], strict=True))
        steps = {}
        for spec in self.signature.state_inputs():
            node = produced.get(self.signature.present_for(spec.name))
            if node is not None and str(node.target) == DEQUANTIZE_PER_TENSOR:
                steps[spec.name] = float(node.args[1])
        return steps

    def state(self) -> dict[str, np.ndarray]:
        return {
            spec.name: t.numpy().copy()
            for spec, t in zip(self.signature.state_inputs(), self._state, strict=True)
        }
