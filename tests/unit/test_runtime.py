"""The run-time layer (tlora.runtime) against dense float64 weight patches applied one after the other.

The reference builds T entry by entry from the trace formula (brute.py) and Delta from the ring
trace, patches a float64 copy of the weight row by row in the order the adapters were added,
and runs the plain layer on it: nothing of the code under test is used to build it.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from tests.unit.brute import brute_t
from tlora import ModuleAdapter
from tlora.adapter import R_DOWN, R_UP, SCALE
from tlora.runtime import AdapterLayer, Entry, Geometry, geometry_of


def brute_delta(out_cores: list[torch.Tensor], in_cores: list[torch.Tensor]) -> torch.Tensor:
    """Delta[(i..), (j..)] = trace(B_1[i_1] ... B_Do[i_Do] C_1[j_1] ... C_Di[j_Di]) entry by entry."""
    rows = list(itertools.product(*[range(c.shape[0]) for c in out_cores]))
    cols = list(itertools.product(*[range(c.shape[0]) for c in in_cores]))
    out = torch.empty(len(rows), len(cols), dtype=torch.float64)
    for a, i in enumerate(rows):
        left = torch.linalg.multi_dot([c[k].double() for c, k in zip(out_cores, i)]) if len(i) > 1 \
            else out_cores[0][i[0]].double()
        for b, j in enumerate(cols):
            right = [c[k].double() for c, k in zip(in_cores, j)]
            out[a, b] = torch.trace(torch.linalg.multi_dot([left, *right]))
    return out


def dense_parts(adapter: ModuleAdapter) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    """(T, Delta unscaled, s) in float64 from the adapter's stored tensors (T None: identity)."""
    t = adapter.tensors
    cores = [t[f"tlora_t.{d}"] for d in range(8) if f"tlora_t.{d}" in t]
    dense_t = brute_t([c.double() for c in cores]) if cores else (torch.diag(t["tlora_t.diag"].double())
                                                                 if "tlora_t.diag" in t else None)
    outs = [t[f"tlora_r.out.{d}"] for d in range(8) if f"tlora_r.out.{d}" in t]
    ins = [t[f"tlora_r.in.{d}"] for d in range(8) if f"tlora_r.in.{d}" in t]
    delta = brute_delta(outs, ins) if outs else (t[R_UP].double() @ t[R_DOWN].double() if R_UP in t else None)
    return dense_t, delta, float(t[SCALE])


def patch(w: torch.Tensor, adapter: ModuleAdapter, strength: float, rows=None, pick=None) -> torch.Tensor:
    """W with one adapter merged on `rows` (W_r + sigma (W_r T + s Delta[pick] - W_r)), float64."""
    w = w.clone()
    idx = torch.arange(w.shape[0]) if rows is None else torch.as_tensor(rows)
    part = w[idx]
    dense_t, delta, s = dense_parts(adapter)
    flat = part.movedim(1, -1) if part.dim() == 4 else part
    moved = flat if dense_t is None else flat @ dense_t
    target = moved.movedim(-1, 1) if part.dim() == 4 else moved
    if delta is not None:
        d = delta if pick is None else delta[torch.as_tensor(pick)]
        target = target + s * d.reshape(part.shape)
    w[idx] = part + strength * (target - part)
    return w


def random_adapter(shape, transform: str, residual: str, seed: int, name: str = "m") -> ModuleAdapter:
    """An adapter whose every tensor is random (no identity start, no zero core)."""
    fresh = ModuleAdapter.create(shape, transform, residual, name=name)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: (v if k == SCALE else v + 0.2 * torch.randn(v.shape, generator=g)) for k, v in fresh.tensors.items()}
    return ModuleAdapter(tensors, name=name)


def lora(shape, rank: int, alpha: float, seed: int) -> ModuleAdapter:
    """A plain LoRA (up, down, alpha) as the residual-only adapter the run-time layer stacks."""
    g = torch.Generator().manual_seed(seed)
    fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
    return ModuleAdapter({R_UP: torch.randn(shape[0], rank, generator=g) * 0.3,
                          R_DOWN: torch.randn(rank, fan_in, generator=g) * 0.3,
                          SCALE: torch.tensor(alpha / rank)}, name="lora")


