"""LFM2 / LFM2-MoE configuration: one dataclass, parsed from either published `config.json` key style."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lfm_export.contract.errors import ConfigError

MODEL_TYPES = ("lfm2", "lfm2_moe")
LAYER_CONV = "conv"
LAYER_ATTN = "full_attention"


@dataclass(frozen=True)
class Lfm2Config:
    """Architecture of one LFM2 model. `intermediate_size` is the *effective* dense FFN width."""

    model_type: str = "lfm2"
    vocab_size: int = 65536
    hidden_size: int = 1024
    intermediate_size: int = 4608
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    layer_types: tuple[str, ...] = ()
    conv_L_cache: int = 3
    conv_bias: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 7
    pad_token_id: int = 0
    # MoE (model_type lfm2_moe)
    num_dense_layers: int = 0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    use_expert_bias: bool = False
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived -------------------------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_types)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.model_type == "lfm2_moe"

    @property
    def conv_state_len(self) -> int:
        """Time steps of conv state kept between calls (`L - 1`)."""
        return self.conv_L_cache - 1

    @property
    def conv_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == LAYER_CONV]

    @property
    def attn_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == LAYER_ATTN]

    def is_moe_layer(self, i: int) -> bool:
        return self.is_moe and i >= self.num_dense_layers

    def validate(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(
                f"unknown model_type {self.model_type!r} (expected one of {', '.join(MODEL_TYPES)})"
            )
        if not self.layer_types:
            raise ConfigError("config has no layers (layer_types / full_attn_idxs + num_hidden_layers)")
        bad = sorted({t for t in self.layer_types if t not in (LAYER_CONV, LAYER_ATTN)})
        if bad:
            raise ConfigError(f"unknown layer type(s) {bad} in layer_types")
        for name in (
            "hidden_size",
            "vocab_size",
            "num_attention_heads",
            "num_key_value_heads",
            "conv_L_cache",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) does not divide hidden_size ({self.hidden_size})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads ({self.num_key_value_heads}) does not divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.conv_L_cache < 2:
            raise ConfigError(f"conv_L_cache must be >= 2, got {self.conv_L_cache}")
        if self.is_moe:
            if not (0 < self.num_experts_per_tok <= self.num_experts):
                raise ConfigError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts ({self.num_experts})"
                )
            if self.moe_intermediate_size <= 0:
                raise ConfigError("moe_intermediate_size must be positive for lfm2_moe")
            if not 0 <= self.num_dense_layers <= self.num_hidden_layers:
                raise ConfigError(f"num_dense_layers ({self.num_dense_layers}) exceeds the layer count")

    # ---- serialisation -------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """transformers-style `config.json` (auto-adjust off, so `intermediate_size` is the effective width)."""
        d: dict[str, Any] = {
            "architectures": ["Lfm2MoeForCausalLM" if self.is_moe else "Lfm2ForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "layer_types": list(self.layer_types),
            "full_attn_idxs": self.attn_layers,
            "conv_L_cache": self.conv_L_cache,
            "conv_bias": self.conv_bias,
            "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "block_auto_adjust_ff_dim": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
            "use_cache": True,
        }
        if self.is_moe:
            d.update(
                num_dense_layers=self.num_dense_layers,
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                use_expert_bias=self.use_expert_bias,
                norm_topk_prob=self.norm_topk_prob,
                routed_scaling_factor=self.routed_scaling_factor,
            )
        return d

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> Lfm2Config:
        return parse_hf_config(raw)

    @classmethod
    def from_file(cls, path: str | Path) -> Lfm2Config:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return parse_hf_config(raw)


def effective_ff_dim(
    ff: int, auto_adjust: bool, multiplier: float | None = None, multiple_of: int = 256
) -> int:
    """The SwiGLU width actually used: LFM2's `block_auto_adjust_ff_dim` rule (12288 -> 8192 for 1.2B)."""
    if not auto_adjust:
        return ff
    ff = int(2 * ff / 3)
    if multiplier is not None:
        ff = int(multiplier * ff)
    return multiple_of * math.ceil(ff / multiple_of)


