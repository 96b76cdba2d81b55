"""The I/O signature of a traced LFM2 program: the one contract between backends and runtime shims.

Pure data (no torch): it is stored in every artifact's manifest and read back by the runtime shims.
Names follow onnxruntime-genai's LFM2 convention; `%d` is the absolute layer index.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lfm_export.config import Lfm2Config

GROWING = "growing"
STATIC = "static"

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
        for group in ("inputs", "outputs"):
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
        )


def past_name(role: str, layer: int) -> str:
    return f"past.{layer}.conv" if role == CONV else f"past_key_values.{layer}.{role}"


def present_name(role: str, layer: int) -> str:
    return f"present.{layer}.{role}"


def build_signature(
    cfg: Lfm2Config, form: str = GROWING, max_seq_len: int | None = None, state_dtype: str = "float32"
) -> IOSignature:
    """Signature for `cfg` in the `growing` (past concatenated) or `static` (preallocated) KV form."""
    if form not in (GROWING, STATIC):
        raise ValueError(f"unknown KV form {form!r}")
    if form == STATIC and not max_seq_len:
        raise ValueError("the static KV form needs max_seq_len")
    h, kv, hd, lc = cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim, cfg.conv_state_len
    kv_past = PAST if form == GROWING else max_seq_len
    kv_present = TOTAL if form == GROWING else max_seq_len
    inputs = [TensorSpec(INPUT_IDS, (BATCH, SEQ), "int64", INPUT_IDS)]
    if form == GROWING:
        inputs.append(TensorSpec(ATTENTION_MASK, (BATCH, TOTAL), "int64", ATTENTION_MASK))
    else:
        inputs.append(TensorSpec(INPUT_POS, (1,), "int64", INPUT_POS))
    outputs = [TensorSpec(LOGITS, (BATCH, SEQ, cfg.vocab_size), "float32", LOGITS)]
    for i in range(cfg.num_hidden_layers):
        if i in cfg.conv_layers:
            roles: tuple[tuple[str, tuple[int | str, ...], tuple[int | str, ...]], ...] = (
                (CONV, (BATCH, h, lc), (BATCH, h, lc)),
            )
        else:
            roles = (
                (KEY, (BATCH, kv, kv_past, hd), (BATCH, kv, kv_present, hd)),
                (VALUE, (BATCH, kv, kv_past, hd), (BATCH, kv, kv_present, hd)),
            )
        for role, past_shape, present_shape in roles:
            inputs.append(TensorSpec(past_name(role, i), past_shape, state_dtype, role, i))
            outputs.append(TensorSpec(present_name(role, i), present_shape, state_dtype, role, i))
    dims = {
        BATCH: "batch size",
        SEQ: "new tokens in this call",
    }
    if form == GROWING:
        dims[PAST] = "tokens already in the KV cache"
        dims[TOTAL] = f"{PAST} + {SEQ}"
    return IOSignature(form, tuple(inputs), tuple(outputs), max_seq_len, state_dtype, dims)
