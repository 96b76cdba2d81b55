"""The model card (`README.md` with Hugging Face front matter) every artifact folder carries.

The card is rendered from the manifest alone (`render_card`), so it says what the manifest says: the source
model and its hashes, the recipe, the parity verdict table, the size, and how to run the artifact with its
ecosystem's own runner (the backend record's `runner`) and with our shim. It is derived from the manifest like
the manifest is derived from the files, so the manifest does not list it (`lfm_export.manifest.file_entries`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lfm_export.manifest import CARD

_PARTS = ("exactness", "quality")
_METRICS = (
    ("kl_mean", "KL mean", ".2e"),
    ("logit_max_rel", "logit max rel", ".2e"),
    ("top1_agreement", "top-1", ".4f"),
    ("top1_decisive", "top-1 decisive", ".4f"),
)


def render_card(manifest: dict[str, Any], folder_name: str = ".") -> str:
    """The card's Markdown for an artifact with this manifest; `folder_name` is how the usage snippets name
    the artifact folder."""
    from lfm_export.backends import get as get_backend

    model = manifest.get("model", {})
    recipe = manifest.get("recipe", {})
    backend = manifest.get("backend", "?")
    runner = _runner(backend)
    recipe_name = recipe.get("name", "?")
    title = f"{model.get('name', model.get('source', '?'))}: {backend} {recipe_name}"
    lines = [*_front_matter(manifest, runner), f"# {title}", ""]
    lines += [
        f"Exported by lfm-export {manifest.get('tool', {}).get('versions', {}).get('lfm-export', '?')} on "
        f"{manifest.get('created', '?')}. Generated from `manifest.json`; `lfm-export inspect {folder_name}` "
        "shows the same facts.",
        "",
    ]
    if model.get("random_weights"):
        lines += ["**RANDOM WEIGHTS**: for size and speed work only; the text it writes means nothing.", ""]
    lines += _source(model)
    lines += _recipe(recipe, manifest.get("max_seq_len"))
    lines += _parity(manifest.get("parity", {}))
    lines += _size(manifest)
    lines += ["## How to run it", ""]
    if runner is not None:
        lines += [f"With {runner.name}:", "", f"```{runner.language}"]
        lines += [runner.code.replace("{folder}", folder_name), "```", ""]
    record = get_backend(backend) if _known(backend) else None
    install = f"lfm-export[runtime-{backend}]" if backend in ("onnx", "mlx") else "lfm-export"
    if record is not None and record.session is not None:
        lines += [
            f"With lfm-export's runtime shim (`pip install '{install}'`):",
            "",
            "```sh",
            f'lfm-export run {folder_name} --prompt "Once upon a time" --threads 2',
            f"lfm-export bench {folder_name} --prompt-len 256 --new-tokens 64",
            f"lfm-export parity {folder_name}   # re-check against the fp32 reference",
            "```",
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


def write_card(folder: Path, manifest: dict[str, Any] | None = None) -> Path:
    """Write `folder/README.md` from `manifest` (default: the folder's) atomically."""
    from lfm_export.contract.manifest import read_manifest

    folder = Path(folder)
    manifest = read_manifest(folder) if manifest is None else manifest
    target = folder / CARD
    tmp = folder / f".{CARD}.tmp"
    tmp.write_text(render_card(manifest, folder_name=_display_name(folder)))
    os.replace(tmp, target)
    return target


def _display_name(folder: Path) -> str:
    """The folder's name as the artifact will be called: a temporary export folder (`.NAME.tmp-XXXX`) says
    NAME."""
    name = folder.name
    if name.startswith(".") and ".tmp-" in name:
        name = name[1:].split(".tmp-", 1)[0]
    return name


def _known(backend: str) -> bool:
    from lfm_export.backends import all_backends

    return backend in all_backends()


def _runner(backend: str) -> Any:
    if not _known(backend):
        return None
    from lfm_export.backends import get as get_backend

    return get_backend(backend).runner


def _yaml_scalar(value: Any) -> str:
    """A YAML scalar: JSON's quoting is valid YAML for strings."""
    return json.dumps(value) if isinstance(value, str) else str(value).lower()


def _front_matter(manifest: dict[str, Any], runner: Any) -> list[str]:
    model = manifest.get("model", {})
    recipe = manifest.get("recipe", {})
    parity = manifest.get("parity", {})
    tags = ["lfm2", "liquid", "lfm-export", manifest.get("backend", "?"), recipe.get("name", "?")]
    lines = ["---", "pipeline_tag: text-generation"]
    if runner is not None:
        lines.append(f"library_name: {runner.library}")
    hub = model.get("hub")
    if hub:
        lines.append(f"base_model: {_yaml_scalar(hub['repo_id'])}")
    lines.append("tags:")
    lines += [f"  - {_yaml_scalar(t)}" for t in tags]
    lines.append("lfm_export:")
    lines.append(f"  backend: {_yaml_scalar(manifest.get('backend', '?'))}")
    lines.append(f"  recipe: {_yaml_scalar(recipe.get('name', '?'))}")
    lines.append(f"  source: {_yaml_scalar(str(model.get('source', '?')))}")
    if model.get("weights_sha256"):
        lines.append(f"  weights_sha256: {_yaml_scalar(model['weights_sha256'])}")
    passed = parity.get("passed")
    lines.append(
        f"  parity: {_yaml_scalar('not run' if passed is None else 'passed' if passed else 'failed')}"
    )
    lines.append(f"  total_bytes: {int(manifest.get('total_bytes') or 0)}")
    lines += ["---", ""]
    return lines


def _source(model: dict[str, Any]) -> list[str]:
    rows = [
        ("source", model.get("source")),
        ("model type", model.get("model_type")),
        ("weights dtype", model.get("weights_dtype")),
        ("config sha256", model.get("config_sha256")),
        ("weights sha256", model.get("weights_sha256") or "none (random weights)"),
    ]
    hub = model.get("hub")
    if hub:
        rows.insert(
            1, ("Hugging Face", f"{hub['repo_id']} @ {hub.get('revision')} (commit {hub.get('commit')})")
        )
    out = ["## Source model", "", "| | |", "|---|---|"]
    out += [f"| {k} | `{v}` |" for k, v in rows if v is not None]
    return [*out, ""]


def _recipe(recipe: dict[str, Any], max_seq_len: Any) -> list[str]:
    out = ["## Recipe", "", f"`{recipe.get('name', '?')}`, context {max_seq_len} tokens.", ""]
    simple = {k: v for k, v in recipe.items() if k != "name" and isinstance(v, str | int | float | bool)}
    if simple:
        out += ["| setting | value |", "|---|---|"]
        out += [f"| {k} | `{v}` |" for k, v in simple.items()]
        out.append("")
    kept = recipe.get("keep_float")
    if kept:
        out += [f"Kept in float: {', '.join(kept)}.", ""]
    return out


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _parity(parity: dict[str, Any]) -> list[str]:
    out = ["## Parity", ""]
    if parity.get("passed") is None:
        return [*out, "Parity was not run (`lfm-export parity FOLDER` runs it and rewrites this card).", ""]
    out += [f"**{parity.get('verdict', '')}**", ""]
    out += ["| part | against | gate | passed | " + " | ".join(t for _, t, _ in _METRICS) + " |"]
    out += ["|---" * (4 + len(_METRICS)) + "|"]
    for part in _PARTS:
        p = parity.get(part, {})
        pooled = p.get("pooled", {})
        cells = [_num(pooled.get(k), fmt) for k, _, fmt in _METRICS]
        out.append(
            f"| {part} | {p.get('against', '-')} | {p.get('gate') or '-'} | "
            f"{'yes' if p.get('passed') else 'NO'} | " + " | ".join(cells) + " |"
        )
    out.append("")
    scenarios = parity.get("scenarios", {})
    if scenarios:
        out += ["Scenarios: " + ", ".join(f"{k} {v}" for k, v in scenarios.items()) + ".", ""]
    for failure in parity.get("failures", []):
        out.append(f"- {failure}")
    if parity.get("failures"):
        out.append("")
    out += ["Full reports: `parity/parity.md`, `parity/parity.json`.", ""]
    return out


def _size(manifest: dict[str, Any]) -> list[str]:
    files = manifest.get("files", [])
    total = int(manifest.get("total_bytes") or 0)
    out = ["## Files", "", f"{total / 1e6:.2f} MB in {len(files)} files.", "", "| file | bytes | sha256 |"]
    out.append("|---|---|---|")
    out += [f"| `{f['path']}` | {f['bytes']} | `{f['sha256'][:16]}` |" for f in files]
    return [*out, ""]
