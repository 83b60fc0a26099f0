"""benchmarks/flux_step.py, the Flux block pair's whole training step, runs end to end at a tiny width:
every config steps through our engine (adapters suspended between turns), and the report carries the ratios
and the adapted linears' multiply-add bound.

On the primary host only (as the GPU check): older hosts cannot backward through Flux's fused RoPE."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import comfy_host as ch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(ch.host_version() < (0, 33), reason="the Flux step benchmark runs on the primary host")


def test_the_flux_step_benchmark_runs_every_config_at_a_tiny_width():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "flux_step.py"), "--latent", "8", "--text", "8",
                           "--repeats", "1", "--threads", "1"], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", TLORA_MEM_FLUX_HIDDEN="128"), cwd=str(ROOT))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "`attn` preset (6 linears)" in next(line for line in lines if line.startswith("Flux block pair"))
    steps = lines[lines.index("|---:|---:|---:|---:|") + 1]
    assert all(float(cell) > 0 for cell in steps.strip("| ").split(" | "))
    ratios = [line for line in lines if line.startswith("| TLoRA(")]
    assert len(ratios) == 2
    for row in ratios:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1].split("**")[1]) > 0 and float(cells[2]) > 1.0, row
