"""`lfm-export compare BASE HEAD`: what changed between two exports, per entry, with tolerances that gate.

A side is an artifact folder (its `manifest.json` and `parity/parity.json`), a folder of artifacts (a matrix
output folder: its `matrix.json`, else every artifact folder under it), or a JSON report (`matrix.json`, an
export command's `--json` output, or `parity.json`). Each side becomes entries keyed `model/backend/recipe`
(a matrix's entry id); two single artifacts are compared with each other whatever their keys. The diff holds
the verdict, the exactness margin, KL / top-1 against fp32, the first greedy divergence, the size and the
`bench` figures where both sides have them; `--fail-on kl=+10%,size=+2%,decode=-5%` says which changes fail.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lfm_export.contract.errors import UserError
from lfm_export.contract.manifest import MANIFEST

MATRIX_REPORT = "matrix.json"
"""The combined report a matrix run writes into its output folder (`lfm_export.matrix`)."""


@dataclass(frozen=True)
class Metric:
    """One compared figure: `key` as `--fail-on` names it, and whether a larger value is better."""

    key: str
    title: str
    higher_is_better: bool
    fmt: str


METRICS = (
    Metric("kl", "KL mean", False, ".3e"),
    Metric("top1", "top-1", True, ".4f"),
    Metric("top1_decisive", "top-1 decisive", True, ".4f"),
    Metric("greedy", "greedy match", True, "d"),
    Metric("exact", "exactness used", False, ".1%"),
    Metric("size", "size", False, "bytes"),
    Metric("load", "load s", False, ".3f"),
    Metric("prefill", "prefill tok/s", True, ".1f"),
    Metric("decode", "decode tok/s", True, ".1f"),
    Metric("rss", "peak RSS", False, "bytes"),
)
"""`kl`, `top1`, `top1_decisive`: pooled against the fp32 reference; `greedy`: decode steps before greedy
decoding first diverges from the reference; `exact`: the largest share of an exactness limit used; `size`:
artifact bytes; `load`, `prefill`, `decode`, `rss`: `bench` figures."""
_BY_KEY = {m.key: m for m in METRICS}


@dataclass
class Entry:
    """One export as compare sees it."""

    key: str
    verdict: str  # passed | failed | not run | error
    values: dict[str, float] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Tolerance:
    """`key=+10%` (head may exceed base by 10%), `key=-5%` (head may fall 5% below base), `key=+0.01` (an
    absolute change); the sign (`rise`) says which direction fails."""

    key: str
    amount: float
    relative: bool
    rise: bool

    def exceeded(self, base: float, head: float) -> bool:
        change = (head - base) if self.rise else (base - head)
        allowed = self.amount * (abs(base) if self.relative else 1.0)
        return change > allowed + 1e-12 * max(abs(base), 1.0)

    def __str__(self) -> str:
        sign = "+" if self.rise else "-"
        return (
            f"{self.key}={sign}{self.amount * 100:g}%"
            if self.relative
            else f"{self.key}={sign}{self.amount:g}"
        )


_TOLERANCE = re.compile(r"^\s*([a-z0-9_]+)\s*=\s*([+-])\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(%?)\s*$")


def parse_fail_on(spec: str) -> list[Tolerance]:
    """`kl=+10%,size=+2%,decode=-5%` as tolerances; a sign is required (it says which direction fails)."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = _TOLERANCE.match(part)
        if m is None:
            raise UserError(
                f"--fail-on: cannot read {part!r}; write KEY=+N% or KEY=-N% (or an absolute +N), e.g. "
                "kl=+10%,size=+2%,decode=-5%"
            )
        key, sign, number, pct = m.groups()
        if key not in _BY_KEY:
            raise UserError(f"--fail-on: unknown figure {key!r}; known: {', '.join(_BY_KEY)}")
        out.append(Tolerance(key, float(number) / (100 if pct else 1), bool(pct), sign == "+"))
    return out


