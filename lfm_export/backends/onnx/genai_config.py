"""`genai_config.json` in onnxruntime-genai's LFM2 convention (`model.type = "lfm2"`), so
`onnxruntime_genai.Model(folder)` loads an export unchanged. Field names follow onnxruntime-genai's model
builder; search defaults come from the checkpoint's `generation_config.json` where it sets them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lfm_export.contract.session import DEFAULT_THREADS
from lfm_export.contract.signature import IOSignature
from lfm_export.loading import LoadedModel

SESSION_THREADS = DEFAULT_THREADS
"""The one thread count written into an artifact: onnxruntime-genai reads it from genai_config.json, and left
unset it ran these models on one thread of this 2-core machine, at about half the decode speed."""
SEARCH_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams")


def genai_config(
    loaded: LoadedModel, signature: IOSignature, filename: str = "model.onnx", share_kv: bool = False
) -> dict[str, Any]:
    """`share_kv`: the graph's attention is GroupQueryAttention, which can append to one KV buffer bound as
    both past and present (`past_present_share_buffer`, as the builder sets it); a graph that concatenates
    past and new in plain ops cannot."""
    cfg = loaded.config
    gen = loaded.generation_config or {}
    context = signature.max_seq_len or cfg.max_position_embeddings
    eos = gen.get("eos_token_id", cfg.eos_token_id)
    search: dict[str, Any] = {
        "diversity_penalty": 0.0,
        "do_sample": False,
        "early_stopping": True,
        "length_penalty": 1.0,
        "max_length": context,
        "min_length": 0,
        "no_repeat_ngram_size": 0,
        "num_beams": 1,
        "num_return_sequences": 1,
        "past_present_share_buffer": share_kv,
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
    }
    for key in SEARCH_KEYS:
        if gen.get(key) is not None:
            search[key] = gen[key]
    names = set(signature.input_names) | set(signature.output_names)
    inputs: dict[str, str] = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    outputs: dict[str, str] = {"logits": "logits"}
    if cfg.attn_layers:
        inputs["past_key_names"] = "past_key_values.%d.key"
        inputs["past_value_names"] = "past_key_values.%d.value"
        outputs["present_key_names"] = "present.%d.key"
        outputs["present_value_names"] = "present.%d.value"
    if cfg.conv_layers:
        inputs["past_conv_names"] = "past.%d.conv"
        outputs["present_conv_names"] = "present.%d.conv"
    for template in list(inputs.values()) + list(outputs.values()):
        layers = cfg.conv_layers if "conv" in template else cfg.attn_layers
        concrete = {template % i for i in layers} if "%d" in template else {template}
        missing = concrete - names
        if missing:
            raise ValueError(f"genai name {sorted(missing)[0]} is not in the signature")
    return {
        "model": {
            "bos_token_id": gen.get("bos_token_id", cfg.bos_token_id),
            "context_length": context,
            "decoder": {
                "session_options": {
                    "log_id": "onnxruntime-genai",
                    "intra_op_num_threads": SESSION_THREADS,
                    "inter_op_num_threads": 1,
                    "provider_options": [],
                },
                "filename": filename,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_key_value_heads": cfg.num_key_value_heads,
                "layer_types": list(cfg.layer_types),
                "conv_cache_size": cfg.conv_L_cache - 1,
            },
            "eos_token_id": eos,
            "pad_token_id": gen.get("pad_token_id", cfg.pad_token_id),
            "type": "lfm2",
            "vocab_size": cfg.vocab_size,
        },
        "search": search,
    }


def write_genai_config(
    out_dir: Path,
    loaded: LoadedModel,
    signature: IOSignature,
    filename: str = "model.onnx",
    share_kv: bool = False,
) -> Path:
    path = Path(out_dir) / "genai_config.json"
    path.write_text(json.dumps(genai_config(loaded, signature, filename, share_kv), indent=4) + "\n")
    return path
