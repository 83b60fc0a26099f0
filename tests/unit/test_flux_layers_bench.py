"""benchmarks/flux_layers.py at tiny shapes: it runs, and its multiply-add bound counts what actually runs.

The bound column is only worth printing if `macs` is the work the layers do: each config's
forward+backward is run under a counter of the matrix products torch executes (the pure-torch
chain engine, factored form, so every product goes through torch) and compared with `macs`.
"""
from __future__ import annotations

import time

import pytest
import torch

from benchmarks import flux_layers
from tests.unit.gemm_count import GemmCounter
from tlora.functional import _trm_native

TOKENS, OUT_F, IN_F = 16, 24, 60  # 60 = 3 x 4 x 5: three cores


def test_runs_and_reports_every_config() -> None:
    """Every config is timed, both bounds and both rates are reported, and TLoRA(2,6)'s bound is above TLoRA(1,6)'s."""
    results = flux_layers.run(TOKENS, 1, time.perf_counter, warmup=0, log=lambda _: None,
                              layers=(("tiny", OUT_F, IN_F),))
    row = results[f"tiny {OUT_F}x{IN_F}"]
    assert all(len(row[c]["runs_ms"]) == 1 for c in flux_layers.CONFIGS)
    assert row["bound"]["tlora26/lora16"] > row["bound"]["tlora16/lora16"] > 1.0
    assert row["rate"]["frozen_gmacs"] > 0
    table = flux_layers.format_table(results, TOKENS)
    assert table.count(f"| tiny {OUT_F}x{IN_F} |") == 2


@pytest.mark.parametrize("config", flux_layers.CONFIGS)
def test_counted_macs_are_what_runs(config: str, monkeypatch) -> None:
    """`macs` equals the products one forward+backward runs, to the residual's small per-step build."""
    monkeypatch.setenv("TLORA_FORM", "factored")
    monkeypatch.setattr(_trm_native, "native_lib", lambda *tensors: None)  # the torch engine, seen op by op
    module = flux_layers.build(OUT_F, IN_F)[config]
    x = torch.randn(TOKENS, IN_F, requires_grad=True)
    with GemmCounter() as counter:
        module(x).backward(torch.ones(TOKENS, OUT_F))
    want = flux_layers.macs(config, OUT_F, IN_F, TOKENS)
    # tr:6 builds its factor matrices from the cores each step ((O + I) R^3 per pass): not in `macs`.
    slack = 3 * (OUT_F + IN_F) * 6 ** 3 if config.startswith("tlora") else 0
    assert want <= counter.macs <= want + slack
