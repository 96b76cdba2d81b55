"""`build_signature`: the I/O signature (`lfm_export.contract.signature`) of the canonical model for a config,
in each program form."""

from __future__ import annotations

from lfm_export.config import Lfm2Config
from lfm_export.contract.signature import (
    ATTENTION_MASK,
    BATCH,
    CONV,
    FORMS,
    GROWING,
    INPUT_IDS,
    INPUT_POS,
    KEY,
    LOGITS,
    PAST,
    SEQ,
    STATEFUL,
    TOTAL,
    VALUE,
    IOSignature,
    TensorSpec,
    past_name,
    present_name,
)


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
