"""`lfm-export` command line. Results go to stdout (`--json` for machines), progress to stderr.

Exit codes: 0 success / parity passed, 1 parity or check failed, 2 usage or input error, 3 internal error.
"""

from __future__ import annotations

import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

from lfm_export.ci_commands import register as register_ci_commands
from lfm_export.cli_options import (
    FullContextOpt,
    GatesOpt,
    JsonOpt,
    MaxKlOpt,
    ModelArg,
    ThreadsOpt,
    emit,
    require_torch,
    set_threads,
)
from lfm_export.contract.errors import UserError
from lfm_export.contract.session import DEFAULT_THREADS
from lfm_export.describe import manifest_lines, model_lines
from lfm_export.export_command import register

app = typer.Typer(
    name="lfm-export",
    help="Export, quantize and parity-check Liquid AI LFM2 / LFM2.5 models for edge runtimes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_state = {"verbose": False}


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.")] = False,
) -> None:
    _state["verbose"] = verbose


def _prompt_ids(loaded: Any, text: str) -> list[int]:
    """Token ids of `text` with the model's tokenizer; seeded pseudo-random ids when it has none."""
    if loaded.tokenizer_file is not None:
        from lfm_export.runtime.tokenizer import Tokenizer

        return Tokenizer.from_folder(loaded.path).encode(text, add_bos=True)
    import numpy as np

    rng = np.random.default_rng(0)
    return [loaded.config.bos_token_id, *rng.integers(16, loaded.config.vocab_size, size=15).tolist()]


# ---- presets ----------------------------------------------------------------------------------------
@app.command()
def presets(as_json: JsonOpt = False) -> None:
    """List the built-in architectures (use as random:NAME) with parameter counts computed from the config."""
    from lfm_export.describe import preset_rows, print_presets

    rows = preset_rows()
    if as_json:
        emit(rows, True, "")
        return
    print_presets(rows)


# ---- check ------------------------------------------------------------------------------------------------
@app.command()
def check(
    model: ModelArg,
    prompt: Annotated[str, typer.Option(help="Prompt text (tokenized with the model's tokenizer).")] = (
        "Once upon a time, a little fox lived in the forest."
    ),
    steps: Annotated[int, typer.Option(help="Greedy decode steps with state carried.")] = 32,
    tolerance: Annotated[float, typer.Option(help="Max abs logit error allowed.")] = 1e-4,
    threads: ThreadsOpt = DEFAULT_THREADS,
    as_json: JsonOpt = False,
) -> None:
    """Compare the canonical model with transformers' Lfm2ForCausalLM / Lfm2MoeForCausalLM on MODEL (fp32)."""
    require_torch("check", "test")
    from lfm_export.check import run_check
    from lfm_export.loading import load_model
    from lfm_export.progress import Progress

    set_threads(threads)
    progress = Progress(quiet=as_json)
    with progress.step(f"Loading {model}"):
        loaded = load_model(model)
    with progress.step("Running canonical model and transformers"):
        result = run_check(loaded, _prompt_ids(loaded, prompt), steps, tolerance)
    verdict = "PASS" if result.passed else "FAIL"
    parts = ", ".join(f"{k} {v:.2e}" for k, v in result.parts.items())
    emit(
        result.to_dict(),
        as_json,
        f"{verdict}: max abs logit error {result.max_abs_error:.3e} (tolerance {tolerance:g}; {parts}); "
        f"greedy tokens {'match' if result.greedy_match else 'DIFFER'}; transformers' config parsed by "
        f"{result.reference_config}",
    )
    raise typer.Exit(0 if result.passed else 1)


# ---- generate -------------------------------------------------------------------------------------------
@app.command()
def generate(
    model: ModelArg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text.")],
    chat: Annotated[
        bool, typer.Option(help="Wrap the prompt as a user turn with the chat template.")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 128,
    greedy: Annotated[
        bool, typer.Option(help="Greedy decoding instead of generation_config.json sampling.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    threads: ThreadsOpt = DEFAULT_THREADS,
) -> None:
    """Stream text from the reference (PyTorch) model."""
    require_torch("generate")
    from lfm_export.loading import load_model
    from lfm_export.parity.reference import ReferenceSession

    set_threads(threads)
    loaded = load_model(model)
    if loaded.path is None or loaded.tokenizer_file is None:
        raise UserError(f"{model} has no tokenizer.json; generate needs one")
    session = ReferenceSession(loaded.model, max_seq_len=loaded.config.max_position_embeddings)
    _stream(session, loaded.path, prompt, chat, max_new_tokens, greedy, seed)


def _stream(
    session: Any, folder: Path, prompt: str, chat: bool, max_new: int, greedy: bool, seed: int
) -> None:
    from lfm_export.runtime.generate import stream_generate
    from lfm_export.runtime.sampler import GenerationConfig
    from lfm_export.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(folder)
    cfg = GenerationConfig.from_folder(folder).replace(
        max_new_tokens=max_new, do_sample=False if greedy else None
    )
    if chat:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]), add_bos=False)
    else:
        ids = tok.encode(prompt, add_bos=True)
        typer.echo(prompt, nl=False)
    for piece in stream_generate(session, tok, ids, cfg, seed=seed):
        typer.echo(piece, nl=False)
        sys.stdout.flush()
    typer.echo()


