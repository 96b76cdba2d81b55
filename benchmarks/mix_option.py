"""`--mix` of the decode side-by-side scripts: a precision mix as `(pattern, bits, block)` triples."""

from __future__ import annotations

TABLE = ("model.embed_tokens.weight", "lm_head.weight")
"""The token table and the head: `default` holds them at int8-b128, as the budgets chose on `small`."""


def parse_mix(text: str, default: tuple[tuple[str, int, int], ...]) -> tuple[tuple[str, int, int], ...]:
    """`default` (the script's mix and the int8-b128 table), `none`, or `PATTERN=BITS/BLOCK,...`."""
    if text == "none":
        return ()
    if text == "default":
        return (*default, *((t, 8, 128) for t in TABLE))
    out = []
    for item in text.split(","):
        pattern, held = item.split("=")
        bits, block = held.split("/")
        out.append((pattern, int(bits), int(block)))
    return tuple(out)
