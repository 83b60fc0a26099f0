"""The compiled ring products (tlora/native/ring.c): a tensor ring's factor matrices U, V and their
gradients, against the ring trace entry by entry in float64 and autograd on it.

float32 in the kernel, so tolerances are float32-sized; each case checks the compiled path ran.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from tests.unit.brute import brute_t
from tests.unit.test_native import needs_native
from tlora import native
from tlora.functional import _trm_native, tr


def brute_product(cores: list[torch.Tensor]) -> torch.Tensor:
    """(P, R, R): C_1[i_1] @ ... @ C_D[i_D] for every p = (i_1..i_D), row-major, one by one in float64."""
    out = []
    for idx in itertools.product(*[range(c.shape[0]) for c in cores]):
        m = cores[0][idx[0]]
        for c, i in zip(cores[1:], idx[1:]):
            m = m @ c[i]
        out.append(m)
    return torch.stack(out)


@pytest.fixture
def ring_calls(monkeypatch):
    """Count calls into the compiled ring products (a test fails if it silently fell back)."""
    assert _trm_native.native_lib(torch.empty(0)) is not None, native.status()
    calls = {"forward": 0, "backward": 0}
    forward, backward = native.ring_product, native.ring_product_backward

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped
    monkeypatch.setattr(native, "ring_product", count("forward", forward))
    monkeypatch.setattr(native, "ring_product_backward", count("backward", backward))
    return calls


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want).abs().max().item() / (want.abs().max().item() or 1.0)


@needs_native
@pytest.mark.parametrize("out_f,in_f,rank", [((4, 8, 10), (8, 8, 12), 6), ((7,), (1, 5, 1, 2), 3),
                                             ((2, 3), (3, 2), 1), ((16, 24, 32), (12, 16, 16), 2)])
def test_factor_matrices_and_their_gradients_match_the_ring_trace(out_f, in_f, rank, ring_calls) -> None:
    """U[a, (r, s)] = B[a][r, s], V[b, (r, s)] = C[b][s, r] (so Delta = U V^T is the ring trace), and the
    cores' gradients given any gradients of U and V."""
    gen = torch.Generator().manual_seed(sum(out_f) + rank)
    outs = [torch.randn(n, rank, rank, generator=gen) / rank for n in out_f]
    ins = [torch.randn(n, rank, rank, generator=gen) / rank for n in in_f]
    up, down = tr.factor_matrices_detached(outs, ins)
    g_up, g_down = torch.randn(up.shape, generator=gen), torch.randn(down.shape, generator=gen)
    grads = tr.factor_matrices_backward(outs, ins, g_up, g_down)
    assert ring_calls == {"forward": 2, "backward": 2}

    leaves = [c.double().requires_grad_(True) for c in (*outs, *ins)]
    bo, ci = brute_product(leaves[:len(outs)]), brute_product(leaves[len(outs):])
    want_up, want_down = bo.reshape(bo.shape[0], -1), ci.transpose(1, 2).reshape(ci.shape[0], -1)
    assert _rel(up, want_up) < 2e-6 and _rel(down, want_down) < 2e-6
    loss = (want_up * g_up.double()).sum() + (want_down * g_down.double()).sum()
    for got, want in zip(grads, torch.autograd.grad(loss, leaves)):
        assert got.shape == want.shape and _rel(got, want) < 2e-6
    delta = up.double() @ down.double().t()  # the ring trace itself, entry by entry for a few entries
    for a, b in [(0, 0), (up.shape[0] - 1, down.shape[0] - 1), (up.shape[0] // 2, 1)]:
        trace = torch.trace(bo[a] @ ci[b]).item()
        assert abs(delta[a, b].item() - trace) <= 2e-6 * max(1.0, bo.abs().max().item() * ci.abs().max().item())


@needs_native
def test_other_dtypes_and_ranks_use_the_torch_chain(ring_calls) -> None:
    """float64 cores, or cores of two ranks in one list, never reach the kernel (same results in float64)."""
    gen = torch.Generator().manual_seed(2)
    outs = [torch.randn(n, 2, 2, generator=gen, dtype=torch.float64) for n in (3, 4)]
    ins = [torch.randn(n, 2, 2, generator=gen, dtype=torch.float64) for n in (2, 5)]
    up, down = tr.factor_matrices_detached(outs, ins)
    assert ring_calls["forward"] == 0
    torch.testing.assert_close(up, brute_product(outs).reshape(12, 4), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(down, brute_product(ins).transpose(1, 2).reshape(10, 4), rtol=1e-12, atol=1e-12)
    assert tr._native([torch.randn(3, 2, 2)], [torch.randn(3, 2, 3)]) is None


@needs_native
def test_ring_wrappers_reject_bad_tensors_before_calling() -> None:
    lib = native.load()
    cores = [torch.randn(3, 2, 2), torch.randn(4, 2, 2)]
    with pytest.raises(ValueError, match="one R"):
        native.ring_product(lib, [cores[0], torch.randn(4, 2, 3)], torch.empty(12, 4), False)
    with pytest.raises(ValueError, match="output must be"):
        native.ring_product(lib, cores, torch.empty(11, 4), False)  # one row short
    with pytest.raises(ValueError, match="ring cores must be"):
        native.ring_product(lib, [cores[0].double(), cores[1].double()], torch.empty(12, 4), False)
    with pytest.raises(ValueError, match="2 gradients for 3 cores"):
        native.ring_product_backward(lib, [*cores, cores[0]], torch.empty(36, 4), False, [torch.empty(3, 2, 2)] * 2)
    with pytest.raises(ValueError, match="gradient must be"):
        native.ring_product_backward(lib, cores, torch.empty(12, 4)[:, :2], False, [torch.empty(3, 2, 2)] * 2)


@needs_native
def test_vector_width_and_tiles() -> None:
    """The kernels' vector width is 8 or 16 floats; a tile of 8 tokens (the callers' unit) is accepted on
    either and rounded up inside, so results do not depend on it."""
    lib = native.load()
    assert native.vector_width(lib) in (8, 16)
    gen = torch.Generator().manual_seed(4)
    chain = _trm_native._Chain((2, 3, 4), 2)
    cores = [torch.randn(n, n, 2, 2, generator=gen) for n in chain.sizes]
    ops = chain.operands_detached(cores, 1.0)
    x = torch.randn(21, 24, generator=gen)
    want = x.double() @ brute_t([c.double() for c in cores]).t()
    for tile in (8, 16, 32):
        out = torch.empty_like(x)
        native.chain_forward(lib, chain.sizes, 2, ops, x, out, 21, 24, 1, 0.0, tile, 1)
        assert _rel(out, want) < 2e-6, tile


@needs_native
@pytest.mark.parametrize("arch", ["-march=haswell", "-mno-avx"])
def test_narrower_builds_match_too(arch: str, tmp_path) -> None:
    """The kernels as built for an AVX2 machine (8-float vectors, smaller register tiles) and without
    AVX (no 8 x 8 transposes): the chain's forward and backward, and the ring products, against the
    float64 formulas, whatever this machine's own build uses."""
    import ctypes
    import subprocess

    compiler = native._compiler()
    lib_path = tmp_path / "narrow.so"
    built = subprocess.run([compiler, "-O3", arch, "-shared", "-fPIC", "-o", str(lib_path), *map(str, native.SOURCES)],
                           capture_output=True, text=True)
    if built.returncode:
        pytest.skip(f"{compiler} cannot build {arch} here: {built.stderr.strip()[-200:]}")
    lib = native._bind(ctypes.CDLL(str(lib_path)))
    assert native.vector_width(lib) == 8
    gen = torch.Generator().manual_seed(6)
    for factors, rank, tokens in [((4, 8, 10), 2, 37), ((2, 3, 2, 5), 3, 9)]:
        chain = _trm_native._Chain(factors, rank)
        cores = [torch.randn(n, n, rank, rank, generator=gen) / rank for n in factors]
        ops = chain.operands_detached(cores, 0.6)
        x, h = (torch.randn(tokens, chain.width, generator=gen) for _ in range(2))
        y, gx = torch.empty_like(x), torch.empty_like(x)
        grads = [torch.zeros_like(op) for op in ops]
        native.chain_forward(lib, chain.sizes, rank, ops, x, y, tokens, chain.width, 1, 0.4, 8, 1)
        native.chain_backward(lib, chain.sizes, rank, ops, _trm_native._transposed_ops(ops), x, h, gx, grads,
                              tokens, chain.width, 1, 0.4, 8, 1)
        leaves = [c.double().requires_grad_(True) for c in cores]
        eff = 0.6 * brute_t(leaves) + 0.4 * torch.eye(chain.width, dtype=torch.float64)
        assert _rel(y, x.double() @ eff.t()) < 2e-6
        assert _rel(gx, h.double() @ eff) < 2e-6
        want = torch.autograd.grad((h.double() * (x.double() @ eff.t())).sum(), leaves)
        got = chain.core_grads(grads, cores, 0.6)
        for a, b in zip(got, want):
            assert _rel(a, b) < 2e-6
    ring = [torch.randn(n, 3, 3, generator=gen) for n in (4, 1, 5)]
    prod = torch.empty(20, 9)
    native.ring_product(lib, ring, prod, False)
    assert _rel(prod, brute_product([c.double() for c in ring]).reshape(20, 9)) < 2e-6
