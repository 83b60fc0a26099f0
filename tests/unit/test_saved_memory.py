"""What an adapted layer keeps for its backward, and the residual's own autograd node.

Counted with torch.autograd.graph.saved_tensors_hooks, by storage (a tensor kept twice, or as
two views, counts once) and leaving out the model's and the adapter's parameters and buffers
(resident anyway): what is left is activation memory the adapter adds. The gradients of the
residual's node are checked against autograd on the dense float64 weight built from the
formulas (brute force, nothing of the code under test).
"""
from __future__ import annotations

import pytest
import torch

from tests.unit.test_runtime import dense_parts, lora, patch, random_adapter
from tlora.functional import lowrank
from tlora.runtime import AdapterLayer, Entry, Geometry, geometry_of


def kept_storages(layer: torch.nn.Module, run, base: torch.nn.Module) -> dict[int, tuple[torch.dtype, int]]:
    """{storage address: (dtype, bytes)} of what `run()` saves for backward, the adapter's and the frozen
    layer's parameters and buffers left out."""
    resident = {t.untyped_storage().data_ptr() for m in (layer, base) for t in [*m.parameters(), *m.buffers()]}
    kept: dict[int, tuple[torch.dtype, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in resident:
            kept[key] = (t.dtype, t.untyped_storage().nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return kept


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("residual", ["tr:3", "lora:4"])
def test_an_adapted_linear_keeps_x_once_and_v_x(fused: bool, residual: str) -> None:
    """Transform + residual keep x (once, shared) and V^T x (k floats per token): not U, V, T x or the
    stage intermediates, whichever path runs (the fused node on a torch Linear, or the general path
    around any callable)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40).requires_grad_(False)
    adapter = random_adapter((40, 48), "trm:2", residual, seed=1)
    layer = AdapterLayer(base if fused else (lambda x: base(x)),
                         [Entry(adapter, geometry_of(base), form="factored", trainable=True)],
                         geometry=geometry_of(base), module=base)
    assert layer._fusable(layer.entries[0], torch.empty(0, 48)) == fused
    x = torch.randn(50, 48, requires_grad=True)
    kept = kept_storages(layer, lambda: layer(x), base)
    rank = 9 if residual == "tr:3" else 4
    assert sorted(b for _, b in kept.values()) == sorted([50 * rank * 4, 50 * 48 * 4])
    assert x.untyped_storage().data_ptr() in kept


def test_under_autocast_x_is_cast_once_for_transform_and_residual() -> None:
    """The general path under bfloat16 autocast: one bfloat16 copy of a float32 x kept, not one per part."""
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 40).requires_grad_(False)
    layer = AdapterLayer(lambda x: base(x), [Entry(random_adapter((40, 48), "trm:2", "tr:3", seed=2),
                                                   geometry_of(base), form="factored", trainable=True)],
                         geometry=geometry_of(base), module=base)
    x = torch.randn(50, 48, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = kept_storages(layer, lambda: layer(x), base)
    copies = [b for dtype, b in kept.values() if dtype == torch.bfloat16 and b == 50 * 48 * 2]
    assert len(copies) == 1 and all(dtype != torch.float32 or b < 50 * 48 * 4 for dtype, b in kept.values())


@pytest.mark.parametrize("kind", ["tr:2", "lora:3"])
def test_residual_node_gradients_equal_the_dense_reference(kind: str) -> None:
    """lowrank.apply (through the general path, with `pick` rows of a fused adapter): values, input and
    every raw tensor's gradients as autograd gives them on W + sigma s Delta[pick] in float64."""
    fused = random_adapter((18, 16), "none", kind, seed=7)
    pick = list(range(6, 12))
    weight = torch.randn(6, 16, dtype=torch.float64)
    entry = Entry(fused, Geometry(6, 16), strength=0.5, pick=pick, trainable=True)
    layer = AdapterLayer(lambda x: x @ weight.t(), [entry], geometry=Geometry(6, 16)).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 6, dtype=torch.float64)
    y = layer(x)
    (y * g).sum().backward()

    leaves = {k.replace("__", "."): v.detach().clone().requires_grad_(True) for k, v in entry.adapter_params.items()}
    ref_adapter = type(fused)({**leaves, "tlora_scale": entry.scale.detach().double()}, name="m")
    xr = x.detach().clone().requires_grad_(True)
    want = xr @ patch(weight, ref_adapter, 0.5, pick=pick).t()
    (want * g).sum().backward()
    torch.testing.assert_close(y.detach(), want.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-10)
    for name, param in entry.adapter_params.items():
        torch.testing.assert_close(param.grad, leaves[name.replace("__", ".")].grad, rtol=1e-9, atol=1e-10)


def test_residual_node_alone_and_with_a_float_scale() -> None:
    """lowrank.apply on raw LoRA tensors with a float scale, rows of any leading shape: s up down x, and
    gradients of x, up and down from autograd on the dense float64 product."""
    gen = torch.Generator().manual_seed(3)
    up, down = (torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    down_t = torch.randn(3, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 2, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 2, 7, generator=gen, dtype=torch.float64)
    y = lowrank.apply(x, ("lora", up, down_t.t(), 0.25))
    got = torch.autograd.grad((y * g).sum(), [x, up, down_t])
    want_y = x @ (0.25 * up @ down_t).t()
    want = torch.autograd.grad((want_y * g).sum(), [x, up, down_t])
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert dense_parts is not None and lora is not None  # shared helpers, imported from the runtime tests
