"""The export commands: one per backend record (`lfm_export.backends`), each with the shared options, the record's
own and its `--max-seq-len` help; the same export, parity and report for every backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from inspect import Parameter, Signature
from pathlib import Path
from typing import Annotated, Any

import typer

from lfm_export.backends import all_backends
from lfm_export.cli_options import (
    BudgetOpt,
    CalibOpt,
    ForceOpt,
    FullContextOpt,
    GatesOpt,
    JsonOpt,
    MaxKlOpt,
    ModelArg,
    NoCardOpt,
    NoParityOpt,
    OutOpt,
    QuantOpt,
    RevisionOpt,
    ThreadsOpt,
    context_option,
    emit,
    require_torch,
    set_threads,
)
from lfm_export.contract.session import DEFAULT_THREADS


@dataclass(frozen=True)
class ExportOptions:
    """The options of every backend command, parsed once (see `backend_command`)."""

    model: str
    out: Path
    quant: str
    max_seq_len: int | None
    no_parity: bool
    full_context: bool
    force: bool
    threads: int
    max_kl: float | None
    gates: Path | None
    calib: Path | None
    as_json: bool
    budget: str | None = None
    no_card: bool = False
    revision: str | None = None


def option(name: str, annotation: Any, default: Any = Parameter.empty) -> Parameter:
    """A command parameter (`annotation` is `Annotated[type, typer.Option(...)]`) for `backend_command`."""
    return Parameter(name, Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


_SHARED_HEAD = [option("model", ModelArg), option("out", OutOpt), option("quant", QuantOpt, "fp32")]
_SHARED_TAIL = [
    option("no_parity", NoParityOpt, False),
    option("full_context", FullContextOpt, False),
    option("force", ForceOpt, False),
    option("threads", ThreadsOpt, DEFAULT_THREADS),
    option("max_kl", MaxKlOpt, None),
    option("gates", GatesOpt, None),
    option("calib", CalibOpt, None),
    option("budget", BudgetOpt, None),
    option("as_json", JsonOpt, False),
    option("no_card", NoCardOpt, False),
    option("revision", RevisionOpt, None),
]


def _typer_option(opt: Any) -> Parameter:
    """A backend record's `Option` as a command parameter."""
    kwargs: dict[str, Any] = {"help": opt.help}
    if opt.min is not None:
        kwargs["min"] = opt.min
    return option(opt.name, Annotated[opt.type, typer.Option(**kwargs)], opt.default)


def backend_command(backend: Any, cli: typer.Typer) -> Callable[..., None]:
    """Register `lfm-export NAME MODEL -o OUT` (on `cli`) for a backend record (`lfm_export.backends.record`):
    the shared options plus the record's own (after `--quant`), `--max-seq-len` with the record's default and
    cost; build the recipe, export, run the parity gate, report (exit 1 if the gate fails)."""

    def command(**values: Any) -> None:
        require_torch(backend.name, backend.install)
        opts = ExportOptions(**{f.name: values.pop(f.name) for f in fields(ExportOptions)})
        _export(backend.name, opts, backend.recipe(opts.quant, opts.max_seq_len, **values))

    head = [*_SHARED_HEAD[:2], option("quant", QuantOpt, backend.quant_default)]
    context = option("max_seq_len", context_option(backend.context_default, backend.context_cost), None)
    own = [_typer_option(o) for o in backend.options]
    command.__signature__ = Signature([*head, *own, context, *_SHARED_TAIL])  # type: ignore[attr-defined]
    command.__name__ = backend.name
    command.__doc__ = backend.help
    return cli.command(backend.name)(command)


def _export(backend: str, opts: ExportOptions, recipe: Any) -> None:
    from lfm_export.pipeline import export_artifact
    from lfm_export.progress import Progress

    set_threads(opts.threads)
    outcome = export_artifact(
        backend,
        opts.model,
        opts.out,
        recipe,
        force=opts.force,
        parity=not opts.no_parity,
        threads=opts.threads,
        progress=Progress(quiet=opts.as_json),
        max_kl=opts.max_kl,
        gates_file=opts.gates,
        full_context=opts.full_context,
        calib=opts.calib,
        budget=opts.budget,
        card=not opts.no_card,
        revision=opts.revision,
    )
    _report_export(outcome, opts.as_json)


def _report_export(outcome: Any, as_json: bool) -> None:
    m = outcome.manifest
    p = m.get("parity", {})
    data = {
        "out": str(outcome.out),
        "model": m["model"]["source"],
        "backend": m["backend"],
        "recipe": m["recipe"],
        "total_bytes": m["total_bytes"],
        "ops": m.get("ops"),
        "parity": p,
        "timings_s": m.get("timings_s"),
    }
    text = [f"wrote {outcome.out} ({m['total_bytes'] / 1e6:.2f} MB, {m['recipe'].get('name')})"]
    if outcome.parity is not None:
        text.append(outcome.parity.verdict_line())
        text.append(f"reports: {outcome.out}/parity/parity.md, parity.json")
    emit(data, as_json, "\n".join(text))
    if outcome.passed is False:
        raise typer.Exit(1)


def register(cli: typer.Typer) -> None:
    """One export command per registered backend, in registry order."""
    for backend in all_backends().values():
        backend_command(backend, cli)
