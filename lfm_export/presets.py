"""Architectures of every released LFM2 / LFM2.5 model, with the values no published config confirms."""

from __future__ import annotations

from dataclasses import dataclass, field

from lfm_export.config import LAYER_ATTN, LAYER_CONV, Lfm2Config
from lfm_export.contract.errors import UserError


def _layers(n: int, attn: tuple[int, ...]) -> tuple[str, ...]:
    return tuple(LAYER_ATTN if i in attn else LAYER_CONV for i in range(n))


@dataclass(frozen=True)
class Preset:
    name: str
    config: Lfm2Config
    published_params: int | None = None
    """Exact count from the model card where one is published; None when only a rounded figure exists."""
    published_label: str = ""
    unconfirmed: tuple[str, ...] = ()
    notes: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def params(self) -> int:
        return param_count(self.config)

    @property
    def active_params(self) -> int:
        return param_count(self.config, active_only=True)


def param_count(cfg: Lfm2Config, active_only: bool = False) -> int:
    """Parameters of the architecture, counted from the config (tied lm_head counted once)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    kv = cfg.num_key_value_heads * hd
    total = cfg.vocab_size * h + h  # embeddings + final norm
    if not cfg.tie_word_embeddings:
        total += cfg.vocab_size * h
    for i, kind in enumerate(cfg.layer_types):
        total += 2 * h  # operator_norm + ffn_norm
        if kind == LAYER_CONV:
            total += 3 * h * h + h * cfg.conv_L_cache + h * h + (4 * h if cfg.conv_bias else 0)
        else:
            total += 2 * h * h + 2 * h * kv + 2 * hd
        if cfg.is_moe_layer(i):
            experts = cfg.num_experts_per_tok if active_only else cfg.num_experts
            total += experts * 3 * h * cfg.moe_intermediate_size + cfg.num_experts * h
            if cfg.use_expert_bias:
                total += cfg.num_experts
        else:
            total += 3 * h * cfg.intermediate_size
    return total


_DENSE_16 = _layers(16, (2, 5, 8, 10, 12, 14))
_MOE_24 = _layers(24, (2, 6, 10, 14, 18, 21))
_MOE = dict(
    model_type="lfm2_moe",
    hidden_size=2048,
    intermediate_size=7168,
    num_attention_heads=32,
    num_key_value_heads=8,
    layer_types=_MOE_24,
    num_dense_layers=2,
    num_experts=32,
    num_experts_per_tok=4,
    moe_intermediate_size=1792,
    use_expert_bias=True,
    norm_topk_prob=True,
    routed_scaling_factor=1.0,
)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "lfm2-350m",
            Lfm2Config(
                hidden_size=1024, intermediate_size=4608, num_attention_heads=16, layer_types=_DENSE_16
            ),
            published_params=354_483_968,
            published_label="354M",
        ),
        Preset(
            "lfm2-700m",
            Lfm2Config(
                hidden_size=1536, intermediate_size=6912, num_attention_heads=24, layer_types=_DENSE_16
            ),
            published_params=742_489_344,
            published_label="742M",
        ),
        Preset(
            "lfm2-1.2b",
            Lfm2Config(
                hidden_size=2048, intermediate_size=8192, num_attention_heads=32, layer_types=_DENSE_16
            ),
            published_params=1_170_340_608,
            published_label="1.17B",
        ),
        Preset(
            "lfm2-8b-a1b",
            Lfm2Config(**_MOE),
            published_label="8.3B total / 1.5B active",
        ),
        Preset(
            "lfm2.5-230m",
            Lfm2Config(
                hidden_size=1024,
                intermediate_size=2560,
                num_attention_heads=16,
                layer_types=_layers(14, (2, 4, 6, 8, 10, 12)),
            ),
            published_label="230M",
            unconfirmed=("intermediate_size",),
            notes="FFN width 2560 is from third-party benchmarks; no published config seen",
        ),
        Preset(
            "lfm2.5-350m",
            Lfm2Config(
                hidden_size=1024, intermediate_size=4608, num_attention_heads=16, layer_types=_DENSE_16
            ),
            published_label="350M",
        ),
        Preset(
            "lfm2.5-1.2b",
            Lfm2Config(
                hidden_size=2048, intermediate_size=8192, num_attention_heads=32, layer_types=_DENSE_16
            ),
            published_params=1_170_340_608,
            published_label="1.17B",
            notes="shared by LFM2.5-1.2B Base, Instruct, Thinking and JP",
            aliases=("lfm2.5-1.2b-base", "lfm2.5-1.2b-instruct", "lfm2.5-1.2b-thinking", "lfm2.5-1.2b-jp"),
        ),
        Preset(
            "lfm2.5-8b-a1b",
            Lfm2Config(**{**_MOE, "vocab_size": 128000, "max_position_embeddings": 131072}),
            published_label="8.3B total / 1.5B active",
            unconfirmed=("layer_types", "rope_theta", "moe_intermediate_size", "intermediate_size"),
            notes="assumed to follow LFM2-8B-A1B apart from the 128k vocabulary and 131072 context",
        ),
    ]
}


def get_preset(name: str) -> Preset:
    key = name.lower()
    for p in PRESETS.values():
        if key == p.name or key in p.aliases:
            return p
    raise UserError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
