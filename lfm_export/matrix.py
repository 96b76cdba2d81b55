"""`lfm-export matrix SPEC`: a declared set of exports (models x backends x recipes, with per-entry gates), run
on this machine (`run_matrix`) or spread over a CI's own job matrix (`lfm_export.ci_emit`).

Each entry is one `lfm-export BACKEND MODEL -o OUT/ID ...` process, so a failed entry never stops the others
and each one's peak RSS is its own (`os.wait4`). Entries run side by side while the sum of their memory
estimates (`export_memory_estimate`) fits the machine's available memory; one always runs. Each finished entry
writes `OUT/entries/SLUG.json`; `OUT/matrix.json` and `OUT/matrix.md` combine every entry file present, so
the outputs of several CI jobs copied into one folder combine the same way (`--report`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lfm_export.compare import MATRIX_REPORT
from lfm_export.contract.errors import UserError

ENTRIES_DIR = "entries"
MATRIX_MD = "matrix.md"
RUNTIME_OVERHEAD = 1_000_000_000
"""Bytes an export process holds besides the model: Python, torch and the backend's library (a tiny ONNX
export peaks near 0.6 GB here)."""


@dataclass(frozen=True)
class Entry:
    """One export of the matrix: `id` is `model/backend/recipe` (its output folder under OUT)."""

    model: str
    backend: str
    recipe: str
    max_seq_len: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    max_kl: float | None = None
    gates: str | None = None
    parity: bool = True

    @property
    def id(self) -> str:
        return f"{_model_name(self.model)}/{self.backend}/{self.recipe}"

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.id)


@dataclass(frozen=True)
class Spec:
    """A parsed SPEC file."""

    path: Path
    entries: list[Entry]
    threads: int = 1
    bench: dict[str, int] | None = None
    ci: dict[str, str] = field(default_factory=dict)
    """What the emitted CI definitions use (`lfm_export.ci_emit`): `fail_on` (compare's tolerances), `python`,
    `runs_on` (GitHub), `image` (GitLab)."""


def _model_name(model: str) -> str:
    return model.replace(":", "-").rstrip("/").split("/")[-1] if "/" in model or ":" in model else model


_TOP_KEYS = {"models", "backends", "max_seq_len", "threads", "bench", "gates", "parity", "ci"}
_CI_KEYS = {"fail_on", "python", "runs_on", "image"}
_BACKEND_KEYS = {"recipes", "options", "max_seq_len"}
_GATE_KEYS = {"match", "max_kl", "gates"}


def read_spec(path: Path) -> Spec:
    """Read a SPEC file (YAML, or TOML by its `.toml` suffix):

    ```yaml
    models: [tiny, tiny-moe]          # anything MODEL takes
    max_seq_len: 128                  # every entry's context (a backend may set its own)
    threads: 1                        # per export
    bench: {prompt_len: 32, new_tokens: 16}   # optional: `lfm-export bench` on every passing artifact
    backends:
      onnx: {recipes: [int4, int8], options: {ops: ort}}
      coreml: {recipes: [int4-b32, fp16]}
    gates:                            # per-entry quality gates: the first whose glob matches the id
      - {match: "*/*/int4*", max_kl: 0.1}
      - {match: "tiny-moe/*", gates: gates.json}   # relative to the SPEC file
    ci: {fail_on: "kl=+10%,size=+2%,decode=-5%", python: "3.11"}   # the emitted CI definitions
    ```
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"{path}: cannot read the matrix spec ({e.strerror or e})") from None
    data = _parse(path, text)
    if not isinstance(data, dict):
        raise UserError(f"{path}: a matrix spec is a mapping with models and backends")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise UserError(
            f"{path}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_TOP_KEYS))}"
        )
    models = data.get("models")
    backends = data.get("backends")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise UserError(f"{path}: `models` must be a non-empty list of model names")
    if not isinstance(backends, dict) or not backends:
        raise UserError(f"{path}: `backends` must map backend names to {{recipes: [...]}}")
    from lfm_export.backends import all_backends

    known = all_backends()
    gates = _gate_rules(path, data.get("gates", []))
    entries = []
    for model in models:
        for name, body in backends.items():
            if name not in known:
                raise UserError(f"{path}: unknown backend {name!r}; known: {', '.join(known)}")
            body = body or {}
            if not isinstance(body, dict) or set(body) - _BACKEND_KEYS:
                raise UserError(f"{path}: backends.{name} takes {', '.join(sorted(_BACKEND_KEYS))}")
            recipes = body.get("recipes") or [known[name].quant_default]
            for recipe in recipes:
                entry = Entry(
                    model=model,
                    backend=name,
                    recipe=str(recipe),
                    max_seq_len=body.get("max_seq_len", data.get("max_seq_len")),
                    options=dict(body.get("options") or {}),
                    parity=bool(data.get("parity", True)),
                )
                entries.append(_gated(entry, gates))
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        raise UserError(
            f"{path}: two entries share an id ({_first_duplicate(ids)}): give the models other names"
        )
    bench = data.get("bench")
    if bench is not None and (not isinstance(bench, dict) or set(bench) - {"prompt_len", "new_tokens"}):
        raise UserError(f"{path}: `bench` takes prompt_len and new_tokens")
    ci = data.get("ci") or {}
    if not isinstance(ci, dict) or set(ci) - _CI_KEYS:
        raise UserError(f"{path}: `ci` takes {', '.join(sorted(_CI_KEYS))}")
    return Spec(path, entries, int(data.get("threads", 1)), bench, {k: str(v) for k, v in ci.items()})


