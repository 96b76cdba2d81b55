"""Small trained checkpoints for the default suite's whole-artifact tests: a few decoder layers of a bundled
model (`tiny`, `tiny-moe`) with its embedding, norm and tokenizer, written as a checkpoint folder the loader
reads like any other. A slice exports in a fraction of the bundled model's time (lowering and conversion
cost grows with the layers), and its weights are trained ones, so its logits are a trained model's (peaked,
not a random initialisation's near-uniform ones). Two slices of other layers of the same model have the same
shapes: one is the other's "another checkpoint of the same architecture" (same embedding and head)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from lfm_export.loading import BUNDLED

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def write_slice(model: str, folder: Path, layers: Sequence[int]) -> Path:
    """Write the decoder layers `layers` of the bundled `model`, renumbered from 0, into `folder` (config,
    `model.safetensors`, tokenizer files). MoE models keep as dense the kept layers that were dense, which
    must come first. Returns `folder`."""
    from safetensors.numpy import load_file, save_file

    src = BUNDLED[model]
    cfg = json.loads((src / "config.json").read_text())
    new = {old: i for i, old in enumerate(layers)}
    out = {}
    for key, value in load_file(src / "model.safetensors").items():
        if key.startswith("model.layers."):
            old = int(key.split(".")[2])
            if old not in new:
                continue
            key = key.replace(f"model.layers.{old}.", f"model.layers.{new[old]}.", 1)
        out[key] = value
    types = [cfg["layer_types"][i] for i in layers]
    cfg.update(
        num_hidden_layers=len(layers),
        layer_types=types,
        full_attn_idxs=[i for i, t in enumerate(types) if t == "full_attention"],
    )
    if "num_dense_layers" in cfg:
        dense = [i < cfg["num_dense_layers"] for i in layers]
        assert dense == sorted(dense, reverse=True), f"dense layers must come first: {layers}"
        cfg["num_dense_layers"] = sum(dense)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, folder / name)
    return folder


def copy_artifact(sliced: dict, name: str) -> Path:
    """A copy of a slice fixture's artifact (`sliced["out"]`) under its root, named `name`, to tamper with."""
    dest = sliced["root"] / name
    shutil.copytree(sliced["out"], dest)
    return dest