# ---- reading a side -----------------------------------------------------------------------------------
def load_side(path: Path) -> dict[str, Entry]:
    """The entries of one side of a comparison (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: not found (compare takes artifact folders, matrix folders or JSON reports)")
    if path.is_dir():
        if (path / MANIFEST).is_file():
            entry = entry_from_artifact(path)
            return {entry.key: entry}
        if (path / MATRIX_REPORT).is_file():
            return _from_report(_read_json(path / MATRIX_REPORT), path)
        artifacts = sorted(p.parent for p in path.rglob(MANIFEST))
        if not artifacts:
            raise UserError(f"{path}: no artifact (manifest.json) and no {MATRIX_REPORT} under it")
        out = {}
        for folder in artifacts:
            entry = entry_from_artifact(folder)
            entry.key = folder.relative_to(path).as_posix()
            out[entry.key] = entry
        return out
    return _from_report(_read_json(path), path.parent)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a JSON report ({e})") from None


def _key(model: str, backend: str, recipe: str) -> str:
    return f"{Path(str(model)).name}/{backend}/{recipe}"


def entry_from_artifact(folder: Path, bench: dict[str, Any] | None = None) -> Entry:
    """An artifact's entry: its manifest's parity summary and size, its `parity/parity.json` for the greedy
    divergence and the exactness margin, and `bench` figures when given."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        backend, recipe = manifest["backend"], manifest["recipe"].get("name", "?")
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise UserError(f"{folder}: unreadable {MANIFEST} ({e})") from None
    report = folder / "parity" / "parity.json"
    full = _read_json(report) if report.is_file() else None
    entry = _entry(
        _key(manifest.get("model", {}).get("source", "?"), backend, recipe),
        manifest.get("parity", {}),
        full,
    )
    entry.values["size"] = float(manifest.get("total_bytes") or 0)
    entry.values.update(_bench_values(bench))
    return entry


def _entry(key: str, summary: dict[str, Any], full: dict[str, Any] | None) -> Entry:
    passed = summary.get("passed")
    verdict = "not run" if passed is None else "passed" if passed else "failed"
    entry = Entry(key, verdict, note=str(summary.get("verdict", "")))
    pooled = summary.get("quality", {}).get("pooled", {})
    for key_, name in (("kl", "kl_mean"), ("top1", "top1_agreement"), ("top1_decisive", "top1_decisive")):
        if _finite(pooled.get(name)):
            entry.values[key_] = float(pooled[name])
    if full is not None:
        entry.values.update(_from_parity_json(full))
    return entry


