"""The options and output helpers every `lfm-export` command shares (`cli.py`, `export_command.py`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from lfm_export.contract.errors import UserError

ModelArg = Annotated[
    str,
    typer.Argument(
        help="Checkpoint folder, a bundled model (tiny, tiny-moe), random:PRESET or a Hugging Face id (org/name)."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=1, help="CPU threads for torch / the runtime.")]

OutOpt = Annotated[
    Path, typer.Option("--out", "-o", help="Output artifact folder (must not exist unless --force).")
]
QuantOpt = Annotated[
    str,
    typer.Option(
        help="Recipe: fp32 | fp16 | bf16 | int8 | int4, with -bN (block 32 | 64 | 128), -asym, -a8, -mse, "
        "-imat or -gptq (calibrated) "
        "(int4-b64, int8-b128-asym; aliases 8da4w, 8da8w). The backend says which it supports."
    ),
]
PARITY_FILL = (
    "Parity fills the whole declared context up to 32768 tokens (near_max_seq_len: its time grows with the "
    "context); above that it compares positions past 8192 unless --full-context."
)


def context_option(default: str, cost: str) -> Any:
    """`--max-seq-len`, with the backend's default context, why, and what a longer one costs."""
    return Annotated[
        int | None,
        typer.Option(min=1, help=f"Context the artifact declares ({default}). {cost} {PARITY_FILL}"),
    ]


RevisionOpt = Annotated[
    str | None,
    typer.Option(help="Revision of a Hugging Face id MODEL (branch, tag or commit; default main)."),
]
NoCardOpt = Annotated[
    bool, typer.Option("--no-card", help="Write no model card (README.md with Hugging Face front matter).")
]
NoParityOpt = Annotated[bool, typer.Option("--no-parity", help="Skip the parity gate after export.")]
FullContextOpt = Annotated[
    bool,
    typer.Option(
        "--full-context",
        help="Parity fills the whole declared context even above 32768 tokens (by default, above it, it "
        "compares positions past 8192 instead).",
    ),
]
ForceOpt = Annotated[bool, typer.Option(help="Replace OUT if it exists.")]
MaxKlOpt = Annotated[
    float | None,
    typer.Option(
        "--max-kl", help="Quality gate: pooled KL mean against the fp32 reference at most this (strict)."
    ),
]
CalibOpt = Annotated[
    Path | None,
    typer.Option(
        "--calib",
        metavar="FILE",
        help="Calibration text (UTF-8) for the calibrated recipes (-imat, -gptq); default: the bundled one.",
    ),
]
BudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--budget",
        metavar="size=MB|kl=X",
        help="Per-layer precision to a budget: the least-KL mix within MB weight bytes, or the smallest within "
        "an estimated KL, from each tensor group's KL measured on the calibration text (ONNX, MLX, ExecuTorch).",
    ),
]
GatesOpt = Annotated[
    Path | None,
    typer.Option(
        "--gates", metavar="FILE", help="Quality gate from a JSON gates file, by recipe name (strict)."
    ),
]


def emit(data: Any, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(data, indent=2) if as_json else text)


def require_torch(command: str, extra: str = "onnx") -> None:
    """The commands that run the canonical model need PyTorch, which the runtime-only installs leave out."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise UserError(
            f"`lfm-export {command}` needs PyTorch (not in this install): pip install 'lfm-export[{extra}]'"
        )


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
