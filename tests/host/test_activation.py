"""Our loaders' activation-side mode on every host (0.3.75, 0.12.1, 0.33): chain order, stacking, strength 0.

The reference patches float64 copies of the weights in the order of the node chain (tlora_refs'
dense formulas: TLoRA W + s (W T + s Delta - W), LoRA W + s (alpha / r) B A) and runs the same
UNet on them; nothing of the pack builds it.
"""
from __future__ import annotations

import pytest
import torch

from harness import comfy_host as ch
from tests.host import tlora_refs as R


@pytest.fixture(scope="module")
def sd15(tm):
    m = tm.tiny_sd15(seed=0)
    return m, R.unet_shapes(m.model)


def forward(patcher, m) -> torch.Tensor:
    import comfy.model_management as mm
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(11))
    mm.load_models_gpu([patcher], force_full_load=True)
    try:
        with torch.no_grad():
            return patcher.model.apply_model(x, torch.tensor([500.0]), c_crossattn=m.cond(seed=1)[0][0]).double()
    finally:
        ch.free_models()


def reference(m, steps) -> torch.Tensor:
    """The UNet on float64 weights patched step by step: ("tlora", {prefix: adapter}, s) or ("lora", {prefix: f}, s)."""
    model = R.tiny_sd15_dtype(torch.float64, seed=m.seed).model  # the same seeded weights, stored in float64
    sd = model.state_dict()
    for kind, files, strength in steps:
        for prefix, value in files.items():
            key = prefix + ".weight"
            if kind == "tlora":
                sd[key] = R.ref_patched(sd[key], value.tensors, strength)
            else:
                up, down, alpha = value
                sd[key] = sd[key] + strength * R.ref_lora_diff(up, down, alpha, sd[key].shape)
    model.load_state_dict(sd)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        return model.apply_model(x.double(), torch.tensor([500.0]), c_crossattn=m.cond(seed=1)[0][0].double())


def assert_close(actual, expected, what: str) -> None:
    err, scale = float((actual - expected).abs().max()), float(expected.abs().max())
    assert err <= 2e-5 * scale, f"{what}: off by {err:.3g} at a scale of {scale:.3g}"


def tlora(model, name: str, strength: float, mode: str):
    return R.loader("TLoRALoaderModelOnly").execute(model=model, adapter_name=name, strength_model=strength,
                                                    mode=mode).result[0]


def lora(model, name: str, strength: float, mode: str):
    return R.loader("TLoRABlockWeights").execute(model=model, adapter_name=name, strength_model=strength,
                                                 input_blocks=1.0, middle_block=1.0, output_blocks=1.0, other=1.0,
                                                 overrides="", mode=mode).result[0]


def test_two_tloras_and_loras_stack_in_chain_order(sd15, loras_dir):
    """stock LoRA -> TLoRA A (activation) -> LoRA (ours, activation) -> TLoRA B (merged: joins the chain)."""
    m, shapes = sd15
    a, b = R.random_adapters(shapes, seed=1), R.random_adapters(shapes, seed=2)
    half = dict(list(shapes.items())[::2])
    first, later = R.random_lora(half, seed=3), R.random_lora(shapes, seed=4)
    for name, files in (("act_a.safetensors", a), ("act_b.safetensors", b)):
        R.write_tlora(loras_dir / name, files)
    R.write_lora(loras_dir / "act_first.safetensors", first)
    R.write_lora(loras_dir / "act_later.safetensors", later)
    chain = R.stock_model_only(m.patcher, "act_first.safetensors", 0.6)
    chain = tlora(chain, "act_a.safetensors", 0.8, "activation")
    chain = lora(chain, "act_later.safetensors", -0.5, "activation")
    chain = tlora(chain, "act_b.safetensors", -1.0, "merged")
    want = reference(m, [("lora", {p: first[p] for p in half}, 0.6), ("tlora", a, 0.8), ("lora", later, -0.5),
                         ("tlora", b, -1.0)])
    wrong_order = reference(m, [("tlora", a, 0.8), ("lora", {p: first[p] for p in half}, 0.6), ("lora", later, -0.5),
                                ("tlora", b, -1.0)])
    got = forward(chain, m)
    assert float((wrong_order - want).abs().max()) > 100 * 2e-5 * float(want.abs().max()), "order must matter here"
    assert_close(got, want, "chain")


@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
def test_activation_equals_merged_and_strength_zero_is_the_base(sd15, loras_dir, strength):
    m, shapes = sd15
    files = R.random_adapters(shapes, seed=7)
    R.write_tlora(loras_dir / "act_one.safetensors", files)
    base = forward(m.patcher, m)
    act = forward(tlora(m.patcher, "act_one.safetensors", strength, "activation"), m)
    assert_close(act, reference(m, [("tlora", files, strength)]), f"activation at {strength}")
    assert_close(act, forward(tlora(m.patcher, "act_one.safetensors", strength, "merged"), m), "merged")
    assert torch.equal(forward(tlora(m.patcher, "act_one.safetensors", 0.0, "activation"), m), base)
    # auto on float weights merges (nothing activation-side), and the base is back bit for bit afterwards.
    auto = tlora(m.patcher, "act_one.safetensors", strength, "auto")
    assert auto.patches and not any(k.endswith(".forward") for k in auto.object_patches)
    assert torch.equal(forward(m.patcher, m), base)


def test_an_unknown_mode_is_refused(sd15, loras_dir):
    m, shapes = sd15
    R.write_tlora(loras_dir / "act_mode.safetensors", R.random_adapters(shapes, seed=9))
    with pytest.raises(Exception, match="mode 'bypass': expected one of auto, merged, activation"):
        tlora(m.patcher, "act_mode.safetensors", 1.0, "bypass")


@pytest.mark.skipif(ch.host_version() < (0, 33), reason="clone(force_deepcopy=...) reloads through cached_patcher_init")
def test_a_clone_over_a_new_model_runs_its_own_layers(sd15, loras_dir):
    """TrainLoraNode's deep clone and the dynamic-VRAM delegate load a fresh model: our object patches follow it."""
    m, shapes = sd15
    R.write_tlora(loras_dir / "act_clone.safetensors", R.random_adapters(shapes, seed=11))
    patched = tlora(m.patcher, "act_clone.safetensors", 0.7, "activation")
    fresh = patched.clone(force_deepcopy=True)
    assert fresh.model is not patched.model
    layer_forwards = [(k, v) for k, v in fresh.object_patches.items() if k.endswith(".forward")]
    import comfy.utils
    assert layer_forwards and all(v.module is comfy.utils.get_attr(fresh.model, k.removesuffix(".forward"))
                                  for k, v in layer_forwards)
    assert_close(forward(fresh, m), forward(patched, m), "deep clone")
