"""`Session` over an ONNX artifact folder (manifest.json + model.onnx), run by onnxruntime.

onnxruntime is imported when a session is created, so importing this module costs nothing and needs neither
onnxruntime nor torch.

Threads: `intra_op_num_threads` is set explicitly (default `DEFAULT_THREADS`, 2) and `inter_op_num_threads`
to 1. Left at its default, onnxruntime-genai ran these models on 1 thread on the 2-core development machine,
at about half the decode speed; the graph is one sequential chain of small ops, so inter-op parallelism only
adds overhead.
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

KV cache (`kv`): with "copy" every step feeds `past_key_values.*` and takes `present.*` (past + new) back, so
onnxruntime writes the whole cache anew each step. With "shared" (the default, "auto", for artifacts whose
attention is `com.microsoft.GroupQueryAttention`), each layer's cache is one buffer bound as both the past
input and the present output: GroupQueryAttention sees the same memory and appends the new positions in
place (it reads the valid length from `attention_mask`, not from the buffer's shape). Buffers grow by
doubling, up to `max_seq_len`. Logits and state are bit-identical to "copy". Random LFM2-1.2B int4, 2 threads,
the two modes interleaved in one process (median of 72 decode steps each): 35.8 -> 33.7 ms/step after a
512-token prompt, 41.8 -> 36.9 after 2048 (the copy grows with the context).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lfm_export.contract.errors import UserError
from lfm_export.contract.manifest import manifest_max_seq_len, manifest_signature, model_file, read_manifest
from lfm_export.contract.session import DEFAULT_THREADS, SessionBase, SessionError
from lfm_export.contract.signature import (
    ATTENTION_MASK,
    GROWING,
    INPUT_IDS,
    INPUT_POS,
    KEY,
    LOGITS,
    VALUE,
    TensorSpec,
)
from lfm_export.contract.snapshot import Snapshot, artifact_id

IO_MODES = ("ortvalue", "iobinding", "numpy")
KV_MODES = ("auto", "shared", "copy")
GQA_OP = "com.microsoft::GroupQueryAttention"
MIN_KV_CAPACITY = 256
_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


class OnnxSession(SessionBase):
    """`Session` over the ONNX artifact in `folder` (growing or static KV form, any batch size)."""

    def __init__(
        self,
        folder: str | Path,
        threads: int = DEFAULT_THREADS,
        providers: list[Any] | None = None,
        io: str = "numpy",
        spin: bool = False,
        kv: str = "auto",
    ) -> None:
        if io not in IO_MODES:
            raise UserError(f"unknown io mode {io!r}; expected one of {', '.join(IO_MODES)}")
        if kv not in KV_MODES:
            raise UserError(f"unknown kv mode {kv!r}; expected one of {', '.join(KV_MODES)}")
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
        self.artifact_id = artifact_id(self.manifest)
        gqa = GQA_OP in self.manifest.get("ops", {}).get("op_types", {})
        if kv == "shared" and not (gqa and self.form == GROWING):
            raise UserError(
                f"{where}: kv='shared' needs a growing-KV artifact with GroupQueryAttention (--ops ort)"
            )
        self.kv = "shared" if kv == "shared" or (kv == "auto" and gqa and self.form == GROWING) else "copy"

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
        self._kv_names = [s.name for s in self._state_specs if s.role in (KEY, VALUE)]
        self._shared_outputs_of = {n: self.signature.present_for(n) for n in self._kv_names}
        shared_outputs = set(self._shared_outputs_of.values())
        self._rest_outputs = [n for n in self._output_names if n not in shared_outputs]
        self._conv_presents = {
            s.name: self.signature.present_for(s.name)
            for s in self._state_specs
            if s.name not in self._kv_names
        }
        self._kv_binding: Any = None
        self._state: dict[str, Any] = {}
        self._kv_buffers: dict[str, np.ndarray] = {}
        self._kv_values: dict[str, Any] = {}
        self.reset(1)

    # ---- Session protocol --------------------------------------------------------------------------
    def _reset_state(self, batch_size: int) -> None:
        shared = self.kv == "shared"
        self._state = {
            s.name: self._wrap(np.zeros(self._state_shape(s, 0), _dtype(s)))
            for s in self._state_specs
            if not (shared and s.name in self._kv_names)
        }
        if shared:
            self._kv_buffers = {}
            self._grow_kv(MIN_KV_CAPACITY)

    def _prefill(self, ids: np.ndarray) -> np.ndarray:
        b, t = ids.shape
        end = self._position + t
        if self.kv == "shared":
            self._grow_kv(end)
        feeds = {INPUT_IDS: ids}
        if self.form == GROWING:
            feeds[ATTENTION_MASK] = np.ones((b, end), dtype=np.int64)
        else:
            feeds[INPUT_POS] = np.array([self._position], dtype=np.int64)
        return self._run(feeds)

    def state(self) -> dict[str, np.ndarray]:
        """Copies of the current state by signature input name (`past.N.conv`, `past_key_values.N.key`)."""
        out = {name: np.array(_as_numpy(v), copy=True) for name, v in self._state.items()}
        for name, buf in self._kv_buffers.items():
            out[name] = np.array(buf[:, :, : self._position], copy=True)
        return out

    def _restore_state(self, snap: Snapshot) -> None:
        tokens = self._history
        self.set_state(dict(snap.state), snap.position)
        self._history = tokens

    # ---- extras ------------------------------------------------------------------------------------
    def set_state(self, state: dict[str, np.ndarray], position: int | None = None) -> None:
        """Restore a `state()` snapshot. `position` defaults to the KV length (growing form only)."""
        missing = [s.name for s in self._state_specs if s.name not in state]
        if missing:
            raise SessionError(f"state is missing {missing[0]}")
        arrays = {
            s.name: np.array(state[s.name], dtype=_dtype(s), order="C", copy=True) for s in self._state_specs
        }
        batch = arrays[self._state_specs[0].name].shape[0] if self._state_specs else self._batch
        if position is None:
            kv = [arrays[s.name] for s in self._state_specs if s.role == KEY]
            if self.form != GROWING or not kv:
                raise SessionError("set_state needs the position for this artifact")
            position = kv[0].shape[2]
        for s in self._state_specs:
            want = self._state_shape(s, position, batch)
            if arrays[s.name].shape != want:
                raise SessionError(
                    f"state {s.name} has shape {list(arrays[s.name].shape)}, expected {list(want)}"
                )
        self._restored(batch, position)
        shared = self.kv == "shared"
        self._state = {
            name: self._wrap(a) for name, a in arrays.items() if not (shared and name in self._kv_names)
        }
        if shared:
            self._kv_buffers = {}
            self._grow_kv(max(position, MIN_KV_CAPACITY), {n: arrays[n] for n in self._kv_names})

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

    def _grow_kv(self, needed: int, fill: dict[str, np.ndarray] | None = None) -> None:
        """Make every shared KV buffer hold at least `needed` positions (doubling, capped at max_seq_len),
        keeping the first `position` positions of the current buffers (or of `fill`)."""
        have = next(iter(self._kv_buffers.values())).shape[2] if self._kv_buffers else 0
        if needed <= have:
            return
        cap = max(needed, 2 * have, MIN_KV_CAPACITY)
        if self.max_seq_len is not None:
            cap = max(needed, min(cap, self.max_seq_len))
        specs = {s.name: s for s in self._state_specs}
        grown = {}
        for name in self._kv_names:
            shape = list(self._state_shape(specs[name], cap))
            buf = np.zeros(shape, _dtype(specs[name]))
            old = (fill or self._kv_buffers).get(name)
            if old is not None:
                buf[:, :, : self._position] = old[:, :, : self._position]
            grown[name] = buf
        self._kv_buffers = grown
        self._kv_values = {n: self._ort.OrtValue.ortvalue_from_numpy(b) for n, b in grown.items()}
        self._kv_binding = None

    def _run_shared(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One run on a binding that persists across steps: the KV buffers are bound (as input and output)
        only when they are (re)allocated; ids, mask, conv state and the other outputs every step."""
        binding = self._kv_binding
        if binding is None:
            binding = self._kv_binding = self._sess.io_binding()
            for k in self._rest_outputs:  # bound first, so get_outputs() lists them first
                binding.bind_output(k, "cpu")
            for k, v in self._kv_values.items():
                binding.bind_ortvalue_input(k, v)
                binding.bind_ortvalue_output(self._shared_outputs_of[k], v)
        for k, v in feeds.items():
            binding.bind_cpu_input(k, v)
        for k, v in self._state.items():
            binding.bind_cpu_input(k, _as_numpy(v))
        for k in self._rest_outputs:  # rebound every step: shapes change with the number of new tokens
            binding.bind_output(k, "cpu")
        self._sess.run_with_iobinding(binding)
        outs = dict(zip(self._rest_outputs, binding.get_outputs()))
        self._state = {name: outs[present].numpy() for name, present in self._conv_presents.items()}
        return np.asarray(outs[self._output_names[0]].numpy(), dtype=np.float32)

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if self.kv == "shared":
            return self._run_shared(feeds)
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