def _first(raw: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if k in raw and raw[k] is not None:
            return raw[k]
    return default


def parse_hf_config(raw: dict[str, Any]) -> Lfm2Config:
    """Accept transformers-style and original Liquid-style keys; raise ConfigError on inconsistencies."""
    model_type = raw.get("model_type", "lfm2")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"unknown model_type {model_type!r} (expected one of {', '.join(MODEL_TYPES)})")
    try:
        hidden = int(_first(raw, "hidden_size", "block_dim"))
        n_layers = _first(raw, "num_hidden_layers", "num_layers")
        layer_types = raw.get("layer_types")
        attn_idxs = raw.get("full_attn_idxs")
        if layer_types is None:
            if attn_idxs is None or n_layers is None:
                raise ConfigError("config needs layer_types, or full_attn_idxs with num_hidden_layers")
            layer_types = [LAYER_ATTN if i in set(attn_idxs) else LAYER_CONV for i in range(int(n_layers))]
        layer_types = tuple(str(t) for t in layer_types)
        if n_layers is not None and int(n_layers) != len(layer_types):
            raise ConfigError(
                f"layer_types has {len(layer_types)} entries but num_hidden_layers is {int(n_layers)}"
            )
        if attn_idxs is not None and raw.get("layer_types") is not None:
            derived = [i for i, t in enumerate(layer_types) if t == LAYER_ATTN]
            if sorted(int(i) for i in attn_idxs) != derived:
                raise ConfigError(f"full_attn_idxs {list(attn_idxs)} disagrees with layer_types ({derived})")

        ff_raw = _first(raw, "intermediate_size", "block_ff_dim")
        if ff_raw is None:
            raise ConfigError("config needs intermediate_size (or block_ff_dim)")
        auto = bool(_first(raw, "block_auto_adjust_ff_dim", default=model_type == "lfm2"))
        ff = effective_ff_dim(
            int(ff_raw),
            auto and model_type == "lfm2",
            _first(raw, "block_ffn_dim_multiplier"),
            int(_first(raw, "block_multiple_of", default=256)),
        )
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        theta = _first(rope, "rope_theta") if isinstance(rope, dict) else None
        theta = theta if theta is not None else _first(raw, "rope_theta", "theta", default=1e6)
        eos = _first(raw, "eos_token_id", default=7)
        if isinstance(eos, list):
            eos = eos[0]
        kw: dict[str, Any] = dict(
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=ff,
            num_attention_heads=int(_first(raw, "num_attention_heads", "num_heads")),
            num_key_value_heads=int(
                _first(raw, "num_key_value_heads", "num_kv_heads", "num_attention_heads")
            ),
            layer_types=layer_types,
            conv_L_cache=int(_first(raw, "conv_L_cache", default=3)),
            conv_bias=bool(_first(raw, "conv_bias", default=False)),
            norm_eps=float(_first(raw, "norm_eps", "rms_norm_eps", default=1e-5)),
            rope_theta=float(theta),
            max_position_embeddings=int(_first(raw, "max_position_embeddings", default=128000)),
            tie_word_embeddings=bool(_first(raw, "tie_word_embeddings", "tie_embedding", default=True)),
            bos_token_id=int(_first(raw, "bos_token_id", default=1)),
            eos_token_id=int(eos),
            pad_token_id=int(_first(raw, "pad_token_id", default=0)),
        )
        if model_type == "lfm2_moe":
            kw.update(
                num_dense_layers=int(_first(raw, "num_dense_layers", default=0)),
                num_experts=int(raw["num_experts"]),
                num_experts_per_tok=int(raw["num_experts_per_tok"]),
                moe_intermediate_size=int(raw["moe_intermediate_size"]),
                use_expert_bias=bool(_first(raw, "use_expert_bias", default=True)),
                norm_topk_prob=bool(_first(raw, "norm_topk_prob", default=True)),
                routed_scaling_factor=float(_first(raw, "routed_scaling_factor", default=1.0)),
            )
    except KeyError as e:
        raise ConfigError(f"config.json is missing required key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.json has a malformed value: {e}") from None
    return Lfm2Config(**kw)
