"""The wheel holds every backend and runtime subpackage (setuptools finds them under `lfm_export/`), the bundled
models and the console script. Built offline
from a copy of the sources, so the working tree gets no build folder (about 5 s on 2 cores)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"lfm_export": "lfm_export"}


def source_packages() -> set[str]:
    """Every folder with an `__init__.py` under the source root, by its import name."""
    out = set()
    for folder, name in SOURCES.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            out.add(".".join([name, *rel.parts]))
    return out


def test_wheel_holds_every_backend_and_runtime_package(tmp_path: Path) -> None:
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in SOURCES:
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
        + ["-w", str(tmp_path / "wheel"), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = (tmp_path / "wheel").glob("lfm_export-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    expected = source_packages()
    assert {"lfm_export.backends.onnx", "lfm_export.runtime", "lfm_export.parity"} <= expected
    assert expected - in_wheel == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    for model in ("tiny", "tiny-moe"):
        assert f"lfm_export/assets/{model}/model.safetensors" in names
        assert f"lfm_export/assets/{model}/tokenizer.json" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "lfm-export = lfm_export.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
