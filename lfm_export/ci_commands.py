"""The commands a CI pipeline runs around the exports: `compare` (base vs head) and `matrix` (a set of exports,
run here or spread over the CI's own job matrix). Their logic lives in `lfm_export.compare` and
`lfm_export.matrix`; this module only declares the commands."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from lfm_export.cli_options import JsonOpt, ThreadsOpt, emit


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


def register(cli: typer.Typer) -> None:
    """`compare` and `matrix` on `cli`."""
    cli.command("compare")(compare)


_ = ThreadsOpt, Emit
