"""What newer ComfyUI (0.33) asks of an adapter and of a trainer, on the real host.

* 0.33's low-VRAM and dynamic-VRAM paths rebuild every patch as `type(p)(p.loaded_keys, w)`
  each time its weights are cast for a use (`comfy.lora.prefetch_prepared_value`, driven by
  `LowVramPatch.prepare`): our patch must stay exact there and must not re-validate its
  tensors (a full read of every value, a device sync on a GPU) per layer per step.
* `comfy.lora.calculate_shape` asks each adapter for the patched shape.
* Training under dynamic VRAM (the default on GPUs from 0.33) runs on the host's own
  non-dynamic delegate. `ModelPatcherDynamic` cannot be constructed on a CPU (its `__new__`
  gives a plain ModelPatcher for a CPU device and comfy_aimdo's host buffers need CUDA), so the
  test takes a patcher from the real checkpoint loader and gives it the real class afterwards:
  what runs is the host's own `get_non_dynamic_delegate` and reload. Training itself under
  the delegate is the ordinary resident path every other training test runs.
"""
from __future__ import annotations

import pytest
import torch

from harness import comfy_host as ch
from tests.host.tlora_refs import pack, random_adapters, ref_patched, unet_shapes



def _patch_for(key: str, tensors: dict) -> object:
    """Our patch as the host's loader builds it (the registry's `load`)."""
    cls = pack("nodes.comfy_adapter").TLoRAWeightAdapter
    return cls.load(key, {f"{key}.{s}": t for s, t in tensors.items()})


def _tensors(shape, seed: int) -> dict:
    """A trained-looking adapter's tensors by suffix (transform and residual away from their start)."""
    key = "m"
    return dict(random_adapters({key: shape}, seed=seed)[key].tensors)


def test_a_patch_rebuilt_by_the_host_stays_exact_and_is_not_validated_again(tm, monkeypatch):
    import comfy.lora
    import comfy.model_patcher
    if not hasattr(comfy.model_patcher, "LowVramPatch") or not hasattr(comfy.lora, "prefetch_prepared_value"):
        pytest.skip(f"{ch.host_label()} does not rebuild patches per use (0.33 does)")
    m = tm.tiny_sd15(seed=0)
    shapes = unet_shapes(m.model, convs=False)
    key = next(k for k in shapes if k.endswith("attn1.to_q"))
    tensors = _tensors(shapes[key], seed=3)
    patch = _patch_for(key, tensors)
    w0 = m.model.state_dict()[key + ".weight"].float()
    weight_key = key + ".weight"
    lowvram = comfy.model_patcher.LowVramPatch(weight_key, {weight_key: [(1.0, patch, 1.0, None, None)]})
    buffer = torch.zeros(lowvram.memory_required(), dtype=torch.uint8)
    adapter_cls = pack("tlora.adapter").ModuleAdapter
    validations = []
    real_validate = adapter_cls._validate
    monkeypatch.setattr(adapter_cls, "_validate", lambda self: validations.append(self.name) or real_validate(self))
    prepared = lowvram.prepare(buffer, None)
    rebuilt = prepared[0][1]
    assert type(rebuilt) is type(patch) and rebuilt is not patch
    # The host copied our tensors into its buffer: the rebuilt patch reads those copies...
    assert all(t.data_ptr() != s.data_ptr() for t, s in zip(rebuilt.weights[1:], patch.weights[1:]))
    out = rebuilt.calculate_weight(w0.clone(), weight_key, 1.0, 1.0, None, lambda a: a)
    # ...exactly as the dense float64 reference says, and never validated them again.
    torch.testing.assert_close(out.double(), ref_patched(w0.double(), tensors, 1.0), rtol=1e-5, atol=1e-6)
    assert validations == []
    # Copies that do not match what was validated (another shape) are validated, and refused.
    bad = type(patch)(patch.loaded_keys, (patch.weights[0], *(t[:1] if t.dim() else t for t in patch.weights[1:])))
    with pytest.raises(Exception, match="core|shape|residual|transform"):
        bad.calculate_weight(w0.clone(), weight_key, 1.0, 1.0, None, lambda a: a)
    assert validations


def test_calculate_shape_keeps_the_weight_shape(tm):
    import comfy.lora
    m = tm.tiny_sd15(seed=0)
    shapes = unet_shapes(m.model, convs=True)
    key = next(k for k, s in shapes.items() if len(s) == 4)  # a conv
    patch = _patch_for(key, _tensors(shapes[key], seed=1))
    assert patch.calculate_shape(key + ".weight") is None
    if hasattr(comfy.lora, "calculate_shape"):
        weight = m.model.state_dict()[key + ".weight"]
        assert tuple(comfy.lora.calculate_shape([(1.0, patch, 1.0, None, None)], weight, key + ".weight")) \
            == tuple(weight.shape)


def test_training_under_dynamic_vram_runs_on_the_hosts_non_dynamic_delegate(comfy_host, host_checkpoint, tm,
                                                                          loras_dir):
    import comfy.model_patcher as mp
    import nodes
    if not hasattr(mp, "ModelPatcherDynamic") or not hasattr(mp.ModelPatcherDynamic, "get_non_dynamic_delegate"):
        pytest.skip(f"{ch.host_label()} has no non-dynamic delegate (0.33 has)")
    comfy_host.require_pack()
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(host_checkpoint)[:3]
    assert model.cached_patcher_init is not None  # the real loader says how to reload without dynamic VRAM

    dynamic = model.clone()
    dynamic.__class__ = mp.ModelPatcherDynamic  # the real class (its constructor gives CPUs a plain patcher)
    dynamic.non_dynamic_delegate_model = None  # what its __init__ sets (0.33)
    assert dynamic.is_dynamic()
    key = next(k for k in dynamic.model.state_dict() if k.endswith("attn1.to_q.weight"))
    dynamic.add_patches({key: (torch.ones_like(dynamic.model.state_dict()[key]),)}, 0.5)  # a LoRA upstream
    run = pack("trainer.comfy.run")
    resident = run.resident_patcher(dynamic)
    assert not resident.is_dynamic() and type(resident) is mp.ModelPatcher
    assert resident.model is not dynamic.model  # a model of its own, reloaded as the host reloads for hooks
    # Same weights, same patches as the dynamic patcher had.
    a, b = dynamic.model.state_dict(), resident.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resident.patches.keys() == dynamic.patches.keys() == {key}
    # The node trains through it: a file comes out, and the dynamic patcher's model was never wrapped.
    from tests.host.test_train import train, wrappers_left
    tiny = tm.tiny_sd15(seed=0)
    streaming = tiny.patcher.clone()
    streaming.__class__ = mp.ModelPatcherDynamic
    streaming.non_dynamic_delegate_model = None
    before = set(loras_dir.iterdir())
    calls = []
    hook = tiny.model.diffusion_model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        train(streaming, tm.tiny_clip(seed=0), tm.tiny_vae(seed=0), steps=2, output_name="dynamic_delegate")
    finally:
        hook.remove()
    written = set(loras_dir.iterdir()) - before
    assert [p.name for p in written if p.suffix == ".safetensors"] == ["dynamic_delegate.safetensors"]
    assert calls == [] and wrappers_left(tiny) == 0  # the streaming model never ran a training step
    # A patcher without a way back to resident weights is refused, saying what to do.
    bare = model.clone()
    bare.__class__ = mp.ModelPatcherDynamic
    bare.non_dynamic_delegate_model = None
    bare.cached_patcher_init = None
    with pytest.raises(Exception, match="--disable-dynamic-vram"):
        run.resident_patcher(bare)
