"""`Session` over a GGUF artifact folder (manifest.json, model.gguf) through llama.cpp (llama-cpp-python).

Imports only llama_cpp and numpy (llama_cpp when a session is created). llama.cpp holds the state (each conv
layer's last `L-1` inputs, each attention layer's KV cache) inside its context, so `state()` returns None;
`snapshot()` / `restore(snap)` (`SessionBase`'s) copy it out and back through llama.cpp's state API (`llama_state_get_data` /
`llama_state_set_data`), position included.

Run as parity needs it: batch 1; the KV cache held in F32 (llama.cpp's default F16 cache would round every key
and value, which the artifact's simulation does not); flash attention off; `threads` for both prompt and
generation. `prefill` asks llama.cpp for every position's logits; `prefill_last` (generation) only for the last
token's, so the output matrix runs once per call, as llama.cpp's own generation does. Prompts are fed in
batches of at most `BATCH` tokens (causal, so the split changes nothing but float summation order inside a
matmul). llama.cpp's own log reaches stderr for errors only.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from typing import Any

import numpy as np

from lfm_export.contract.errors import UserError
from lfm_export.contract.manifest import manifest_max_seq_len, manifest_signature, read_manifest
from lfm_export.contract.session import DEFAULT_THREADS, SessionBase, SessionError
from lfm_export.contract.snapshot import Snapshot, artifact_id

GGML_LOG_ERROR = 4
"""ggml's `GGML_LOG_LEVEL_ERROR` (llama-cpp-python 0.3.36's own log callback reads ggml's older numbering and
prints warnings as errors)."""
BATCH = 512
"""Tokens per `llama_decode` call (its `n_batch` and `n_ubatch`)."""
GGML_TYPE_F32 = 0
STATE_KEY = "llama_state"
"""The one array of a GGUF snapshot's state: llama.cpp's state bytes (KV cache and conv state, its layout)."""


class GgufSession(SessionBase):
    """`Session` over the GGUF artifact in `folder` (llama.cpp holds the state; batch 1)."""

    supports_batch = False

    def __init__(self, folder: str | Path, threads: int = DEFAULT_THREADS) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        where = self.folder / "manifest.json"
        signature = manifest_signature(self.manifest, where)
        self.max_seq_len: int | None = manifest_max_seq_len(self.manifest, signature)
        info = self.manifest.get("gguf") or {}
        path = self.folder / info.get("file", "model.gguf")
        if not path.is_file():
            raise UserError(f"{path}: missing; not a GGUF artifact of this tool")
        self.name = "gguf"
        self.artifact_id = artifact_id(self.manifest)
        self.threads = threads
        llama_cpp = _import_llama_cpp()
        self._lib = llama_cpp
        _errors_only(llama_cpp)
        from llama_cpp._internals import LlamaBatch

        try:
            self._llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=self.max_seq_len or 0,
                n_batch=BATCH,
                n_ubatch=BATCH,
                n_threads=threads,
                n_threads_batch=threads,
                type_k=GGML_TYPE_F32,
                type_v=GGML_TYPE_F32,
                flash_attn=False,
                logits_all=False,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as e:
            raise UserError(f"{path}: llama.cpp cannot load it ({str(e).splitlines()[0]})") from None
        self.vocab_size = int(self._llm.n_vocab())
        self._ctx = self._llm._ctx
        self._chunk = min(BATCH, int(self._ctx.n_ctx()))  # llama.cpp caps n_batch at the context
        self._lbatch = LlamaBatch(n_tokens=self._chunk, embd=0, n_seq_max=1, verbose=False)
        self.reset(1)

    def _reset_state(self, batch_size: int) -> None:
        self._ctx.kv_cache_clear()

    def _feed(self, ids: np.ndarray, every: bool) -> np.ndarray:
        """Decode `ids [1, T]` after the state; the logits of every token (`every`) or of the last one."""
        tokens = ids[0].tolist()
        out = []
        for start in range(0, len(tokens), self._chunk):
            chunk = tokens[start : start + self._chunk]
            last = start + self._chunk >= len(tokens)
            self._lbatch.set_batch(chunk, self._position + start, logits_all=every)
            try:
                self._ctx.decode(self._lbatch)
            except RuntimeError as e:
                raise SessionError(f"{self.name}: llama.cpp could not decode ({e})") from None
            if every or last:
                rows = len(chunk) if every else 1
                ptr = self._lib.llama_get_logits(self._ctx.ctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(rows, self.vocab_size)).copy())
        return np.concatenate(out)[None]

    def _prefill(self, ids: np.ndarray) -> np.ndarray:
        return self._feed(ids, every=True)

    def prefill_last(self, tokens: np.ndarray) -> np.ndarray:
        """`prefill` for generation: logits `[1, vocab]` of the last token only."""
        ids = self._check_tokens(tokens)
        self._check_room(ids.shape[1])
        logits = self._feed(ids, every=False)
        self._position += ids.shape[1]
        return logits[:, -1]

    def _snapshot_state(self) -> dict[str, np.ndarray]:
        """The context's state through llama.cpp's state API, as one byte array."""
        lib, ctx = self._lib, self._ctx.ctx
        size = int(lib.llama_state_get_size(ctx))
        buf = (ctypes.c_uint8 * size)()
        n = int(lib.llama_state_get_data(ctx, buf, size))
        return {STATE_KEY: np.frombuffer(bytes(buf[:n]), dtype=np.uint8)}

    def _restore_state(self, snap: Snapshot) -> None:
        data = np.ascontiguousarray(snap.state.get(STATE_KEY, np.empty(0, np.uint8)), dtype=np.uint8)
        if data.size == 0:
            raise SessionError(f"{self.name}: the snapshot holds no llama.cpp state")
        buf = (ctypes.c_uint8 * data.size).from_buffer_copy(data.tobytes())
        if int(self._lib.llama_state_set_data(self._ctx.ctx, buf, data.size)) != data.size:
            raise SessionError(f"{self.name}: llama.cpp refused the state snapshot")

    def close(self) -> None:
        self._lbatch.close()
        self._llm.close()


_LOG_CALLBACK: list[Any] = []
"""The ctypes callback given to llama.cpp, kept alive here (llama.cpp holds a bare pointer to it)."""


def _errors_only(llama_cpp: Any) -> None:
    """llama.cpp's log, errors only, to stderr (once per process): its load-time notes and warnings are not
    the shim's output."""
    if _LOG_CALLBACK:
        return

    @llama_cpp.llama_log_callback
    def log(level: int, text: bytes, user_data: Any) -> None:
        if level == GGML_LOG_ERROR:
            sys.stderr.write(text.decode("utf-8", "replace"))

    _LOG_CALLBACK.append(log)
    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as e:
        raise UserError(
            f"the llama.cpp runtime is not installed ({e}); pip install 'lfm-export[runtime-gguf]'"
        ) from None
    return llama_cpp
