"""The commands a CI pipeline runs around the exports: `compare` (base vs head) and `matrix` (a set of exports,
run here or spread over the CI's own job matrix). Their logic lives in `lfm_export.compare` and
`lfm_export.matrix`; this module only declares the commands."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from lfm_export.cli_options import JsonOpt, emit


class CompareFormat(str, Enum):
    markdown = "markdown"
    github = "github"


class Emit(str, Enum):
    github = "github"
    gitlab = "gitlab"


SideArg = (
    "An artifact folder, a matrix output folder, or a JSON report (matrix.json, export --json, parity.json)."
)


def compare(
    base: Annotated[Path, typer.Argument(help=f"The base side. {SideArg}")],
    head: Annotated[Path, typer.Argument(help="The head side, as BASE.")],
    fail_on: Annotated[
        str,
        typer.Option(
            "--fail-on",
            help="Tolerances that fail (exit 1): kl=+10%,size=+2%,decode=-5% (figures: kl, top1, "
            "top1_decisive, greedy, exact, size, load, prefill, decode, rss). A verdict regression always fails.",
        ),
    ] = "",
    fmt: Annotated[
        CompareFormat,
        typer.Option(
            "--format",
            help="markdown: the full report on stdout; github: also appends it to $GITHUB_STEP_SUMMARY and "
            "prints the pull-request comment body (at most 60 lines).",
        ),
    ] = CompareFormat.markdown,
    comment_file: Annotated[
        Path | None, typer.Option("--comment", metavar="FILE", help="Write the comment body to FILE.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare two exports, artifact by artifact (verdict, exactness margin, KL / top-1, greedy divergence, size,
    bench figures); exit 1 when a --fail-on tolerance is exceeded or a verdict regresses."""
    from lfm_export.compare import comment, compare, load_side, markdown, parse_fail_on, write_github

    tolerances = parse_fail_on(fail_on)
    result = compare(load_side(base), load_side(head), tolerances)
    if fmt is CompareFormat.github:
        text = write_github(result, comment_file)
    else:
        text = markdown(result).rstrip()
        if comment_file is not None:
            comment_file.write_text(comment(result))
    emit(result.to_json(), as_json, text.rstrip())
    raise typer.Exit(1 if result.failed else 0)


def matrix(
    spec: Annotated[Path, typer.Argument(help="The matrix spec (YAML, or TOML by its .toml suffix).")],
    run: Annotated[
        bool, typer.Option("--run", help="Run the entries here and write the combined report.")
    ] = False,
    emit_ci: Annotated[
        Emit | None,
        typer.Option("--emit", help="Print the CI's own pipeline for the spec (one job per entry) and exit."),
    ] = None,
    report: Annotated[
        bool,
        typer.Option(
            "--report", help="Combine the entry results already under OUT (gathered CI jobs) and gate."
        ),
    ] = False,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (an artifact folder per entry id).")
    ] = Path("matrix-out"),
    only: Annotated[
        list[str] | None,
        typer.Option("--only", metavar="GLOB", help="Only the entries whose id matches (repeatable)."),
    ] = None,
    jobs: Annotated[
        int | None, typer.Option("--jobs", min=1, help="Exports at once at most (default: the CPU count).")
    ] = None,
    memory_gb: Annotated[
        float | None,
        typer.Option("--memory", help="Memory the exports may use together, GB (default: 80% of available)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a matrix of exports (models x backends x recipes, per-entry gates) here with bounded concurrency, or
    emit it as a GitHub Actions / GitLab CI pipeline; exit 1 when any entry fails its gate or errs."""
    from lfm_export.contract.errors import UserError
    from lfm_export.matrix import export_memory_estimate, read_spec, run_matrix, select, write_report

    if sum([run, report, emit_ci is not None]) > 1:
        raise UserError("choose one of --run, --report and --emit")
    parsed = read_spec(spec)
    if emit_ci is not None:
        from lfm_export.ci_emit import emit as emit_pipeline

        typer.echo(emit_pipeline(emit_ci.value, parsed), nl=False)
        return
    if run or report:
        memory = None if memory_gb is None else int(memory_gb * 1e9)
        result = (
            run_matrix(parsed, out, only=only, jobs=jobs, memory=memory) if run else write_report(out, parsed)
        )
        from lfm_export.matrix import report_markdown

        emit(result, as_json, report_markdown(result).rstrip())
        raise typer.Exit(0 if result["passed"] else 1)
    plan = [{"id": e.id, "estimate_bytes": export_memory_estimate(e)} for e in select(parsed, only or [])]
    text = "\n".join(f"{p['id']}  (estimate {p['estimate_bytes'] / 1e9:.2f} GB)" for p in plan)
    emit(plan, as_json, text)


def register(cli: typer.Typer) -> None:
    """`compare` and `matrix` on `cli`."""
    cli.command("compare")(compare)
    cli.command("matrix")(matrix)