def _from_parity_json(full: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    used = [
        c["value"] / c["limit"]
        for c in full.get("checks", [])
        if c.get("part", "exactness") == "exactness"
        and c.get("op") == "<="
        and _finite(c.get("value"))
        and _finite(c.get("limit"))
        and c["limit"] > 0
    ]
    if used:
        out["exact"] = max(used)
    for s in full.get("quality", {}).get("scenarios", []):
        if s.get("name") == "decode" and _finite(s.get("metrics", {}).get("greedy_match")):
            out["greedy"] = float(s["metrics"]["greedy_match"])
    return out


def _bench_values(bench: dict[str, Any] | None) -> dict[str, float]:
    if not bench:
        return {}
    names = {"load": "load_s", "prefill": "prefill_tok_s", "decode": "decode_tok_s", "rss": "peak_rss_bytes"}
    return {k: float(bench[n]) for k, n in names.items() if _finite(bench.get(n))}


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _from_report(data: Any, base: Path) -> dict[str, Entry]:
    if isinstance(data, dict) and isinstance(data.get("entries"), list):  # a matrix report
        out = {}
        for e in data["entries"]:
            entry = _from_matrix_entry(e, base)
            out[entry.key] = entry
        return out
    if isinstance(data, dict) and "backend" in data and "parity" in data:  # an export command's --json
        recipe = data.get("recipe", {})
        name = recipe.get("name", "?") if isinstance(recipe, dict) else str(recipe)
        entry = _entry(
            _key(data.get("model", data.get("out", "?")), data["backend"], name), data["parity"], None
        )
        if _finite(data.get("total_bytes")):
            entry.values["size"] = float(data["total_bytes"])
        return {entry.key: entry}
    if isinstance(data, dict) and "verdict" in data and "checks" in data:  # parity.json / parity --json
        meta = data.get("metadata", {})
        key = _key(meta.get("model", "?"), meta.get("backend", "?"), data.get("recipe", "?"))
        summary = {"passed": data.get("passed"), "verdict": data.get("verdict"), "quality": {}}
        entry = _entry(key, summary, data)
        entry.values.update(_pooled_quality(data))
        return {entry.key: entry}
    raise UserError("not a report compare reads: a matrix.json, an export --json output or a parity.json")


def _pooled_quality(full: dict[str, Any]) -> dict[str, float]:
    for s in full.get("quality", {}).get("scenarios", []):
        if s.get("name") == "pooled":
            m = s.get("metrics", {})
            names = (("kl", "kl_mean"), ("top1", "top1_agreement"), ("top1_decisive", "top1_decisive"))
            return {k: float(m[n]) for k, n in names if _finite(m.get(n))}
    return {}


def _from_matrix_entry(e: dict[str, Any], base: Path) -> Entry:
    key = str(e.get("id", "?"))
    folder = base / e["artifact"] if e.get("artifact") else None
    if folder is not None and (folder / MANIFEST).is_file():
        entry = entry_from_artifact(folder, e.get("bench"))
        entry.key = key
    else:
        entry = Entry(key, "error" if e.get("status") == "error" else "not run", note=str(e.get("error", "")))
        entry.values.update(_bench_values(e.get("bench")))
    if e.get("status") == "error":
        entry.verdict, entry.note = "error", str(e.get("error", ""))
    return entry


# ---- the diff -----------------------------------------------------------------------------------------
@dataclass
class Row:
    """One entry's comparison."""

    key: str
    base: Entry | None
    head: Entry | None
    failures: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.base is None:
            return "added"
        if self.head is None:
            return "removed"
        if self.failures:
            return "FAIL"
        return "changed" if self.changed() else "no change"

    def changed(self) -> bool:
        if self.base is None or self.head is None:
            return True
        return self.base.verdict != self.head.verdict or any(
            self.base.values.get(k) != self.head.values.get(k) for k in self.shared()
        )

    def shared(self) -> list[str]:
        if self.base is None or self.head is None:
            return []
        return [m.key for m in METRICS if m.key in self.base.values and m.key in self.head.values]


@dataclass
class Comparison:
    rows: list[Row]
    tolerances: list[Tolerance]

    @property
    def failed(self) -> bool:
        return any(r.failures for r in self.rows)

    @property
    def unchanged(self) -> bool:
        return all(r.status == "no change" for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        def side(e: Entry | None) -> dict[str, Any] | None:
            return None if e is None else {"verdict": e.verdict, "values": e.values, "note": e.note}

        return {
            "failed": self.failed,
            "unchanged": self.unchanged,
            "fail_on": [str(t) for t in self.tolerances],
            "entries": [
                {
                    "id": r.key,
                    "status": r.status,
                    "base": side(r.base),
                    "head": side(r.head),
                    "change": {k: _change(r.base.values[k], r.head.values[k]) for k in r.shared()}  # type: ignore[union-attr]
                    if r.base and r.head
                    else {},
                    "failures": r.failures,
                }
                for r in self.rows
            ],
        }


def _change(base: float, head: float) -> dict[str, float | None]:
    return {
        "base": base,
        "head": head,
        "delta": head - base,
        "relative": None if base == 0 else (head - base) / abs(base),
    }


def compare(base: dict[str, Entry], head: dict[str, Entry], tolerances: list[Tolerance]) -> Comparison:
    """Pair the entries (two single artifacts pair whatever their keys) and apply the tolerances. A verdict
    that goes from passed to anything else always fails; an entry only one side has is reported, not failed."""
    if len(base) == 1 and len(head) == 1 and set(base) != set(head):
        (b,), (h,) = base.values(), head.values()
        key = h.key if b.key == h.key else f"{b.key} -> {h.key}"
        base, head = {key: b}, {key: h}
    rows = []
    for key in sorted(set(base) | set(head)):
        row = Row(key, base.get(key), head.get(key))
        if row.base is not None and row.head is not None:
            if row.base.verdict == "passed" and row.head.verdict != "passed":
                row.failures.append(f"verdict {row.base.verdict} -> {row.head.verdict}")
            for t in tolerances:
                b, h = row.base.values.get(t.key), row.head.values.get(t.key)
                if b is not None and h is not None and t.exceeded(b, h):
                    row.failures.append(f"{t.key} {_fmt(t.key, b)} -> {_fmt(t.key, h)} (tolerance {t})")
        rows.append(row)
    return Comparison(rows, tolerances)


# ---- Markdown -----------------------------------------------------------------------------------------
def _fmt(key: str, v: float | None) -> str:
    if v is None:
        return "-"
    fmt = _BY_KEY[key].fmt
    if fmt == "bytes":
        return f"{v / 1e6:.3f} MB"
    if fmt == "d":
        return str(int(v))
    return format(v, fmt)


def _cell(row: Row, key: str) -> str:
    b = row.base.values.get(key) if row.base else None
    h = row.head.values.get(key) if row.head else None
    if b is None and h is None:
        return "-"
    if b is None or h is None or b == h:
        return _fmt(key, h if h is not None else b)
    rel = "" if b == 0 else f" ({(h - b) / abs(b):+.1%})"
    return f"{_fmt(key, b)} → {_fmt(key, h)}{rel}"


def _verdict(row: Row) -> str:
    b = row.base.verdict if row.base else "-"
    h = row.head.verdict if row.head else "-"
    return h if b == h else f"{b} → {h}"


_TABLE_KEYS = ("kl", "top1", "size", "decode")
_ICON = {
    "FAIL": "❌ FAIL",
    "changed": "changed",
    "no change": "no change",
    "added": "added",
    "removed": "removed",
}


def verdict_table(comparison: Comparison, rows: list[Row] | None = None) -> list[str]:
    rows = comparison.rows if rows is None else rows
    head = ["entry", "status", "verdict", *(_BY_KEY[k].title for k in _TABLE_KEYS)]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r.key}`", _ICON[r.status], _verdict(r), *(_cell(r, k) for k in _TABLE_KEYS)]
        out.append("| " + " | ".join(cells) + " |")
    return out


def headline(comparison: Comparison) -> str:
    n = len(comparison.rows)
    if comparison.unchanged:
        return f"**No change** in {n} entr{'y' if n == 1 else 'ies'}."
    failing = sum(1 for r in comparison.rows if r.failures)
    changed = sum(1 for r in comparison.rows if r.status != "no change")
    tol = ", ".join(str(t) for t in comparison.tolerances) or "none"
    word = f"**{failing} failing**" if failing else "**no failure**"
    return f"{word}, {changed} of {n} entries changed (tolerances: {tol}; a verdict regression always fails)."


def details(row: Row) -> list[str]:
    keys = [
        m.key
        for m in METRICS
        if (row.base and m.key in row.base.values) or (row.head and m.key in row.head.values)
    ]
    out = [f"**`{row.key}`**: {_verdict(row)}", "", "| figure | base → head |", "|---|---|"]
    out += [f"| {_BY_KEY[k].title} | {_cell(row, k)} |" for k in keys]
    if row.failures:
        out += ["", *(f"- {f}" for f in row.failures)]
    return [*out, ""]


def markdown(comparison: Comparison) -> str:
    """The full report: headline, verdict table, every entry's figures."""
    lines = ["## lfm-export compare", "", headline(comparison), "", *verdict_table(comparison), ""]
    for r in comparison.rows:
        lines += details(r)
    return "\n".join(lines).rstrip() + "\n"


COMMENT_LINES = 60


def comment(comparison: Comparison, limit: int = COMMENT_LINES) -> str:
    """A pull-request comment of at most `limit` lines: the headline and verdict table first (failing and
    changed entries before unchanged ones), the per-entry figures folded in `<details>`, cut to fit."""
    order = {"FAIL": 0, "removed": 1, "added": 2, "changed": 3, "no change": 4}
    rows = sorted(comparison.rows, key=lambda r: (order[r.status], r.key))
    top = ["### lfm-export: parity and size, base → head", "", headline(comparison), ""]
    room = limit - len(top) - 4  # table header, a line for the rows left out, the details' open and close
    shown = rows[: max(room - 2, 1)]
    lines = top + verdict_table(comparison, shown)
    if len(shown) < len(rows):
        rest = rows[len(shown) :]
        lines += ["", f"{len(rest)} more entries ({sum(r.status == 'no change' for r in rest)} unchanged)."]
    body = [line for r in rows if r.status != "no change" for line in details(r)]
    budget = limit - len(lines) - 4  # a blank line, the summary line, a blank line, the closing tag
    if body and budget > 4:
        if len(body) > budget:
            body = [*body[: budget - 1], "(cut: the full report is in the job's step summary)"]
        lines += ["", "<details><summary>Details</summary>", "", *body, "</details>"]
    return "\n".join(lines).rstrip() + "\n"


def write_github(comparison: Comparison, comment_file: Path | None) -> str:
    """GitHub Actions' outputs: the full report appended to the job's step summary (`$GITHUB_STEP_SUMMARY`,
    when set) and the comment body, written to `comment_file` when given; returns the comment body."""
    import os

    body = comment(comparison)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a") as f:
            f.write(markdown(comparison) + "\n")
    if comment_file is not None:
        Path(comment_file).write_text(body)
    return body