def _parse(path: Path, text: str) -> Any:
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            raise UserError(f"{path}: TOML specs need Python 3.11+; write it as YAML") from None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{path}: not valid TOML ({e})") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None


def _first_duplicate(ids: list[str]) -> str:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return ""


def _gate_rules(path: Path, rules: Any) -> list[dict[str, Any]]:
    if not isinstance(rules, list) or not all(isinstance(r, dict) and "match" in r for r in rules):
        raise UserError(f"{path}: `gates` is a list of {{match: GLOB, max_kl: FLOAT, gates: FILE}}")
    out = []
    for r in rules:
        if set(r) - _GATE_KEYS:
            raise UserError(f"{path}: a gate takes {', '.join(sorted(_GATE_KEYS))}")
        rule = dict(r)
        if rule.get("gates"):
            rule["gates"] = str((path.parent / rule["gates"]).resolve())
        out.append(rule)
    return out


def _gated(entry: Entry, rules: list[dict[str, Any]]) -> Entry:
    for r in rules:
        if fnmatch.fnmatchcase(entry.id, r["match"]):
            return Entry(**{**entry.__dict__, "max_kl": r.get("max_kl"), "gates": r.get("gates")})
    return entry


def select(spec: Spec, only: list[str]) -> list[Entry]:
    """The entries whose id matches one of the globs `only` (all when empty)."""
    if not only:
        return spec.entries
    chosen = [e for e in spec.entries if any(fnmatch.fnmatchcase(e.id, o) for o in only)]
    if not chosen:
        raise UserError(
            f"--only {' '.join(only)}: no entry of {spec.path} matches (ids: {spec.entries[0].id}, ...)"
        )
    return chosen


# ---- memory -------------------------------------------------------------------------------------------
def export_memory_estimate(entry: Entry) -> int:
    """Bytes one export process is expected to peak at: the runtime's overhead plus float32 copies of the
    model (the lazily written export holds about one; parity holds the reference and the simulation, and a
    recipe with int8 activations a third: `LoadedModel.reference_fits`'s count; where they do not fit, parity streams them instead)."""
    from lfm_export.presets import param_count

    config = _config(entry.model)
    if config is None:
        return RUNTIME_OVERHEAD * 4
    copies = 1 + (
        (3 if "a8" in entry.recipe or entry.recipe in ("8da4w", "8da8w") else 2) if entry.parity else 0
    )
    return RUNTIME_OVERHEAD + copies * 4 * param_count(config)


def _config(model: str) -> Any:
    from lfm_export.config import Lfm2Config

    if model.startswith("random:"):
        from lfm_export.presets import get_preset

        try:
            return get_preset(model.split(":", 1)[1]).config
        except UserError:
            return None
    folder = local_folder(model)
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        return Lfm2Config.from_file(folder / "config.json")
    except UserError:
        return None


def local_folder(model: str) -> Path | None:
    """The checkpoint folder of a bundled model, a local folder or a cached Hugging Face id (never downloads)."""
    bundled = Path(__file__).parent / "assets" / model
    if "/" not in model and (bundled / "config.json").is_file():
        return bundled
    if Path(model).is_dir():
        return Path(model)
    from lfm_export.hub import cached, is_hub_id

    return cached(model) if is_hub_id(model) else None


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


