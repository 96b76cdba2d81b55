"""Lowering of the QNN-quantized step program (`lfm_export.backends.qnn.quantize`) by ExecuTorch's QNN delegate, up
to the Qualcomm SDK boundary.

Lowering runs Qualcomm's host libraries (QAIRT: `libQnnHtp.so`, `libQnnSystem.so`, ...) through the wheel's
`PyQnnManagerAdaptor`, which looks for them under `$QNN_SDK_ROOT/lib/x86_64-linux-clang/`. The executorch 1.5.1
wheel was built against QAIRT 2.37; the only QAIRT builds installable here (onnxruntime-qnn 2.3 / 2.7 ship 2.47 /
2.51) load, but creating the HTP device fails ("unknown custom config socModel 0", error 14001). So `lower`
refuses cleanly, before writing anything, when the libraries are missing, and turns a failed lowering into the
same kind of one-line error naming the SDK it needs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lfm_export.contract.errors import UserError

QAIRT_VERSION = "2.37"
"""The QAIRT (QNN SDK) version the executorch 1.5.1 wheel's QNN adaptor was built against."""

HOST_LIB_DIR = "lib/x86_64-linux-clang"
HOST_LIBS = ("libQnnHtp.so", "libQnnSystem.so")


def sdk_root() -> Path:
    """`$QNN_SDK_ROOT`, checked to hold the host libraries the lowering loads; otherwise a `UserError` naming the
    SDK version and the variable."""
    need = (
        f"the ExecuTorch QNN delegate needs the Qualcomm AI Engine Direct (QAIRT) SDK {QAIRT_VERSION} host "
        f"libraries: set QNN_SDK_ROOT to an SDK holding {HOST_LIB_DIR}/{HOST_LIBS[0]}"
    )
    root = os.environ.get("QNN_SDK_ROOT")
    if not root:
        raise UserError(f"{need} (QNN_SDK_ROOT is not set)")
    missing = [lib for lib in HOST_LIBS if not (Path(root) / HOST_LIB_DIR / lib).is_file()]
    if missing:
        raise UserError(f"{need} ({', '.join(missing)} not found under {Path(root) / HOST_LIB_DIR})")
    return Path(root)


def probe_libraries(root: Path) -> str:
    """The SDK build id the wheel's adaptor reads from `root`'s `libQnnHtp.so`, in a child process: when the
    library is there but cannot load (a missing libc++ beside it, say), the adaptor fails an assert and aborts the
    whole process (SIGABRT, exit 134; seen with onnxruntime-qnn's libraries without their `.libs`)."""
    import subprocess
    import sys

    code = (
        "from executorch.backends.qualcomm.utils.check_qnn_version import _get_sdk_build_id; "
        f"print(_get_sdk_build_id({str(root)!r}))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        why = next((x for x in reversed(r.stderr.strip().splitlines()) if "Qnn" in x or "error" in x), "")
        raise UserError(
            f"the QNN host libraries in QNN_SDK_ROOT={root} do not load (exit {r.returncode}: {why[-200:]}); "
            f"executorch 1.5.1 needs the QAIRT {QAIRT_VERSION} host libraries there, with their dependencies on "
            "LD_LIBRARY_PATH"
        )
    return r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""


def compile_specs(soc: str, online_prepare: bool = False) -> list[Any]:
    """The HTP compile specs for SoC `soc` (quantized, not fp16); these need no SDK."""
    from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset
    from executorch.backends.qualcomm.utils.utils import (
        generate_htp_compiler_spec,
        generate_qnn_executorch_compiler_spec,
    )

    return generate_qnn_executorch_compiler_spec(
        soc_model=getattr(QcomChipset, soc),
        backend_options=generate_htp_compiler_spec(use_fp16=False),
        online_prepare=online_prepare,
    )


def lower(step: Any, soc: str, pte: Path, online_prepare: bool = False) -> Path:
    """Lower the fake-quantized `step` (`QuantizedStep`) with the QNN partitioner for `soc` and write `pte`.
    Stops with a `UserError` at the SDK boundary (module docstring); nothing is written then."""
    root = sdk_root()
    probe_libraries(root)
    specs = compile_specs(soc, online_prepare)
    from executorch.backends.qualcomm.utils.utils import to_edge_transform_and_lower_to_qnn

    from lfm_export.backends.qnn.quantize import empty_state, step_args

    args = step_args(step.signature, 0, 0, empty_state(step.signature))
    try:
        edge = to_edge_transform_and_lower_to_qnn(step.module, args, specs)
        program = edge.to_executorch()
    except Exception as e:  # the adaptor raises RuntimeError / ValueError with the QNN error text
        line = next((x for x in str(e).strip().splitlines() if x.strip()), type(e).__name__)
        raise UserError(
            f"the ExecuTorch QNN delegate could not lower for {soc} with the libraries in QNN_SDK_ROOT={root} "
            f"({line[:200]}); executorch 1.5.1 needs the QAIRT {QAIRT_VERSION} host libraries there"
        ) from None
    pte.write_bytes(program.buffer)
    return pte
