"""ComfyUI 0.12's bypass LoRA loading (LoraLoaderBypass*) of TLoRA files equals the merged path (real host).

Bypass mode leaves the weights alone and runs each adapter around its layer's forward
(`BypassForwardHook`, which sets `multiplier`, `is_conv`, `kernel_size` and `kw_dict` on the
adapter). Each layer kind gets a file of its own, so a failure names the kind. Skipped on
hosts before 0.12 (they have no bypass loading).
"""
from __future__ import annotations

import pytest
import torch

from harness import comfy_host as ch
from harness import tiny_models
from tests.host.tlora_refs import assert_all_base, random_adapter, stock_model_only, write_tlora

pytestmark = pytest.mark.skipif(ch.host_version() < (0, 12),
                                reason=f"{ch.host_label()} has no bypass LoRA loading (0.12 added it)")

LAYERS = {
    "linear": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "conv_1x1": "output_blocks.3.1.proj_in",
    "conv_3x3_padded": "input_blocks.1.0.in_layers.2",
    "conv_strided": "input_blocks.2.0.op",
}
KINDS = [("trm:2", "tr:3"), ("trm:1", "lora:4"), ("diag", "tr:2")]


@pytest.fixture(scope="module")
def sd15(tm):
    m = tm.tiny_sd15(seed=0)
    return m, tm.state_fingerprint(m.model)


def bypass_model_only(model, name: str, strength: float):
    """ComfyUI 0.12's LoraLoaderBypassModelOnly."""
    return ch.node_class("LoraLoaderBypassModelOnly")().load_lora_model_only(model, name, strength)[0]


def forward(patcher, m) -> torch.Tensor:
    """One UNet forward through ComfyUI's model wrapper, with the patcher loaded (patches or hooks in place)."""
    import comfy.model_management as mm
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 4, 16, 16, generator=g)
    mm.load_models_gpu([patcher], force_full_load=True)
    try:
        with torch.no_grad():
            return patcher.model.apply_model(x, torch.tensor([500.0]), c_crossattn=m.cond(seed=1)[0][0]).float().clone()
    finally:
        ch.free_models()


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: f"{k[0]}+{k[1]}")
@pytest.mark.parametrize("layer", list(LAYERS), ids=list(LAYERS))
@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
def test_bypass_equals_merged(sd15, loras_dir, layer, kind, strength):
    m, fingerprint = sd15
    key = f"diffusion_model.{LAYERS[layer]}"
    shape = tuple(m.model.state_dict()[key + ".weight"].shape)
    name = f"bypass_{layer}_{kind[0]}_{kind[1]}.safetensors".replace(":", "")
    write_tlora(loras_dir / name, {key: random_adapter(shape, *kind, seed=3)})
    base = forward(m.patcher, m)
    merged = forward(stock_model_only(m.patcher, name, strength), m)
    bypass = forward(bypass_model_only(m.patcher, name, strength), m)
    assert not torch.allclose(merged, base, atol=1e-4), "the adapter must change the output"
    assert_close_to_scale(bypass, merged)
    # Bypass never touches the weights, and after the merged run they are restored bit for bit.
    assert_all_base(tiny_models.state_fingerprint(m.model), fingerprint, f"after bypass and merged runs ({layer})")
    assert torch.equal(forward(m.patcher, m), base)


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal to float32 rounding at the output's scale (the tiny random UNet's outputs reach ~1e3)."""
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert err <= rel * scale, f"bypass differs from merged by {err:.3g} at an output scale of {scale:.3g}"


def test_bypass_at_strength_zero_is_the_base(sd15, loras_dir):
    m, _ = sd15
    key = f"diffusion_model.{LAYERS['conv_3x3_padded']}"
    shape = tuple(m.model.state_dict()[key + ".weight"].shape)
    write_tlora(loras_dir / "bypass_zero.safetensors", {key: random_adapter(shape, seed=4)})
    assert torch.equal(forward(bypass_model_only(m.patcher, "bypass_zero.safetensors", 0.0), m), forward(m.patcher, m))


def test_bypass_of_a_whole_file_matches_merged(sd15, loras_dir):
    """Every attention linear plus the three conv kinds in one file, kinds cycling, as users load them."""
    from tests.host.tlora_refs import random_adapters, unet_shapes
    m, _ = sd15
    write_tlora(loras_dir / "bypass_all.safetensors", random_adapters(unet_shapes(m.model), seed=5))
    merged = forward(stock_model_only(m.patcher, "bypass_all.safetensors", 0.8), m)
    bypass = forward(bypass_model_only(m.patcher, "bypass_all.safetensors", 0.8), m)
    assert_close_to_scale(bypass, merged)
