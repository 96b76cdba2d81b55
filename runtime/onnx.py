"""`Session` over an ONNX artifact folder (manifest.json + model.onnx), run by onnxruntime.

onnxruntime is imported when a session is created, so importing this module costs nothing and needs neither
onnxruntime nor torch.

Threads: `intra_op_num_threads` is set explicitly (default 2) and `inter_op_num_threads` to 1. Left at its
default, onnxruntime-genai ran these models on 1 thread on the 2-core development machine, at about half the
decode speed; the graph is one sequential chain of small ops, so inter-op parallelism only adds overhead.
Spin-waiting of the intra-op threads is off by default (`spin=False`): with other processes on the same cores
(load ~3.6 on 2 cores), a 16-layer hidden-1024 model decoded at 42 ms/step on 1 thread, 84 ms on 2 spinning
threads and 46 ms on 2 non-spinning ones; spinning only pays on otherwise idle cores.

State transfer (`io`), measured on CPU (onnxruntime 1.32, 2 busy cores): "numpy" (default) uses plain `run`;
on the CPU provider it is already zero-copy both ways (numpy inputs are wrapped, outputs come back as views
of onnxruntime's buffers), so the `present.*` outputs of step n are the `past.*` inputs of step n+1 without a
copy. "ortvalue" (`run_with_ort_values`, state kept as OrtValues) and "iobinding" (an `IOBinding`) avoid no
copy there and add Python wrapping per tensor: tiny model, ~0.49 / 0.64 / 0.60 ms per decode step (best of
7); a 16-layer hidden-1024 model, no measurable difference (~75-175 ms per step depending on KV length).
They are kept for device providers, where binding keeps the state off the host (untested here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lfm_export.errors import ContextLimitError, UserError
from lfm_export.signature import ATTENTION_MASK, GROWING, INPUT_IDS, INPUT_POS, KEY, LOGITS, TensorSpec

from .artifact import manifest_max_seq_len, manifest_signature, model_file, read_manifest

IO_MODES = ("ortvalue", "iobinding", "numpy")
_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


class OnnxSession:
    """`Session` over the ONNX artifact in `folder` (growing or static KV form, any batch size)."""

    supports_batch = True

    def __init__(
        self,
        folder: str | Path,
        threads: int = 2,
        providers: list[Any] | None = None,
        io: str = "numpy",
        spin: bool = False,
    ) -> None:
        if io not in IO_MODES:
            raise UserError(f"unknown io mode {io!r}; expected one of {', '.join(IO_MODES)}")
        if threads < 0:
            raise UserError(f"threads must be >= 0 (0 lets onnxruntime decide), got {threads}")
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        where = self.folder / "manifest.json"
        self.signature = manifest_signature(self.manifest, where)
        self.max_seq_len: int | None = manifest_max_seq_len(self.manifest, self.signature)
        self.model_path = model_file(self.folder, self.manifest)
        self.form = self.signature.form
        if self.form != GROWING and self.max_seq_len is None:
            raise UserError(f"{where}: the static KV form needs max_seq_len in the manifest")
        self.io = io
        self.name = "onnx"

        ort = _import_ort()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self._ort = ort
        try:
            self._sess = ort.InferenceSession(
                str(self.model_path), opts, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own exception types for unloadable models
            raise UserError(
                f"{self.model_path}: onnxruntime cannot load it ({str(e).splitlines()[0]})"
            ) from None
        self._check_names()

        self._logits = next(s for s in self.signature.outputs if s.role == LOGITS)
        vocab = self._logits.shape[-1]
        self.vocab_size = int(vocab) if isinstance(vocab, int) else int(self._sess.get_outputs()[0].shape[-1])
        self._state_specs = self.signature.state_inputs()
        self._output_names = self.signature.output_names
        self._present_index = {
            s.name: self._output_names.index(self.signature.present_for(s.name)) for s in self._state_specs
        }
        self._state: dict[str, Any] = {}
        self._batch = 1
        self._position = 0
        self.reset(1)

    # ---- Session protocol --------------------------------------------------------------------------
    @property
    def position(self) -> int:
        return self._position

    @property
    def batch_size(self) -> int:
        return self._batch

    def reset(self, batch_size: int = 1) -> None:
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        self._batch = batch_size
        self._position = 0
        self._state = {
            s.name: self._wrap(np.zeros(self._state_shape(s, 0), _dtype(s))) for s in self._state_specs
        }

    def prefill(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] < 1:
            raise UserError(f"prefill expects token ids shaped [batch, tokens], got {list(tokens.shape)}")
        if tokens.shape[0] != self._batch:
            raise UserError(
                f"prefill got batch {tokens.shape[0]}, the session was reset for batch {self._batch}"
            )
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise UserError(
                f"token ids must be in 0..{self.vocab_size - 1}, got {int(tokens.min())}..{int(tokens.max())}"
            )
        b, t = tokens.shape
        end = self._position + t
        if self.max_seq_len is not None and end > self.max_seq_len:
            raise ContextLimitError(
                f"{self.name} session: {self._position} tokens held + {t} new exceeds max_seq_len {self.max_seq_len}"
            )
        feeds = {INPUT_IDS: np.ascontiguousarray(tokens, dtype=np.int64)}
        if self.form == GROWING:
            feeds[ATTENTION_MASK] = np.ones((b, end), dtype=np.int64)
        else:
            feeds[INPUT_POS] = np.array([self._position], dtype=np.int64)
        logits = self._run(feeds)
        self._position = end
        return logits

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens).reshape(-1)
        return self.prefill(tokens[:, None])[:, -1]

    def state(self) -> dict[str, np.ndarray]:
        """Copies of the current state, keyed by signature input name (`past.N.conv`, `past_key_values.N.key`)."""
        return {name: np.array(_as_numpy(v), copy=True) for name, v in self._state.items()}

    # ---- extras ------------------------------------------------------------------------------------
    def set_state(self, state: dict[str, np.ndarray], position: int | None = None) -> None:
        """Restore a `state()` snapshot. `position` defaults to the KV length (growing form only)."""
        missing = [s.name for s in self._state_specs if s.name not in state]
        if missing:
            raise UserError(f"state is missing {missing[0]}")
        arrays = {
            s.name: np.array(state[s.name], dtype=_dtype(s), order="C", copy=True) for s in self._state_specs
        }
        batch = arrays[self._state_specs[0].name].shape[0] if self._state_specs else self._batch
        if position is None:
            kv = [arrays[s.name] for s in self._state_specs if s.role == KEY]
            if self.form != GROWING or not kv:
                raise UserError("set_state needs the position for this artifact")
            position = kv[0].shape[2]
        for s in self._state_specs:
            want = self._state_shape(s, position, batch)
            if arrays[s.name].shape != want:
                raise UserError(
                    f"state {s.name} has shape {list(arrays[s.name].shape)}, expected {list(want)}"
                )
        self._batch, self._position = batch, position
        self._state = {name: self._wrap(a) for name, a in arrays.items()}

    # ---- internals ---------------------------------------------------------------------------------
    def _check_names(self) -> None:
        have_in = {i.name for i in self._sess.get_inputs()}
        have_out = {o.name for o in self._sess.get_outputs()}
        for kind, want, have in (
            ("input", self.signature.input_names, have_in),
            ("output", self.signature.output_names, have_out),
        ):
            missing = [n for n in want if n not in have]
            if missing:
                raise UserError(
                    f"{self.model_path.name} does not match its manifest: {kind} {missing[0]} is missing"
                )

    def _state_shape(self, spec: TensorSpec, position: int, batch: int | None = None) -> tuple[int, ...]:
        out = []
        for axis, d in enumerate(spec.shape):
            if axis == 0:
                out.append(self._batch if batch is None else batch)
            elif isinstance(d, int):
                out.append(d)
            else:
                out.append(position)
        return tuple(out)

    def _wrap(self, array: np.ndarray) -> Any:
        return array if self.io == "numpy" else self._ort.OrtValue.ortvalue_from_numpy(array)

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if self.io == "numpy":
            outs = self._sess.run(self._output_names, {**feeds, **self._state})
        elif self.io == "ortvalue":
            wrapped = {k: self._ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
            outs = self._sess.run_with_ort_values(self._output_names, {**wrapped, **self._state})
        else:
            binding = self._sess.io_binding()
            for k, v in feeds.items():
                binding.bind_ortvalue_input(k, self._ort.OrtValue.ortvalue_from_numpy(v))
            for k, v in self._state.items():
                binding.bind_ortvalue_input(k, v)
            for k in self._output_names:
                binding.bind_output(k, "cpu")
            self._sess.run_with_iobinding(binding)
            outs = binding.get_outputs()
        self._state = {name: outs[i] for name, i in self._present_index.items()}
        return np.asarray(_as_numpy(outs[0]), dtype=np.float32)


def _as_numpy(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()


def _dtype(spec: TensorSpec) -> Any:
    try:
        return _DTYPES[spec.dtype]
    except KeyError:
        raise UserError(f"signature tensor {spec.name} has unsupported dtype {spec.dtype}") from None


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install 'lfm-export[runtime-onnx]'") from None
    return onnxruntime
