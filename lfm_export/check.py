"""`lfm-export check`: does our canonical model compute what transformers computes on the same checkpoint?

Three comparisons, all at fp32: a full prefill, greedy decode with state carried (both models are fed the
canonical model's greedy tokens, so one early difference cannot cascade), and a chunked prefill of the canonical
model against transformers' full prefill.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lfm_export.errors import UnsupportedError
from lfm_export.loading import LoadedModel

DEFAULT_TOLERANCE = 1e-4


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def transformers_model(loaded: LoadedModel) -> torch.nn.Module:
    """transformers' own model on the same weights: loaded by transformers from the folder when there is one."""
    try:
        import transformers
    except ImportError:
        raise UnsupportedError(
            "`check` needs transformers (pip install 'lfm-export[test]' or pip install transformers)"
        ) from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cfg = loaded.config
    cls_name = "Lfm2MoeForCausalLM" if cfg.is_moe else "Lfm2ForCausalLM"
    cfg_name = "Lfm2MoeConfig" if cfg.is_moe else "Lfm2Config"
    if not hasattr(transformers, cls_name):
        raise UnsupportedError(f"installed transformers {transformers.__version__} has no {cls_name}")
    model_cls = getattr(transformers, cls_name)
    # Our parsed config, in transformers' key style: published configs in the original Liquid style
    # (block_ff_dim, full_attn_idxs, ...) are not all understood by every transformers version.
    hf_cfg = getattr(transformers, cfg_name)(**cfg.to_hf_dict())
    if loaded.path is not None:
        model = model_cls.from_pretrained(str(loaded.path), config=hf_cfg, dtype=torch.float32)
    else:
        model = model_cls(hf_cfg).to(torch.float32)
        missing, unexpected = model.load_state_dict(loaded.model.state_dict(), strict=False)
        real_missing = [k for k in missing if k != "lm_head.weight"]
        if real_missing or unexpected:
            raise UnsupportedError(
                f"cannot map weights onto transformers' model: {real_missing[:3] or unexpected[:3]}"
            )
        if cfg.tie_word_embeddings:
            model.tie_weights()
    return model.eval()


def run_check(
    loaded: LoadedModel, prompt_ids: list[int], decode_steps: int = 32, tolerance: float = DEFAULT_TOLERANCE
) -> CheckResult:
    import transformers

    if len(prompt_ids) < 2:
        raise UnsupportedError(
            "check needs a prompt of at least 2 tokens (transformers' 1-token conv state differs)"
        )
    ours = loaded.model.float()
    hf = transformers_model(loaded)
    ids = torch.tensor([prompt_ids], dtype=torch.int64)
    parts: dict[str, float] = {}
    with torch.no_grad():
        conv, keys, values = ours.empty_state(1)
        logits, conv, keys, values = ours(ids, conv, keys, values)
        hf_out = hf(input_ids=ids, use_cache=True)
        parts["prefill"] = (logits - hf_out.logits).abs().max().item()
        cache = hf_out.past_key_values

        ours_tokens, hf_tokens = [], []
        decode_err = 0.0
        nxt = logits[:, -1].argmax(-1)
        hf_next = hf_out.logits[:, -1].argmax(-1)
        for _ in range(decode_steps):
            ours_tokens.append(int(nxt))
            hf_tokens.append(int(hf_next))
            step = nxt.view(1, 1)
            logits, conv, keys, values = ours(step, conv, keys, values)
            hf_out = hf(input_ids=step, past_key_values=cache, use_cache=True)
            cache = hf_out.past_key_values
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
    )
