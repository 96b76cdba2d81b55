"""Rewrite a GGUF file with its tensors in another file's order (same header, metadata and tensor bytes; only
the tensor-info order, the offsets and so the data layout change): tests whether the order alone changes
llama.cpp's decode speed (`gguf_decode_ab.py` on the result against the order's source).

    .venv/bin/python benchmarks/gguf_reorder.py SRC.gguf ORDER_FROM.gguf OUT.gguf [--same-data-start]

The two files must hold the same tensor names. Alignment: the source's `general.alignment` (32 when absent).
`--same-data-start`: one string key `lfm_export.pad` added so that the data section starts where ORDER_FROM's
does, which puts every tensor at ORDER_FROM's address (the metadata and the tensor bytes stay the source's).
`--bytes-from-order`: the tensor bytes taken from ORDER_FROM instead (SRC's metadata, ORDER_FROM's tensors).
`--bytes-from FILE --bytes-match REGEX`: the bytes of the tensors whose name matches REGEX taken from FILE (same
types and sizes), every other tensor's from SRC: which tensors' values a speed difference follows.
"""

from __future__ import annotations

import argparse
import re
import struct
from pathlib import Path

import numpy as np


def main() -> None:
    import gguf

    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path)
    ap.add_argument("order_from", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--same-data-start", action="store_true")
    ap.add_argument("--bytes-from-order", action="store_true")
    ap.add_argument("--bytes-from", type=Path, default=None)
    ap.add_argument("--bytes-match", default=None, help="regex on tensor names (with --bytes-from)")
    args = ap.parse_args()
    if (args.bytes_from is None) != (args.bytes_match is None):
        raise SystemExit("--bytes-from and --bytes-match go together")
    if args.bytes_from is not None and args.bytes_from_order:
        raise SystemExit("--bytes-from-order or --bytes-from, not both")
    for p in (args.src, args.order_from):
        if not p.is_file():
            raise SystemExit(f"{p}: no such file")
    src = gguf.GGUFReader(args.src)
    target = gguf.GGUFReader(args.order_from)
    order = [t.name for t in target.tensors]
    by_name = {t.name: t for t in src.tensors}
    if sorted(order) != sorted(by_name):
        raise SystemExit("the two files hold different tensor names")
    align = int(src.fields["general.alignment"].contents()) if "general.alignment" in src.fields else 32
    raw = np.memmap(args.src, dtype=np.uint8, mode="r")
    other = np.memmap(args.order_from, dtype=np.uint8, mode="r")
    theirs = {t.name: t for t in target.tensors}
    swapped: set[str] = set()
    if args.bytes_from is not None:
        if not args.bytes_from.is_file():
            raise SystemExit(f"{args.bytes_from}: no such file")
        other = np.memmap(args.bytes_from, dtype=np.uint8, mode="r")
        theirs = {t.name: t for t in gguf.GGUFReader(args.bytes_from).tensors}
        swapped = {n for n in order if re.search(args.bytes_match, n)}
        if not swapped:
            raise SystemExit(f"--bytes-match {args.bytes_match!r}: no tensor matches")
    head = bytes(raw[: src.tensors[0].field.offset])  # magic, version, counts, every key: unchanged
    infos = bytearray()
    offset = 0
    placed = []
    for name in order:
        t = by_name[name]
        enc = name.encode()
        infos += struct.pack("<Q", len(enc)) + enc
        infos += struct.pack("<I", len(t.shape)) + b"".join(struct.pack("<Q", int(d)) for d in t.shape)
        infos += struct.pack("<IQ", int(t.tensor_type), offset)  # from the data section's start
        placed.append((t, offset))
        offset += -(-int(t.n_bytes) // align) * align
    start = len(head) + len(infos)
    data_start = -(-start // align) * align
    if args.same_data_start and data_start != target.data_offset:
        key = b"lfm_export.pad"
        room = target.data_offset - start - (8 + len(key) + 4 + 8)  # the key's own bytes, then its string
        if room < 0:
            raise SystemExit(
                f"the data section cannot start at {target.data_offset} (the header ends at {start})"
            )
        pad = struct.pack("<Q", len(key)) + key + struct.pack("<IQ", int(gguf.GGUFValueType.STRING), room)
        pad += b"p" * room
        kv_count = struct.unpack_from("<Q", head, 16)[0]
        head = head[:16] + struct.pack("<Q", kv_count + 1) + head[24:] + pad
        start = len(head) + len(infos)
        data_start = -(-start // align) * align
        assert data_start == target.data_offset, (data_start, target.data_offset)
    with open(args.out, "wb") as f:
        f.write(head)
        f.write(infos)
        f.write(b"\0" * (data_start - start))
        for t, off in placed:
            assert f.tell() == data_start + off
            if args.bytes_from_order or t.name in swapped:
                u = theirs[t.name]
                if int(u.n_bytes) != int(t.n_bytes) or u.tensor_type != t.tensor_type:
                    raise SystemExit(f"{t.name}: another type or size in {args.order_from}")
                begin = int(u.data_offset)  # the reader's offsets are from the file's start
                f.write(bytes(other[begin : begin + int(t.n_bytes)]))
            else:
                begin = int(t.data_offset)
                f.write(bytes(raw[begin : begin + int(t.n_bytes)]))
            f.write(b"\0" * (-(int(t.n_bytes)) % align))
    check = gguf.GGUFReader(args.out)
    for t in check.tensors:
        a = theirs[t.name] if args.bytes_from_order or t.name in swapped else by_name[t.name]
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(a.data).view(np.uint8)), t.name
    print(f"{args.out}: {len(order)} tensors in {args.order_from.name}'s order, data at {data_start}", end="")
    print(f"; {len(swapped)} tensors' bytes from {args.bytes_from}" if swapped else "")


if __name__ == "__main__":
    main()
