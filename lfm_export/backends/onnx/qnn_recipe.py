"""`lfm-export onnx --target qnn`: the ONNX options that mean nothing for a QNN graph are refused, the rest becomes
a `lfm_export.backends.qnn.QnnRecipe` (exported by the `qnn` backend into a QDQ ONNX folder)."""

from __future__ import annotations

from typing import Any

from lfm_export.contract.errors import UserError

CPU_DEFAULTS = {"block_size": None, "ops": "ort", "asymmetric": False, "accuracy_level": 4}
"""The CPU-only options and their defaults: a QNN graph has per-channel weights and QDQ activations instead."""


def qnn_recipe(quant: str, max_seq_len: int | None, extra: dict[str, Any]) -> Any:
    from lfm_export.backends.qnn.recipes import make_recipe

    given = [f"--{k.replace('_', '-')}" for k, v in CPU_DEFAULTS.items() if extra.get(k, v) != v]
    if given:
        raise UserError(f"{', '.join(given)} apply to --target cpu only, not to --target qnn")
    return make_recipe(quant, extra.get("soc"), max_seq_len, bool(extra.get("context_binary")))
