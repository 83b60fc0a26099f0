"""Training on a quantized frozen base in the real host: fp8 weights (Load Diffusion Model's fp8_e4m3fn) and a
ComfyUI-GGUF model (its reader, GGMLOps layers and GGUFModelPatcher).

The frozen layers run as the host stores them (the run-time layer wraps their own forward); only the
adapter is float32. The run lowers the denoising loss of the quantized model, its stored bytes never
change, and the file is a normal TLoRA file: applied to the float model it gives exactly the dense
float64 patch of that model's weights.
"""
from __future__ import annotations

import pytest
import torch

from harness import comfy_host as ch
from tests.host import tlora_refs as R
from tests.host.test_train import eval_loss, images, prepared_for, train

pytestmark = pytest.mark.skipif(ch.host_version() < (0, 33), reason="the GGUF twin needs ComfyUI-GGUF (0.33 host)")


@pytest.mark.parametrize("fmt", ["fp8", "gguf_q8_0"])
def test_training_on_a_quantized_base(tm, loras_dir, fmt):
    from harness import quantized as q
    twin = q.twin("sd15", fmt, seed=0)
    clip, vae = tm.tiny_clip(seed=0), tm.tiny_vae(seed=0)
    imgs = images()
    stored = q.stored(twin.patcher.model)
    prepared = prepared_for(twin.patcher, clip, vae, imgs)
    before = eval_loss(twin.patcher, prepared)
    new_model, _, payload, _, file_name = train(twin.patcher, clip, vae, imgs, steps=30, learning_rate=1e-2,
                                                output_name=f"quantized_{fmt}")
    after = eval_loss(new_model, prepared)
    ch.free_models()
    assert after < 0.9 * before, (before, after)
    now = q.stored(twin.patcher.model)
    assert now.keys() == stored.keys() and all(torch.equal(now[k], v) for k, v in stored.items()), \
        "training wrote into the stored weights"
    adapters = payload["adapters"]
    assert adapters and all(t.dtype == torch.float32 for a in adapters.values() for t in a.tensors.values())

    # A normal file: our loader applies it to the float model the twin was quantized from, exactly.
    from tlora import load
    loaded = load(loras_dir / file_name)
    assert set(loaded.adapters) == set(adapters)
    float_model = tm.tiny_sd15(seed=0, model_channels=q.SD15_CHANNELS)
    keys = [k + ".weight" for k in loaded.adapters]
    base = R.base_weights(float_model.patcher, keys)
    patched = R.patched_weights(R.tlora_model_only(float_model.patcher, file_name, 1.0), keys)
    for prefix, adapter in loaded.adapters.items():
        key = prefix + ".weight"
        expected = R.ref_patched(base[key], adapter.tensors, 1.0)
        assert not torch.allclose(expected, base[key].double(), atol=1e-6), f"{prefix} did not train"
        R.assert_close64(patched[key], expected, f"{fmt}-trained {prefix} on the float model")
