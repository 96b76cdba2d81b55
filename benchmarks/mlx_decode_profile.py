"""Where one MLX decode step's time goes, per kernel kind, for mlx-lm folders (ours and mlx-lm's own).

    flock /tmp/lfm-heavy.lock .venv/bin/python benchmarks/mlx_decode_profile.py \\
        ours=/tmp/mlx_decode_side_by_side/random-lfm2-350m/ours \\
        mlx-lm=/tmp/mlx_decode_side_by_side/random-lfm2-350m/mlx-lm-q4-g64 \\
        --out benchmarks/results/mlx_decode_profile_350m.json

Every folder loads through mlx-lm (`load_model`; an lfm-export MLX folder is an mlx-lm folder); folders with a
`manifest.json` also through our shim (`MlxSession`, the `.mlxfn` decode function). In one worker pinned to
`--threads` cores (`taskset`), per folder, after a `--prompt-len` random prompt:

- `step_ms`: `--steps` decode steps of the whole model (mlx-lm: `model(token, cache)`, one `mx.eval`; ours:
  `MlxSession.decode`), the median;
- `profile`: `--steps` more steps through mlx-lm with every linear and embedding evaluated apart (its input
  evaluated first, then the call timed with its own `mx.eval`), summed per kind (`q{bits}g{group}` /
  `float32`) and role (the module's name with its layer index dropped: `mlp.gate_proj`, `self_attn.q_proj`,
  `conv.in_proj`, `embed_tokens` as a lookup and as the tied head); `other_ms` is the step's remainder (norms,
  the short convolution, attention over the cache, element-wise ops and the cost of evaluating apart).

The rounds rotate the folders' order; one untimed warm-up step per folder. Writes JSON (provenance, per folder:
step medians, the per-kind / per-role sums, the number of quantized calls per kind) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from pinned_worker import add_worker_option, run_pinned, serve_worker  # noqa: E402
from provenance import provenance  # noqa: E402


def _median(v: list[float]) -> float:
    s = sorted(v)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _kind(module: Any) -> str:
    bits = getattr(module, "bits", None)
    if bits is not None and hasattr(module, "scales"):
        return f"q{bits}g{module.group_size}"
    w = getattr(module, "weight", None)
    return str(w.dtype).replace("mlx.core.", "") if w is not None else "?"


def _role(path: str) -> str:
    parts = [p for p in path.split(".") if not p.isdigit() and p not in ("model", "layers")]
    return ".".join(parts)


class Profiler:
    """Wraps mlx-lm's linear / embedding modules of `model` so a profiled step times each call apart."""

    def __init__(self, model: Any) -> None:
        import mlx.core as mx
        import mlx.nn as nn

        self.mx = mx
        self.active = False
        self.times: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        kinds = (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding)
        for path, module in model.named_modules():
            if isinstance(module, kinds):
                self._wrap(module, path)

    def _wrap(self, module: Any, path: str) -> None:
        mx, prof = self.mx, self
        key = (_kind(module), _role(path))
        cls = type(module)

        def timed(fn: Any, key: tuple[str, str]) -> Any:
            def call(*args: Any, **kw: Any) -> Any:
                if not prof.active:
                    return fn(*args, **kw)
                mx.eval(*[a for a in args if isinstance(a, mx.array)])
                t = time.perf_counter()
                y = fn(*args, **kw)
                mx.eval(y)
                prof.times[key] += time.perf_counter() - t
                prof.calls[key] += 1
                return y

            return call

        # instance attributes shadow the class's __call__ only through a subclass: give each module its own
        sub = type(cls.__name__, (cls,), {"__call__": timed(cls.__call__, key)})
        module.__class__ = sub
        if hasattr(module, "as_linear"):
            head = (key[0], key[1] + ".as_linear (head)")
            bound = timed(cls.as_linear, head)
            sub.as_linear = lambda self, x, _b=bound: _b(self, x)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import load_model

    mx.set_default_device(mx.cpu)
    rng = np.random.default_rng(spec["seed"])
    out: dict[str, Any] = {}
    entries = []
    for name, folder in spec["folders"].items():
        model, cfg = load_model(Path(folder))
        prof = Profiler(model)
        entries.append((name, "mlx-lm", model, prof))
        if (Path(folder) / "manifest.json").is_file():
            from lfm_export.runtime.mlx import MlxSession

            entries.append((name, "shim", MlxSession(folder), None))
    vocab = 65536
    for _, how, obj, _ in entries:
        if how == "mlx-lm":
            vocab = min(vocab, obj.args.vocab_size)
    ids = rng.integers(16, vocab, (1, spec["prompt_len"]))

    def run_mlx_lm(model: Any, steps: int, prof: Any = None) -> list[float]:
        cache = model.make_cache()
        y = model(mx.array(ids), cache=cache)
        mx.eval(y)
        tok = mx.argmax(y[:, -1:], axis=-1)
        times = []
        for _ in range(steps):
            if prof is not None:
                prof.active = True
            t = time.perf_counter()
            y = model(tok, cache=cache)
            tok = mx.argmax(y[:, -1:], axis=-1)
            mx.eval(tok, *[c.state for c in cache if c.state is not None and not isinstance(c.state, list)])
            times.append(time.perf_counter() - t)
            if prof is not None:
                prof.active = False
        return times

    def run_shim(s: Any, steps: int) -> list[float]:
        s.reset()
        tok = int(s.prefill_last(ids)[0].argmax())
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            tok = int(s.decode(np.array([tok]))[0].argmax())
            times.append(time.perf_counter() - t)
        return times

    step: dict[str, list[float]] = defaultdict(list)
    prof_steps: dict[str, list[float]] = defaultdict(list)
    for _name, how, obj, _ in entries:  # warm-up
        (run_mlx_lm if how == "mlx-lm" else run_shim)(obj, 1)
    for r in range(spec["rounds"]):
        order = entries[r % len(entries) :] + entries[: r % len(entries)]
        for name, how, obj, prof in order:
            key = f"{name} ({how})"
            if how == "mlx-lm":
                step[key] += run_mlx_lm(obj, spec["steps"])
                prof_steps[key] += run_mlx_lm(obj, spec["steps"], prof)
            else:
                step[key] += run_shim(obj, spec["steps"])
    for name, how, _obj, prof in entries:
        key = f"{name} ({how})"
        row: dict[str, Any] = {"step_ms": round(_median(step[key]) * 1e3, 2), "steps": len(step[key])}
        if prof is not None:
            n = len(prof_steps[key])
            per_kind: dict[str, float] = defaultdict(float)
            per_role = {}
            for (kind, role), t in sorted(prof.times.items()):
                per_kind[kind] += t / n * 1e3
                per_role[f"{role} [{kind}]"] = {
                    "ms_per_step": round(t / n * 1e3, 3),
                    "calls_per_step": prof.calls[(kind, role)] // n,
                }
            total = _median(prof_steps[key]) * 1e3
            timed_sum = sum(per_kind.values())
            row.update(
                {
                    "profiled_step_ms": round(total, 2),
                    "linear_ms_by_kind": {k: round(v, 2) for k, v in per_kind.items()},
                    "linear_ms": round(timed_sum, 2),
                    "other_ms": round(total - timed_sum, 2),
                    "by_role": per_role,
                }
            )
        out[key] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="*", help="NAME=FOLDER (an mlx-lm folder)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    add_worker_option(ap)
    a = ap.parse_args()
    if serve_worker(a, worker):
        return
    folders = {}
    for item in a.folders:
        name, sep, folder = item.partition("=")
        if not sep or not (Path(folder) / "config.json").is_file():
            raise SystemExit(f"expected NAME=FOLDER with an mlx-lm folder, got {item!r}")
        folders[name] = str(Path(folder).resolve())
    if not folders:
        raise SystemExit("give at least one NAME=FOLDER")
    prov = provenance()
    spec = {
        "folders": folders,
        "rounds": a.rounds,
        "steps": a.steps,
        "prompt_len": a.prompt_len,
        "seed": a.seed,
    }
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    before = round(os.getloadavg()[0], 2)
    res = run_pinned(__file__, spec, a.threads, env)
    result = {
        **prov,
        "threads": a.threads,
        **spec,
        "load_avg_1m_before": before,
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "results": res,
    }
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    for key, row in res.items():
        print(f"{key}: step {row['step_ms']} ms")
        if "linear_ms_by_kind" in row:
            print(
                f"  profiled step {row['profiled_step_ms']} ms = linears {row['linear_ms']} "
                f"{row['linear_ms_by_kind']} + other {row['other_ms']}"
            )
            for role, v in row["by_role"].items():
                print(f"    {role:<48} {v['ms_per_step']:8.2f} ms ({v['calls_per_step']} calls)")
    print(f"load average {result['load_avg_1m_before']} before, {result['load_avg_1m_after']} after")


if __name__ == "__main__":
    main()
