#!/usr/bin/env bash
# The runtime-only install: a venv from the built wheel with only the runtime-onnx extra has no torch, and
# `lfm-export run` / `bench` work on an ONNX artifact; an export command there says in one line which extra
# to add. The artifact is written first by the project's own venv (.venv, from `make install`).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/lfm-export onnx tiny -o "$work/tiny-int4" --quant int4 --max-seq-len 64 --no-parity --threads 2 >/dev/null
.venv/bin/pip wheel --quiet --no-deps --wheel-dir "$work/dist" . 2>/dev/null
python3 -m venv "$work/rt"
wheel=$(ls "$work"/dist/lfm_export-*.whl)
"$work/rt/bin/pip" install --quiet "${wheel}[runtime-onnx]" 2>/dev/null
if "$work/rt/bin/python" -c "import torch" 2>/dev/null; then
  echo "runtime-onnx install has torch" >&2; exit 1
fi
"$work/rt/bin/lfm-export" run "$work/tiny-int4" --prompt "Once upon a time" --max-new-tokens 8 --greedy
"$work/rt/bin/lfm-export" bench "$work/tiny-int4" --prompt-len 16 --new-tokens 8 --json >/dev/null
set +e
msg=$("$work/rt/bin/lfm-export" onnx tiny -o "$work/x" 2>&1); rc=$?
set -e
if [ "$rc" -ne 2 ] || [ "$(printf '%s\n' "$msg" | wc -l)" -ne 1 ] || ! grep -q "lfm-export\[onnx\]" <<<"$msg"; then
  echo "export in a runtime-only install: expected one line naming the extra, exit 2; got $rc: $msg" >&2; exit 1
fi
echo "runtime-onnx install: no torch; run and bench work; export says: $msg"
