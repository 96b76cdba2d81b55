"""Activation-aware scaling (`-awq`, AWQ-style), folded into the RMSNorm weight that precedes the linears.

A linear's input channels differ in size; rounding error on a weight column matters in proportion to its
input channel. Per RMSNorm that feeds linears directly (a layer's `operator_norm` into a conv block's
`in_proj` or attention's `q/k/v_proj`; its `ffn_norm` into the MLP's `w1/w3`, or an MoE layer's router and
every expert's `w1/w3`), a per-channel scale `s = mean|x|^alpha` (normalised so that
`sqrt(max(s) * min(s)) = 1`) multiplies those linears' weight columns and divides the norm's weight: the
float model computes the same function (up to float32 rounding), and the quantizer then rounds the larger
columns more finely. `alpha` is searched per norm over `ALPHAS` (0 = no scaling, so the chosen one is never
worse on the search's measure): the squared error of the linears' outputs on calibration tokens, with each
weight quantized as the recipe holds it (`lfm_export.precision`, plain rounding).

The transform is a weight transform, not a graph change: `scaled_source` gives the export the scaled weights
(every backend reads its weights from the source), `scaled_model` gives the simulation the same tensors
(one function, `scaled_tensor`, makes both), and parity's fp32 reference keeps the original weights. The
scales are recorded in the manifest (`awq`), so a check in another process rebuilds the same tensors.
"""

from __future__ import annotations

import base64
import copy
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lfm_export.config import Lfm2Config
from lfm_export.loading import LoadedModel
from lfm_export.precision import block_as, held_as
from lfm_export.recipes import CALIBRATED_ROUNDINGS, Recipe
from lfm_export.weights import WeightSource, lazy_model

ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))
SEARCH_TOKENS = 512
"""Calibration tokens (evenly spaced) whose linear outputs the alpha search compares."""


def consumers(cfg: Lfm2Config) -> dict[str, list[str]]:
    """Each foldable RMSNorm weight and the linears that read its output directly."""
    out: dict[str, list[str]] = {}
    for i, kind in enumerate(cfg.layer_types):
        p = f"model.layers.{i}"
        if kind == "full_attention":
            mixer = [f"{p}.self_attn.{w}_proj.weight" for w in "qkv"]
        else:
            mixer = [f"{p}.conv.in_proj.weight"]
        out[f"{p}.operator_norm.weight"] = mixer
        if cfg.is_moe_layer(i):
            experts = [
                f"{p}.feed_forward.experts.{e}.{w}.weight"
                for e in range(cfg.num_experts)
                for w in ("w1", "w3")
            ]
            out[f"{p}.ffn_norm.weight"] = [f"{p}.feed_forward.gate.weight", *experts]
        else:
            out[f"{p}.ffn_norm.weight"] = [f"{p}.feed_forward.w1.weight", f"{p}.feed_forward.w3.weight"]
    return out


def scaled_tensor(name: str, t: Tensor, scales: dict[str, Tensor], readers: dict[str, str]) -> Tensor:
    """Tensor `name` after the fold: a norm weight divided by its scales, a reader's columns multiplied by its
    norm's (float32 arithmetic, back to `t`'s dtype); any other tensor as it is."""
    if name in scales:
        return (t.float() / scales[name]).to(t.dtype)
    norm = readers.get(name)
    if norm is not None:
        return (t.float() * scales[norm][None, :]).to(t.dtype)
    return t


def _readers(cfg: Lfm2Config, scales: dict[str, Tensor]) -> dict[str, str]:
    return {lin: norm for norm, lins in consumers(cfg).items() if norm in scales for lin in lins}


class ScaledSource(WeightSource):
    """`base` with the fold applied to the tensors it touches (`scaled_tensor`), one tensor at a time."""

    def __init__(self, base: WeightSource, cfg: Lfm2Config, scales: dict[str, Tensor]) -> None:
        super().__init__(base.shapes, base.dtype, bool(base.aliases))
        self.shapes = dict(base.shapes)
        self.aliases = dict(base.aliases)
        self.base, self.scales, self.readers = base, scales, _readers(cfg, scales)

    def _make(self, name: str, dtype: torch.dtype) -> Tensor:
        return scaled_tensor(name, self.base.get(name), self.scales, self.readers)


