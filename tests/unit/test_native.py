"""The compiled CPU chain (tlora/native/chain.c) against a brute-force dense T in float64.

float32 only (the kernels' dtype), so tolerances are float32-sized; every case checks that
the compiled path really ran (a counting wrapper), and the fallbacks (no compiler, disabled)
run in fresh processes because the build state is per process.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.unit.brute import brute_t
from tlora import native
from tlora.functional import _trm_chain, _trm_fused, _trm_native, tr, trm

ROOT = Path(__file__).resolve().parents[2]
HAVE_CC = any(shutil.which(c) for c in (os.environ.get("CC") or "cc", "cc", "gcc", "clang"))
needs_native = pytest.mark.skipif(not (HAVE_CC and native.enabled() and os.name == "posix"),
                                  reason="no C compiler here (or TLORA_NATIVE=0): the torch engine is used")


@pytest.fixture
def native_calls(monkeypatch):
    """Count calls into the compiled kernels (so a test fails if it silently fell back)."""
    trm.native_status()  # the once-per-process self-check runs before counting starts
    calls = {"forward": 0, "backward": 0}
    forward, backward = native.chain_forward, native.chain_backward

    def count_forward(*args, **kwargs):
        calls["forward"] += 1
        return forward(*args, **kwargs)

    def count_backward(*args, **kwargs):
        calls["backward"] += 1
        return backward(*args, **kwargs)

    monkeypatch.setattr(native, "chain_forward", count_forward)
    monkeypatch.setattr(native, "chain_backward", count_backward)
    return calls


def _cores(factors, rank, gen):
    return [(torch.eye(n)[:, :, None, None] / rank + 0.3 * torch.randn(n, n, rank, rank, generator=gen) / rank)
            .requires_grad_(True) for n in factors]


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = want.abs().max().item() or 1.0
    err = (got.double() - want).abs().max().item() / scale
    assert err < 2e-5, f"{what}: relative error {err:.2e}"


@needs_native
def test_compiled_kernels_are_built_and_used_here() -> None:
    assert native.status().startswith("loaded"), native.status()


@needs_native
@pytest.mark.parametrize("factors", [(2, 3, 4), (4, 8, 10), (3, 2, 2, 5), (5, 7, 3)])
@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
@pytest.mark.parametrize("tokens", [1, 37])
def test_linear_matches_brute_force(factors, rank, strength, tokens, native_calls) -> None:
    """W0 (x + s (T x - x)) + b + s f U V^T x: values and every gradient (x, W0, cores, residual)."""
    gen = torch.Generator().manual_seed(sum(factors) * 10 + rank)
    width, out_f = math.prod(factors), 6
    cores = _cores(factors, rank, gen)
    x = torch.randn(tokens, width, generator=gen, requires_grad=True)
    weight = torch.randn(out_f, width, generator=gen, requires_grad=True)
    bias = torch.randn(out_f, generator=gen)
    up = torch.randn(out_f, 3, generator=gen, requires_grad=True)
    down = torch.randn(width, 3, generator=gen, requires_grad=True)
    gy = torch.randn(tokens, out_f, generator=gen)
    y = trm.linear(x, weight, bias, cores, form="factored", strength=strength,
                   residual=("lora", up, down, 0.7))
    leaves = [x, weight, *cores, up, down]
    got = torch.autograd.grad(y, leaves, gy)
    assert native_calls["forward"] >= 1 and native_calls["backward"] >= 1

    d = [t.detach().double().requires_grad_(True) for t in leaves]
    xd, wd, cd, ud, vd = d[0], d[1], d[2:2 + len(cores)], d[-2], d[-1]
    t = brute_t(cd)
    moved = xd + strength * (xd @ t.t() - xd)
    want_y = moved @ wd.t() + bias.double() + strength * 0.7 * (xd @ vd) @ ud.t()
    want = torch.autograd.grad(want_y, d, gy.double())
    _close(y.detach(), want_y.detach(), "y")
    for name, a, b in zip(["x", "weight", *[f"core{i}" for i in range(len(cores))], "up", "down"], got, want):
        _close(a, b, name)


@needs_native
@pytest.mark.parametrize("strength", [1.0, 0.25])
def test_channels_and_tr_residual_match(strength, native_calls) -> None:
    """A conv-style channel-major input (B, I, H, W) and the rows path with a TR residual."""
    gen = torch.Generator().manual_seed(7)
    factors, rank = (2, 3, 4), 2
    cores = _cores(factors, rank, gen)
    x = torch.randn(3, 24, 5, 3, generator=gen, requires_grad=True)
    gy = torch.randn(3, 24, 5, 3, generator=gen)
    y = trm.apply_channels(x, cores, form="factored", strength=strength)
    got = torch.autograd.grad(y, [x, *cores], gy)
    assert native_calls["forward"] >= 1 and native_calls["backward"] >= 1
    d = [t.detach().double().requires_grad_(True) for t in [x, *cores]]
    t = brute_t(d[1:])
    eff = strength * t + (1 - strength) * torch.eye(24, dtype=torch.float64)
    want_y = torch.einsum("ij,bjhw->bihw", eff, d[0])
    want = torch.autograd.grad(want_y, d, gy.double())
    _close(y.detach(), want_y.detach(), "y")
    for a, b in zip(got, want):
        _close(a, b, "grad")

    out_cores = [torch.randn(n, 3, 3, generator=gen, requires_grad=True) for n in (2, 3)]
    in_cores = [torch.randn(n, 3, 3, generator=gen, requires_grad=True) for n in factors]
    rows = torch.randn(9, 24, generator=gen, requires_grad=True)
    weight = torch.randn(6, 24, generator=gen)
    y = trm.linear(rows, weight, None, cores, form="factored", strength=strength,
                   residual=("tr", out_cores, in_cores, 0.5))
    leaves = [rows, *cores, *out_cores, *in_cores]
    got = torch.autograd.grad(y, leaves, torch.ones_like(y))
    d = [t.detach().double().requires_grad_(True) for t in leaves]
    rd, cd = d[0], d[1:4]
    od, idd = d[4:6], d[6:9]
    t = brute_t(cd)
    want_y = ((rd + strength * (rd @ t.t() - rd)) @ weight.double().t()
              + strength * 0.5 * rd @ tr.dense(od, idd).t())
    want = torch.autograd.grad(want_y, d, torch.ones_like(want_y))
    _close(y.detach(), want_y.detach(), "y (tr residual)")
    for a, b in zip(got, want):
        _close(a, b, "grad (tr residual)")


@needs_native
def test_compiled_and_torch_engines_agree(monkeypatch) -> None:
    """Paper shapes (8, 10, 16), R = 2, 300 tokens (a ragged last tile): same outputs and grads."""
    gen = torch.Generator().manual_seed(3)
    cores = _cores((8, 10, 16), 2, gen)
    x = torch.randn(300, 1280, generator=gen, requires_grad=True)
    weight = torch.randn(64, 1280, generator=gen) / 36
    gy = torch.randn(300, 64, generator=gen)

    def run():
        y = trm.linear(x, weight, None, cores, form="factored")
        return [y.detach(), *torch.autograd.grad(y, [x, *cores], gy)]

    compiled = run()
    trm.release_scratch()  # frees the kernels' per-thread work space: the next call reallocates it
    assert all(torch.equal(a, b) for a, b in zip(run(), compiled))  # and is deterministic
    monkeypatch.setattr(_trm_fused, "_native_for", lambda chain, x: None)
    reference = run()
    for a, b in zip(compiled, reference):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_wrapper_rejects_bad_tensors_before_calling() -> None:
    """Shapes and layouts are checked in Python: a wrong tensor is an error, never a bad pointer."""
    lib = native.load()
    if lib is None:
        pytest.skip(native.status())
    chain = _trm_chain._Chain((2, 3, 2), 2)
    ops = chain.operands_detached([torch.randn(n, n, 2, 2) for n in chain.sizes], 1.0)
    x = torch.randn(12, 5)  # too few elements for 5 tokens of width 12
    with pytest.raises(ValueError, match="x must be"):
        native.chain_forward(lib, chain.sizes, 2, ops, x[:, :4].t(), torch.empty(60), 5, 12, 1, 0.0, 8)
    with pytest.raises(ValueError, match="float32"):
        native.chain_forward(lib, chain.sizes, 2, ops, torch.randn(5, 12, dtype=torch.float64),
                             torch.empty(60), 5, 12, 1, 0.0, 8)
    x, out = torch.randn(5, 12), torch.empty(5, 12)
    with pytest.raises(ValueError, match="stage matrices must be"):
        native.chain_forward(lib, chain.sizes, 3, ops, x, out, 5, 12, 1, 0.0, 8)  # rank 3 reads more
    with pytest.raises(ValueError, match="2 stage matrices for 3 cores"):
        native.chain_forward(lib, chain.sizes, 2, ops[:2], x, out, 5, 12, 1, 0.0, 8)
    with pytest.raises(ValueError, match="gradients must be"):
        native.chain_backward(lib, chain.sizes, 2, ops, _trm_native._transposed_ops(ops), x, x, out,
                              [torch.zeros(1) for _ in ops], 5, 12, 1, 0.0, 8)
    with pytest.raises(RuntimeError, match="bad plan"):
        native.chain_forward(lib, chain.sizes, 2, ops, x, out, 5, 12, 1, 0.0, 12)  # tile not a multiple of 8


_PROBE = """
import json, torch
from tlora import native
from tlora.functional import trm
gen = torch.Generator().manual_seed(0)
cores = [torch.randn(n, n, 2, 2, generator=gen) for n in (2, 3, 4)]
x = torch.randn(5, 24, generator=gen)
y = trm.apply(x, cores, form="factored")
ref = x.double() @ trm.dense([c.double() for c in cores]).t()
print(json.dumps({"status": native.status(), "err": (y.double() - ref).abs().max().item()}))
"""


def _probe(tmp_path: Path, **env: str) -> dict:
    full = {**os.environ, "TLORA_CACHE_DIR": str(tmp_path / "cache"), **env}
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_no_compiler_falls_back_to_torch(tmp_path) -> None:
    """A compiler that fails: the reason in status(), and the torch engine's exact result."""
    fake = tmp_path / "bin" / "cc"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'cc: fatal error: no input' >&2\nexit 1\n")
    fake.chmod(0o755)
    result = _probe(tmp_path, CC=str(fake), PATH=str(fake.parent))
    assert result["status"].startswith("unavailable"), result
    assert result["err"] < 1e-4
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.so"))


