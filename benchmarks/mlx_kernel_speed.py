"""Time per call and weight GB/s of MLX's CPU matmul kernels, per kernel kind, at the real LFM2 linear shapes.

    flock /tmp/lfm-heavy.lock .venv/bin/python benchmarks/mlx_kernel_speed.py \\
        --out benchmarks/results/mlx_kernel_speed.json

One decode step multiplies a `[1, K]` activation by every weight `[N, K]` once (`x @ w.T`). This times that
product alone, per kind: `mx.quantized_matmul` at bits 2, 3, 4, 6, 8 in groups of 32, 64, 128 (MLX's affine
format, the one our artifacts and mlx-lm's hold) and `x @ w.T` with `w` in float32, float16 and bfloat16 (`x`
in the weight's type), at the shapes of each preset in `--presets` read from `lfm_export.presets`: the MLP's
`w1` / `w3` `[F, H]` and `w2` `[H, F]`, attention's `q_proj` / `out_proj` `[H, H]` and `k_proj` / `v_proj`
`[kv, H]`, the conv block's `in_proj` `[3H, H]` and `out_proj` `[H, H]`, and the tied head `[V, H]`.

Each `--threads` value runs in its own worker process pinned to that many cores with `taskset` (MLX 0.32 has no
thread setting). Per kind and shape: `--warmup` untimed calls, then `--calls` calls, each evaluated alone
(`mx.eval`), the median of their wall times; weight bytes as the format holds them (codes in uint32 words plus
the float32 scale and bias per group MLX's `quantize` returns for float32 weights; float weights at their
width) and GB/s = bytes / median time. Inputs are random normal (MLX's kernels do not branch on values).

`step_linears`: per threads, preset and kind, the summed time of one decode step's linears if every one were held
at that kind (each role's median times its calls per step), and q4g64's (mlx-lm's default) sum over it.

Writes JSON (provenance, per threads, per preset, per shape, per kind: ms and GB/s; the step sums) to `--out`
and prints a table of ms per call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from pinned_worker import add_worker_option, run_pinned, serve_worker  # noqa: E402
from provenance import provenance  # noqa: E402

BITS = (2, 3, 4, 6, 8)
GROUPS = (32, 64, 128)
FLOATS = ("float32", "float16", "bfloat16")


def kinds() -> list[str]:
    """`q{bits}g{group}` for every quantized kind, then the float types."""
    return [f"q{b}g{g}" for b in BITS for g in GROUPS] + list(FLOATS)


def shapes(preset: str) -> dict[str, list[int]]:
    """The distinct linear shapes `[N, K]` of `preset` (a name of `lfm_export.presets`), by role."""
    from lfm_export.presets import get_preset

    c = get_preset(preset).config
    h, f, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim
    return {
        "mlp.w1/w3": [f, h],
        "mlp.w2": [h, f],
        "attn.q/out": [h, h],
        "attn.k/v": [kv, h],
        "conv.in_proj": [3 * h, h],
        "conv.out_proj": [h, h],
        "head": [c.vocab_size, h],
    }


def calls_per_step(preset: str) -> dict[str, int]:
    """How many times one decode step of `preset` runs each role of `shapes` (w1 and w3, q and out, k and v:
    two each per layer that has them; the head once)."""
    from lfm_export.config import LAYER_ATTN
    from lfm_export.presets import get_preset

    c = get_preset(preset).config
    attn = sum(1 for t in c.layer_types if t == LAYER_ATTN)
    conv = len(c.layer_types) - attn
    n = len(c.layer_types)
    return {
        "mlp.w1/w3": 2 * n,
        "mlp.w2": n,
        "attn.q/out": 2 * attn,
        "attn.k/v": 2 * attn,
        "conv.in_proj": conv,
        "conv.out_proj": conv,
        "head": 1,
    }


def step_sums(per: dict[str, Any], kinds: list[str]) -> dict[str, Any]:
    """Per preset and kind: the linears of one decode step held at that kind, their summed ms per call
    (`calls_per_step` times each role's median) and q4g64's sum over it (`speed_vs_q4g64`, > 1 faster)."""
    out: dict[str, Any] = {}
    for preset, roles in per.items():
        counts = calls_per_step(preset)
        sums = {k: sum(roles[r]["kinds"][k]["ms"] * c for r, c in counts.items()) for k in kinds}
        base = sums.get("q4g64")
        out[preset] = {
            k: {"ms": round(v, 2), **({"speed_vs_q4g64": round(base / v, 3)} if base else {})}
            for k, v in sums.items()
        }
    return out


def _median(v: list[float]) -> float:
    s = sorted(v)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Times every kind at every shape of `spec["shapes"]` (preset -> role -> [N, K]) in this process."""
    import mlx.core as mx

    mx.set_default_device(mx.cpu)
    mx.random.seed(0)
    out: dict[str, Any] = {}
    done: dict[tuple[int, int], dict[str, Any]] = {}
    for preset, roles in spec["shapes"].items():
        out[preset] = {}
        for role, (n, k) in roles.items():
            if (n, k) in done:  # conv.out_proj is attn.q/out's shape
                out[preset][role] = done[(n, k)]
                continue
            w32 = mx.random.normal((n, k))
            x32 = mx.random.normal((1, k))
            mx.eval(w32, x32)
            row: dict[str, Any] = {}
            for kind in spec["kinds"]:
                if kind in FLOATS:
                    dt = getattr(mx, kind)
                    w, x = w32.astype(dt), x32.astype(dt)
                    wt = mx.swapaxes(w, 0, 1)
                    mx.eval(w, x)
                    nbytes = w.nbytes

                    def call(x: Any = x, wt: Any = wt) -> Any:
                        return x @ wt
                else:
                    bits, group = (int(p) for p in kind[1:].split("g"))
                    q, s, b = mx.quantize(w32, group_size=group, bits=bits)
                    mx.eval(q, s, b)
                    nbytes = q.nbytes + s.nbytes + b.nbytes

                    def call(
                        q: Any = q,
                        s: Any = s,
                        b: Any = b,
                        group: int = group,
                        bits: int = bits,
                        x: Any = x32,
                    ) -> Any:
                        return mx.quantized_matmul(x, q, s, b, True, group, bits)

                for _ in range(spec["warmup"]):
                    mx.eval(call())
                times = []
                for _ in range(spec["calls"]):
                    t = time.perf_counter()
                    mx.eval(call())
                    times.append(time.perf_counter() - t)
                ms = _median(times) * 1e3
                row[kind] = {
                    "ms": round(ms, 4),
                    "min_ms": round(min(times) * 1e3, 4),
                    "weight_bytes": int(nbytes),
                    "gb_s": round(nbytes / (ms / 1e3) / 1e9, 3),
                }
            cell = {"shape": [n, k], "kinds": row}
            done[(n, k)] = cell
            out[preset][role] = cell
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["lfm2-350m", "lfm2-1.2b"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="cores per worker (taskset)")
    ap.add_argument("--kinds", nargs="+", default=kinds(), help="q{bits}g{group} or a float type")
    ap.add_argument("--calls", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    add_worker_option(ap)
    a = ap.parse_args()
    if serve_worker(a, worker):
        return
    bad = [k for k in a.kinds if k not in kinds()]
    if bad:
        raise SystemExit(f"unknown kind {bad[0]!r}; known: {', '.join(kinds())}")
    spec = {
        "shapes": {p: shapes(p) for p in a.presets},
        "kinds": a.kinds,
        "calls": a.calls,
        "warmup": a.warmup,
    }
    prov = provenance()
    import mlx.core as mx

    results: dict[str, Any] = {}
    loads: dict[str, Any] = {}
    for t in a.threads:
        before = round(os.getloadavg()[0], 2)
        results[str(t)] = run_pinned(__file__, spec, t)
        loads[str(t)] = {"before": before, "after": round(os.getloadavg()[0], 2)}
    result = {
        **prov,
        "mlx_version": mx.__version__,
        "device": "cpu",
        "calls": a.calls,
        "warmup": a.warmup,
        "load_average_per_threads": loads,
        "load_average_at_end": round(os.getloadavg()[0], 2),
        "calls_per_step": {p: calls_per_step(p) for p in a.presets},
        "step_linears": {t: step_sums(per, a.kinds) for t, per in results.items()},
        "results": results,
    }
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    for t, per in results.items():
        print(f"\n{t} thread(s), ms per call (median of {a.calls}); load {loads[t]}")
        for preset, roles in per.items():
            print(f"{preset}: " + " ".join(f"{k:>8}" for k in a.kinds))
            for role, cell in roles.items():
                n, k = cell["shape"]
                vals = " ".join(f"{cell['kinds'][kd]['ms']:8.2f}" for kd in a.kinds)
                print(f"  {role:<13} [{n}, {k}] {vals}")
            sums = result["step_linears"][t][preset]
            print(f"  {'step':<13} {'':<14}" + " ".join(f"{sums[kd]['ms']:8.1f}" for kd in a.kinds))


if __name__ == "__main__":
    main()
