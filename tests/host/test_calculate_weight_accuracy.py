"""The stock loaders' patch path (`TLoRAWeightAdapter.calculate_weight`) against the float64
reference of tests/unit/test_patch_accuracy.py, at float32 rounding level (its tolerance C)."""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from harness import comfy_host as ch
from tests.unit.test_patch_accuracy import C, CASES, error_units, reference, trained


@pytest.mark.parametrize("case", CASES[:2] + CASES[6:8], ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_calculate_weight_is_as_accurate_as_float32_rounding(case, comfy_host) -> None:
    """ComfyUI hands calculate_weight a float32 copy of the weight to update in place."""
    comfy_host.require_pack()
    comfy_adapter = importlib.import_module(f"{ch.pack_module_name()}.nodes.comfy_adapter")
    shape, transform, residual, shapes = case
    tensors = trained(shape, transform, residual, shapes, seed=7 + sum(shape))
    names = tuple(tensors)
    patch = comfy_adapter.TLoRAWeightAdapter(set(), (names, *(tensors[n] for n in names)))
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
    same = w0.clone()
    assert patch.calculate_weight(same, "k", 0.0, 1.0, None, lambda a: a) is same and torch.equal(same, w0)
    for strength in (1.0, 0.5, -1.0):
        weight = w0.clone()
        out = patch.calculate_weight(weight, "k", strength, 1.0, None, lambda a: a)
        assert out is weight  # updated in place, as ComfyUI's contract asks
        units = error_units(out, w0, reference(w0, tensors, strength))
        assert units <= C, f"strength {strength}: max error {units:.2f} eps32 * max|W|"