def linear(out_f: int = 24, in_f: int = 16, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(in_f, out_f).double()


def run_linear(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x @ weight.t() + bias


CHAIN = [(("trm:2", "tr:3"), 1.0), (("diag", "lora:2"), -1.0), (("trm:1", "none"), 0.5), (("none", "tr:2"), 0.7)]


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0)])
def test_entries_in_order_equal_weight_patches_in_that_order(order):
    base = linear()
    geometry = geometry_of(base)
    adapters = [random_adapter(tuple(base.weight.shape), *CHAIN[i][0], seed=i) for i in order]
    strengths = [CHAIN[i][1] for i in order]
    layer = AdapterLayer(base, [Entry(a, geometry, strength=s, form="factored") for a, s in zip(adapters, strengths)])
    w = base.weight.detach().double()
    for a, s in zip(adapters, strengths):
        w = patch(w, a, s)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, run_linear(w, base.bias.detach(), x), rtol=1e-9, atol=1e-9)


def test_conv_entries_with_stride_and_padding():
    torch.manual_seed(1)
    base = torch.nn.Conv2d(8, 12, 3, stride=2, padding=1).double()
    shape = tuple(base.weight.shape)
    adapters = [random_adapter(shape, "trm:2", "tr:2", seed=5), lora(shape, 3, 1.5, seed=6)]
    layer = AdapterLayer(base, [Entry(adapters[0], geometry_of(base), strength=0.5, form="factored"),
                                Entry(adapters[1], geometry_of(base), strength=-1.0)])
    w = patch(patch(base.weight.detach().double(), adapters[0], 0.5), adapters[1], -1.0)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, F.conv2d(x, w, base.bias.detach(), 2, 1), rtol=1e-9, atol=1e-9)


def test_row_slices_of_a_fused_weight_with_a_whole_weight_lora_between():
    """q/k/v adapters on row slices of one fused weight (as ComfyUI's Flux qkv under diffusers names),
    a LoRA on the whole weight after q, and a transform on k: each row group sees its own chain."""
    base = linear(out_f=18, in_f=16)
    geometry = geometry_of(base)
    q, k, v = list(range(0, 6)), list(range(6, 12)), list(range(12, 18))
    a_q = random_adapter((6, 16), "trm:2", "tr:2", seed=1)
    whole = lora((18, 16), 2, 2.0, seed=2)
    a_k = random_adapter((6, 16), "trm:1", "lora:2", seed=3)
    a_v = random_adapter((6, 16), "none", "tr:2", seed=4)
    plan = [(a_q, 1.0, q), (whole, 0.5, None), (a_k, -1.0, k), (a_v, 0.5, v)]
    layer = AdapterLayer(base, [Entry(a, geometry, strength=s, rows=r, form="factored") for a, s, r in plan])
    w = base.weight.detach().double()
    for a, s, r in plan:
        w = patch(w, a, s, rows=r)
    x = torch.randn(4, 16, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, run_linear(w, base.bias.detach(), x), rtol=1e-9, atol=1e-9)


def test_a_fused_adapter_on_a_split_layer_takes_its_rows():
    """`pick`: a generic fused-qkv adapter on diffusers' split k layer gets Delta's k rows only."""
    fused = random_adapter((18, 16), "trm:2", "tr:2", seed=7)
    base = linear(out_f=6, in_f=16)
    pick = list(range(6, 12))
    layer = AdapterLayer(base, [Entry(fused, geometry_of(base), strength=0.5, pick=pick, form="dense")])
    _, delta, s = dense_parts(fused)
    w = patch(base.weight.detach().double(), fused, 0.5, pick=pick)
    x = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), run_linear(w, base.bias.detach(), x), rtol=1e-9, atol=1e-9)


