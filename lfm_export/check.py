"""`lfm-export check`: does our canonical model compute what transformers computes on the same checkpoint?

Three comparisons, all at fp32: a full prefill, greedy decode with state carried (both models are fed the
canonical model's greedy tokens, so one early difference cannot cascade), and a chunked prefill of the
canonical model against transformers' full prefill.

The two sides share nothing but the checkpoint folder: transformers reads `config.json` and the weights itself
(`AutoModelForCausalLM.from_pretrained`), so a key our config parser misreads or ignores shows up as a logit
difference. Only when transformers cannot load a config in the original Liquid key style (`block_dim`,
`block_ff_dim`, ...: transformers 5.24 takes its default widths and refuses the weights) does our parsed
config reach transformers; the result says so (`reference_config`). A model without a folder
(`random:PRESET`) is built from our config as well.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lfm_export.contract.errors import UnsupportedError
from lfm_export.loading import LoadedModel

DEFAULT_TOLERANCE = 1e-4
OWN_CONFIG = "transformers"
"""`CheckResult.reference_config` when transformers parsed `config.json` itself."""
LIQUID_KEYS = ("block_dim", "block_ff_dim")
"""Keys of the original Liquid config style in place of transformers' `hidden_size` / `intermediate_size`."""


@dataclass
class CheckResult:
    model: str
    max_abs_error: float
    tolerance: float
    passed: bool
    parts: dict[str, float] = field(default_factory=dict)
    prompt_tokens: int = 0
    decode_steps: int = 0
    greedy_match: bool = True
    transformers_version: str = ""
    reference_config: str = OWN_CONFIG
    """Who parsed the config of transformers' side: "transformers", or why lfm-export's parse was used."""
    reference_class: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UnsupportedError(
            "`check` needs transformers (pip install 'lfm-export[test]' or pip install transformers)"
        ) from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def liquid_style(folder: Path) -> bool:
    """Whether `folder/config.json` uses the original Liquid keys instead of transformers' widths."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and "hidden_size" not in raw and any(k in raw for k in LIQUID_KEYS)


def transformers_model(loaded: LoadedModel) -> tuple[torch.nn.Module, str]:
    """transformers' own model on the same checkpoint in fp32, and who parsed its config (see the module)."""
    transformers = _transformers()
    cfg = loaded.config
    fallback = "lfm-export (no checkpoint folder: config and weights are lfm-export's)"
    if loaded.path is not None:
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(loaded.path), dtype=torch.float32)
            return model.eval(), OWN_CONFIG
        except Exception as e:  # transformers raises many types (size mismatch, strict config validation)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if not liquid_style(loaded.path):
                raise UnsupportedError(
                    f"transformers cannot load {loaded.path} with its own config.json: {reason}"
                ) from None
            fallback = f"lfm-export (config.json uses the original Liquid keys; transformers: {reason})"
    cls_name = "Lfm2MoeForCausalLM" if cfg.is_moe else "Lfm2ForCausalLM"
    if not hasattr(transformers, cls_name):
        raise UnsupportedError(f"installed transformers {transformers.__version__} has no {cls_name}")
    model_cls = getattr(transformers, cls_name)
    hf_cfg = getattr(transformers, "Lfm2MoeConfig" if cfg.is_moe else "Lfm2Config")(**cfg.to_hf_dict())
    if loaded.path is not None:
        return model_cls.from_pretrained(
            str(loaded.path), config=hf_cfg, dtype=torch.float32
        ).eval(), fallback
    model = model_cls(hf_cfg).to(torch.float32)
    missing, unexpected = model.load_state_dict(loaded.model.state_dict(), strict=False)
    real_missing = [k for k in missing if k != "lm_head.weight"]
    if real_missing or unexpected:
        raise UnsupportedError(
            f"cannot map weights onto transformers' model: {real_missing[:3] or unexpected[:3]}"
        )
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval(), fallback


