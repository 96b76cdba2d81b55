"""`lfm-export` command line. Results go to stdout (`--json` for machines), progress to stderr.

Exit codes: 0 success / parity passed, 1 parity or check failed, 2 usage or input error, 3 internal error.
"""

from __future__ import annotations

import json
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, fields
from inspect import Parameter, Signature
from pathlib import Path
from typing import Annotated, Any

import typer

from lfm_export.backends import all_backends
from lfm_export.contract.errors import UserError
from lfm_export.contract.session import DEFAULT_THREADS

app = typer.Typer(
    name="lfm-export",
    help="Export, quantize and parity-check Liquid AI LFM2 / LFM2.5 models for edge runtimes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_state = {"verbose": False}

ModelArg = Annotated[
    str, typer.Argument(help="Checkpoint folder, a bundled model (tiny, tiny-moe) or random:PRESET.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=1, help="CPU threads for torch / the runtime.")]


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show tracebacks on errors.")] = False,
) -> None:
    _state["verbose"] = verbose


def _emit(data: Any, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(data, indent=2) if as_json else text)


def _require_torch(command: str, extra: str = "onnx") -> None:
    """The commands that run the canonical model need PyTorch, which the runtime-only installs leave out."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise UserError(
            f"`lfm-export {command}` needs PyTorch (not in this install): pip install 'lfm-export[{extra}]'"
        )


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


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
    from lfm_export.presets import PRESETS

    rows = []
    for p in PRESETS.values():
        c = p.config
        rows.append(
            {
                "name": p.name,
                "params": p.params,
                "active_params": p.active_params,
                "published": p.published_label,
                "published_params": p.published_params,
                "model_type": c.model_type,
                "hidden_size": c.hidden_size,
                "layers": c.num_hidden_layers,
                "attention_layers": c.attn_layers,
                "heads": c.num_attention_heads,
                "kv_heads": c.num_key_value_heads,
                "ffn": c.intermediate_size,
                "vocab_size": c.vocab_size,
                "experts": f"{c.num_experts} x {c.moe_intermediate_size}, top-{c.num_experts_per_tok}"
                if c.is_moe
                else "",
                "unconfirmed": list(p.unconfirmed),
                "aliases": list(p.aliases),
                "notes": p.notes,
            }
        )
    if as_json:
        _emit(rows, True, "")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(
        "preset",
        "params",
        "active",
        "published",
        "layers (attn idx)",
        "heads/kv",
        "ffn",
        "vocab",
        "unconfirmed",
    )
    for r in rows:
        t.add_row(
            r["name"],
            f"{r['params']:,}",
            f"{r['active_params']:,}",
            r["published"],
            f"{r['layers']} ({','.join(map(str, r['attention_layers']))})",
            f"{r['heads']}/{r['kv_heads']}",
            r["experts"] or str(r["ffn"]),
            str(r["vocab_size"]),
            ", ".join(r["unconfirmed"]) or "-",
        )
    Console().print(t)


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
    _require_torch("check", "test")
    from lfm_export.check import run_check
    from lfm_export.loading import load_model
    from lfm_export.progress import Progress

    _threads(threads)
    progress = Progress(quiet=as_json)
    with progress.step(f"Loading {model}"):
        loaded = load_model(model)
    with progress.step("Running canonical model and transformers"):
        result = run_check(loaded, _prompt_ids(loaded, prompt), steps, tolerance)
    verdict = "PASS" if result.passed else "FAIL"
    parts = ", ".join(f"{k} {v:.2e}" for k, v in result.parts.items())
    _emit(
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
    _require_torch("generate")
    from lfm_export.loading import load_model
    from lfm_export.parity.reference import ReferenceSession

    _threads(threads)
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
OutOpt = Annotated[
    Path, typer.Option("--out", "-o", help="Output artifact folder (must not exist unless --force).")
]
QuantOpt = Annotated[
    str,
    typer.Option(
        help="Recipe: fp32 | fp16 | bf16 | int8 | int4, with -bN (block 32 | 64 | 128), -asym, -a8, -mse "
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
GatesOpt = Annotated[
    Path | None,
    typer.Option(
        "--gates", metavar="FILE", help="Quality gate from a JSON gates file, by recipe name (strict)."
    ),
]


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
    as_json: bool


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
    option("as_json", JsonOpt, False),
]


def _typer_option(opt: Any) -> Parameter:
    """A backend record's `Option` as a command parameter."""
    kwargs: dict[str, Any] = {"help": opt.help}
    if opt.min is not None:
        kwargs["min"] = opt.min
    return option(opt.name, Annotated[opt.type, typer.Option(**kwargs)], opt.default)


def backend_command(backend: Any, cli: typer.Typer = app) -> Callable[..., None]:
    """Register `lfm-export NAME MODEL -o OUT` (on `cli`) for a backend record (`lfm_export.backends.record`):
    the shared options plus the record's own (after `--quant`), `--max-seq-len` with the record's default and
    cost; build the recipe, export, run the parity gate, report (exit 1 if the gate fails)."""

    def command(**values: Any) -> None:
        _require_torch(backend.name, backend.install)
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

    _threads(opts.threads)
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
    )
    _report_export(outcome, opts.as_json)


def _report_export(outcome: Any, as_json: bool) -> None:
    m = outcome.manifest
    p = m.get("parity", {})
    data = {
        "out": str(outcome.out),
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
    _emit(data, as_json, "\n".join(text))
    if outcome.passed is False:
        raise typer.Exit(1)


for _backend in all_backends().values():
    backend_command(_backend)


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
    as_json: JsonOpt = False,
) -> None:
    """Re-check an artifact's numerical parity against the fp32 reference model; exit 1 if the gate fails."""
    _require_torch("parity")
    from lfm_export.loading import load_model
    from lfm_export.pipeline import check_artifact
    from lfm_export.progress import Progress

    loaded = load_model(model) if model else None
    result = check_artifact(
        artifact,
        loaded,
        threads=threads,
        progress=Progress(quiet=as_json),
        max_kl=max_kl,
        gates_file=gates,
        full_context=full_context,
    )
    _emit(
        result.to_json(),
        as_json,
        result.verdict_line() + f"\nreports: {artifact}/parity/parity.md, parity.json",
    )
    raise typer.Exit(0 if result.passed else 1)


@app.command()
def run(
    artifact: ArtifactArg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt text.")],
    chat: Annotated[
        bool, typer.Option(help="Wrap the prompt as a user turn with the chat template.")
    ] = False,
    greedy: Annotated[
        bool, typer.Option(help="Greedy decoding instead of generation_config.json sampling.")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 128,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    threads: ThreadsOpt = DEFAULT_THREADS,
) -> None:
    """Stream text from an artifact through its runtime shim (no PyTorch needed for ONNX)."""
    from lfm_export.backends import open_session

    if not (artifact / "tokenizer.json").is_file():
        raise UserError(f"{artifact} has no tokenizer.json; run needs one")
    _stream(open_session(artifact, threads=threads), artifact, prompt, chat, max_new_tokens, greedy, seed)


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
    _emit(
        r,
        as_json,
        (
            f"{r['backend']} {r['recipe']}: load {r['load_s']:.2f}s, prefill {r['prefill_tok_s']:.1f} tok/s "
            f"({prompt_len} tokens), decode {r['decode_tok_s']:.1f} tok/s ({new_tokens} tokens), "
            f"peak RSS {r['peak_rss_bytes'] / 1e6:.0f} MB, size {(r['artifact_bytes'] or 0) / 1e6:.1f} MB, "
            f"{threads} threads"
        ),
    )


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
            if not folder.is_dir():
                raise UserError(
                    f"{target}: not an artifact folder, a model folder, a bundled model or random:PRESET"
                )
            cfg = Lfm2Config.from_file(folder / "config.json")
        info = {"model": target, "config": cfg.to_dict(), "signature": build_signature(cfg).to_dict()}
        lines = [
            f"model     {target}",
            *_tree("config", info["config"]),
            *_signature_lines(info["signature"]),
        ]
    _emit(info, as_json, "\n".join(lines))


_SHOWN_FIRST = ("backend", "recipe", "model", "max_seq_len", "parity", "files", "total_bytes", "signature")
_NOT_SHOWN = ("schema_version", "config")
"""`config` repeats the model's config.json (`--json` shows it); the rest of the manifest is shown as is."""


def manifest_lines(m: dict[str, Any]) -> list[str]:
    """A manifest of any backend as text: the common entries first, then every other key as it is stored."""
    recipe = m.get("recipe") if isinstance(m.get("recipe"), dict) else {"name": m.get("recipe")}
    lines = [f"backend   {m.get('backend')}"]
    lines += _headed("recipe", str(recipe.get("name")), {k: v for k, v in recipe.items() if k != "name"})
    model = dict(m.get("model") or {})
    random = "  (RANDOM WEIGHTS)" if model.pop("random_weights", False) else ""
    lines += _headed("model", f"{model.pop('source', '?')}{random}", model)
    if m.get("max_seq_len") is not None:
        lines.append(f"context   {m['max_seq_len']} tokens")
    lines += _parity_lines(m.get("parity"))
    files = m.get("files") or []
    lines.append(f"files     {len(files)}, {(m.get('total_bytes') or 0) / 1e6:.2f} MB")
    for f in files:
        if isinstance(f, dict):
            lines.append(f"  {f.get('path', '?'):<40} {f.get('bytes', 0):>14,} B")
        else:
            lines.append(f"  {f}")
    lines += _signature_lines(m.get("signature") or {})
    for key, value in m.items():
        if key not in _SHOWN_FIRST and key not in _NOT_SHOWN:
            lines += _tree(key, value)
    return lines


def _parity_lines(p: Any) -> list[str]:
    if not isinstance(p, dict) or "passed" not in p:
        status = p.get("status", "not run") if isinstance(p, dict) else "not run"
        return [f"parity    {status}"]
    title = str(p.get("verdict") or ("PASSED" if p["passed"] else "FAILED"))
    return _headed("parity", title, {k: v for k, v in p.items() if k not in ("passed", "verdict")})


def _signature_lines(sig: dict[str, Any]) -> list[str]:
    """Inputs, outputs and other tensor lists (such as `held` state) of a signature, then its other keys."""
    groups = {
        k: v for k, v in sig.items() if isinstance(v, list | tuple) and all(isinstance(s, dict) for s in v)
    }
    other = {k: v for k, v in sig.items() if k not in groups and k != "form"}
    lines = _headed("signature", f"{sig.get('form', '?')} form", other)
    for group, specs in groups.items():  # an empty group (no held state) shows nothing
        label = {"inputs": "in", "outputs": "out"}.get(group, group)
        for s in specs:
            shape = ", ".join(map(str, s.get("shape", [])))
            lines.append(f"  {label:<5} {s.get('name', '?'):<28} {s.get('dtype', ''):<8} [{shape}]")
    return lines


def _headed(key: str, title: str, fields: dict[str, Any]) -> list[str]:
    """`key title (fields inline)` when it fits in 110 characters, else `key title` and the fields below."""
    line = f"{key.ljust(9)} {title}" + (f"  ({_inline(fields)})" if fields else "")
    if len(line) <= 110:
        return [line]
    return [f"{key.ljust(9)} {title}", *(sub for k, v in fields.items() for sub in _tree(str(k), v, 1))]


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_inline(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _tree(key: str, value: Any, depth: int = 0) -> list[str]:
    """`key value` on one line when it fits in 110 characters, else `key` and its entries indented below."""
    pad = "  " * depth
    line = f"{pad}{key.ljust(9 - len(pad))} {_inline(value)}"
    if len(line) <= 110 or not isinstance(value, dict | list):
        return [line]
    items = value.items() if isinstance(value, dict) else enumerate(value)
    return [f"{pad}{key}", *(sub for k, v in items for sub in _tree(str(k), v, depth + 1))]


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
