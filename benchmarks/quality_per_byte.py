"""Quality per byte on every backend: lfm-export's 4-bit recipes next to each ecosystem's own exporter on the same
weights, measured by one harness in one run with the same threads.

    .venv/bin/python benchmarks/quality_per_byte.py --models tiny out/trained/small --threads 1 \\
        --llama-src LLAMA_SRC --json benchmarks/results/quality_per_byte_frontier.json --svg docs/quality_per_byte.svg

(`LLAMA_SRC`: the `vendor/llama.cpp` folder of llama-cpp-python's sdist, as for `gguf_vs_llamacpp.py`;
`--backends` picks backends, `--merge A.json --merge B.json` with no `--models` combines earlier runs: a later
file's points of a model replace the earlier's of the same backend and recipe, each point keeping its run's
date in `run_date`, the model's `runs` each run's provenance by that date; `--drop MODEL[:BACKEND[:RECIPE]]`
removes a model, one backend's points or one point after this command's merges: drop stale points from the earlier file in one
command, then merge its output with the new runs in another.)

Points, one function per backend and one per peer (`POINTS`), each returning artifact folders:

| backend | ours (`lfm-export BACKEND --quant R`) | peer |
|---|---|---|
| onnx | int4-b32, int4-b64-gptq, int4-b128-gptq, the two gptq ones `+t4` | onnxruntime-genai builder `-p int4` (its default RTN) and `algo_config=k_quant` |
| mlx | int4-b32, int4-b64, int4-b64-gptq, int4-b128-gptq, the two gptq ones `+t4` | `mlx_lm.convert` q4 g64 (its default); `mlx_lm.quant.gptq` on our calibration text |
| gguf | q4_0, q4_k_m, q4_k_m-mse | llama.cpp `convert_hf_to_gguf.py` + `llama_model_quantize` q4_0, q4_k_m; with `--llama-build`, also with an importance matrix (below) |
| executorch | int4-b32-a8 (`8da4w`), int4-b128-a8 | `export_llm` with `lfm2_xnnpack_q8da4w.yaml` |

Per point: `weight_bytes` (the bytes of the weight tensors as the format stores them: ONNX initializers,
safetensors tensors, GGUF tensors; a `.pte` counts whole, its graph included), `file_bytes` (the artifact's
model files), KL against the fp32 model (the canonical model in torch, the same reference for every tool):
`pooled` (the parity scenarios prefill, decode, chunked_prefill and batch2 where the runtime batches, quality
half only: `kl_mean` over every position) and `corpus` (`lfm_export.parity.corpus`, llama.cpp's
`--kl-divergence` protocol: held-out text of the bundled corpus, chunks of `--ctx` tokens from an empty state,
the second half of each scored: mean, its standard error, p99, top-1), and decode tok/s: `--new-tokens`
greedy steps after a `--prompt-len` random prompt, a fresh process per run, `--repeats` rounds each running
every artifact of the model once in turn (a slow spell on the shared machine hits all alike), best run kept,
the load average before each run recorded.

Every artifact runs through a `Session` (`lfm_export.contract.session`): ours and the ONNX builder's and
llama.cpp's files through our runtime shims (the peer files given our manifest), mlx-lm's folder through
`MlxLmSession` (its model and prompt cache) and ExecuTorch's own program through `EtProgramSession` (its
`forward(tokens, input_pos)`, one-token calls for every position's logits; the program is loaded afresh at each
reset, because nothing says its conv state starts from zeros at position 0).

A point `NAME+t4` exports `--quant NAME --head-bits 4 --embedding-quant 4` (the lm_head and the token table at 4
bits in the recipe's blocks, as the builder and mlx-lm hold them; ours are int8 by default). `--ours R ...`
replaces the lfm-export points of the backends run. A recipe point `NAME@BUDGET` exports `--quant NAME --budget BUDGET` (a precision mix chosen to `size=MB` or
`kl=X`, `lfm_export.budget`); `-awq` recipes fold activation-aware scales into the norms (`lfm_export.awq`).
`benchmarks/budget_awq_quality.py` measures those two on the simulation alone (no artifacts).

llama.cpp with an importance matrix (`--llama-build DIR`: points `llama.cpp-q4_0-imat`, `llama.cpp-q4_k_m-imat`):
`llama-imatrix` over the same calibration text and token budget as our calibrated recipes, then
`llama-quantize --imatrix`, both tools built from `--llama-src` into DIR with CMake the first time
(`llama_tools`): llama-cpp-python builds the library but neither tool, and its binding's
`llama_model_quantize_params.imatrix` is a pointer to a C++ map that ctypes cannot build.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "examples"))

from provenance import provenance  # noqa: E402

from lfm_export.contract.session import SessionBase  # noqa: E402

BIN = Path(sys.executable).parent
TABLES_4 = "t4"
"""A point's suffix `+t4`: the lm_head and the embedding table at 4 bits in the recipe's blocks (`--head-bits 4
--embedding-quant 4`), as the peers hold them."""
OURS_ONNX = ("int4-b32", "int4-b64-gptq", "int4-b128-gptq", "int4-b64-gptq+t4", "int4-b128-gptq+t4")
OURS_MLX = (
    "int4-b32",
    "int4-b64",
    "int4-b64-gptq",
    "int4-b128-gptq",
    "int4-b64-gptq+t4",
    "int4-b128-gptq+t4",
)
OURS_GGUF = ("q4_0", "q4_k_m", "q4_k_m-mse")
THEIRS_GGUF = ("q4_0", "q4_k_m")
"""llama.cpp's types quantized by default (`--theirs` picks others: also `q3_k_s`, `q3_k_m`, `q8_0`, `q6_k`)."""
OURS_ET = ("int4-b32-a8", "int4-b128-a8")
PEER_DEFAULT = {
    "onnx": "genai-builder-int4",
    "mlx": "mlx-lm-q4-g64",
    "gguf": "llama.cpp-q4_k_m",
    "executorch": "export_llm-q8da4w",
}
"""Each backend's peer default 4-bit recipe, the point the goals compare against."""
OUR_DEFAULT = {"onnx": "int4-b32", "mlx": "int4-b32", "gguf": "q4_k_m", "executorch": "int4-b32-a8"}
"""Our recommended 4-bit recipe of each backend today (README / alias meaning)."""


