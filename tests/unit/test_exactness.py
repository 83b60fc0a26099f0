"""The adapter maths against brute-force references written here (not the code's own dense()).

T[(i..), (j..)] = trace(A_1[i_1, j_1] ... A_D[i_D, j_D]), Delta[(a..), (b..)] =
trace(B_1[a_1] ... B_Do[a_Do] C_1[b_1] ... C_Di[b_Di]), row-major multi-indices,
W(sigma) = W0 + sigma (W0 T + s Delta - W0), conv: T on input channels at every tap,
Delta over the flattened (C, kh, kw) fan-in.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.unit.brute import brute_t
from tlora import ModuleAdapter, TLoRAModule
from tlora.shapes import auto_factors

# Transform factors for D = 1..4 (widths 5, 12, 12, 16) and output factors of the residual.
FACTORS = {1: (5,), 2: (3, 4), 3: (2, 3, 2), 4: (2, 2, 2, 2)}
OUT_FACTORS = (2, 3)
SCALE = float(torch.tensor(0.7))  # the float32 value the adapter stores and uses


def brute_tr(out_cores: list[torch.Tensor], in_cores: list[torch.Tensor]) -> torch.Tensor:
    """Dense Delta entry by entry from the ring formula (differentiable, batched over entries)."""
    rows = list(itertools.product(*[range(c.shape[0]) for c in out_cores]))
    cols = list(itertools.product(*[range(c.shape[0]) for c in in_cores]))
    pairs = [(a, b) for a in rows for b in cols]
    prod = None
    for d, core in enumerate(out_cores):
        mats = core[torch.tensor([a[d] for a, _ in pairs])]
        prod = mats if prod is None else prod @ mats
    for d, core in enumerate(in_cores):
        prod = prod @ core[torch.tensor([b[d] for _, b in pairs])]
    return prod.diagonal(dim1=-2, dim2=-1).sum(-1).reshape(len(rows), len(cols))


def reference_weight(w0: torch.Tensor, t: torch.Tensor | None, delta: torch.Tensor | None,
                     scale: float, strength: float) -> torch.Tensor:
    """W0 + sigma (W0 T + s Delta - W0); for convs T contracts the input-channel axis per tap."""
    target = w0.clone()
    if t is not None:
        target = torch.einsum("oi...,ij->oj...", w0, t)
    if delta is not None:
        target = target + scale * delta.reshape(w0.shape)
    return w0 + strength * (target - w0)


def random_adapter(weight_shape, depth: int, rank: int, generator: torch.Generator,
                   residual: str = "tr") -> dict[str, torch.Tensor]:
    """Random (trained-looking) float32 tensors for a TRM transform and a TR/LoRA residual."""
    factors = FACTORS[depth]
    assert math.prod(factors) == weight_shape[1]
    tensors = {}
    for d, n in enumerate(factors):
        eye = torch.eye(n)[:, :, None, None] / rank
        tensors[f"tlora_t.{d}"] = eye + 0.3 * torch.randn(n, n, rank, rank, generator=generator) / rank
    fan_in = math.prod(weight_shape[1:])
    if residual == "tr":
        for d, n in enumerate(OUT_FACTORS):
            tensors[f"tlora_r.out.{d}"] = torch.randn(n, rank, rank, generator=generator) / math.sqrt(rank)
        for d, n in enumerate(auto_factors(fan_in, depth)):
            tensors[f"tlora_r.in.{d}"] = torch.randn(n, rank, rank, generator=generator) / math.sqrt(rank)
    else:
        tensors["tlora_r.up"] = torch.randn(weight_shape[0], rank, generator=generator)
        tensors["tlora_r.down"] = torch.randn(rank, fan_in, generator=generator)
    tensors["tlora_scale"] = torch.tensor(0.7)
    return tensors


def make_base(weight_shape, generator: torch.Generator) -> nn.Module:
    if len(weight_shape) == 2:
        base = nn.Linear(weight_shape[1], weight_shape[0], dtype=torch.float64)
    else:
        base = nn.Conv2d(weight_shape[1], weight_shape[0], weight_shape[2:], stride=2, padding=1,
                         dtype=torch.float64)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=generator, dtype=torch.float64))
        base.bias.copy_(torch.randn(base.bias.shape, generator=generator, dtype=torch.float64))
    return base


def reference_forward(base: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, base.bias)
    return F.conv2d(x, weight, base.bias, base.stride, base.padding, base.dilation)


def make_input(weight_shape, generator: torch.Generator) -> torch.Tensor:
    if len(weight_shape) == 2:
        return torch.randn(2, 3, weight_shape[1], generator=generator, dtype=torch.float64)
    return torch.randn(2, weight_shape[1], 5, 4, generator=generator, dtype=torch.float64)


def weight_shape_for(kind: str, depth: int) -> tuple[int, ...]:
    width = math.prod(FACTORS[depth])
    o = math.prod(OUT_FACTORS)
    return (o, width) if kind == "linear" else (o, width, 2, 3)


# ----- factored vs dense vs brute force: forward and gradients -----------------------------
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("rank", [1, 2, 3, 4])
def test_module_matches_brute_force_forward_and_grad(kind: str, depth: int, rank: int) -> None:
    gen = torch.Generator().manual_seed(1000 * depth + 10 * rank + (kind == "conv"))
    shape = weight_shape_for(kind, depth)
    residual = "tr" if (depth + rank) % 2 else "lora"  # both residual kinds across the grid
    tensors = random_adapter(shape, depth, rank, gen, residual)
    adapter = ModuleAdapter(tensors, name="m", weight_shape=shape)
    base = make_base(shape, gen)
    x0 = make_input(shape, gen)
    upstream = None

    # Reference: dense weight from the brute-force formulas, leaves in float64.
    leaves = {k: v.double().requires_grad_(k != "tlora_scale") for k, v in tensors.items()}
    t = brute_t([leaves[f"tlora_t.{d}"] for d in range(depth)])
    if residual == "tr":
        n_in = len([k for k in leaves if k.startswith("tlora_r.in.")])
        delta = brute_tr([leaves[f"tlora_r.out.{d}"] for d in range(len(OUT_FACTORS))],
                         [leaves[f"tlora_r.in.{d}"] for d in range(n_in)])
    else:
        delta = leaves["tlora_r.up"] @ leaves["tlora_r.down"]
    x_ref = x0.clone().requires_grad_(True)
    y_ref = reference_forward(base, reference_weight(base.weight.detach(), t, delta, SCALE, 1.0), x_ref)
    upstream = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    (y_ref * upstream).sum().backward()

    for form in ("factored", "dense"):
        module = TLoRAModule(base, adapter, form=form).double()
        x = x0.clone().requires_grad_(True)
        y = module(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10, msg=f"forward, form {form}")
        (y * upstream).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10, msg=f"input grad, form {form}")
        for key, leaf in leaves.items():
            if key == "tlora_scale":
                continue
            got = module.adapter_params[key.replace(".", "__")].grad
            torch.testing.assert_close(got, leaf.grad, rtol=1e-9, atol=1e-10, msg=f"grad {key}, form {form}")
        # The base layer stays frozen data: no gradient is accumulated into a copy of it.
        base.zero_grad(set_to_none=True)

    # The merged weight (factored W0 T) agrees with the brute-force one too.
    merged = adapter.patched_weight(base.weight.detach().float())
    torch.testing.assert_close(merged.double(), reference_weight(base.weight.detach().float().double(),
                                                                  t.detach(), delta.detach(), SCALE, 1.0),
                               rtol=1e-4, atol=1e-4)


def test_factored_and_dense_forms_agree_on_paper_shapes() -> None:
    gen = torch.Generator().manual_seed(3)
    cores = [torch.eye(n, dtype=torch.float64)[:, :, None, None] / 2
             + 0.1 * torch.randn(n, n, 2, 2, generator=gen, dtype=torch.float64) for n in (4, 8, 10)]
    tensors = {f"tlora_t.{d}": c for d, c in enumerate(cores)} | {"tlora_scale": torch.tensor(1.0)}
    adapter = ModuleAdapter(tensors, weight_shape=(16, 320))
    base = nn.Linear(320, 16, dtype=torch.float64)
    x = torch.randn(7, 320, generator=gen, dtype=torch.float64)
    outs = [TLoRAModule(base, adapter, form=f).double()(x) for f in ("factored", "dense")]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)


# ----- an untrained adapter changes nothing -----------------------------------------------
@pytest.mark.parametrize("rank", [1, 2, 3, 4])
@pytest.mark.parametrize("residual", ["tr:{}", "lora:{}", "none"])
@pytest.mark.parametrize("shape", [(24, 40), (16, 12, 3, 3), (20, 320)])
def test_untrained_adapter_is_identity(rank: int, residual: str, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(rank)
    adapter = ModuleAdapter.create(shape, f"trm:{rank}", residual.format(rank), shapes="auto", generator=gen)
    w0 = torch.randn(shape, generator=gen)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = w0.to(dtype)
        for strength in (1.0, 0.5, -1.0):
            assert torch.equal(adapter.patched_weight(w, strength), w), (dtype, strength)
    if rank == 3:
        return  # eye/3 is inexact: only the merged weight is guaranteed bit-exact (recognised identity)
    base = make_base(shape, gen).float()
    x = make_input(shape, gen).float()
    for form in ("factored", "dense"):
        module = TLoRAModule(base, adapter, form=form)
        with torch.no_grad():
            assert torch.equal(module(x), base(x)), form


def test_untrained_diag_adapter_is_identity() -> None:
    adapter = ModuleAdapter.create((8, 6), "diag", "lora:2")
    w0 = torch.randn(8, 6)
    assert torch.equal(adapter.patched_weight(w0), w0)
    base = nn.Linear(6, 8)
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(TLoRAModule(base, adapter)(x), base(x))


# ----- strength is linear in weight space -----------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_strength_follows_linear_rule(kind: str) -> None:
    gen = torch.Generator().manual_seed(11)
    depth, rank = 3, 2
    shape = weight_shape_for(kind, depth)
    tensors = random_adapter(shape, depth, rank, gen, "tr")
    adapter = ModuleAdapter(tensors, weight_shape=shape)
    base = make_base(shape, gen)
    w0 = base.weight.detach()
    t = brute_t([tensors[f"tlora_t.{d}"].double() for d in range(depth)])
    n_in = len([k for k in tensors if k.startswith("tlora_r.in.")])
    delta = brute_tr([tensors[f"tlora_r.out.{d}"].double() for d in range(2)],
                     [tensors[f"tlora_r.in.{d}"].double() for d in range(n_in)])
    x = make_input(shape, gen)
    w0_32 = w0.float()
    assert torch.equal(adapter.patched_weight(w0_32, 0.0), w0_32)  # bit-exact base at strength 0
    for strength in (0.0, 1.0, 0.5, -1.0):
        expected = reference_weight(w0, t, delta, SCALE, strength)
        torch.testing.assert_close(adapter.patched_weight(w0_32, strength).double(),
                                   reference_weight(w0_32.double(), t, delta, SCALE, strength),
                                   rtol=1e-5, atol=1e-5)
        module = TLoRAModule(base, adapter, strength=strength).double()
        with torch.no_grad():
            y = module(x)
            if strength == 0:
                assert torch.equal(y, base(x))
            torch.testing.assert_close(y, reference_forward(base, expected, x), rtol=1e-10, atol=1e-10)
    # Linear in sigma: W(0.5) is the midpoint of W(0) and W(1), W(-1) the mirror of W(1).
    w_half, w_one, w_neg = (adapter.patched_weight(w0_32, s).double() for s in (0.5, 1.0, -1.0))
    torch.testing.assert_close(w_half, (w0_32.double() + w_one) / 2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w_neg, 2 * w0_32.double() - w_one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [2, 3, 4])
def test_untrained_module_is_exact_while_training_and_still_learns(rank: int) -> None:
    """With gradients on, the identity start still returns the base output bit for bit, T's
    cores get the true gradient, and after one in-place update the transform takes effect."""
    gen = torch.Generator().manual_seed(20 + rank)
    shape = (24, 40)
    adapter = ModuleAdapter.create(shape, f"trm:{rank}", f"tr:{rank}", shapes="auto", generator=gen)
    base = make_base(shape, gen).float().requires_grad_(False)
    x = make_input(shape, gen).float()
    module = TLoRAModule(base, adapter, form="factored")
    y = module(x)
    assert torch.equal(y, base(x))
    upstream = torch.randn(y.shape, generator=gen)
    (y * upstream).sum().backward()
    # Reference gradient of the cores: the brute-force T at the same cores, in float64.
    leaves = [adapter.tensors[f"tlora_t.{d}"].double().requires_grad_(True) for d in range(3)]
    t = brute_t(leaves)
    (F.linear(x.double(), base.weight.double() @ t, base.bias.double()) * upstream.double()).sum().backward()
    for d, leaf in enumerate(leaves):
        torch.testing.assert_close(module.adapter_params[f"tlora_t__{d}"].grad.double(), leaf.grad,
                                   rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        for p in module.adapter_params.values():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
        assert not torch.equal(module(x), base(x))
        expected = F.linear(x, module.to_adapter().patched_weight(base.weight), base.bias)
        torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=1e-4)
