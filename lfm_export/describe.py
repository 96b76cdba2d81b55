"""`lfm-export inspect`'s text: an artifact's manifest, or a model's config, as indented lines."""

from __future__ import annotations

from typing import Any

_SHOWN_FIRST = ("backend", "recipe", "model", "max_seq_len", "parity", "files", "total_bytes", "signature")
_NOT_SHOWN = ("schema_version", "config")
"""`config` repeats the model's config.json (`--json` shows it); the rest of the manifest is shown as is."""


def manifest_lines(m: dict[str, Any]) -> list[str]:
    """A manifest of any backend as text: the common entries first, then every other key as it is stored."""
    recipe = m.get("recipe") if isinstance(m.get("recipe"), dict) else {"name": m.get("recipe")}
    lines = [f"backend   {m.get('backend')}"]
    lines += _headed("recipe", str(recipe.get("name")), {k: v for k, v in recipe.items() if k != "name"})
    model = dict(m.get("model") or {})
    random = "  (RANDOM WEIGHTS)" if model.pop("random_weights", False) else ""
    lines += _headed("model", f"{model.pop('source', '?')}{random}", model)
    if m.get("max_seq_len") is not None:
        lines.append(f"context   {m['max_seq_len']} tokens")
    lines += _parity_lines(m.get("parity"))
    files = m.get("files") or []
    lines.append(f"files     {len(files)}, {(m.get('total_bytes') or 0) / 1e6:.2f} MB")
    for f in files:
        if isinstance(f, dict):
            lines.append(f"  {f.get('path', '?'):<40} {f.get('bytes', 0):>14,} B")
        else:
            lines.append(f"  {f}")
    lines += _signature_lines(m.get("signature") or {})
    for key, value in m.items():
        if key not in _SHOWN_FIRST and key not in _NOT_SHOWN:
            lines += _tree(key, value)
    return lines


def _parity_lines(p: Any) -> list[str]:
    if not isinstance(p, dict) or "passed" not in p:
        status = p.get("status", "not run") if isinstance(p, dict) else "not run"
        return [f"parity    {status}"]
    title = str(p.get("verdict") or ("PASSED" if p["passed"] else "FAILED"))
    return _headed("parity", title, {k: v for k, v in p.items() if k not in ("passed", "verdict")})


def _signature_lines(sig: dict[str, Any]) -> list[str]:
    """Inputs, outputs and other tensor lists (such as `held` state) of a signature, then its other keys."""
    groups = {
        k: v for k, v in sig.items() if isinstance(v, list | tuple) and all(isinstance(s, dict) for s in v)
    }
    other = {k: v for k, v in sig.items() if k not in groups and k != "form"}
    lines = _headed("signature", f"{sig.get('form', '?')} form", other)
    for group, specs in groups.items():  # an empty group (no held state) shows nothing
        label = {"inputs": "in", "outputs": "out"}.get(group, group)
        for s in specs:
            shape = ", ".join(map(str, s.get("shape", [])))
            lines.append(f"  {label:<5} {s.get('name', '?'):<28} {s.get('dtype', ''):<8} [{shape}]")
    return lines


def _headed(key: str, title: str, fields: dict[str, Any]) -> list[str]:
    """`key title (fields inline)` when it fits in 110 characters, else `key title` and the fields below."""
    line = f"{key.ljust(9)} {title}" + (f"  ({_inline(fields)})" if fields else "")
    if len(line) <= 110:
        return [line]
    return [f"{key.ljust(9)} {title}", *(sub for k, v in fields.items() for sub in _tree(str(k), v, 1))]


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_inline(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _tree(key: str, value: Any, depth: int = 0) -> list[str]:
    """`key value` on one line when it fits in 110 characters, else `key` and its entries indented below."""
    pad = "  " * depth
    line = f"{pad}{key.ljust(9 - len(pad))} {_inline(value)}"
    if len(line) <= 110 or not isinstance(value, dict | list):
        return [line]
    items = value.items() if isinstance(value, dict) else enumerate(value)
    return [f"{pad}{key}", *(sub for k, v in items for sub in _tree(str(k), v, depth + 1))]


def model_lines(target: str, info: dict[str, Any]) -> list[str]:
    """A model's config and I/O signature (`info`: `config`, `signature`) as text lines."""
    return [f"model     {target}", *_tree("config", info["config"]), *_signature_lines(info["signature"])]


def preset_rows() -> list[dict[str, Any]]:
    """One row per built-in architecture, parameter counts computed from its config (`lfm-export presets`)."""
    from lfm_export.presets import PRESETS

    rows = []
    for p in PRESETS.values():
        c = p.config
        rows.append(
            {
                "name": p.name,
                "params": p.params,
                "active_params": p.active_params,
                "published": p.published_label,
                "published_params": p.published_params,
                "model_type": c.model_type,
                "hidden_size": c.hidden_size,
                "layers": c.num_hidden_layers,
                "attention_layers": c.attn_layers,
                "heads": c.num_attention_heads,
                "kv_heads": c.num_key_value_heads,
                "ffn": c.intermediate_size,
                "vocab_size": c.vocab_size,
                "experts": f"{c.num_experts} x {c.moe_intermediate_size}, top-{c.num_experts_per_tok}"
                if c.is_moe
                else "",
                "unconfirmed": list(p.unconfirmed),
                "aliases": list(p.aliases),
                "notes": p.notes,
            }
        )
    return rows


def print_presets(rows: list[dict[str, Any]]) -> None:
    """`preset_rows()` as a table on stdout."""
    from rich.console import Console
    from rich.table import Table

    t = Table(
        "preset",
        "params",
        "active",
        "published",
        "layers (attn idx)",
        "heads/kv",
        "ffn",
        "vocab",
        "unconfirmed",
    )
    for r in rows:
        t.add_row(
            r["name"],
            f"{r['params']:,}",
            f"{r['active_params']:,}",
            r["published"],
            f"{r['layers']} ({','.join(map(str, r['attention_layers']))})",
            f"{r['heads']}/{r['kv_heads']}",
            r["experts"] or str(r["ffn"]),
            str(r["vocab_size"]),
            ", ".join(r["unconfirmed"]) or "-",
        )
    Console().print(t)
