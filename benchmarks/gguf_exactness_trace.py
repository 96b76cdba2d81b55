"""Where a GGUF artifact and its simulation part: llama.cpp's own intermediate tensors against the simulation's,
matmul by matmul, at one position.

    .venv/bin/python benchmarks/gguf_exactness_trace.py OUT --position 15 \
        --out benchmarks/results/gguf_exactness_trace_tiny_q4_k_m.json

OUT is a GGUF artifact folder (`lfm-export gguf ... --no-parity`). The parity prompt is fed one token a call to
llama.cpp (llama-cpp-python, 1 thread, the runtime shim's settings) and to the simulation
(`lfm_export.parity.boundary`'s stepping), the simulation's activation decisions left as they round. At
`--position`, llama.cpp's graph evaluation callback (`cb_eval`, `ggml_backend_sched_eval_callback`) hands over
every `MUL_MAT` node: its weight's name and type, its float32 input and output. Per matmul the result holds

- `op_rel`: llama.cpp's output against its own input rounded by the simulation's activation rounding
  (`fake_quant_q8_0` / `fake_quant_q8_k` by the weight's type) times the weights the file holds (gguf-py's
  dequantization), relative to the output's largest magnitude: the op alone, from the same input;
- `input_rel` / `output_rel`: llama.cpp's input and output against the simulation's at the same linear;
- `codes_differing`: activation values whose rounded value (Q8_K: whose code) differs between the two inputs,
  and `scales_differing`:
  Q8_0 blocks whose fp16 scale `amax / 127` rounds to another fp16 number from the two inputs (with both
  float32 values).

The first matmul with a differing rounded input while its input is within float32 rounding of the simulation's is
where the two part. Also prints the position errors of the stepped comparison (`--positions` of them).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from provenance import provenance

LLAMA_TO_CHECKPOINT = {
    "shortconv.in_proj": "conv.in_proj",
    "shortconv.out_proj": "conv.out_proj",
    "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3",
    "ffn_down": "feed_forward.w2",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.out_proj",
}
"""llama.cpp's dense tensor names (`blk.N.NAME.weight`) and the canonical linears they hold."""
K_TYPES = ("q4_K", "q5_K", "q6_K")


class GgmlTensor(ctypes.Structure):
    """`struct ggml_tensor` of ggml/include/ggml.h (GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10,
    GGML_MAX_NAME 64) as llama-cpp-python 0.3.36 vendors it."""


GgmlTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * 4),
    ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * 16),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * 10),
    ("view_src", ctypes.c_void_p),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * 64),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


def _array(t: GgmlTensor) -> np.ndarray | None:
    """A copy of float32 tensor `t`'s data (its strides), None for another type or no data."""
    if t.type != 0 or not t.data:
        return None
    ne, nb = list(t.ne), list(t.nb)
    size = sum((ne[i] - 1) * nb[i] for i in range(4)) + 4
    buf = (ctypes.c_char * size).from_address(t.data)
    return np.ndarray(shape=ne[::-1], dtype=np.float32, buffer=buf, strides=nb[::-1]).copy()


