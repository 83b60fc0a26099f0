"""Our ComfyUI adapter registers by identity, beside a same-named method (T-LoRA), never in its place."""
from __future__ import annotations

import importlib

import pytest

from harness import comfy_host as ch
from tests.host.tlora_refs import random_adapters, stock_model_only, unet_shapes, write_tlora


def _adapter_module():
    return importlib.import_module(f"{ch.pack_module_name()}.nodes.comfy_adapter")


@pytest.fixture
def registry(comfy_host):
    """ComfyUI's adapter registries, restored after the test."""
    comfy_host.require_pack()
    import comfy.weight_adapter as wa
    adapters, maps = list(wa.adapters), dict(wa.adapter_maps)
    yield wa
    wa.adapters[:] = adapters
    wa.adapter_maps.clear()
    wa.adapter_maps.update(maps)


def _other_tlora_method(wa):
    """Stands in for another pack's T-LoRA (timestep-dependent LoRA): LyCORIS names it `tlora` too."""
    class TimestepLoRA(wa.WeightAdapterBase):
        name = "tlora"

        @classmethod
        def load(cls, x, lora, alpha=None, dora_scale=None, loaded_keys=None):
            return None  # its own keys (`x.lora_up.weight` + timestep masks) are not in our files
    return TimestepLoRA


def test_a_same_named_adapter_does_not_keep_ours_out(registry, tm, loras_dir):
    mod = _adapter_module()
    registry.adapters[:] = [a for a in registry.adapters if not mod._is_ours(a)]
    registry.adapters.append(_other_tlora_method(registry))
    assert mod.register() and mod.register()  # twice: still one entry of ours
    ours = [a for a in registry.adapters if mod._is_ours(a)]
    assert ours == [mod.TLoRAWeightAdapter] and any(a.name == "tlora" for a in registry.adapters)
    assert mod.TLoRAWeightAdapter.name != "tlora"
    # The stock loader applies our file with the other method registered before ours.
    m = tm.tiny_sd15(seed=0)
    shapes = unet_shapes(m.model, convs=False)
    write_tlora(loras_dir / "reg.safetensors", random_adapters(shapes, seed=8))
    patched = stock_model_only(m.patcher, "reg.safetensors", 1.0)
    assert set(patched.patches) == {k + ".weight" for k in shapes}


def test_a_stale_copy_of_ours_is_replaced_and_others_are_never_touched(registry):
    mod = _adapter_module()
    stale = type("TLoRAWeightAdapter", (registry.WeightAdapterBase,),
                 {"TLORA_PACK_ADAPTER": mod.TLoRAWeightAdapter.TLORA_PACK_ADAPTER})  # an earlier import's class
    other = _other_tlora_method(registry)
    registry.adapters[:] = [a for a in registry.adapters if not mod._is_ours(a)] + [stale, other]
    assert mod.register()
    assert stale not in registry.adapters and other in registry.adapters
    assert [a for a in registry.adapters if mod._is_ours(a)] == [mod.TLoRAWeightAdapter]


def test_trainer_algorithm_taken_by_another_pack_is_left_alone(registry, caplog):
    mod = _adapter_module()
    other = _other_tlora_method(registry)
    registry.adapter_maps[mod.TRAIN_ALGORITHM] = other
    assert mod.register_train_adapter() is False
    assert registry.adapter_maps[mod.TRAIN_ALGORITHM] is other
    assert "is taken by" in caplog.text
    del registry.adapter_maps[mod.TRAIN_ALGORITHM]
    assert mod.register_train_adapter() and registry.adapter_maps[mod.TRAIN_ALGORITHM] is mod.TLoRAWeightAdapter