# ---- running ------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    entry: Entry
    status: str  # passed | failed | error
    exit_code: int
    seconds: float
    peak_rss_bytes: int
    estimate_bytes: int
    error: str = ""
    export: dict[str, Any] | None = None
    bench: dict[str, Any] | None = None

    def to_json(self, out: Path) -> dict[str, Any]:
        e = self.entry
        return {
            "id": e.id,
            "model": e.model,
            "backend": e.backend,
            "recipe": e.recipe,
            "artifact": e.id if (out / e.id / "manifest.json").is_file() else None,
            "status": self.status,
            "exit_code": self.exit_code,
            "error": self.error,
            "seconds": round(self.seconds, 2),
            "peak_rss_bytes": self.peak_rss_bytes,
            "estimate_bytes": self.estimate_bytes,
            "gate": {"max_kl": e.max_kl, "gates": e.gates},
            "total_bytes": (self.export or {}).get("total_bytes"),
            "parity": (self.export or {}).get("parity"),
            "bench": self.bench,
        }


def command(entry: Entry, out: Path, threads: int) -> list[str]:
    """The `lfm-export` command line of one entry."""
    args = [entry.backend, entry.model, "-o", str(out / entry.id), "--quant", entry.recipe, "--force"]
    args += ["--threads", str(threads), "--json"]
    if entry.max_seq_len is not None:
        args += ["--max-seq-len", str(entry.max_seq_len)]
    if not entry.parity:
        args.append("--no-parity")
    if entry.max_kl is not None:
        args += ["--max-kl", str(entry.max_kl)]
    if entry.gates:
        args += ["--gates", entry.gates]
    for k, v in entry.options.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            args.append(flag)
        elif v is not False and v is not None:
            args += [flag, str(v)]
    return args


def _cli() -> list[str]:
    return [sys.executable, "-m", "lfm_export.cli"]


def _run_process(args: list[str], threads: int) -> tuple[int, str, str, int, float]:
    """(exit code, stdout, stderr, peak RSS bytes, seconds) of one `lfm-export` process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    with (
        open(os.devnull, "rb") as stdin,
        _TempText() as out_f,
        _TempText() as err_f,
    ):
        proc = subprocess.Popen([*_cli(), *args], stdin=stdin, stdout=out_f, stderr=err_f, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        rss = usage.ru_maxrss * (1 if platform.system() == "Darwin" else 1024)
        return proc.returncode, out_f.text(), err_f.text(), rss, seconds


class _TempText:
    """A temporary file a child writes into (no pipe to drain while waiting on it)."""

    def __enter__(self) -> Any:
        import tempfile

        self.f = tempfile.TemporaryFile(mode="w+b")
        return self

    def fileno(self) -> int:
        return self.f.fileno()

    def text(self) -> str:
        self.f.seek(0)
        return self.f.read().decode(errors="replace")

    def __exit__(self, *exc: Any) -> None:
        self.f.close()


def run_entry(entry: Entry, out: Path, threads: int, bench: dict[str, int] | None, estimate: int) -> Outcome:
    """Export one entry (and bench it when asked); never raises for the entry's own failure."""
    code, stdout, stderr, rss, seconds = _run_process(command(entry, out, threads), threads)
    export = None
    try:
        export = json.loads(stdout) if stdout.strip() else None
    except json.JSONDecodeError:
        export = None
    if code == 0:
        status = "passed" if (export or {}).get("parity", {}).get("passed") is not False else "failed"
    elif code == 1 and export is not None:
        status = "failed"
    else:
        status = "error"
    error = "" if status != "error" else (_last_line(stderr) or f"exit code {code}")
    outcome = Outcome(entry, status, code, seconds, rss, estimate, error, export)
    if bench and status in ("passed", "failed"):
        b_args = ["bench", str(out / entry.id), "--threads", str(threads), "--json"]
        b_args += [f"--{k.replace('_', '-')}={v}" for k, v in bench.items()]
        b_code, b_out, b_err, b_rss, _ = _run_process(b_args, threads)
        if b_code == 0:
            outcome.bench = json.loads(b_out)
        else:
            outcome.bench = {"error": _last_line(b_err) or f"exit code {b_code}"}
        outcome.peak_rss_bytes = max(outcome.peak_rss_bytes, b_rss)
    return outcome


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def run_matrix(
    spec: Spec,
    out: Path,
    *,
    only: list[str] | None = None,
    jobs: int | None = None,
    memory: int | None = None,
    echo: Any = None,
) -> dict[str, Any]:
    """Run the chosen entries, as many at once as their memory estimates allow within `memory` (default: 80% of
    the available memory) and `jobs` (default: the CPU count); write each entry's file and the combined report;
    return the report."""
    entries = select(spec, only or [])
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    budget = int(memory if memory is not None else 0.8 * available_memory())
    jobs = jobs or os.cpu_count() or 1
    out.mkdir(parents=True, exist_ok=True)
    (out / ENTRIES_DIR).mkdir(exist_ok=True)
    estimates = {e.id: export_memory_estimate(e) for e in entries}
    pending = sorted(entries, key=lambda e: -estimates[e.id])  # the biggest first: they gate the concurrency
    running: dict[str, threading.Thread] = {}
    lock = threading.Condition()
    held = [0]
    n = len(entries)
    done = [0]

    def work(entry: Entry) -> None:
        try:
            outcome = run_entry(entry, out, spec.threads, spec.bench, estimates[entry.id])
        except Exception as e:  # an entry's failure never stops the others
            outcome = Outcome(entry, "error", 3, 0.0, 0, estimates[entry.id], f"{type(e).__name__}: {e}")
        _write_entry(out, outcome)
        with lock:
            done[0] += 1
            held[0] -= estimates[entry.id]
            running.pop(entry.id, None)
            extra = f" ({outcome.error})" if outcome.error else ""
            echo(
                f"[{done[0]}/{n}] {entry.id}: {outcome.status}{extra} in {outcome.seconds:.0f} s, "
                f"peak RSS {outcome.peak_rss_bytes / 1e9:.2f} GB"
            )
            lock.notify_all()

    echo(f"matrix {spec.path}: {n} entries, memory budget {budget / 1e9:.1f} GB, at most {jobs} at once")
    with lock:
        while pending:
            entry = pending[0]
            fits = held[0] + estimates[entry.id] <= budget
            if running and (len(running) >= jobs or not fits):
                lock.wait()
                continue
            pending.pop(0)
            held[0] += estimates[entry.id]
            echo(f"[start] {entry.id} (estimate {estimates[entry.id] / 1e9:.2f} GB)")
            t = threading.Thread(target=work, args=(entry,), daemon=True)
            running[entry.id] = t
            t.start()
        while running:
            lock.wait()
    return write_report(out, spec)


