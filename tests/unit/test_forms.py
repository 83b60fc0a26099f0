"""Every activation-side transform form against autograd through a brute-force dense T (float64).

Covers D = 1..4 cores, ranks 1..4, rows / fused linear / conv (channel-major) layouts,
strength != 1, several token blocks with a ragged last one, and the form selection rules
(forced by env, cached measurement, cost-model fallback).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.unit.brute import brute_t
from tests.unit.gemm_count import GemmCounter
from tlora import forms
from tlora.adapter import ModuleAdapter
from tlora.functional import _trm_chain, trm
from tlora.module import TLoRAModule

FACTORS = {1: (5,), 2: (3, 4), 3: (2, 3, 2), 4: (2, 2, 2, 2)}
TOL = dict(rtol=1e-10, atol=1e-10)


def random_cores(depth: int, rank: int, gen: torch.Generator) -> list[torch.Tensor]:
    return [(torch.eye(n, dtype=torch.float64)[:, :, None, None] / rank
             + 0.3 * torch.randn(n, n, rank, rank, generator=gen, dtype=torch.float64) / rank).requires_grad_(True)
            for n in FACTORS[depth]]


def grads(out: torch.Tensor, leaves: list[torch.Tensor], upstream: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, leaves, upstream, retain_graph=True))


@pytest.fixture
def small_blocks(monkeypatch):
    """Force several CPU token blocks (the last one ragged) through the factored engine."""
    monkeypatch.setattr(_trm_chain, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(_trm_chain, "MIN_BLOCK", 3)


@pytest.mark.parametrize("blocks", ["one", "many"])
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("rank", [1, 2, 3, 4])
def test_forms_match_brute_force(depth: int, rank: int, blocks: str, request) -> None:
    if blocks == "many":
        request.getfixturevalue("small_blocks")
    gen = torch.Generator().manual_seed(100 * depth + rank)
    cores = random_cores(depth, rank, gen)
    width = math.prod(FACTORS[depth])
    out_f, k, strength = 6, 3, 0.7
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = rnd(2, 7, width).requires_grad_(True)
    weight, bias = rnd(out_f, width).requires_grad_(True), rnd(out_f).requires_grad_(True)
    up, down = rnd(out_f, k).requires_grad_(True), rnd(width, k).requires_grad_(True)
    xc = rnd(2, width, 5, 3).requires_grad_(True)
    t_ref = brute_t(cores)
    t_sig = strength * t_ref + (1 - strength) * torch.eye(width, dtype=torch.float64)
    g_rows, g_lin, g_conv = rnd(2, 7, width), rnd(2, 7, out_f), rnd(2, width, 5, 3)
    leaves_lin = [x, weight, bias, up, down, *cores]
    ref_rows = x @ t_sig.t()
    ref_lin = F.linear(ref_rows, weight, bias) + (x @ down) @ up.t()
    ref_conv = torch.einsum("ij,bjhw->bihw", t_sig, xc)
    want_rows = grads(ref_rows, [x, *cores], g_rows)
    want_lin = grads(ref_lin, leaves_lin, g_lin)
    want_conv = grads(ref_conv, [xc, *cores], g_conv)
    for form in trm.FORMS:
        rows = trm.apply(x, cores, form, strength)
        torch.testing.assert_close(rows, ref_rows, **TOL, msg=f"rows {form}")
        for got, want in zip(grads(rows, [x, *cores], g_rows), want_rows):
            torch.testing.assert_close(got, want, **TOL, msg=f"rows grad {form}")
        lin = trm.linear(x, weight, bias, cores, form, strength, up, down)
        torch.testing.assert_close(lin, ref_lin, **TOL, msg=f"linear {form}")
        for got, want in zip(grads(lin, leaves_lin, g_lin), want_lin):
            torch.testing.assert_close(got, want, **TOL, msg=f"linear grad {form}")
        conv = trm.apply_channels(xc, cores, form, strength)
        torch.testing.assert_close(conv, ref_conv, **TOL, msg=f"channels {form}")
        for got, want in zip(grads(conv, [xc, *cores], g_conv), want_conv):
            torch.testing.assert_close(got, want, **TOL, msg=f"channels grad {form}")


def test_dense_and_weight_times_t_match_brute_force() -> None:
    gen = torch.Generator().manual_seed(7)
    for depth in FACTORS:
        cores = [c.detach() for c in random_cores(depth, 3, gen)]
        t = brute_t(cores)
        torch.testing.assert_close(trm.dense(cores), t, **TOL)
        w = torch.randn(5, t.shape[0], generator=gen, dtype=torch.float64)
        torch.testing.assert_close(trm.weight_times_t(w, cores), w @ t, **TOL)


def _module_case(kind: str, depth: int, rank: int, gen: torch.Generator):
    width = math.prod(FACTORS[depth])
    shape = (6, width) if kind == "linear" else (6, width, 3, 2)
    tensors = {f"tlora_t.{d}": c.detach().float() for d, c in enumerate(random_cores(depth, rank, gen))}
    fan_in = math.prod(shape[1:])
    tensors["tlora_r.up"] = torch.randn(6, 2, generator=gen)
    tensors["tlora_r.down"] = torch.randn(2, fan_in, generator=gen)
    tensors["tlora_scale"] = torch.tensor(0.5)
    adapter = ModuleAdapter(tensors, weight_shape=shape)
    base = (nn.Linear(width, 6) if kind == "linear" else nn.Conv2d(width, 6, (3, 2), stride=2, padding=1)).double()
    base.requires_grad_(False)
    x = (torch.randn(3, 4, width, generator=gen) if kind == "linear"
         else torch.randn(2, width, 5, 4, generator=gen)).double()
    return adapter, base, x


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
def test_module_forms_agree(kind: str, depth: int, strength: float, monkeypatch) -> None:
    """TLoRAModule (fused linear path included) equals the dense-weight reference in every form."""
    monkeypatch.setenv(forms.ENV_AUTOTUNE, "0")
    gen = torch.Generator().manual_seed(depth + (kind == "conv") * 10)
    adapter, base, x0 = _module_case(kind, depth, 2, gen)
    cores = [adapter.tensors[f"tlora_t.{d}"].double().requires_grad_(True) for d in range(depth)]
    up = adapter.tensors["tlora_r.up"].double().requires_grad_(True)
    down = adapter.tensors["tlora_r.down"].double().requires_grad_(True)
    t = brute_t(cores)
    w0 = base.weight.detach()
    w_adapted = torch.einsum("oi...,ij->oj...", w0, t) + 0.5 * (up @ down).reshape(w0.shape)
    w = w0 + strength * (w_adapted - w0)
    x_ref = x0.clone().requires_grad_(True)
    y_ref = (F.linear(x_ref, w, base.bias) if kind == "linear"
             else F.conv2d(x_ref, w, base.bias, base.stride, base.padding))
    upstream = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    want = grads(y_ref, [x_ref, *cores, up, down], upstream)
    for form in (*trm.FORMS, "auto"):
        module = TLoRAModule(base, adapter, strength=strength, form=form).double()
        x = x0.clone().requires_grad_(True)
        y = module(x)
        torch.testing.assert_close(y, y_ref, **TOL, msg=f"forward {form}")
        params = [module.adapter_params[f"tlora_t__{d}"] for d in range(depth)]
        params += [module.adapter_params["tlora_r__up"], module.adapter_params["tlora_r__down"]]
        for got, ref in zip(grads(y, [x, *params], upstream), want):
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10, msg=f"grad {form}")
        assert module.last_form in trm.FORMS


def test_comfy_style_cast_layers_are_not_fused() -> None:
    """A Linear subclass that casts/patches its weight keeps running its own forward."""
    calls = []

    class CastLinear(nn.Linear):
        comfy_cast_weights = True
        weight_function: list = []
        bias_function: list = []

        def forward(self, x):
            calls.append(1)
            return super().forward(x)

    gen = torch.Generator().manual_seed(3)
    adapter, base, x = _module_case("linear", 3, 2, gen)
    layer = CastLinear(base.in_features, base.out_features).double()
    layer.load_state_dict(base.state_dict())
    module = TLoRAModule(layer, adapter, form="factored").double()
    plain = TLoRAModule(base, adapter, form="factored").double()
    torch.testing.assert_close(module(x), plain(x), **TOL)
    assert calls
    layer.comfy_cast_weights = False  # ComfyUI's plain path: fused, the subclass forward is skipped
    calls.clear()
    torch.testing.assert_close(module(x), plain(x), **TOL)
    assert not calls


# ----- form selection ---------------------------------------------------------------------
def test_candidates_and_cost_model_are_deterministic() -> None:
    assert forms.candidates((16,)) == ("dense",)
    assert forms.candidates((4, 5)) == ("factored", "dense")
    assert forms.candidates((8, 10, 16)) == trm.FORMS
    for factors in ((4, 8, 10), (8, 10, 16), (16, 16)):
        for tokens in (1, 77, 1024, 4096):
            first = forms.choose_form(factors, 2, tokens, "cpu")
            assert first in forms.trial_candidates(factors, "cpu", True)
            assert forms.choose_form(factors, 2, tokens, "cpu") == first
    assert forms.token_bucket(1000) == 1024 and forms.token_bucket(1024) == 1024 and forms.token_bucket(1) == 1


def test_env_forces_form(monkeypatch) -> None:
    monkeypatch.setenv(forms.ENV_FORM, "merged")
    assert forms.select_form((8, 10, 16), 2, 1024) == "merged"
    monkeypatch.setenv(forms.ENV_FORM, "bogus")
    with pytest.raises(ValueError):
        forms.select_form((8, 10, 16), 2, 1024)


def test_measured_choice_is_cached(monkeypatch) -> None:
    monkeypatch.delenv(forms.ENV_FORM, raising=False)
    monkeypatch.setenv(forms.ENV_AUTOTUNE, "1")
    forms.clear_cache()
    calls = []

    timed = []

    def fake(factors, rank, tokens, **kw):
        calls.append(tokens)
        timed.append(tuple(kw["forms"]))
        return {f: (0.5 if f == "dense" else 1.0) for f in kw["forms"]}

    monkeypatch.setattr(forms, "benchmark_forms", fake)
    monkeypatch.setattr(forms, "PREFILTER", float("inf"))
    assert forms.select_form((4, 8, 10), 2, 1000) == "dense"
    assert forms.select_form((4, 8, 10), 2, 1020) == "dense"  # same bucket: no new measurement
    assert len(calls) == 1
    assert "merged" not in timed[0]  # CPU training: merged is not a candidate
    forms.select_form((4, 8, 10), 2, 1000, requires_grad=False)  # another key
    assert len(calls) == 2
    assert "merged" in timed[1]
    monkeypatch.setenv(forms.ENV_AUTOTUNE, "0")
    forms.clear_cache()
    assert forms.select_form((4, 8, 10), 2, 1000) == forms.choose_form((4, 8, 10), 2, 1000, "cpu")
    assert len(calls) == 2
    forms.clear_cache()


def test_every_trial_runs_on_one_thread_apart_from_the_caller(monkeypatch) -> None:
    """Trials run away from the caller's autograd state, all on one kept thread: a new thread per layer left
    its per-thread buffers (MKL's, the kernels' work space) behind every time (387 vs 214 MiB held after a
    Flux block pair's first steps, benchmarks/train_memory.py)."""
    import threading
    monkeypatch.delenv(forms.ENV_FORM, raising=False)
    monkeypatch.setenv(forms.ENV_AUTOTUNE, "1")
    monkeypatch.setattr(forms, "PREFILTER", float("inf"))
    forms.clear_cache()
    threads = []

    def fake(factors, rank, tokens, **kw):
        threads.append((threading.get_ident(), torch.is_grad_enabled()))
        return {f: 1.0 for f in kw["forms"]}

    monkeypatch.setattr(forms, "benchmark_forms", fake)
    with torch.no_grad():  # the caller's mode stays the caller's
        for tokens in (16, 64, 256, 1024):
            forms.select_form((4, 8, 10), 2, tokens)
    forms.clear_cache()
    assert len(threads) == 4
    assert len({ident for ident, _ in threads}) == 1 and threads[0][0] != threading.get_ident()
    assert all(grad for _, grad in threads), "a trial thread has its own (default) autograd mode"


def test_benchmark_forms_runs_every_candidate() -> None:
    times = forms.benchmark_forms((2, 3, 4), 2, 33, repeats=1)
    assert set(times) == set(trm.FORMS) and all(t > 0 for t in times.values())
    weight = torch.randn(5, 24)
    times = forms.benchmark_forms((2, 3, 4), 2, 33, repeats=1, weight=weight, requires_grad=False)
    assert set(times) == set(trm.FORMS)
    times = forms.benchmark_forms((2, 3, 4), 2, 33, repeats=1, layout="channels")
    assert set(times) == set(trm.FORMS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forms_under_cpu_autocast(dtype: torch.dtype) -> None:
    """Under autocast the factored engine computes in the autocast dtype, like F.linear would."""
    gen = torch.Generator().manual_seed(5)
    cores = [c.float().detach().requires_grad_(True) for c in random_cores(3, 2, gen)]
    x = torch.randn(40, 12, generator=gen, requires_grad=True)
    xc = torch.randn(2, 12, 3, 3, generator=gen, requires_grad=True)
    weight, up, down = torch.randn(5, 12, generator=gen), torch.randn(5, 2, generator=gen), torch.randn(12, 2, generator=gen)
    exact = trm.linear(x.double(), weight.double(), None, [c.double() for c in cores], "dense", 0.8,
                       up.double(), down.double())
    for form in trm.FORMS:
        with torch.autocast("cpu", dtype=dtype):
            y = trm.linear(x, weight, None, cores, form, 0.8, up, down)
            rows = trm.apply(x, cores, form)
            chans = trm.apply_channels(xc, cores, form)
        assert y.dtype == rows.dtype == chans.dtype == dtype
        (y.float().sum() + rows.float().sum() + chans.float().sum()).backward()
        assert x.grad.dtype == torch.float32 and cores[0].grad.dtype == torch.float32
        torch.testing.assert_close(y.double(), exact, rtol=0.05, atol=0.05 * exact.abs().max().item())
        x.grad = xc.grad = None
        for c in cores:
            c.grad = None


@pytest.mark.parametrize("sizes,rank", [((2, 3, 4), 2), ((3, 2, 2, 3), 3), ((4, 8, 10), 1)])
def test_chain_macs_counts_what_the_engine_multiplies(sizes, rank) -> None:
    """`forms.chain_macs` (the benchmarks' and cost model's count) equals the products the torch engine runs."""
    chain = _trm_chain._Chain(sizes, rank)
    gen = torch.Generator().manual_seed(3)
    cores = [torch.randn(n, n, rank, rank, generator=gen) for n in sizes]
    ops = chain.operands_detached(cores, 1.0)
    tokens = 24
    x, g = (torch.randn(chain.width, tokens, generator=gen) for _ in range(2))
    with torch.no_grad(), GemmCounter() as forward:
        chain.forward_block(x, ops, torch.empty(chain.width, tokens))
    assert forward.macs == forms.chain_macs(sizes, rank, tokens, requires_grad=False)
    with torch.no_grad(), GemmCounter() as backward:
        chain.backward_block(g, x, ops, [torch.zeros_like(op) for op in ops], torch.empty(chain.width, tokens))
    assert forward.macs + backward.macs == forms.chain_macs(sizes, rank, tokens)
