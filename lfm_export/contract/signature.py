"""The I/O signature of a traced LFM2 program: the one contract between backends and runtime shims (built for a
config by `lfm_export.signature.build_signature`).

Pure data (no torch): it is stored in every artifact's manifest and read back by the runtime shims.
Names follow onnxruntime-genai's LFM2 convention; `%d` is the absolute layer index.

Forms: `growing` and `static` take the state as inputs and return the next state as outputs; `stateful`
(ExecuTorch, Core ML) holds it inside the program as mutable buffers, listed in `IOSignature.held` under the
names the state inputs have in the other forms, so a manifest still describes it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

GROWING = "growing"
STATIC = "static"
STATEFUL = "stateful"
FORMS = (GROWING, STATIC, STATEFUL)

# symbolic dimensions
BATCH = "batch_size"
SEQ = "sequence_length"
PAST = "past_sequence_length"
TOTAL = "total_sequence_length"
MAX_SEQ = "max_seq_len"

# roles
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
INPUT_POS = "input_pos"
LOGITS = "logits"
CONV = "conv"
KEY = "key"
VALUE = "value"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]
    dtype: str
    role: str
    layer: int | None = None

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class IOSignature:
    form: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_seq_len: int | None = None
    state_dtype: str = "float32"
    dims: dict[str, str] = field(default_factory=dict)
    held: tuple[TensorSpec, ...] = ()
    max_prefill: int | None = None

    # ---- lookup -------------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def state_inputs(self) -> list[TensorSpec]:
        return [s for s in self.inputs if s.role in (CONV, KEY, VALUE)]

    def state_outputs(self) -> list[TensorSpec]:
        return [s for s in self.outputs if s.role in (CONV, KEY, VALUE)]

    def present_for(self, past_name: str) -> str:
        """Output name that carries the next value of state input `past_name`."""
        spec = next(s for s in self.inputs if s.name == past_name)
        return next(o.name for o in self.outputs if o.role == spec.role and o.layer == spec.layer)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for group in ("inputs", "outputs", "held"):
            for s in d[group]:
                s["shape"] = list(s["shape"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IOSignature:
        def specs(items: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(**{**s, "shape": tuple(s["shape"])}) for s in items)

        return cls(
            form=d["form"],
            inputs=specs(d["inputs"]),
            outputs=specs(d["outputs"]),
            max_seq_len=d.get("max_seq_len"),
            state_dtype=d.get("state_dtype", "float32"),
            dims=dict(d.get("dims", {})),
            held=specs(d.get("held", [])),
            max_prefill=d.get("max_prefill"),
        )


def past_name(role: str, layer: int) -> str:
    return f"past.{layer}.conv" if role == CONV else f"past_key_values.{layer}.{role}"


def present_name(role: str, layer: int) -> str:
    return f"present.{layer}.{role}"
