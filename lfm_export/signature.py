"""The I/O signature of a traced LFM2 program: the one contract between backends and runtime shims.

Pure data (no torch): it is stored in every artifact's manifest and read back by the runtime shims.
Names follow onnxruntime-genai's LFM2 convention; `%d` is the absolute layer index.

Forms: `growing` and `static` take the state as inputs and return the next state as outputs; `stateful`
(ExecuTorch, Core ML) holds it inside the program as mutable buffers, listed in `IOSignature.held` under the
names the state inputs have in the other forms, so a manifest still describes it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lfm_export.config import Lfm2Config

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


def build_signature(
    cfg: Lfm2Config,
    form: str = GROWING,
    max_seq_len: int | None = None,
    state_dtype: str = "float32",
    max_prefill: int | None = None,
) -> IOSignature:
    """Signature for `cfg` in the `growing` (past concatenated), `static` (preallocated) or `stateful`
    (state held in the program, batch 1) form.

    The stateful form's token input keeps the name `input_ids` (ExecuTorch calls it `tokens` but passes it by
    position; Core ML uses the name, and one name across forms lets a shim find it by name or role). Its
    `max_prefill` (default `max_seq_len`) bounds the tokens of one call."""
    if form not in FORMS:
        raise ValueError(f"unknown KV form {form!r}")
    if form != GROWING and not max_seq_len:
        raise ValueError(f"the {form} KV form needs max_seq_len")
    if form == STATEFUL:
        return _stateful_signature(cfg, max_seq_len or 0, state_dtype, max_prefill or max_seq_len or 0)
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


def _stateful_signature(cfg: Lfm2Config, max_seq_len: int, state_dtype: str, max_prefill: int) -> IOSignature:
    if not 1 <= max_prefill <= max_seq_len:
        raise ValueError(f"max_prefill must be 1..max_seq_len ({max_seq_len}), got {max_prefill}")
    h, kv, hd, lc = cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim, cfg.conv_state_len
    held = []
    for i in range(cfg.num_hidden_layers):
        if i in cfg.conv_layers:
            held.append(TensorSpec(past_name(CONV, i), (1, h, lc), state_dtype, CONV, i))
        else:
            for role in (KEY, VALUE):
                held.append(TensorSpec(past_name(role, i), (1, kv, max_seq_len, hd), state_dtype, role, i))
    return IOSignature(
        STATEFUL,
        inputs=(
            TensorSpec(INPUT_IDS, (1, SEQ), "int64", INPUT_IDS),
            TensorSpec(INPUT_POS, (1,), "int64", INPUT_POS),
        ),
        outputs=(TensorSpec(LOGITS, (1, SEQ, cfg.vocab_size), "float32", LOGITS),),
        max_seq_len=max_seq_len,
        state_dtype=state_dtype,
        dims={SEQ: f"new tokens in this call, 1 to {max_prefill}"},
        held=tuple(held),
        max_prefill=max_prefill,
    )