def _write_entry(out: Path, outcome: Outcome) -> None:
    target = out / ENTRIES_DIR / f"{outcome.entry.slug}.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(outcome.to_json(out), indent=2) + "\n")
    os.replace(tmp, target)


def write_report(out: Path, spec: Spec | None = None) -> dict[str, Any]:
    """Combine every entry file under `out/entries/` into `out/matrix.json` and `out/matrix.md`."""
    folder = out / ENTRIES_DIR
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise UserError(f"{out}: no matrix entry results ({ENTRIES_DIR}/*.json) to report")
    entries = [json.loads(f.read_text()) for f in files]
    entries.sort(key=lambda e: e["id"])
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "memory_bytes": _total_memory(),
        },
        "commit": _commit(),
        "spec": str(spec.path) if spec else None,
        "passed": all(e["status"] == "passed" for e in entries),
        "counts": {s: sum(e["status"] == s for e in entries) for s in ("passed", "failed", "error")},
        "peak_rss_bytes": max((e.get("peak_rss_bytes") or 0) for e in entries),
        "entries": entries,
    }
    for name, text in (
        (MATRIX_REPORT, json.dumps(report, indent=2) + "\n"),
        (MATRIX_MD, report_markdown(report)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return report


def _total_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def _commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def _num(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def report_markdown(report: dict[str, Any]) -> str:
    c = report["counts"]
    lines = [
        "## lfm-export matrix",
        "",
        f"{c['passed']} passed, {c['failed']} failed, {c['error']} errors; peak RSS of one job "
        f"{report['peak_rss_bytes'] / 1e9:.2f} GB.",
        "",
        "| entry | status | KL mean | top-1 | size MB | decode tok/s | time s | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in report["entries"]:
        pooled = ((e.get("parity") or {}).get("quality") or {}).get("pooled") or {}
        bench = e.get("bench") or {}
        size = e.get("total_bytes")
        status = e["status"] + (f": {e['error']}" if e.get("error") else "")
        lines.append(
            f"| `{e['id']}` | {status} | {_num(pooled.get('kl_mean'), '.3e')} | "
            f"{_num(pooled.get('top1_agreement'), '.4f')} | {_num(size and size / 1e6, '.3f')} | "
            f"{_num(bench.get('decode_tok_s'), '.1f')} | {e['seconds']:.0f} | {e['peak_rss_bytes'] / 1e9:.2f} |"
        )
    return "\n".join(lines) + "\n"