def test_disabled_by_environment(tmp_path) -> None:
    result = _probe(tmp_path, TLORA_NATIVE="0")
    assert result["status"] == "disabled by TLORA_NATIVE=0"
    assert result["err"] < 1e-4


@needs_native
def test_build_goes_to_the_cache_dir_once(tmp_path) -> None:
    """First use builds one library into TLORA_CACHE_DIR (atomically: no temp files left); later uses load it."""
    first = _probe(tmp_path)
    assert first["status"].startswith(f"loaded {tmp_path / 'cache'}"), first
    built = sorted((tmp_path / "cache").iterdir())
    assert len(built) == 1 and not built[0].name.startswith(".build-")
    stamp = built[0].stat().st_mtime_ns
    second = _probe(tmp_path)
    assert second["status"] == first["status"] and built[0].stat().st_mtime_ns == stamp
    assert first["err"] < 1e-4


@needs_native
def test_thread_counts_agree(monkeypatch, native_calls) -> None:
    """Tokens split over 1, 2 or 5 threads (per-thread gradients summed after the join): same results."""
    gen = torch.Generator().manual_seed(11)
    cores = _cores((4, 8, 10), 2, gen)
    x = torch.randn(203, 320, generator=gen, requires_grad=True)
    weight = torch.randn(32, 320, generator=gen) / 18
    gy = torch.randn(203, 32, generator=gen)
    results = {}
    for threads in (1, 2, 5):
        monkeypatch.setenv(trm.ENV_CHAIN_THREADS, str(threads))
        monkeypatch.setenv(trm.ENV_NATIVE_TILE, "8")
        assert trm.native_threads() == threads
        y = trm.linear(x, weight, None, cores, form="factored", strength=0.8)
        results[threads] = [y.detach(), *torch.autograd.grad(y, [x, *cores], gy)]
    assert native_calls["backward"] == 3
    for threads in (2, 5):
        for a, b in zip(results[threads], results[1]):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@needs_native
