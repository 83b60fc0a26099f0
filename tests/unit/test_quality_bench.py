"""The quality benchmark's simulation fits (benchmarks/quality.py): batched over modules by vmap of the core."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _bench_module() -> object:
    """benchmarks/quality.py imported by path (benchmarks/ is no package); no host is imported."""
    name = "quality_bench_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "quality.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


Q = _bench_module()
trm = Q.pack("tlora.functional.trm")
tr = Q.pack("tlora.functional.tr")


def _cores(shapes: list[tuple[int, ...]], batch: int, seed: int) -> list[torch.Tensor]:
    """Random float64 cores of these shapes, stacked for `batch` modules, with gradients."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *s, generator=gen, dtype=torch.float64, requires_grad=True) for s in shapes]


def _grads(out: torch.Tensor, cores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of a fixed, non-uniform weighting of `out` with respect to the cores."""
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    return list(torch.autograd.grad((out * weights).sum(), cores))


@pytest.mark.parametrize("factors,rank", [((40,), 2), ((16, 20), 1), ((4, 8, 10), 2), ((4, 4, 4, 5), 2)])
def test_trm_dense_batch_is_the_core_per_module(factors: tuple[int, ...], rank: int) -> None:
    cores = _cores([(n, n, rank, rank) for n in factors], 3, seed=len(factors))
    got = Q.trm_dense_batch(cores)
    want = torch.stack([trm.dense([c[i] for c in cores]) for i in range(3)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(got, cores), _grads(want, cores)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("out_f,in_f,rank", [((40,), (16, 20), 4), ((8, 10), (4, 8, 10), 6), ((4, 4, 4), (8,), 3)])
def test_tr_dense_batch_is_the_core_per_module(out_f: tuple[int, ...], in_f: tuple[int, ...], rank: int) -> None:
    out_cores = _cores([(n, rank, rank) for n in out_f], 3, seed=1)
    in_cores = _cores([(n, rank, rank) for n in in_f], 3, seed=2)
    got = Q.tr_dense_batch(out_cores, in_cores)
    want = torch.stack([tr.dense([c[i] for c in out_cores], [c[i] for c in in_cores]) for i in range(3)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    cores = out_cores + in_cores
    for a, b in zip(_grads(got, cores), _grads(want, cores)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _deltas(batch: int, out_features: int = 24, in_features: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Random W0 with zero-padded inputs (as the default model's) and W* = W0 + a small delta."""
    gen = torch.Generator().manual_seed(7)
    w0 = torch.randn(batch, out_features, in_features, generator=gen) / in_features ** 0.5
    w0[:, :, in_features // 2:] = 0
    return w0, w0 + 0.1 * torch.randn(w0.shape, generator=gen) / in_features ** 0.5


@pytest.mark.parametrize("residual", ["none", "lora:2"])
def test_batched_fit_is_each_module_fitted_alone(residual: str) -> None:
    # Deterministic starts (identity TRM, LoRA solved in closed form): a module's fit must not
    # depend on the others in its batch.
    w0, w1 = _deltas(3)
    fits, params = Q.fit_tlora_group(w0, w1, "trm:2", residual, iters=12)
    alone = torch.cat([Q.fit_tlora_group(w0[i:i + 1], w1[i:i + 1], "trm:2", residual, iters=12)[0] for i in range(3)])
    assert params == Q.pack("tlora").ModuleAdapter.create((24, 32), "trm:2", residual, "paper").num_params()
    torch.testing.assert_close(fits, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("transform,residual", [("none", "tr:4"), ("trm:2", "tr:4"), ("trm:1", "tr:4")])
def test_tensor_ring_fits_improve_on_the_start(transform: str, residual: str) -> None:
    w0, w1 = _deltas(2)
    fits, _ = Q.fit_tlora_group(w0, w1, transform, residual, iters=30)
    rel = ((fits - w1).pow(2).sum() / (w1 - w0).pow(2).sum()).sqrt()
    assert float(rel) < 0.999