class Capture:
    """llama.cpp's `MUL_MAT` nodes while `on`, through a `cb_eval` installed into every context created after
    `install()` (llama-cpp-python builds its context parameters from `llama_context_default_params`)."""

    def __init__(self) -> None:
        import llama_cpp
        import llama_cpp.llama as llama_module
        import llama_cpp.llama_cpp as low

        lib = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.so"))[0]
        self.base = ctypes.CDLL(str(lib))
        self.base.ggml_op_name.restype = ctypes.c_char_p
        self.base.ggml_op_name.argtypes = [ctypes.c_int]
        self.base.ggml_type_name.restype = ctypes.c_char_p
        self.base.ggml_type_name.argtypes = [ctypes.c_int]
        self.on = False
        self.items: list[dict[str, Any]] = []
        self.callback = low.ggml_backend_sched_eval_callback(self._seen)
        default = low.llama_context_default_params

        def params() -> Any:
            p = default()
            p.cb_eval = self.callback
            p.cb_eval_user_data = None
            return p

        low.llama_context_default_params = params
        llama_module.llama_cpp.llama_context_default_params = params

    def _seen(self, pointer: Any, ask: bool, user_data: Any) -> bool:
        if ask or not self.on:
            return True
        t = ctypes.cast(pointer, ctypes.POINTER(GgmlTensor)).contents
        if self.base.ggml_op_name(t.op).decode() != "MUL_MAT":
            return True
        w, x = t.src[0].contents, t.src[1].contents
        self.items.append(
            {
                "node": t.name.decode(),
                "weight": w.name.decode(),
                "type": self.base.ggml_type_name(w.type).decode(),
                "x": _array(x),
                "y": _array(t),
            }
        )
        return True


def checkpoint_linear(weight: str) -> str | None:
    """The canonical linear of llama.cpp weight `weight` (None: the KV cache's or an MoE one)."""
    if weight == "token_embd.weight" or weight == "output.weight":
        return "lm_head"
    parts = weight.split(".")
    if parts[0] != "blk" or ".".join(parts[2:-1]) not in LLAMA_TO_CHECKPOINT:
        return None
    return f"model.layers.{parts[1]}.{LLAMA_TO_CHECKPOINT['.'.join(parts[2:-1])]}"


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    scale = float(np.abs(b).max())
    return float(np.abs(a.astype(np.float64) - b).max() / scale) if scale else 0.0


def _q8k_codes(x: np.ndarray) -> np.ndarray:
    """Q8_K codes of `x` (rows a multiple of 256): `min(127, rint(x * (-127 / m)))`, `m` the signed extreme."""
    b = x.astype(np.float32).reshape(-1, 256)
    m = np.take_along_axis(b, np.abs(b).argmax(-1)[:, None], -1)
    factor = np.where(m == 0, np.float32(0), np.float32(-127) / np.where(m == 0, np.float32(1), m))
    return np.minimum(np.rint(b * factor.astype(np.float32)), 127)