# ---- export commands: one declaration shared by every backend ---------------------------------------------
register(app)


ArtifactArg = Annotated[Path, typer.Argument(help="An artifact folder written by lfm-export.")]


@app.command()
def parity(
    artifact: ArtifactArg,
    model: Annotated[
        str, typer.Option(help="Reference model (defaults to the one recorded in the manifest).")
    ] = "",
    threads: ThreadsOpt = DEFAULT_THREADS,
    max_kl: MaxKlOpt = None,
    gates: GatesOpt = None,
    full_context: FullContextOpt = False,
    corpus: Annotated[
        Path | None,
        typer.Option(
            help="Instead of the gates: KL against fp32 over this text file (llama.cpp statistics)."
        ),
    ] = None,
    ctx: Annotated[int, typer.Option(help="Tokens per --corpus chunk (the second half is scored).")] = 512,
    stream_reference: Annotated[
        bool,
        typer.Option(
            help="Compute the fp32 reference and the simulation one layer at a time (automatic where they "
            "do not fit in memory)."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Re-check an artifact's numerical parity against the fp32 reference model; exit 1 if the gate fails."""
    require_torch("parity")
    from lfm_export.loading import load_model
    from lfm_export.pipeline import check_artifact
    from lfm_export.progress import Progress

    loaded = load_model(model, lazy=True) if model else None
    if corpus is not None:
        from lfm_export.corpus_check import run_corpus
        from lfm_export.parity.corpus import corpus_line

        report = run_corpus(artifact, corpus, ctx, loaded and loaded.materialized(), threads)
        emit(report, as_json, corpus_line(report))
        return
    result = check_artifact(
        artifact,
        loaded,
        threads=threads,
        progress=Progress(quiet=as_json),
        max_kl=max_kl,
        gates_file=gates,
        full_context=full_context,
        stream=stream_reference,
    )
    emit(
        result.to_json(),
        as_json,
        result.verdict_line() + f"\nreports: {artifact}/parity/parity.md, parity.json",
    )
    raise typer.Exit(0 if result.passed else 1)


@app.command()
def run(
    artifact: ArtifactArg,
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="Prompt text (with --chat: the one user turn).")
    ] = None,
    chat: Annotated[
        bool,
        typer.Option(
            help="A conversation with the chat template; without --prompt, one turn per stdin line "
            "(/reset, /save FILE, /load FILE, /quit)."
        ),
    ] = False,
    system: Annotated[str | None, typer.Option(help="System prompt of the conversation (--chat).")] = None,
    tools: Annotated[
        Path | None, typer.Option(help="JSON list of tool definitions the template lists (--chat).")
    ] = None,
    tool_results: Annotated[
        Path | None,
        typer.Option(help="JSON fed back as the tool turn after the first reply that calls a tool (--chat)."),
    ] = None,
    greedy: Annotated[
        bool, typer.Option(help="Greedy decoding instead of generation_config.json sampling.")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 128,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    threads: ThreadsOpt = DEFAULT_THREADS,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Per chat turn: tokens prefilled and reused (stderr).")
    ] = False,
) -> None:
    """Stream text from an artifact through its runtime shim (no PyTorch needed for ONNX)."""
    from lfm_export.backends import open_session

    if not (artifact / "tokenizer.json").is_file():
        raise UserError(f"{artifact} has no tokenizer.json; run needs one")
    if not chat:
        extra = [
            n for n, v in (("--system", system), ("--tools", tools), ("--tool-results", tool_results)) if v
        ]
        if extra:
            raise UserError(f"{extra[0]} needs --chat")
        if prompt is None:
            raise UserError("run needs --prompt (or --chat for a conversation)")
        _stream(open_session(artifact, threads=threads), artifact, prompt, chat, max_new_tokens, greedy, seed)
        return
    from lfm_export.chat import ChatLoop, read_json_file, read_tools
    from lfm_export.runtime.conversation import Conversation
    from lfm_export.runtime.sampler import GenerationConfig
    from lfm_export.runtime.tokenizer import Tokenizer

    tool_list = read_tools(tools) if tools else None
    results = read_json_file(tool_results, "tool results") if tool_results else None
    tok = Tokenizer.from_folder(artifact)
    if tok.template_source == "fallback":
        typer.echo(f"note: {artifact} ships no chat template; using lfm-export's LFM2 fallback", err=True)
    cfg = GenerationConfig.from_folder(artifact).replace(
        max_new_tokens=max_new_tokens, do_sample=False if greedy else None
    )
    conv = Conversation(
        open_session(artifact, threads=threads), tok, cfg, system=system, tools=tool_list, seed=seed
    )
    loop = ChatLoop(conv, verbose=verbose or _state["verbose"], tool_results=results)
    if prompt is not None:
        loop.turn(prompt)
    else:
        loop.run(sys.stdin, interactive=sys.stdin.isatty())
    if loop.failed:
        raise typer.Exit(2)


@app.command()
def bench(
    artifact: ArtifactArg,
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens to prefill.")] = 512,
    new_tokens: Annotated[int, typer.Option(help="Tokens to decode.")] = 128,
    threads: ThreadsOpt = DEFAULT_THREADS,
    as_json: JsonOpt = False,
) -> None:
    """Measure load time, prefill and decode tokens/s, peak RSS and size of an artifact."""
    from lfm_export.bench import bench_artifact

    r = bench_artifact(artifact, prompt_len, new_tokens, threads)
    emit(
        r,
        as_json,
        (
            f"{r['backend']} {r['recipe']}: load {r['load_s']:.2f}s, prefill {r['prefill_tok_s']:.1f} tok/s "
            f"({prompt_len} tokens), decode {r['decode_tok_s']:.1f} tok/s ({new_tokens} tokens), "
            f"peak RSS {r['peak_rss_bytes'] / 1e6:.0f} MB, size {(r['artifact_bytes'] or 0) / 1e6:.1f} MB, "
            f"{threads} threads"
        ),
    )


# ---- compare, matrix: the CI flow (lfm_export.ci_commands) ------------------------------------------------
register_ci_commands(app)


# ---- inspect ---------------------------------------------------------------------------------------------
@app.command()
def inspect(
    target: Annotated[
        str, typer.Argument(help="An artifact folder, or a model (folder, tiny, random:PRESET).")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Show an artifact's manifest (any backend) or a model's config, with the I/O signature."""
    path = Path(target)
    if (path / "manifest.json").is_file():
        from lfm_export.manifest import read_manifest

        info = read_manifest(path)
        lines = [f"artifact  {path}", *manifest_lines(info)]
    else:
        from lfm_export.config import Lfm2Config
        from lfm_export.loading import BUNDLED
        from lfm_export.presets import get_preset
        from lfm_export.signature import build_signature

        if target.startswith("random:"):
            cfg = get_preset(target.split(":", 1)[1]).config
        else:
            folder = BUNDLED.get(target, path)
            if not folder.is_dir() and target not in BUNDLED:
                from lfm_export.hub import fetch, is_hub_id

                folder = fetch(target).folder if is_hub_id(target) else folder
            if not folder.is_dir():
                raise UserError(
                    f"{target}: not an artifact folder, a model folder, a bundled model, random:PRESET or a "
                    "Hugging Face id"
                )
            cfg = Lfm2Config.from_file(folder / "config.json")
        info = {"model": target, "config": cfg.to_dict(), "signature": build_signature(cfg).to_dict()}
        lines = model_lines(target, info)
    emit(info, as_json, "\n".join(lines))


def _on_signal(signum: int, frame: Any) -> None:
    """While an artifact is being written, Ctrl-C (SIGINT) or a cancel (SIGTERM, what CI systems and `timeout`
    send) removes its temporary folder and exits 128 + the signal number at once (130, 143): a
    KeyboardInterrupt raised inside torch's tracing can crash the process (exit -11), and SIGTERM's default
    action ends the process without cleanup, which leaves `.OUT.tmp-*` behind. Otherwise SIGINT is raised as
    usual and SIGTERM exits 143."""
    _state["interrupted"] = True
    from lfm_export.manifest import LIVE_TEMP_FOLDERS

    if LIVE_TEMP_FOLDERS:
        import os
        import shutil

        for tmp in list(LIVE_TEMP_FOLDERS):
            shutil.rmtree(tmp, ignore_errors=True)
        sys.stderr.write("interrupted\n" if signum == signal.SIGINT else "terminated\n")
        sys.stderr.flush()
        os._exit(128 + signum)
    if signum == signal.SIGINT:
        signal.default_int_handler(signum, frame)
    sys.stderr.write("terminated\n")
    sys.stderr.flush()
    sys.exit(128 + signum)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2 (usage errors: typer's).

    Ctrl-C is exit 130 even where a library wraps the KeyboardInterrupt in an exception of its own (the
    handler records that an interrupt happened), SIGTERM exit 143; the export's temporary folder goes either
    way."""
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        app()
    except KeyboardInterrupt:
        _exit("interrupted", 130)
    except Exception as e:
        if _state.get("interrupted"):
            _exit("interrupted", 130)
        if _state["verbose"]:
            traceback.print_exc()
        if isinstance(e, UserError):
            _exit(f"error: {e}", e.exit_code)
        # a bug, not bad input: still one line unless --verbose
        _exit(f"internal error: {type(e).__name__}: {e} (run with --verbose for the traceback)", 3)


def _exit(message: str, code: int) -> None:
    typer.echo(message, err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