def test_damaged_cached_build_is_rebuilt(tmp_path) -> None:
    """A cached library that cannot be loaded (truncated on a full disk, say) is rebuilt, not trusted."""
    first = _probe(tmp_path)
    built = next((tmp_path / "cache").glob("tlora_chain-*"))
    built.write_bytes(b"\x7fELF truncated")
    second = _probe(tmp_path)
    assert second["status"] == first["status"] and second["err"] < 1e-4
    assert built.stat().st_size > 1000


def test_cli_says_whether_the_kernels_are_in_use(monkeypatch, capsys) -> None:
    from tlora import cli

    assert cli.main(["native", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["in_use"] == (native.load() is not None) and info["status"] == native.status()
    monkeypatch.setenv(native.ENV_NATIVE, "0")
    assert cli.main(["native"]) == 0
    assert capsys.readouterr().out.strip() == (
        "compiled CPU kernels not in use, the torch engine runs instead: disabled by TLORA_NATIVE=0")



def test_install_script_builds_and_reports_the_kernels(tmp_path) -> None:
    """ComfyUI-Manager runs install.py: it builds the kernels up front and says whether they are used."""
    env = {**os.environ, "TLORA_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "install.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "[ComfyUI-TLoRA] dependencies present"
    if HAVE_CC and native.enabled() and os.name == "posix":
        assert lines[1].startswith("[ComfyUI-TLoRA] compiled CPU kernels in use"), lines
        assert list((tmp_path / "cache").glob("tlora_chain-*"))
    else:
        assert "not in use" in lines[1], lines


@needs_native
@pytest.mark.parametrize("factors,rank", [((1, 3, 4), 2), ((3, 1, 4), 2), ((2, 3, 1), 3), ((7, 11, 13), 5),
                                          ((2, 2, 2, 2, 2, 2), 2), ((16, 16, 4), 8)])
def test_odd_shapes_match_the_dense_transform(factors, rank, native_calls) -> None:
    """Factors of 1 anywhere, odd and prime sizes, six cores, and a rank-8 layer on 8-token tiles."""
    gen = torch.Generator().manual_seed(5)
    cores = [(torch.randn(n, n, rank, rank, generator=gen) / rank).requires_grad_(True) for n in factors]
    width = math.prod(factors)
    x = torch.randn(21, width, generator=gen, requires_grad=True)
    gy = torch.randn(21, width, generator=gen)
    y = trm.apply(x, cores, form="factored", strength=0.7)
    got = torch.autograd.grad(y, [x, *cores], gy)
    assert native_calls["forward"] == 1 and native_calls["backward"] == 1
    d = [t.detach().double().requires_grad_(True) for t in [x, *cores]]
    want_y = 0.7 * d[0] @ trm.dense(d[1:]).t() + 0.3 * d[0]
    want = torch.autograd.grad(want_y, d, gy.double())
    _close(y.detach(), want_y.detach(), "y")
    for a, b in zip(got, want):
        _close(a, b, "grad")