def _scales_differing(mine: np.ndarray, theirs: np.ndarray) -> list[dict[str, Any]]:
    """Q8_0 blocks of 32 whose fp16 scale `amax / 127` differs between the two inputs."""
    out = []
    for b in range(mine.size // 32):
        a1 = np.float32(np.abs(mine[b * 32 : (b + 1) * 32]).max())
        a2 = np.float32(np.abs(theirs[b * 32 : (b + 1) * 32]).max())
        s1, s2 = a1 / np.float32(127), a2 / np.float32(127)
        if np.float16(s1) != np.float16(s2):
            out.append(
                {
                    "block": b,
                    "simulation_scale_f32": float(s1),
                    "llama_cpp_scale_f32": float(s2),
                    "simulation_scale_f16": float(np.float16(s1)),
                    "llama_cpp_scale_f16": float(np.float16(s2)),
                }
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--position", type=int, required=True, help="the position traced (0-based, first prompt)")
    ap.add_argument("--positions", type=int, default=64, help="positions of the stepped comparison")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    capture = Capture()  # before any llama.cpp context exists

    import gguf
    import torch
    from gguf.quants import dequantize

    from lfm_export.backends import get as get_backend
    from lfm_export.contract.manifest import read_manifest
    from lfm_export.loading import load_model
    from lfm_export.model import GROWING
    from lfm_export.parity.boundary import _step, prompts_for
    from lfm_export.pipeline import _check_calibration, simulation_for
    from lfm_export.progress import Progress
    from lfm_export.quant import fake_quant_q8_0, fake_quant_q8_k, simulate
    from lfm_export.runtime.gguf import GgufSession

    torch.set_num_threads(1)
    folder = args.folder
    manifest = read_manifest(folder)
    loaded = load_model(manifest["model"]["source"], lazy=False)
    record = get_backend(manifest["backend"])
    recipe, activations = simulation_for(record, manifest["recipe"])
    with _check_calibration(loaded, manifest, Progress()):
        sim = simulate(
            loaded.model, recipe, activations, threads=1, weights=record.weight_values(manifest["recipe"])
        )
        session = GgufSession(folder, threads=1)
        tok = folder / "tokenizer.json"
        prompts = prompts_for(session.vocab_size, tok if tok.is_file() else None, session.max_seq_len)
        ids = prompts[0][0, : max(args.position + 1, min(args.positions, prompts[0].shape[1]))]
        session.reset(1)
        artifact = []
        for t, token in enumerate(ids.tolist()):
            capture.on = t == args.position
            artifact.append(np.asarray(session.decode(np.array([token])), np.float32)[0])
        capture.on = False
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = [
            mod.register_forward_hook(
                lambda m, i, o, name=name: seen.__setitem__(name, (i[0].detach().clone(), o.detach().clone()))
            )
            for name, mod in sim.named_modules()
            if isinstance(mod, torch.nn.Linear)
        ]
        state = sim.empty_state(1, form=GROWING, dtype=torch.float32)
        errors, at_position = [], {}
        for t, token in enumerate(ids.tolist()):
            result = _step(sim, torch.tensor([[token]]), state, [], None)
            logits = result[0][0, -1].numpy()
            errors.append(_rel(artifact[t], logits))
            if t == args.position:
                at_position = dict(seen)
            state = result[1:]
        for h in hooks:
            h.remove()

    reader = gguf.GGUFReader(str(folder / "model.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    rows = []
    for item in capture.items:
        linear = checkpoint_linear(item["weight"])
        if linear is None or item["weight"] not in tensors or item["x"] is None:
            continue
        t = tensors[item["weight"]]
        w = dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0])).astype(np.float64)
        x = item["x"].reshape(-1, item["x"].shape[-1])
        y = item["y"].reshape(-1, w.shape[0])
        rounding = fake_quant_q8_k if item["type"] in K_TYPES else fake_quant_q8_0
        op = rounding(torch.from_numpy(x)).double().numpy() @ w.T
        mine_x, mine_y = (v.reshape(-1, v.shape[-1]).numpy() for v in at_position[linear])
        if item["type"] in K_TYPES:  # the float32 scale moves with its input: count the codes themselves
            differ = int((_q8k_codes(x) != _q8k_codes(mine_x)).sum())
        else:
            differ = int((rounding(torch.from_numpy(x)) != rounding(torch.from_numpy(mine_x))).sum())
        rows.append(
            {
                "node": item["node"],
                "weight": item["weight"],
                "type": item["type"],
                "linear": linear,
                "op_rel": _rel(y, op),
                "input_rel": _rel(x, mine_x),
                "output_rel": _rel(y, mine_y),
                "codes_differing": differ,
                "scales_differing": []
                if item["type"] in K_TYPES
                else _scales_differing(mine_x.reshape(-1), x.reshape(-1)),
            }
        )
    first = next((r for r in rows if r["codes_differing"]), None)
    out = {
        "provenance": provenance(),
        "artifact": str(folder),
        "recipe": manifest["recipe"].get("name"),
        "position": args.position,
        "prompt_ids": ids.tolist(),
        "position_logit_max_rel": errors,
        "first_differing_rounded_input": first and {k: first[k] for k in ("linear", "weight", "type")},
        "matmuls": rows,
    }
    for r in rows:
        print(
            f"{r['linear']:34s} {r['type']:5s} op {r['op_rel']:.1e} in {r['input_rel']:.1e} "
            f"out {r['output_rel']:.1e} codes differing {r['codes_differing']:4d} "
            f"fp16 scales differing {len(r['scales_differing'])}"
        )
    print("position errors:", " ".join(f"{e:.1e}" for e in errors))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