def test_any_frozen_callable_and_strength_zero_is_the_base_bit_for_bit():
    """A plain function standing for a host's quantized op; every entry at 0 calls it exactly once, on x."""
    weight = torch.randn(10, 8)
    calls = []

    def frozen(x):
        calls.append(x)
        return F.linear(x, weight.to(x.dtype))  # as a host op casts its stored weight to the input's dtype
    geometry = Geometry(10, 8)
    entries = [Entry(random_adapter((10, 8), "trm:2", "tr:2", seed=s), geometry, strength=0.0) for s in range(2)]
    layer = AdapterLayer(frozen, entries, geometry=geometry)
    x = torch.randn(5, 8)
    assert torch.equal(layer(x), frozen(x)) and calls[0] is x
    layer.entries[1] = entries[1].with_strength(1.0)
    layer._groups.clear()
    ref = patch(weight.double(), entries[1].to_adapter(), 1.0)
    torch.testing.assert_close(layer(x.double()), x.double() @ ref.t(), rtol=1e-9, atol=1e-9)


def test_with_strength_shares_the_tensors():
    base = linear()
    entry = Entry(random_adapter((24, 16), "trm:2", "tr:3", seed=0), geometry_of(base), strength=1.0)
    other = entry.with_strength(0.25)
    assert other.strength == 0.25 and entry.strength == 1.0
    assert all(a is b for a, b in zip(entry.parameters(), other.parameters()))


def test_training_gradients_equal_the_dense_reference():
    """Trainable entries (two, in order, one on a row slice): gradients of every core as autograd gives them
    on the dense float64 patched weight."""
    base = linear(out_f=12, in_f=16).requires_grad_(False)
    geometry = geometry_of(base)
    first = random_adapter((12, 16), "trm:2", "tr:2", seed=1)
    second = random_adapter((6, 16), "trm:1", "lora:2", seed=2)
    entries = [Entry(first, geometry, strength=1.0, trainable=True, form="factored"),
               Entry(second, geometry, strength=0.5, rows=range(3, 9), trainable=True, form="dense")]
    layer = AdapterLayer(base, entries).double()
    x = torch.randn(4, 16, dtype=torch.float64)
    g = torch.randn(4, 12, dtype=torch.float64)
    (layer(x) * g).sum().backward()

    leaves = {}
    for i, e in enumerate(entries):
        leaves[i] = {k.replace("__", "."): v.detach().clone().requires_grad_(True) for k, v in e.adapter_params.items()}

    def dense(i: int, e: Entry) -> ModuleAdapter:
        return ModuleAdapter({**leaves[i], SCALE: e.scale.detach().double()}, name=e.name)

    w = base.weight.detach().double()
    w = patch(w, dense(0, entries[0]), 1.0)
    w = patch(w, dense(1, entries[1]), 0.5, rows=list(range(3, 9)))
    (run_linear(w, base.bias.detach(), x) * g).sum().backward()
    for i, e in enumerate(entries):
        for name, param in e.adapter_params.items():
            torch.testing.assert_close(param.grad, leaves[i][name.replace("__", ".")].grad, rtol=1e-8, atol=1e-9)


def test_the_fused_path_equals_the_general_path():
    base = linear()
    adapter = random_adapter((24, 16), "trm:2", "tr:3", seed=3)
    fused = AdapterLayer(base, [Entry(adapter, geometry_of(base), strength=0.5, form="factored")])
    general = AdapterLayer(lambda x: base(x), [Entry(adapter, geometry_of(base), strength=0.5, form="factored")],
                           geometry=geometry_of(base))
    x = torch.randn(7, 16, dtype=torch.float64)
    assert fused._fusable(fused.entries[0], x) and not general._fusable(general.entries[0], x)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), general(x), rtol=1e-12, atol=1e-12)


def test_geometry_reads_a_quantized_weights_logical_shape():
    class Packed(torch.nn.Module):  # a host op whose weight storage is not the logical shape
        in_features, out_features = 32, 8

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(8, 16, dtype=torch.uint8), requires_grad=False)
    assert geometry_of(Packed()).weight_shape == (8, 32)  # what the op says, not its packed storage
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1)
    assert geometry_of(conv) == Geometry(6, 4, (3, 3), (2, 2), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="grouped"):
        geometry_of(torch.nn.Conv2d(4, 4, 3, groups=2))
