"""benchmarks/gpu.py, the prepared GPU check, runs end to end on the CPU with tiny shapes (so it is known to work
when a GPU is lent): every model, config and offload setting gives a row with figures, none fails.

On the primary host only: the GPU machine runs it from `.venv` (ComfyUI 0.33); older hosts' TrainLoraNode has
no `offloading` input and cannot backward through Flux's fused RoPE, which the check's own rows need."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import comfy_host as ch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(ch.host_version() < (0, 33), reason="the GPU check runs on the primary host (0.33)")


def test_the_gpu_check_runs_every_row_on_tiny_shapes(tmp_path):
    out = tmp_path / "gpu.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--device", "cpu",
                           "--steps", "1", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=str(ROOT))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines()[2:] if line.startswith("|")]
    assert len(rows) == 2 * 4 * 2  # models x configs x offload off/on
    assert not [r for r in rows if "failed" in r], "\n".join(rows)
    for row in rows:
        cells = [c.strip() for c in row.split("|")]
        assert float(cells[4]) > 0
        # Ours carry the memory estimate made before the run, beside the measured peak (the node's builtin not).
        assert bool(cells[8]) == (cells[2] != "builtin") and (not cells[8] or float(cells[8].split()[0]) > 0), row
    assert (tmp_path / "gpu.json").exists()
