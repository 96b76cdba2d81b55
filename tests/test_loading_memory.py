"""Loading is frugal: a 1.2B fp32 checkpoint loads with peak RSS <= 1.2x its size (slow: writes 4.7 GB)."""

import subprocess
import sys

import pytest

MEASURE = """
import resource, sys, torch
from lfm_export.loading import load_model
loaded = load_model(sys.argv[1])
with torch.no_grad():
    loaded.model(torch.tensor([[1, 2, 3]]), *loaded.model.empty_state(1))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


@pytest.mark.slow
def test_peak_rss_loading_1_2b_fp32(tmp_path):
    write = (
        "import sys; from lfm_export.loading import random_model, save_checkpoint; from pathlib import Path; "
        "save_checkpoint(random_model('lfm2-1.2b').model, Path(sys.argv[1]))"
    )
    subprocess.run([sys.executable, "-c", write, str(tmp_path / "m")], check=True, timeout=1200)
    size = (tmp_path / "m" / "model.safetensors").stat().st_size
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path / "m")],
        capture_output=True,
        text=True,
        check=True,
        timeout=1200,
    )
    peak = int(out.stdout.strip().splitlines()[-1])
    print(f"checkpoint {size / 1e9:.2f} GB, peak RSS {peak / 1e9:.2f} GB ({peak / size:.2f}x)")
    assert peak <= 1.2 * size
