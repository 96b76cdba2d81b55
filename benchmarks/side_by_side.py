"""What the decode side-by-side scripts share: `--mix` (a precision mix as `(pattern, bits, block)` triples) and
`timed` (a subprocess step, its wall time)."""

from __future__ import annotations

import subprocess
import time

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


def timed(cmd: list[str], env: dict[str, str]) -> float:
    """Run `cmd` (an export step); its wall seconds, or exit with its stderr's tail if it fails."""
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{r.stderr[-3000:]}")
    return round(time.perf_counter() - t, 2)
