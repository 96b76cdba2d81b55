"""Two GGUF files side by side, as llama.cpp reads them: every metadata key, every tensor's name, type, shape,
offset in the data section and byte size, where the data section starts, and which tensors llama.cpp's CPU
backend repacks at load (`ggml-cpu/repack.cpp`, x86 with AVX2: Q4_0 and Q4_K matrices whose row count is a
multiple of 8, IQ4_NL likewise; the token table is read by `get_rows` and stays where it is).

    .venv/bin/python benchmarks/gguf_file_diff.py A.gguf B.gguf [--out diff.json]

Prints the differences (keys, tensors in one file only, differing types / shapes, the tensor order and the
data offsets modulo 64 and 4096) and writes them as JSON to `--out`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from provenance import provenance

REPACKED_ON_AVX2 = {"Q4_0", "Q4_K", "IQ4_NL"}
"""GGUF types `ggml_repack_get_optimal_repack_type` repacks on an x86 CPU with AVX2 (rows a multiple of 8)."""


def describe(path: Path) -> dict[str, Any]:
    """Metadata (repr of each value), data-section start and alignment, and the tensors in file order."""
    import gguf

    r = gguf.GGUFReader(path)
    fields = {k: repr(f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}
    align = int(r.fields["general.alignment"].contents()) if "general.alignment" in r.fields else 32
    tensors = []
    for t in r.tensors:
        kind = t.tensor_type.name
        shape = [int(x) for x in t.shape]  # ggml order: ne[0] (row length) first
        tensors.append(
            {
                "name": t.name,
                "type": kind,
                "shape": shape,
                "offset": int(t.data_offset) - int(r.data_offset),  # the reader's is from the file's start
                "bytes": int(t.n_bytes),
                "repacked_avx2": kind in REPACKED_ON_AVX2
                and len(shape) >= 2
                and shape[1] % 8 == 0
                and t.name != "token_embd.weight",
            }
        )
    return {
        "file_bytes": path.stat().st_size,
        "data_offset": int(r.data_offset),
        "alignment": align,
        "fields": fields,
        "tensors": tensors,
    }


def diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """What differs between two `describe` results."""
    fa, fb = a["fields"], b["fields"]
    keys = sorted(set(fa) | set(fb))
    ta = {t["name"]: t for t in a["tensors"]}
    tb = {t["name"]: t for t in b["tensors"]}
    common = [n for n in ta if n in tb]
    order_a = [t["name"] for t in a["tensors"]]
    order_b = [t["name"] for t in b["tensors"]]
    return {
        "file_bytes": [a["file_bytes"], b["file_bytes"]],
        "data_offset": [a["data_offset"], b["data_offset"]],
        "data_offset_mod_64": [a["data_offset"] % 64, b["data_offset"] % 64],
        "data_offset_mod_4096": [a["data_offset"] % 4096, b["data_offset"] % 4096],
        "alignment": [a["alignment"], b["alignment"]],
        "keys_only_a": [k for k in keys if k not in fb],
        "keys_only_b": [k for k in keys if k not in fa],
        "keys_differing": {
            k: [fa[k][:200], fb[k][:200]] for k in keys if k in fa and k in fb and fa[k] != fb[k]
        },
        "tensors": [len(ta), len(tb)],
        "tensors_only_a": [n for n in ta if n not in tb],
        "tensors_only_b": [n for n in tb if n not in ta],
        "type_differing": {
            n: [ta[n]["type"], tb[n]["type"]] for n in common if ta[n]["type"] != tb[n]["type"]
        },
        "shape_differing": {
            n: [ta[n]["shape"], tb[n]["shape"]] for n in common if ta[n]["shape"] != tb[n]["shape"]
        },
        "bytes_differing": {
            n: [ta[n]["bytes"], tb[n]["bytes"]] for n in common if ta[n]["bytes"] != tb[n]["bytes"]
        },
        "same_order": order_a == order_b,
        "repacked": [
            sum(t["bytes"] for t in a["tensors"] if t["repacked_avx2"]),
            sum(t["bytes"] for t in b["tensors"] if t["repacked_avx2"]),
        ],
        "absolute_offset_mod_64_differing": sorted(
            n
            for n in common
            if (a["data_offset"] + ta[n]["offset"]) % 64 != (b["data_offset"] + tb[n]["offset"]) % 64
        ),
        "absolute_offset_mod_4096_differing": len(
            [
                n
                for n in common
                if (a["data_offset"] + ta[n]["offset"]) % 4096 != (b["data_offset"] + tb[n]["offset"]) % 4096
            ]
        ),
        "order_a_first_20": order_a[:20],
        "order_b_first_20": order_b[:20],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    for p in (args.a, args.b):
        if not p.is_file():
            raise SystemExit(f"{p}: no such file")
    a, b = describe(args.a), describe(args.b)
    d = diff(a, b)
    print(json.dumps(d, indent=1))
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    **provenance(),
                    "a": str(args.a),
                    "b": str(args.b),
                    "diff": d,
                    "tensors_a": a["tensors"],
                    "tensors_b": b["tensors"],
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
