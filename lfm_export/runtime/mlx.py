"""`Session` over an MLX artifact folder (manifest.json, model.safetensors, decode.mlxfn, prefill.mlxfn).

Imports only mlx and numpy (mlx when a session is created). The functions are the static-KV form with the
state as inputs and outputs: `f(input_ids [1, T], input_pos [1], *state, **weights) -> (logits, *state)`,
state in signature order (`past.N.conv [1, H, L-1]`, `past_key_values.N.key/.value [1, kv, max_seq_len, hd]`),
weights by mlx-lm name from `model.safetensors`. `decode.mlxfn` takes T = 1, `prefill.mlxfn` holds one trace
per chunk size (the manifest's `mlx.prefill_chunks`); a prompt is fed largest chunks first, the remainder one
token at a time. `state()` returns the state (numpy copies); `snapshot()` / `restore(snap)` copy it out and back, exactly (the
state's own dtype goes through float32, which holds fp16 and bf16 values unchanged). Batch 1.

The device is chosen explicitly (`device="cpu"`, or `"gpu"` on Apple silicon). Threads: MLX 0.32's CPU
backend has no thread setting in its Python API; `threads` is recorded, not applied.

`.mlxfn` files are tied to the MLX version that wrote them (MLX's export API is marked experimental): a
session refuses an artifact whose manifest records another MLX major.minor version, with both named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lfm_export.contract.errors import UserError
from lfm_export.contract.manifest import manifest_max_seq_len, manifest_signature, read_manifest
from lfm_export.contract.session import DEFAULT_THREADS, SessionBase, SessionError
from lfm_export.contract.snapshot import Snapshot, artifact_id


class MlxSession(SessionBase):
    """`Session` over the MLX artifact in `folder` (static KV form, state in and out, batch 1)."""

    supports_batch = False

    def __init__(self, folder: str | Path, threads: int = DEFAULT_THREADS, device: str = "cpu") -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        where = self.folder / "manifest.json"
        self.signature = manifest_signature(self.manifest, where)
        if self.signature.form != "static":
            raise UserError(f"{where}: an MLX artifact has the static form, got {self.signature.form!r}")
        info = self.manifest.get("mlx") or {}
        self.max_seq_len: int | None = manifest_max_seq_len(self.manifest, self.signature)
        self.chunks = sorted((int(c) for c in info.get("prefill_chunks", [])), reverse=True)
        self.name = "mlx"
        self.artifact_id = artifact_id(self.manifest)
        self.threads = threads
        mx = _import_mlx()
        self._mx = mx
        check_version(info.get("mlx_version"), mx.__version__, where)
        if device not in ("cpu", "gpu"):
            raise UserError(f"device must be cpu or gpu, got {device!r}")
        self.device = mx.cpu if device == "cpu" else mx.gpu
        mx.set_default_device(self.device)
        try:
            self._weights = mx.load(str(self.folder / info.get("weights", "model.safetensors")))
            self._decode = mx.import_function(str(self.folder / info.get("decode", "decode.mlxfn")))
            prefill = info.get("prefill")
            self._prefill_fn = mx.import_function(str(self.folder / prefill)) if prefill else None
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(
                f"{self.folder}: MLX cannot load the artifact ({str(e).splitlines()[0]})"
            ) from None
        self.vocab_size = int(self.manifest["config"]["vocab_size"])
        self._state_names = [s.name for s in self.signature.state_inputs()]
        # fp16 / bf16 artifacts hold their state in that type (the manifest's signature says which)
        self._state_dtype = getattr(mx, self.signature.state_dtype)
        self.reset(1)

    def _reset_state(self, batch_size: int) -> None:
        mx = self._mx
        self._state = [
            mx.zeros([1 if isinstance(d, str) else d for d in s.shape], dtype=self._state_dtype)
            for s in self.signature.state_inputs()
        ]

    def _run(self, fn: Any, ids: np.ndarray, position: int, logits: bool = True) -> np.ndarray | None:
        """One call; with `logits` False only the state is evaluated, and MLX, lazy, never computes the
        lm_head for these positions."""
        mx = self._mx
        out = fn(mx.array(ids), mx.array([position], dtype=mx.int64), *self._state, **self._weights)
        mx.eval(out if logits else out[1:])
        self._state = list(out[1:])
        return np.array(out[0].astype(mx.float32)) if logits else None

    def _feed(self, ids: np.ndarray, logits: bool = True) -> list[np.ndarray | None]:
        out, start, t = [], 0, ids.shape[1]
        while start < t:
            size = next((c for c in self.chunks if c <= t - start), 1)
            fn = self._decode if size == 1 else self._prefill_fn
            out.append(self._run(fn, ids[:, start : start + size], self._position + start, logits))
            start += size
        return out

    def _prefill(self, ids: np.ndarray) -> np.ndarray:
        out = self._feed(ids)
        return out[0] if len(out) == 1 else np.concatenate(out, axis=1)

    def prefill_last(self, tokens: np.ndarray) -> np.ndarray:
        """`prefill` for generation: logits `[1, vocab]` of the last token only. All tokens but the last
        update the state without their logits (the lm_head is never run for them); the last goes through
        `decode.mlxfn`. mlx-lm's generation does the same."""
        ids = self._check_tokens(tokens)
        self._check_room(ids.shape[1])
        if ids.shape[1] > 1:
            self._feed(ids[:, :-1], logits=False)
        logits = self._run(self._decode, ids[:, -1:], self._position + ids.shape[1] - 1)
        self._advance(ids)
        assert logits is not None
        return logits[:, -1]

    def state(self) -> dict[str, np.ndarray]:
        f32 = self._mx.float32
        return {n: np.array(s.astype(f32)) for n, s in zip(self._state_names, self._state)}

    def _restore_state(self, snap: Snapshot) -> None:
        missing = [n for n in self._state_names if n not in snap.state]
        if missing:
            raise SessionError(f"{self.name}: the snapshot lacks {', '.join(missing)}")
        specs = {s.name: s for s in self.signature.state_inputs()}
        for n in self._state_names:
            want = [1 if isinstance(d, str) else d for d in specs[n].shape]
            if list(np.shape(snap.state[n])) != want:
                raise SessionError(
                    f"{self.name}: snapshot tensor {n} has shape {list(np.shape(snap.state[n]))}"
                )
        self._state = [
            self._mx.array(np.asarray(snap.state[n], dtype=np.float32)).astype(self._state_dtype)
            for n in self._state_names
        ]


def check_version(recorded: str | None, running: str, where: Path) -> None:
    """Refuse `.mlxfn` files written by another MLX major.minor than the one running."""
    if recorded is None:
        raise UserError(f"{where}: no mlx_version recorded; not an MLX artifact of this tool")
    if recorded.split(".")[:2] != running.split(".")[:2]:
        raise UserError(
            f"{where}: the .mlxfn functions were exported with mlx {recorded}, this is mlx {running}; "
            "re-export with this mlx (MLX's export format is not stable across versions)"
        )


def _import_mlx() -> Any:
    try:
        import mlx.core as mx
    except ImportError as e:
        raise UserError(f"the MLX runtime is not installed ({e}); pip install 'lfm-export[mlx]'") from None
    return mx
