"""`Session` over an ExecuTorch artifact folder (manifest.json + model.pte), run by `executorch.runtime`.

executorch (and with it torch: its bindings import torch) is imported when a session is created, with
`executorch.extension.llm.custom_ops.custom_ops`, which registers the `llama::custom_sdpa` /
`llama::update_cache` kernels the program's attention uses (without it loading fails with "Missing operator").

The program holds its state (stateful form): one method, `forward(input_ids [1, T], input_pos [1]) -> logits
[1, 1, vocab]` of the call's last position (what ExecuTorch's runner reads; the lm_head runs on one row), T at
most the signature's `max_prefill`, longer prompts fed in chunks. `prefill_last` (generation) and `decode` run
it as it is. `prefill` (every position, what parity compares) gets them from the same method in two passes:
one-token calls for every position but the last (the decode path, continuing the real state), then the
position is set back and the whole prompt is fed again in one call (the multi-token path), whose last position
is the last row and whose writes are the state that later calls read. Setting the position back needs the conv
state as it was at the prompt's start: at position 0 the program clears it itself; later, the tokens of the
sequence so far are fed again from position 0 first (the session keeps them). So parity checks both paths:
one-token calls at every position, multi-token calls at each call's last position and through everything read
after them. Cost: about 2 T + the tokens before; parity's prompts are short. Batch 1 only (`supports_batch`
False).

`reset` starts a new sequence by position alone: the program replaces its conv state by zeros when
`input_pos == 0` and masks KV positions past the query (every position at or before it is written by the
current sequence first), so nothing stale can be read. Measured on `tiny` fp32: a second sequence after a
first one matches the reference within 7e-6 (logit scale 15). `state()` is None (parity compares logits only).

Snapshots: the export names the held buffers in the program (`emit_mutable_buffer_names`), and the bindings'
`get_attribute(name)` returns a tensor that aliases the buffer the program updates; `snapshot()` copies them
(conv states and the whole static KV cache, in their dtype) and `restore(snap)` copies them back: bitwise.
A program without the names (exported before) keeps the tokens only, and `restore` feeds them again from
position 0 in `max_prefill` chunks (the program clears the conv state at position 0): the same state within
the float differences of its one-token and multi-token paths, at a prefill's cost.

Threads: the bindings expose the process-wide XNNPACK / ExecuTorch threadpool as
`executorch.extension.pybindings.portable_lib._unsafe_reset_threadpool(n)` (marked experimental); the
session sets it to `threads` when `threads > 0` (0 leaves the pool as it is: one thread per core).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lfm_export.contract.errors import UserError
from lfm_export.contract.manifest import manifest_max_seq_len, manifest_signature, model_file, read_manifest
from lfm_export.contract.session import DEFAULT_THREADS, SessionBase, SessionError
from lfm_export.contract.snapshot import Snapshot, artifact_id


class ExecuTorchSession(SessionBase):
    """`Session` over the ExecuTorch artifact in `folder` (stateful form, batch 1)."""

    supports_batch = False

    def __init__(self, folder: str | Path, threads: int = DEFAULT_THREADS) -> None:
        if threads < 0:
            raise UserError(f"threads must be >= 0 (0 leaves ExecuTorch's default), got {threads}")
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        where = self.folder / "manifest.json"
        self.signature = manifest_signature(self.manifest, where)
        if self.signature.form != "stateful":
            raise UserError(
                f"{where}: an ExecuTorch artifact has the stateful form, got {self.signature.form!r}"
            )
        self.max_seq_len: int | None = manifest_max_seq_len(self.manifest, self.signature)
        self.max_prefill = int(self.signature.max_prefill or self.max_seq_len or 1)
        self.model_path = model_file(self.folder, self.manifest, suffix=".pte", default="model.pte")
        self.name = "executorch"
        self.artifact_id = artifact_id(self.manifest)
        self.threads = threads
        torch, runtime = _import_executorch(threads)
        self._torch = torch
        try:
            self._program = runtime.Runtime.get().load_program(str(self.model_path))
            self._forward = self._program.load_method("forward")
        except Exception as e:  # the bindings raise RuntimeError / ValueError with the runtime's error code
            raise UserError(
                f"{self.model_path}: ExecuTorch cannot load it ({str(e).splitlines()[0]})"
            ) from None
        self._held = self._held_buffers()
        vocab = self.metadata("get_vocab_size")
        self.vocab_size = int(vocab if vocab is not None else self.manifest["config"]["vocab_size"])
        self.reset(1)

    def metadata(self, name: str) -> Any:
        """The value of constant method `name` in the program (None if it has none)."""
        if name not in self._program.method_names:
            return None
        values = list(self._program.load_method(name).execute([]))
        return values if name == "get_eos_ids" else values[0]

    def _reset_state(self, batch_size: int) -> None:
        """Nothing to clear: the program starts a new sequence at input_pos 0 (module docstring)."""

    def _held_buffers(self) -> dict[str, Any] | None:
        """Signature name -> the tensor aliasing that held buffer; None if the program does not name them."""
        get = getattr(getattr(self._forward, "_method", None), "get_attribute", None)
        if get is None or not self.signature.held:
            return None
        out = {}
        for spec in self.signature.held:
            try:
                out[spec.name] = get(spec.name.replace(".", "_"))  # lfm_export.stateful.held_buffer_name
            except Exception:  # noqa: BLE001 - the bindings raise RuntimeError / KeyError for an unnamed buffer
                return None
        return out

    def _snapshot_state(self) -> dict[str, np.ndarray]:
        held = self._held
        if held is None:
            return {}  # the tokens are the state (module docstring)
        bf16 = self._torch.bfloat16
        return {n: (t.float() if t.dtype == bf16 else t).detach().numpy().copy() for n, t in held.items()}

    def _restore_state(self, snap: Snapshot) -> None:
        if self._held is not None and snap.state:
            for name, target in self._held.items():
                value = snap.state.get(name)
                if value is None or tuple(np.shape(value)) != tuple(target.shape):
                    raise SessionError(f"{self.name}: the snapshot lacks {name} or has another shape")
                target.copy_(self._torch.from_numpy(np.ascontiguousarray(value)).to(target.dtype))
            return
        if self._held is not None:
            raise SessionError(f"{self.name}: the snapshot holds no state (taken from an older export)")
        end = self._position
        if end == 0:
            return
        try:
            self._position = 0
            self._run(self._forward, self.tokens())
        finally:
            self._position = end

    def _run(self, method: Any, ids: np.ndarray) -> list[np.ndarray]:
        torch = self._torch
        out = []
        for start in range(0, ids.shape[1], self.max_prefill):
            chunk = torch.from_numpy(ids[:, start : start + self.max_prefill].copy())
            pos = torch.tensor([self._position + start], dtype=torch.int64)
            logits = method.execute([chunk, pos])[0]
            out.append(logits.detach().numpy().astype(np.float32, copy=True))
        return out

    def _prefill(self, ids: np.ndarray) -> np.ndarray:
        out = self._every_position(ids)
        return out[0] if len(out) == 1 else np.concatenate(out, axis=1)

    def _every_position(self, ids: np.ndarray) -> list[np.ndarray]:
        """Every position's logits from the last-position `forward` (module docstring: one-token calls, then
        the whole call again from the restored state)."""
        start, rows = self._position, []
        try:
            for i in range(ids.shape[1] - 1):
                self._position = start + i
                rows.append(self._run(self._forward, ids[:, i : i + 1])[-1])
            if ids.shape[1] > 1 and start > 0:
                self._position = 0
                self._run(self._forward, self.tokens())
            self._position = start
            rows.append(self._run(self._forward, ids)[-1][:, -1:])
        finally:
            self._position = start
        return rows

    def prefill_last(self, tokens: np.ndarray) -> np.ndarray:
        """`prefill` for generation: logits `[1, vocab]` of the last token only (`forward`: the lm_head runs on
        one position per call)."""
        ids = self._check_tokens(tokens)
        self._check_room(ids.shape[1])
        last = self._run(self._forward, ids)[-1][:, -1]
        self._advance(ids)
        return last

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        ids = np.asarray(tokens)
        if ids.ndim != 1:
            return super().decode(tokens)  # its one-line error
        return self.prefill_last(ids[:, None])


def _import_executorch(threads: int) -> tuple[Any, Any]:
    try:
        import torch
        from executorch import runtime
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401 (kernels the program uses)
        from executorch.extension.pybindings import portable_lib
    except ImportError as e:
        raise UserError(
            f"the ExecuTorch runtime is not installed ({e}); pip install 'lfm-export[executorch]'"
        ) from None
    if threads > 0:
        portable_lib._unsafe_reset_threadpool(threads)
    return torch, runtime