def run_check(
    loaded: LoadedModel, prompt_ids: list[int], decode_steps: int = 32, tolerance: float = DEFAULT_TOLERANCE
) -> CheckResult:
    transformers = _transformers()
    if len(prompt_ids) < 2:
        raise UnsupportedError(
            "check needs a prompt of at least 2 tokens (transformers' 1-token conv state differs)"
        )
    ours = loaded.model.float()
    hf, reference_config = transformers_model(loaded)
    # transformers 5.x renamed the cache argument and output `past_key_values` -> `cache`.
    cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    ids = torch.tensor([prompt_ids], dtype=torch.int64)
    parts: dict[str, float] = {}
    with torch.no_grad():
        conv, keys, values = ours.empty_state(1)
        logits, conv, keys, values = ours(ids, conv, keys, values)
        hf_out = hf(input_ids=ids, use_cache=True)
        parts["prefill"] = (logits - hf_out.logits).abs().max().item()
        cache = getattr(hf_out, cache_kw)

        ours_tokens, hf_tokens = [], []
        decode_err = 0.0
        nxt = logits[:, -1].argmax(-1)
        hf_next = hf_out.logits[:, -1].argmax(-1)
        for _ in range(decode_steps):
            ours_tokens.append(int(nxt))
            hf_tokens.append(int(hf_next))
            step = nxt.view(1, 1)
            logits, conv, keys, values = ours(step, conv, keys, values)
            hf_out = hf(input_ids=step, use_cache=True, **{cache_kw: cache})
            cache = getattr(hf_out, cache_kw)
            decode_err = max(decode_err, (logits - hf_out.logits).abs().max().item())
            nxt = logits[:, -1].argmax(-1)
            hf_next = hf_out.logits[:, -1].argmax(-1)
        parts["decode"] = decode_err

        full_ref = hf(input_ids=ids, use_cache=False).logits
        cut = [0, max(1, len(prompt_ids) // 3), max(2, 2 * len(prompt_ids) // 3), len(prompt_ids)]
        conv, keys, values = ours.empty_state(1)
        chunks = []
        for a, b in zip(cut, cut[1:]):
            if b > a:
                out, conv, keys, values = ours(ids[:, a:b], conv, keys, values)
                chunks.append(out)
        parts["chunked_prefill"] = (torch.cat(chunks, dim=1) - full_ref).abs().max().item()

    worst = max(parts.values())
    return CheckResult(
        model=loaded.source,
        max_abs_error=worst,
        tolerance=tolerance,
        passed=worst <= tolerance,
        parts=parts,
        prompt_tokens=len(prompt_ids),
        decode_steps=decode_steps,
        greedy_match=ours_tokens == hf_tokens,
        transformers_version=transformers.__version__,
        reference_config=reference_config,
        reference_class=type(hf).__name__,
    )


def small_shape(kind: str) -> dict[str, Any]:
    """Transformers config kwargs of a small LFM2 checkpoint, `dense` (4 layers, hidden 128) or `moe` (3 layers,
    hidden 64, 4 experts top-2, one dense layer, expert bias), every width a multiple of 32 so block-32
    quantization applies to every weight: the shapes the tests and `benchmarks/detection_limits.py` write with
    `save_random_transformers` (a fresh dict each call)."""
    if kind == "moe":
        return dict(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            num_dense_layers=1,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            layer_types=["conv", "full_attention", "conv"],
            use_expert_bias=True,
        )
    return dict(
        vocab_size=320,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["conv", "full_attention", "conv", "full_attention"],
        block_auto_adjust_ff_dim=False,
    )


def save_random_transformers(folder: Path, kwargs: dict[str, Any], dtype: torch.dtype, seed: int) -> Path:
    """A random transformers `Lfm2ForCausalLM` / `Lfm2MoeForCausalLM` (MoE when `num_experts` is given) with
    perturbed norm weights and a non-zero expert bias, saved by `save_pretrained` in `dtype`."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    if "num_experts" in kwargs:
        model = transformers.Lfm2MoeForCausalLM(transformers.Lfm2MoeConfig(**kwargs))
        with torch.no_grad():  # a non-zero expert bias so that routing by biased scores is exercised
            for layer in model.model.layers[model.config.num_dense_layers :]:
                if getattr(layer.feed_forward, "expert_bias", None) is not None:
                    layer.feed_forward.expert_bias.copy_(torch.linspace(-0.05, 0.05, kwargs["num_experts"]))
    else:
        model = transformers.Lfm2ForCausalLM(transformers.Lfm2Config(**kwargs))
    with torch.no_grad():  # break the all-ones norm init so norm weights are checked too
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.to(dtype).save_pretrained(folder)
    return folder
