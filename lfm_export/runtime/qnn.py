"""`Session` over a QNN artifact (`lfm-export onnx --target qnn`): the static-shape QDQ graph run by onnxruntime's
QNN execution provider (the `onnxruntime-qnn` plugin) on the HTP backend: on a Snapdragon device the NPU, on an
x86_64 host Qualcomm's HTP emulator that the package ships. Torch-free.

Every node must sit on the HTP: the session is created with `session.disable_cpu_ep_fallback` = 1, so
onnxruntime refuses to create it if any node would fall back to its CPU provider; `partitioning()` reports
that. The graph takes one token (`input_ids [1, 1]`, `input_pos [1]`) with the conv state and the
`max_seq_len` KV cache as inputs and outputs, so prefill runs token by token (batch 1). The provider needs the
SoC (`soc_model`): without it the emulated HTP failed to finalize the graph (`QNN_COMMON_ERROR_MEM_ALLOC`)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lfm_export.contract.errors import UserError
from lfm_export.contract.manifest import manifest_max_seq_len, manifest_signature, model_file, read_manifest
from lfm_export.contract.session import DEFAULT_THREADS, SessionBase, SessionError
from lfm_export.contract.snapshot import Snapshot, artifact_id

EP_NAME = "QNNExecutionProvider"
_registered: list[Any] = []


def qnn_devices() -> list[Any]:
    """onnxruntime's QNN plugin devices (the plugin library registered once per process)."""
    try:
        import onnxruntime as ort
        import onnxruntime_qnn
    except ImportError as e:
        raise UserError(
            f"a QNN artifact needs onnxruntime-qnn ({e}); pip install 'lfm-export[qnn]'"
        ) from None
    if not _registered:
        lib = os.path.join(os.path.dirname(onnxruntime_qnn.__file__), "libonnxruntime_providers_qnn.so")
        if not any(d.ep_name == EP_NAME for d in ort.get_ep_devices()):
            ort.register_execution_provider_library(EP_NAME, lib)
        _registered.append(lib)
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        raise UserError("onnxruntime-qnn is installed but its provider offers no device")
    return devices


def htp_session_options(soc_model: int, threads: int = DEFAULT_THREADS, **provider: str) -> Any:
    """Session options placing a graph on the QNN HTP backend for `soc_model`, CPU fallback disabled."""
    import onnxruntime as ort

    devices = qnn_devices()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    opts.add_provider_for_devices(devices, {"backend_type": "htp", "soc_model": str(soc_model), **provider})
    return opts


class QnnSession(SessionBase):
    """`Session` over the QNN artifact in `folder` (batch 1, one token per graph run)."""

    supports_batch = False

    def __init__(self, folder: str | Path, threads: int = DEFAULT_THREADS) -> None:
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        where = self.folder / "manifest.json"
        self.signature = manifest_signature(self.manifest, where)
        if self.signature.form != "static":
            raise UserError(f"{where}: a QNN artifact has the static form, got {self.signature.form!r}")
        self.max_seq_len: int | None = manifest_max_seq_len(self.manifest, self.signature)
        self.model_path = model_file(self.folder, self.manifest, suffix=".onnx", default="model.onnx")
        qnn = self.manifest.get("qnn", {})
        self.soc_model = int(self.manifest["recipe"]["soc_model"])
        self.name = "qnn-htp"
        self.artifact_id = artifact_id(self.manifest)
        self.vocab_size = int(self.signature.outputs[0].shape[-1])
        self.context_binary = qnn.get("context_binary")
        path = self.folder / self.context_binary if self.context_binary else self.model_path
        opts = htp_session_options(self.soc_model, threads)
        try:
            with stdout_to_stderr():
                self._session = ort.InferenceSession(str(path), opts)
        except Exception as e:  # onnxruntime raises its own Fail / EPFail / InvalidGraph types
            raise UserError(
                f"{path}: onnxruntime's QNN provider cannot run it on the HTP ({_first_line(e)})"
            ) from None
        self._state_specs = self.signature.state_inputs()
        self._present = [self.signature.present_for(s.name) for s in self._state_specs]
        self.reset(1)

    def partitioning(self) -> dict[str, Any]:
        """Where the graph runs: the session was created with CPU fallback disabled, so every node is on the QNN
        provider (onnxruntime refuses the session otherwise)."""
        return {
            "providers": self._session.get_providers(),
            "cpu_fallback": "disabled",
            "backend_type": "htp",
            "soc_model": self.soc_model,
        }

    def _reset_state(self, batch_size: int) -> None:
        self._state = {s.name: np.zeros(s.shape, dtype=np.float32) for s in self._state_specs}

    def _prefill(self, ids: np.ndarray) -> np.ndarray:
        out = []
        for i in range(ids.shape[1]):
            feeds = {
                "input_ids": ids[:, i : i + 1],
                "input_pos": np.array([self._position + i], dtype=np.int64),
                **self._state,
            }
            results = self._session.run(None, feeds)
            named = dict(zip(self.signature.output_names, results, strict=True))
            self._state = {s.name: named[p] for s, p in zip(self._state_specs, self._present, strict=True)}
            out.append(named["logits"].astype(np.float32, copy=False))
        return np.concatenate(out, axis=1)

    def state(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._state.items()}

    def _restore_state(self, snap: Snapshot) -> None:
        self._state = restored_state(self.name, self._state_specs, snap)


def restored_state(name: str, specs: list[Any], snap: Snapshot) -> dict[str, np.ndarray]:
    """`snap.state` checked against the static state `specs` (every tensor, its shape), as float32 copies."""
    out = {}
    for spec in specs:
        value = snap.state.get(spec.name)
        if value is None:
            raise SessionError(f"{name}: the snapshot lacks {spec.name}")
        if tuple(np.shape(value)) != tuple(spec.shape):
            raise SessionError(f"{name}: snapshot tensor {spec.name} has shape {list(np.shape(value))}")
        out[spec.name] = np.array(value, dtype=np.float32, copy=True)
    return out


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Within the block, file descriptor 1 (Python's and C libraries' stdout) writes to stderr: Qualcomm's HTP
    library prints a line on stdout when it loads, ExecuTorch's `QnnQuantizer` prints notes ("No quant config is
    implemented for op ..."); both broke `lfm-export ... --json`, whose stdout is the result."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][-300:] if text else type(e).__name__