# ---- running and sizing -------------------------------------------------------------------------------------

MEASURE = (
    "import json, resource, subprocess, sys, time; t = time.perf_counter(); "
    "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "print(json.dumps({'rc': r.returncode, 'wall_s': time.perf_counter() - t, "
    "'peak_rss_bytes': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "
    "'stderr': r.stderr[-3000:]}))"
)


def measured(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> dict[str, Any]:
    """Run `cmd` in a fresh wrapper process (its own peak RSS); `error` holds the tail of stderr on failure."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, env=env, cwd=cwd, check=True
    )
    res = json.loads(out.stdout)
    tail = res.pop("stderr")
    if res.pop("rc"):
        return {"error": tail[-600:]}
    return {"wall_s": round(res["wall_s"], 2), "peak_rss_bytes": res["peak_rss_bytes"]}


def chained(first: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """Two `measured` steps as one: their wall times added and the larger peak RSS (`then` where it failed)."""
    if "error" in then:
        return then
    return {
        "wall_s": round(first["wall_s"] + then["wall_s"], 2),
        "peak_rss_bytes": max(first["peak_rss_bytes"], then["peak_rss_bytes"]),
    }


def env(threads: int, pythonpath: str | None = None) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [pythonpath, str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": path}


def safetensors_bytes(path: Path) -> int:
    """Bytes of the tensors in a safetensors file (its header read, not the data)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


ROTARY_TABLES = ("cos_cache", "sin_cache")
"""Name endings of the rotary cos / sin tables in an ONNX graph (the builder's `cos_cache`; ours are computed in
the graph from `head_dim / 2` inverse frequencies, `fusion.rope_tables`, so hold none): counted in
`weight_bytes` like every initializer, and reported apart as `rotary_bytes`."""


def onnx_bytes(folder: Path) -> tuple[int, int]:
    """(bytes of every initializer, bytes of the rotary tables among them)."""
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    total = rotary = 0
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            n = int({e.key: e.value for e in t.external_data}.get("length", 0))
        else:
            n = onnx.numpy_helper.to_array(t).nbytes
        total += n
        rotary += n if t.name.endswith(ROTARY_TABLES) else 0
    return total, rotary


def gguf_bytes(path: Path) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


MODEL_FILES = (".onnx", ".data", ".safetensors", ".gguf", ".pte", ".mlxfn")


def sizes(folder: Path) -> dict[str, int]:
    """`file_bytes` (the model files) and `weight_bytes` (the weight tensors as stored; a .pte whole); ONNX also
    `rotary_bytes` (the float32 rotary tables among the weight bytes)."""
    files = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in MODEL_FILES)
    if (folder / "model.onnx").is_file():
        weights, rotary = onnx_bytes(folder)
        return {"file_bytes": files, "weight_bytes": weights, "rotary_bytes": rotary}
    elif (folder / "model.gguf").is_file():
        weights = gguf_bytes(folder / "model.gguf")
    elif list(folder.glob("*.safetensors")):
        weights = sum(safetensors_bytes(f) for f in folder.glob("*.safetensors"))
    else:
        weights = sum(f.stat().st_size for f in folder.glob("*.pte"))
    return {"file_bytes": files, "weight_bytes": weights}


def liquid_folder(ckpt: Path, work: Path) -> Path:
    """A copy of `ckpt` whose config has the Liquid keys llama.cpp's converter and mlx-lm's `ModelArgs` read
    (`gguf_vs_llamacpp.liquid_copy`, plus `block_dim`); written once per model."""
    from gguf_vs_llamacpp import liquid_copy

    folder = work / "liquid-hf"
    if not (folder / "config.json").is_file():
        tmp = work / "liquid-hf.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        liquid_copy(ckpt, tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.setdefault("block_dim", cfg["hidden_size"])
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tmp.rename(folder)
    return folder


REUSE = False
"""`--reuse`: keep an artifact exported before (its export record `FOLDER.export.json` beside it)."""


def exported(folder: Path, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The export record of `folder`: `run()`'s (written beside the folder when it succeeds), or with `--reuse`
    the one written by an earlier run."""
    record = folder.with_name(folder.name + ".export.json")
    if REUSE and record.is_file() and folder.is_dir():
        return {**json.loads(record.read_text()), "reused": True}
    res = run()
    if "error" not in res:
        record.write_text(json.dumps(res))
    return res


def point(tool: str, backend: str, recipe: str, folder: Path, session: str, export: dict) -> dict[str, Any]:
    return {
        "tool": tool,
        "backend": backend,
        "recipe": recipe,
        "folder": str(folder),
        "session": session,
        "export": export,
    }


# ---- our exports --------------------------------------------------------------------------------------------


def ours(backend: str, recipes: tuple[str, ...], extra: list[str]) -> Callable[..., list[dict]]:
    """Points of `lfm-export BACKEND CKPT --quant R --no-parity` for each recipe R (`--ours`, else `recipes`)."""

    def export(ckpt: Path, work: Path, args: argparse.Namespace) -> list[dict]:
        out = []
        for recipe in args.ours or recipes:
            folder = work / f"ours-{backend}-{recipe}"
            base, _, budget = recipe.partition("@")  # NAME@BUDGET: `--quant NAME --budget BUDGET`
            name, _, tables = base.partition("+")  # NAME+t4: `--head-bits 4 --embedding-quant 4`
            if tables not in ("", TABLES_4):
                raise SystemExit(f"point {recipe!r}: the only table suffix is +{TABLES_4}")
            cmd = [str(BIN / "lfm-export"), backend, str(ckpt), "-o", str(folder), "--quant", name]
            cmd += ["--threads", str(args.threads), "--no-parity", "--force", *extra]
            cmd += ["--budget", budget] if budget else []
            cmd += ["--head-bits", "4", "--embedding-quant", "4"] if tables else []
            print(f"  lfm-export {backend} {recipe}", file=sys.stderr, flush=True)
            res = exported(folder, lambda cmd=cmd: measured(cmd, env(args.threads)))
            if "error" not in res and (folder / "manifest.json").is_file():
                cal = json.loads((folder / "manifest.json").read_text()).get("calibration")
                if cal:
                    res["calibration_tokens"] = cal.get("tokens")
            out.append(point("lfm-export", backend, recipe, folder, backend, res))
        return out

    return export


# ---- peers --------------------------------------------------------------------------------------------------


def onnx_genai_builder(ckpt: Path, work: Path, args: argparse.Namespace) -> list[dict]:
    """onnxruntime-genai's model builder, `-p int4 -e cpu`, with its default RTN and with `k_quant`."""
    from onnx_vs_genai import describe_builder_output

    out = []
    for name, extra in (("int4", []), ("int4-k_quant", ["--extra_options", "algo_config=k_quant"])):
        folder = work / f"genai-builder-{name}"
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(folder)]
        cmd += ["-p", "int4", "-e", "cpu", "-c", str(work / "builder-cache"), *extra]
        print(f"  onnxruntime-genai builder {name}", file=sys.stderr, flush=True)

        def run(cmd: list[str] = cmd, folder: Path = folder) -> dict[str, Any]:
            shutil.rmtree(folder, ignore_errors=True)
            res = measured(cmd, env(args.threads))
            if "error" not in res:
                describe_builder_output(folder, ckpt)
            return res

        res = exported(folder, run)
        out.append(point("onnxruntime-genai builder", "onnx", f"genai-builder-{name}", folder, "onnx", res))
    return out


MLX_LM_CONVERT = (
    "import sys; from mlx_lm import convert; "
    "convert(hf_path=sys.argv[1], mlx_path=sys.argv[2], quantize=True, q_group_size=64, q_bits=4)"
)
MLX_LM_GPTQ = """
import sys
from pathlib import Path
import mlx.core as mx
from mlx_lm.quant.gptq import gptq_quantize
from mlx_lm.utils import compute_bits_per_weight, load, save
mx.set_default_device(mx.cpu)
mx.random.seed(123)
src, dst, text = sys.argv[1:4]
model, tokenizer, config = load(src, lazy=True, return_config=True)
ids = tokenizer.encode(Path(text).read_text())
seq = 256
ids = ids[: len(ids) // seq * seq]
data = mx.array(ids).reshape(-1, seq)
model, config["quantization"] = gptq_quantize(model, data, 4, 64, 6, 64)
print("bits per weight", compute_bits_per_weight(model), file=sys.stderr)
save(dst, src, model, tokenizer, config)
"""


def mlx_lm(ckpt: Path, work: Path, args: argparse.Namespace) -> list[dict]:
    """mlx-lm's `convert` (q4, groups of 64: its default) and its GPTQ (`mlx_lm.quant.gptq`: 4 bits in groups of
    64, the rest 6 bits; calibrated on our calibration text, rows of 256 tokens, so both tools see the same)."""
    calib = ROOT / "lfm_export" / "assets" / "calibration.txt"
    out = []
    for name, code, extra in (
        ("mlx-lm-q4-g64", MLX_LM_CONVERT, []),
        ("mlx-lm-gptq-q4-g64", MLX_LM_GPTQ, [str(calib)]),
    ):
        folder = work / name
        print(f"  {name}", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-c", code, str(liquid_folder(ckpt, work)), str(folder), *extra]

        def run(cmd: list[str] = cmd, folder: Path = folder) -> dict[str, Any]:
            shutil.rmtree(folder, ignore_errors=True)
            return measured(cmd, env(args.threads))

        res = exported(folder, run)
        out.append(point("mlx-lm", "mlx", name, folder, "mlx-lm", res))
    return out


CONVERT = """
import sys
sys.argv = ["convert_hf_to_gguf.py", {src!r}, "--outtype", "f32", "--outfile", {dst!r}]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "lfm2"
import runpy
runpy.run_path("convert_hf_to_gguf.py", run_name="__main__")
"""
QUANTIZE = """
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = {ftype}
params.nthread = {threads}
sys.exit(llama_cpp.llama_model_quantize({src!r}.encode(), {dst!r}.encode(), params))
"""
FTYPES = {"q8_0": 7, "q4_0": 2, "q3_k_s": 11, "q3_k_m": 12, "q4_k_m": 15, "q6_k": 18}
LLAMA_TOOLS = ("llama-imatrix", "llama-quantize")


def llama_tools(src: Path, build: Path) -> dict[str, Path]:
    """llama.cpp's `llama-imatrix` and `llama-quantize`, built from `src` (the sdist's `vendor/llama.cpp`: the
    sources of the library llama-cpp-python runs) into `build` with CMake the first time (minutes on 2 cores):
    llama-cpp-python builds the library, not these tools."""
    tools = {name: build / "bin" / name for name in LLAMA_TOOLS}
    if not all(path.is_file() for path in tools.values()):
        print(f"  building {', '.join(LLAMA_TOOLS)} into {build}", file=sys.stderr, flush=True)
        flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF"]
        flags += ["-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"]
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), *flags], check=True, capture_output=True)
        jobs = f"-j{os.cpu_count() or 1}"
        subprocess.run(
            ["cmake", "--build", str(build), "--target", *LLAMA_TOOLS, jobs], check=True, capture_output=True
        )
    return tools


def llama_cpp_imatrix(f32: Path, work: Path, args: argparse.Namespace) -> list[dict]:
    """llama.cpp with an importance matrix: `llama-imatrix` over the calibration text our `-imat` / `-gptq`
    recipes read (`lfm_export.calibrate.CORPUS`, its first `DEFAULT_TOKENS` tokens in chunks of `SEQ_LEN`,
    special tokens parsed as our tokenizer does), then `llama-quantize --imatrix` to each type."""
    from lfm_export.calibrate import CORPUS, DEFAULT_TOKENS, SEQ_LEN

    tools = llama_tools(args.llama_src, args.llama_build)
    imatrix = work / "llama-imatrix.gguf"
    threads = str(args.threads)
    print("  llama.cpp llama-imatrix", file=sys.stderr, flush=True)
    cmd = [
        str(tools["llama-imatrix"]),
        "-m",
        str(f32),
        "-f",
        str(CORPUS),
        "-o",
        str(imatrix),
        "-c",
        str(SEQ_LEN),
    ]
    cmd += ["--chunks", str(DEFAULT_TOKENS // SEQ_LEN), "--parse-special", "-t", threads]
    made = measured(cmd, env(args.threads))
    out = []
    for kind in args.theirs:
        folder = work / f"llama.cpp-{kind}-imat"
        plain = work / f"llama.cpp-{kind}"
        if "error" in made or not (plain / "manifest.json").is_file():
            out.append(
                point(
                    "llama.cpp",
                    "gguf",
                    f"llama.cpp-{kind}-imat",
                    folder,
                    "gguf",
                    made | {"error": "no imatrix"},
                )
            )
            continue
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(plain, folder)
        (folder / "model.gguf").unlink()
        print(f"  llama.cpp llama-quantize --imatrix {kind}", file=sys.stderr, flush=True)
        cmd = [str(tools["llama-quantize"]), "--imatrix", str(imatrix), str(f32), str(folder / "model.gguf")]
        res = chained(made, measured([*cmd, kind.upper(), threads], env(args.threads)))
        if "error" not in res:
            res["imatrix_wall_s"] = made["wall_s"]
        out.append(point("llama.cpp", "gguf", f"llama.cpp-{kind}-imat", folder, "gguf", res))
    return out


def _manifest_folder(work: Path, kind: str) -> Path:
    """Our export whose folder (manifest, tokenizer) llama.cpp's `kind` file runs in: ours of the same type, else
    any of our GGUF exports of the model (a type we do not name, e.g. `q3_k_m`: the session reads the manifest's
    context and signature, not its recipe; the point's bytes are the file's own)."""
    same = work / f"ours-gguf-{kind}"
    if (same / "manifest.json").is_file():
        return same
    found = sorted(p.parent for p in work.glob("ours-gguf-*/manifest.json"))
    return found[0] if found else same


def llama_cpp(ckpt: Path, work: Path, args: argparse.Namespace) -> list[dict]:
    """llama.cpp's own path, as `benchmarks/gguf_vs_llamacpp.py` drives it: `convert_hf_to_gguf.py` to f32 (the
    Liquid config keys its converter reads added), then `llama_model_quantize` to each type. The file runs in a
    copy of our folder of the same type (our manifest, llama.cpp's `model.gguf`)."""
    if args.llama_src is None:
        return [point("llama.cpp", "gguf", "llama.cpp", work, "gguf", {"error": "no --llama-src"})]
    src = liquid_folder(ckpt, work)
    f32 = work / "llama-f32.gguf"
    conv_env = env(args.threads, f"{args.llama_src / 'gguf-py'}{os.pathsep}{args.llama_src}")
    print("  llama.cpp convert_hf_to_gguf.py", file=sys.stderr, flush=True)
    conv = measured(
        [sys.executable, "-c", CONVERT.format(src=str(src), dst=str(f32))], conv_env, args.llama_src
    )
    out = []
    for kind in args.theirs:
        folder = work / f"llama.cpp-{kind}"
        ours_folder = _manifest_folder(work, kind)
        if "error" in conv or not (ours_folder / "manifest.json").is_file():
            out.append(
                point("llama.cpp", "gguf", f"llama.cpp-{kind}", folder, "gguf", conv | {"error": "no f32"})
            )
            continue
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(ours_folder, folder)
        code = QUANTIZE.format(
            ftype=FTYPES[kind], threads=args.threads, src=str(f32), dst=str(folder / "model.gguf")
        )
        print(f"  llama.cpp quantize {kind}", file=sys.stderr, flush=True)
        res = chained(conv, measured([sys.executable, "-c", code], env(args.threads)))
        out.append(point("llama.cpp", "gguf", f"llama.cpp-{kind}", folder, "gguf", res))
    if args.llama_build is not None and "error" not in conv:
        out += llama_cpp_imatrix(f32, work, args)
    return out


EXPORT_LLM_PARAMS = """
import json, sys, torch
from executorch.examples.models.lfm2.convert_weights import lfm_2_to_meta
from lfm_export.loading import load_model
sys.path.insert(0, {bench!r})
from executorch_vs_own import params_json
loaded = load_model({ckpt!r}).materialized()
model = loaded.model
state = {{k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}}
torch.save(lfm_2_to_meta(state), {pth!r})
open({params!r}, "w").write(json.dumps(params_json(model.config)))
"""


PREQUANTIZED_PATH_MARKS = ("8da4w", "int8")
"""Substrings that make ExecuTorch's `examples/models/llama/model.py` (1.5.1) treat a checkpoint path as
pre-quantized: it swaps every linear whose input width divides by 256 for torchao's int8-code module before
loading the float weights into it, and the export then fails (`Expected: torch.int8, got: torch.float32`); on
`tiny` (widths 128 and 384) no linear qualifies, so its point stood in a folder named `export_llm-q8da4w`."""


def executorch_export_llm(ckpt: Path, work: Path, args: argparse.Namespace) -> list[dict]:
    """ExecuTorch's `export_llm` with its LFM2 recipe `lfm2_xnnpack_q8da4w.yaml` (8da4w), on the same weights
    converted by its own `convert_weights.lfm_2_to_meta`, context `--context` (as `executorch_vs_own.py`)."""
    import executorch

    folder = work / "export_llm-q8da4w"
    cfg = json.loads((ckpt / "config.json").read_text())
    if cfg.get("num_experts"):
        res = {"error": "ExecuTorch's LFM2 example (examples/models/lfm2) has no MoE model"}
        return [point("ExecuTorch export_llm", "executorch", folder.name, folder, "et-program", res)]

    def run() -> dict[str, Any]:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        # ExecuTorch's llama model.py takes a checkpoint whose path holds "8da4w" or "int8" for a pre-quantized
        # one (int8 slots our float weights are assigned into): the checkpoint goes in a folder of its own.
        prep = Path(tempfile.mkdtemp(prefix="export-llm-checkpoint-"))
        if any(s in str(prep) for s in PREQUANTIZED_PATH_MARKS):
            raise SystemExit(f"{prep}: a path ExecuTorch reads as a pre-quantized checkpoint")
        pth, params = prep / "theirs.pth", folder / "params.json"
        code = EXPORT_LLM_PARAMS.format(bench=str(HERE), ckpt=str(ckpt), pth=str(pth), params=str(params))
        made = measured([sys.executable, "-c", code], env(args.threads))
        if "error" in made:
            shutil.rmtree(prep, ignore_errors=True)
            return made
        yaml = Path(executorch.__path__[0]) / "examples/models/lfm2/config/lfm2_xnnpack_q8da4w.yaml"
        cmd = [sys.executable, "-m", "executorch.extension.llm.export.export_llm", "--config", str(yaml)]
        cmd += ["+base.model_class=lfm2_350m", f"+base.params={params}", f"+base.checkpoint={pth}"]
        cmd += [f"+export.max_seq_length={args.context}", f"+export.max_context_length={args.context}"]
        cmd += [f"+export.output_name={folder / 'model.pte'}"]
        res = measured(cmd, env(args.threads), cwd=folder)
        shutil.rmtree(prep, ignore_errors=True)
        shutil.rmtree(folder / "outputs", ignore_errors=True)  # hydra's logs
        if "error" not in res:
            shutil.copy(ckpt / "config.json", folder / "config.json")
        return res

    print("  ExecuTorch export_llm q8da4w", file=sys.stderr, flush=True)
    res = exported(folder, run)
    return [point("ExecuTorch export_llm", "executorch", folder.name, folder, "et-program", res)]


POINTS: dict[str, list[Callable[..., list[dict]]]] = {
    "onnx": [ours("onnx", OURS_ONNX, []), onnx_genai_builder],
    "mlx": [ours("mlx", OURS_MLX, ["--max-seq-len", "1024"]), mlx_lm],
    "gguf": [ours("gguf", OURS_GGUF, ["--max-seq-len", "1024"]), llama_cpp],
    "executorch": [
        ours("executorch", OURS_ET, ["--max-seq-len", "512", "--max-prefill", "256"]),
        executorch_export_llm,
    ],
}
"""Per backend: our export, then each peer (one function each; a later peer may read an earlier folder)."""


# ---- sessions for the peers' own formats --------------------------------------------------------------------


class MlxLmSession(SessionBase):
    """`Session` over an mlx-lm folder: its model with its prompt cache, on the CPU."""

    supports_batch = False

    def __init__(self, folder: Path, threads: int = 1) -> None:
        import mlx.core as mx
        from mlx_lm.utils import load_model

        mx.set_default_device(mx.cpu)
        self._mx = mx
        self.model, cfg = load_model(Path(folder))
        self.vocab_size = int(cfg["vocab_size"])
        self.name = "mlx-lm"
        self.reset(1)

    def _reset_state(self, batch_size: int) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        self.cache = make_prompt_cache(self.model)

    def _prefill(self, ids: np.ndarray) -> np.ndarray:
        mx = self._mx
        logits = self.model(mx.array(ids), cache=self.cache).astype(mx.float32)
        return np.array(logits)

    def prefill_last(self, tokens: np.ndarray) -> np.ndarray:
        return self.prefill(tokens)[:, -1]


class EtProgramSession(SessionBase):
    """`Session` over ExecuTorch's own LFM2 program (`model.pte`, `forward(tokens [1, T], input_pos [1])` ->
    the last position's logits): every position's logits from one-token calls; loaded afresh at each reset."""

    supports_batch = False

    def __init__(self, folder: Path, threads: int = 1) -> None:
        import executorch.kernels.quantized  # noqa: F401

        from lfm_export.runtime.executorch import _import_executorch

        self._torch, self._runtime = _import_executorch(threads)
        self.path = Path(folder) / "model.pte"
        self.vocab_size = int(json.loads((Path(folder) / "config.json").read_text())["vocab_size"])
        self.name = "export_llm"
        self.reset(1)

    def _reset_state(self, batch_size: int) -> None:
        program = self._runtime.Runtime.get().load_program(str(self.path))
        self._chunk = int(program.load_method("get_max_seq_len").execute([])[0])
        self._forward = program.load_method("forward")

    def _call(self, ids: np.ndarray, pos: int) -> np.ndarray:
        torch = self._torch
        out = self._forward.execute([torch.from_numpy(ids.copy()), torch.tensor([pos], dtype=torch.int64)])[0]
        return out.detach().float().reshape(-1, out.shape[-1])[-1].numpy().copy()

    def _prefill(self, ids: np.ndarray) -> np.ndarray:
        rows = [self._call(ids[:, i : i + 1], self._position + i) for i in range(ids.shape[1])]
        return np.stack(rows)[None]

    def prefill_last(self, tokens: np.ndarray) -> np.ndarray:
        ids = self._check_tokens(tokens)
        for s in range(0, ids.shape[1], self._chunk):
            last = self._call(ids[:, s : s + self._chunk], self._position + s)
        self._advance(ids)
        return last[None]

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        return self.prefill_last(np.asarray(tokens)[:, None])


def open_session(kind: str, folder: Path, threads: int) -> Any:
    """The session that runs an artifact of `kind` (a backend name, `mlx-lm` or `et-program`)."""
    if kind == "mlx-lm":
        return MlxLmSession(folder, threads)
    if kind == "et-program":
        return EtProgramSession(folder, threads)
    if kind == "onnx":
        from lfm_export.runtime.onnx import OnnxSession

        return OnnxSession(folder, threads=threads)
    if kind == "mlx":
        from lfm_export.runtime.mlx import MlxSession

        return MlxSession(folder, threads=threads)
    if kind == "gguf":
        from lfm_export.runtime.gguf import GgufSession

        return GgufSession(folder, threads=threads)
    from lfm_export.runtime.executorch import ExecuTorchSession

    return ExecuTorchSession(folder, threads=threads)


# ---- measurements -------------------------------------------------------------------------------------------


def speed_worker(kind: str, folder: str, prompt_len: int, new_tokens: int, threads: int) -> dict[str, float]:
    """Prefill a seeded random prompt (last position's logits), then greedy decode steps; tokens/s of each."""
    s = open_session(kind, Path(folder), threads)
    ids = np.random.default_rng(0).integers(16, s.vocab_size, (1, prompt_len))
    t = time.perf_counter()
    last = s.prefill_last(ids) if hasattr(s, "prefill_last") else s.prefill(ids)[:, -1]
    prefill = time.perf_counter() - t
    tok = int(np.asarray(last).reshape(-1).argmax())
    t = time.perf_counter()
    for _ in range(new_tokens):
        tok = int(np.asarray(s.decode(np.array([tok]))).reshape(-1).argmax())
    decode = time.perf_counter() - t
    return {"prefill_tok_s": prompt_len / prefill, "decode_tok_s": new_tokens / decode}


def speeds(points: list[dict], args: argparse.Namespace) -> None:
    """`repeats` rounds over every point (a fresh process per run), best decode / prefill kept per point."""
    for p in points:
        p["speed_runs"] = []
    for i in range(args.repeats):
        for p in points:
            load = os.getloadavg()[0]
            cmd = [sys.executable, __file__, "--worker", p["session"], p["folder"]]
            cmd += [str(args.prompt_len), str(args.new_tokens), str(args.threads)]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env(args.threads))
            if r.returncode:
                p["speed_runs"].append({"error": r.stderr[-400:], "load_avg_1m": load})
                continue
            p["speed_runs"].append({**json.loads(r.stdout.strip().splitlines()[-1]), "load_avg_1m": load})
            print(f"  speed {p['recipe']} ({i + 1}/{args.repeats})", file=sys.stderr, flush=True)
    for p in points:
        ok = [r for r in p["speed_runs"] if "error" not in r]
        if ok:
            p["decode_tok_s"] = round(max(r["decode_tok_s"] for r in ok), 1)
            p["prefill_tok_s"] = round(max(r["prefill_tok_s"] for r in ok), 1)


def heldout_pieces(ckpt: Path, tokens: int, ctx: int) -> list[np.ndarray]:
    """Chunks of `ctx` tokens (BOS first) of held-out documents of the bundled corpus, `tokens` in all."""
    from make_corpus import HELDOUT_SEED, generate_documents

    from lfm_export.parity.corpus import chunks
    from lfm_export.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(ckpt)
    ids: list[int] = []
    n = 40
    while len(ids) < tokens:
        ids = tok.encode("\n".join(generate_documents(HELDOUT_SEED, n)), add_bos=False)
        n *= 2
    return chunks(ids[:tokens], tok.bos_token_id, ctx)


def quality(p: dict, loaded: Any, pieces: list[np.ndarray], args: argparse.Namespace) -> None:
    """`pooled` (parity scenarios, quality half) and `corpus` (parity's corpus statistics) of point `p`."""
    from lfm_export.parity import ReferenceSession, run_parity
    from lfm_export.parity.corpus import corpus_kl

    s = open_session(p["session"], Path(p["folder"]), args.threads)
    ref = ReferenceSession(loaded.model, max_seq_len=getattr(s, "max_seq_len", None))
    tok = Path(loaded.path) / "tokenizer.json" if loaded.path else None
    result = run_parity(
        s,
        ref,
        "int4",
        scenarios=["prefill", "decode", "chunked_prefill", "batch2"],
        tokenizer_file=str(tok) if tok and tok.is_file() else None,
        snapshots=False,
    )
    pooled = result.pooled()
    p["pooled"] = {k: pooled[k] for k in ("kl_mean", "kl_p99", "top1_agreement")}
    c = corpus_kl(s, ref, pieces)
    c.pop("first_top1_mismatch")
    p["corpus"] = c
    if hasattr(s, "close"):
        s.close()


# ---- reading the frontier -----------------------------------------------------------------------------------


def ratios(peer: dict, p: dict) -> dict[str, Any]:
    """Point `p` against `peer`: weight bytes, corpus KL and decode speed as ratios."""
    d, pd = p.get("decode_tok_s"), peer.get("decode_tok_s")
    return {
        "recipe": p["recipe"],
        "weight_bytes_ratio": round(p["weight_bytes"] / peer["weight_bytes"], 3),
        "corpus_kl_ratio": round(p["corpus"]["kl_mean"] / peer["corpus"]["kl_mean"], 3),
        "decode_ratio": round(d / pd, 3) if d and pd else None,
    }


def verdicts(points: list[dict]) -> dict[str, Any]:
    """Per backend, against the peer default (`PEER_DEFAULT`): our smallest point at a corpus KL no worse (its
    weight bytes and decode speed as ratios of the peer's), and at equal bytes (ours within 1.02x the peer's
    weight bytes, the lowest corpus KL) the corpus KL ratio; our current default beside it."""
    out: dict[str, Any] = {}
    ok = [p for p in points if "corpus" in p]
    for backend, peer_name in PEER_DEFAULT.items():
        peer = next((p for p in ok if p["recipe"] == peer_name and p["backend"] == backend), None)
        mine = [p for p in ok if p["backend"] == backend and p["tool"] == "lfm-export"]
        if peer is None or not mine:
            continue
        kl = peer["corpus"]["kl_mean"]

        no_worse = [p for p in mine if p["corpus"]["kl_mean"] <= kl]
        same_bytes = [p for p in mine if p["weight_bytes"] <= 1.02 * peer["weight_bytes"]]
        default = next((p for p in mine if p["recipe"] == OUR_DEFAULT[backend]), None)
        out[backend] = {
            "peer": peer_name,
            "smallest_at_kl_no_worse": ratios(peer, min(no_worse, key=lambda p: p["weight_bytes"]))
            if no_worse
            else None,
            "best_kl_at_equal_bytes": ratios(peer, min(same_bytes, key=lambda p: p["corpus"]["kl_mean"]))
            if same_bytes
            else None,
            "our_default": ratios(peer, default) if default else None,
        }
    return out


class Scale:
    """A linear map of [lo, hi] onto [a, b]."""

    def __init__(self, lo: float, hi: float, a: float, b: float) -> None:
        self.lo, self.hi, self.a, self.b = lo, hi, a, b

    def __call__(self, v: float) -> float:
        return self.a + (v - self.lo) / (self.hi - self.lo) * (self.b - self.a)


COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def svg(results: dict) -> str:
    """Weight bytes (x) against corpus KL (y, log scale): a panel per model and backend, a line per tool
    (its points in order of bytes), each point labelled with its recipe."""
    models = list(results["models"])
    backends = list(POINTS)
    w, h, pad = 330, 250, 48
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * len(backends)}" height="{h * len(models) + 30}" '
        'font-family="sans-serif" font-size="9">',
        f'<text x="6" y="16" font-size="12">Quality per byte: weight MB (x) vs corpus KL against fp32 (y, log); '
        f"{results['date']}, commit {results['commit'][:7]}, {results['threads']} thread(s)</text>",
    ]
    for r, model in enumerate(models):
        for c, backend in enumerate(backends):
            pts = [p for p in results["models"][model]["points"] if p["backend"] == backend and "corpus" in p]
            x0, y0 = c * w + pad, 30 + r * h + 18
            pw, ph = w - pad - 12, h - 18 - 40
            parts.append(
                f'<text x="{c * w + 8}" y="{30 + r * h + 12}" font-size="11">{model} / {backend}</text>'
            )
            parts.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
            if not pts:
                parts.append(f'<text x="{x0 + 8}" y="{y0 + 20}">no points</text>')
                continue
            xs = [p["weight_bytes"] / 1e6 for p in pts]
            ys = [math.log10(max(p["corpus"]["kl_mean"], 1e-9)) for p in pts]
            xl, xh = min(xs), max(xs)
            yl, yh = min(ys), max(ys)
            xl, xh = (xl - 0.05 * (xh - xl + 1e-9), xh + 0.05 * (xh - xl + 1e-9))
            yl, yh = (yl - 0.1 * (yh - yl + 1e-3), yh + 0.1 * (yh - yl + 1e-3))

            px = Scale(xl, xh, x0, x0 + pw)
            py = Scale(yl, yh, y0 + ph, y0)

            for v, anchor in ((xl, "start"), (xh, "end")):
                parts.append(
                    f'<text x="{px(v):.1f}" y="{y0 + ph + 12}" text-anchor="{anchor}">{v:.3f} MB</text>'
                )
            for v in (yl, yh):
                parts.append(f'<text x="{x0 - 3}" y="{py(v):.1f}" text-anchor="end">{10**v:.1e}</text>')
            tools = list(dict.fromkeys(p["tool"] for p in pts))
            for k, tool in enumerate(tools):
                color = COLORS[k % len(COLORS)]
                mine = sorted((p for p in pts if p["tool"] == tool), key=lambda p: p["weight_bytes"])
                coords = [
                    (px(p["weight_bytes"] / 1e6), py(math.log10(max(p["corpus"]["kl_mean"], 1e-9))))
                    for p in mine
                ]
                path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
                parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
                for (x, y), p in zip(coords, mine, strict=True):
                    parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>')
                    parts.append(f'<text x="{x + 4:.1f}" y="{y - 4:.1f}" fill="{color}">{p["recipe"]}</text>')
                parts.append(
                    f'<text x="{x0 + 4}" y="{y0 + ph + 26 + 10 * (k % 2)}" fill="{color}" '
                    f'transform="translate({(k // 2) * 140},0)">— {tool}</text>'
                )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def table(results: dict) -> str:
    """The points as docs/quality_per_byte.md's table: per model and backend, sorted by weight bytes, each point's
    weight bytes and corpus KL also as ratios of the backend's peer default (`PEER_DEFAULT`), and its run date."""
    lines = [
        "| model | backend | tool | recipe | weight bytes | KL corpus (± se) | KL pooled | run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model, m in results["models"].items():
        name = Path(model).name if "/" in model else model
        for backend in POINTS:
            points = [p for p in m["points"] if p["backend"] == backend]
            peer = next((p for p in points if p["recipe"] == PEER_DEFAULT[backend] and "corpus" in p), None)
            order = lambda p: (p.get("weight_bytes") or math.inf, p["tool"] != "lfm-export", p["recipe"])  # noqa: E731
            for p in sorted(points, key=order):
                head = f"| `{name}` | {backend} | {p['tool']} | {p['recipe']} |"
                if "corpus" not in p:
                    lines.append(f"{head} failed | | | {p.get('run_date', '')} |")
                    continue
                c = p["corpus"]
                size, kl = f"{p['weight_bytes']:,}", f"{c['kl_mean']:.5f} ± {c['kl_se']:.5f}"
                if peer is not None:
                    size += f" ({p['weight_bytes'] / peer['weight_bytes']:.3f}x)"
                    kl += f" ({c['kl_mean'] / peer['corpus']['kl_mean']:.2f}x)"
                lines.append(
                    f"{head} {size} | {kl} | {p['pooled']['kl_mean']:.4f} | {p.get('run_date', '')} |"
                )
    return "\n".join(lines)


def merge_entry(models: dict[str, Any], name: str, entry: dict[str, Any]) -> None:
    """Add an earlier run's `entry` for model `name`: its points replace those of the same backend and recipe
    already there, the others stay; each point keeps the date of the run that measured it (`run_date`), and the
    verdicts are recomputed (weight bytes and KL of a recipe are the same in every run; decode speed is not);
    `runs` holds every merged run's provenance by date (`DATE #2`, ... for another run of the same minute)."""
    old = models.get(name)
    date = entry["run"].get("date") if entry.get("run") else None
    known = {**(old or {}).get("runs", {}), **entry.get("runs", {})}
    if date in known and known[date] != entry["run"]:
        date = next(
            f"{date} #{n}" for n in range(2, 100) if known.get(f"{date} #{n}", entry["run"]) == entry["run"]
        )
    new = [{**p, "run_date": p.get("run_date", date)} for p in entry["points"]]
    runs = {**entry.get("runs", {}), **({date: entry["run"]} if date else {})}
    if old is None:
        models[name] = {**entry, "points": new, "runs": runs}
        return
    keys = {(p["backend"], p["recipe"]) for p in new}
    points = [p for p in old["points"] if (p["backend"], p["recipe"]) not in keys] + new
    runs = {**old.get("runs", {}), **runs}
    models[name] = {**old, "points": points, "verdicts": verdicts(points), "runs": runs}


def drop(models: dict[str, Any], spec: str) -> None:
    """Remove `MODEL` (its whole entry), `MODEL:BACKEND` (that backend's points) or `MODEL:BACKEND:RECIPE` (one
    point) from a merged result, verdicts recomputed: points measured on another checkpoint or by code that has
    since changed."""
    name = next(
        (m for m in sorted(models, key=len, reverse=True) if spec == m or spec.startswith(m + ":")), None
    )
    if name is None:
        raise SystemExit(f"--drop {spec}: no such model in the merged runs ({', '.join(models)})")
    backend, _, recipe = spec[len(name) + 1 :].partition(":")
    if not backend:
        del models[name]
        return
    entry = models[name]
    points = [
        p for p in entry["points"] if not (p["backend"] == backend and (not recipe or p["recipe"] == recipe))
    ]
    models[name] = {**entry, "points": points, "verdicts": verdicts(points)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["tiny", "tiny-moe"])
    ap.add_argument("--backends", nargs="+", default=list(POINTS), choices=list(POINTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--corpus-tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=256, help="corpus chunk length (the second half is scored)")
    ap.add_argument("--context", type=int, default=512, help="ExecuTorch export_llm's max_seq_length")
    ap.add_argument("--llama-src", type=Path, default=None, help="llama.cpp source (convert_hf_to_gguf.py)")
    ap.add_argument(
        "--llama-build",
        type=Path,
        default=None,
        help="folder of llama-imatrix / llama-quantize built from --llama-src (built there if missing): adds "
        "llama.cpp's points with an importance matrix from our calibration text",
    )
    ap.add_argument(
        "--theirs",
        nargs="+",
        default=list(THEIRS_GGUF),
        choices=list(FTYPES),
        help="llama.cpp types quantized as GGUF peers (with --llama-build, each also with an importance matrix)",
    )
    ap.add_argument("--work", type=Path, default=ROOT / ".work" / "quality_per_byte")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--svg", type=Path, default=None)
    ap.add_argument(
        "--merge",
        type=Path,
        action="append",
        default=[],
        help="an earlier run's JSON whose models (each with that run's provenance) join this one's (repeatable)",
    )
    ap.add_argument(
        "--ours",
        nargs="+",
        default=None,
        help="lfm-export points (NAME[+t4][@BUDGET]) instead of each backend's list",
    )
    ap.add_argument(
        "--drop",
        action="append",
        default=[],
        metavar="MODEL[:BACKEND[:RECIPE]]",
        help="after the merges, remove a model's entry, its points of one backend, or one point (repeatable)",
    )
    ap.add_argument("--reuse", action="store_true", help="keep artifacts an earlier run exported into --work")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, folder, p, n, t = args.worker
        print(json.dumps(speed_worker(kind, folder, int(p), int(n), int(t))))
        return
    import torch
    from onnx_vs_genai import checkpoint_folder

    from lfm_export.loading import load_model

    global REUSE
    REUSE = args.reuse

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    args.work = args.work.resolve()
    results: dict = {
        **provenance(),
        "threads": args.threads,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "corpus_tokens": args.corpus_tokens,
        "ctx": args.ctx,
        "llama_cpp_imatrix": "points llama.cpp-*-imat, where --llama-build is given: llama-imatrix over our "
        "calibration text and token budget, then llama-quantize --imatrix (module doc)",
        "models": {},
    }
    out = args.json or args.work / "results.json"
    for merged in args.merge:
        earlier = json.loads(merged.read_text())
        run = {k: v for k, v in earlier.items() if k != "models"}
        for name, entry in earlier["models"].items():
            merge_entry(results["models"], name, {**entry, "run": entry.get("run", run)})
    for spec in args.drop:
        drop(results["models"], spec)
    for model in args.models:
        ckpt = checkpoint_folder(model, args.work).resolve()
        work = args.work / Path(model).name
        work.mkdir(parents=True, exist_ok=True)
        entry: dict[str, Any] = {"checkpoint": str(ckpt), "load_avg_1m_at_start": os.getloadavg()[0]}
        points: list[dict] = []
        for backend in args.backends:
            print(f"{model}: {backend}", file=sys.stderr, flush=True)
            for fn in POINTS[backend]:
                points.extend(fn(ckpt, work, args))
        ready = [p for p in points if "error" not in p["export"]]
        for p in ready:
            p.update(sizes(Path(p["folder"])))
        loaded = load_model(ckpt).materialized()
        pieces = heldout_pieces(ckpt, args.corpus_tokens, args.ctx)
        for p in ready:
            print(f"{model}: quality of {p['backend']} {p['recipe']}", file=sys.stderr, flush=True)
            try:
                quality(p, loaded, pieces, args)
            except Exception as e:  # noqa: BLE001 - a peer's artifact that does not run is a result too
                p["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        speeds([p for p in ready if "corpus" in p], args)
        entry["load_avg_1m_at_end"] = os.getloadavg()[0]
        entry["points"] = points
        entry["verdicts"] = verdicts(points)
        results["models"][model] = entry
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
        if args.svg:
            args.svg.parent.mkdir(parents=True, exist_ok=True)
            args.svg.write_text(svg(results))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    if args.svg:
        args.svg.parent.mkdir(parents=True, exist_ok=True)
        args.svg.write_text(svg(results))
    print(table(results))
    print(json.dumps({m: e["verdicts"] for m, e in results["models"].items()}, indent=1))


if __name__ == "__main__":
    main()
