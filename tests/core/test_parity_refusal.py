"""Parity refused up front where no runtime here runs the artifact, before anything is exported or written."""

from __future__ import annotations

from pathlib import Path

import pytest

from lfm_export.backends.qnn.recipes import make_recipe
from lfm_export.contract.errors import UnsupportedError
from lfm_export.pipeline import export_artifact
from lfm_export.progress import Progress


@pytest.mark.unit
def test_executorch_qnn_with_parity_is_refused_before_export(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(
        UnsupportedError, match="executorch-qnn: no runtime here runs its artifacts.*--no-parity"
    ):
        export_artifact("executorch-qnn", "tiny", out, make_recipe("16a8w"), progress=Progress(quiet=True))
    assert list(tmp_path.iterdir()) == []