def scaled_model(model: nn.Module, cfg: Lfm2Config, scales: dict[str, Tensor]) -> nn.Module:
    """A copy of `model` (real weights) sharing every tensor the fold leaves alone."""
    readers = _readers(cfg, scales)
    keep = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    out = copy.deepcopy(model, memo=dict(keep))
    with torch.no_grad():
        for name, p in list(out.named_parameters()):
            if name in scales or name in readers:
                owner, _, attr = name.rpartition(".")
                setattr(
                    out.get_submodule(owner),
                    attr,
                    nn.Parameter(scaled_tensor(name, p.detach(), scales, readers), requires_grad=False),
                )
    return out.eval()


def scaled_loaded(loaded: LoadedModel, scales: dict[str, Tensor]) -> LoadedModel:
    """`loaded` whose weights (lazy source or real tensors) are the folded ones; its identity is the original's."""
    import dataclasses

    if loaded.weights is not None:
        source = ScaledSource(loaded.weights, loaded.config, scales)
        return dataclasses.replace(loaded, model=lazy_model(loaded.config, source), weights=source)
    return dataclasses.replace(loaded, model=scaled_model(loaded.model, loaded.config, scales))


def search(
    loaded: LoadedModel, recipe: Recipe, text_file: Path | None = None, tokens: int | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The scales of every foldable norm (`consumers`) for `recipe` and the manifest's `awq` entry."""
    from lfm_export.calibrate import DEFAULT_TOKENS, calibration_ids
    from lfm_export.quant import quantize_block

    cfg = loaded.config
    ids, label, digest = calibration_ids(loaded, text_file, tokens or DEFAULT_TOKENS)
    ref = loaded.materialized().model
    inputs: dict[str, Tensor] = {}
    hooks = []
    for norm in consumers(cfg):
        module = ref.get_submodule(norm.removesuffix(".weight"))
        hooks.append(module.register_forward_hook(_keep(inputs, norm)))
    try:
        with torch.no_grad():
            batch = torch.from_numpy(ids)
            ref(batch, *ref.empty_state(batch=batch.shape[0]))
    finally:
        for h in hooks:
            h.remove()
    params = dict(ref.named_parameters(remove_duplicate=False))
    rounding = "nearest" if recipe.rounding in CALIBRATED_ROUNDINGS else recipe.rounding
    scales: dict[str, Tensor] = {}
    alphas: dict[str, float] = {}
    gains: dict[str, float] = {}
    for norm, lins in consumers(cfg).items():
        x = inputs.pop(norm).reshape(-1, cfg.hidden_size).float()
        stat = x.abs().mean(0).clamp(min=1e-6)
        pick = torch.linspace(0, x.shape[0] - 1, min(SEARCH_TOKENS, x.shape[0])).long()
        xs = x[pick]
        quantized = [n for n in lins if held_as(n, recipe) is not None]
        weights = {n: params[n].detach().float() for n in quantized}
        exact = {n: xs @ w.T for n, w in weights.items()}
        best: tuple[float, float, Tensor] | None = None
        plain = None
        for alpha in ALPHAS:
            s = stat.pow(alpha)
            s = s / (s.max() * s.min()).sqrt()
            err = 0.0
            for n, w in weights.items():
                bits = held_as(n, recipe)
                assert bits is not None
                q = quantize_block(
                    (w * s[None, :]).numpy(),
                    bits,
                    block_as(n, recipe, w.shape[1]),
                    recipe.symmetric,
                    rounding,
                )
                got = (xs / s[None, :]) @ torch.from_numpy(q.dequantize()).T
                err += float(((got - exact[n]) ** 2).sum())
            if plain is None:
                plain = err
            if best is None or err < best[0]:
                best = (err, alpha, s)
        assert best is not None and plain is not None
        err, alpha, s = best
        alphas[norm] = alpha
        gains[norm] = round(err / plain, 4) if plain > 0 else 1.0
        if alpha > 0:
            scales[norm] = s.float().contiguous()
    entry = {
        "corpus": label,
        "corpus_sha256": digest,
        "tokens": int(ids.size),
        "alpha": alphas,
        "output_error_vs_unscaled": gains,
        "scales_f32_base64": {n: base64.b64encode(s.numpy().tobytes()).decode() for n, s in scales.items()},
    }
    return scales, entry


def _keep(store: dict[str, Tensor], norm: str) -> Any:
    def hook(_mod: nn.Module, _args: Any, out: Tensor) -> None:
        store[norm] = out.detach()

    return hook


def scales_from_manifest(manifest: dict[str, Any]) -> dict[str, Tensor] | None:
    """The scales an artifact was exported with (None for an artifact without `-awq`)."""
    entry = manifest.get("awq")
    if not entry:
        return None
    return {
        n: torch.from_numpy(np.frombuffer(base64.b64decode(b), np.float32).copy())
        for n, b in entry["scales_f32_base64"].items()
    }
