"""Latents and text-encoder outputs cached on disk (issue 25, 1) against the real ComfyUI host's encoders.

Cached encodings must equal fresh ones exactly, and a change of model (VAE, text encoder, a LoRA on
CLIP), caption or resolution must miss: the reference is always a fresh encode without the cache.
"""
from __future__ import annotations

import pytest
import torch

from tests.host.test_train import DEFAULTS, images, pack, train


def encode(sd15, captions, resolution=64, disk=None, clip=None, vae=None):
    model, base_clip, base_vae = sd15
    data = pack("trainer.comfy.data")
    with torch.inference_mode():
        prepared = data.prepare_data(model.model, clip or base_clip, vae or base_vae, data.split_images(images()),
                                     captions, DEFAULTS["instance_prompt"], resolution, False,
                                     device=torch.device("cpu"), disk=disk)
    return [(ex.latent, ex.cond) for ex in prepared.data.instance]


def assert_same(a, b):
    assert len(a) == len(b)
    for (la, ca), (lb, cb) in zip(a, b):
        assert torch.equal(la, lb) and ca.keys() == cb.keys()
        assert all(torch.equal(ca[k], cb[k]) for k in ca)


def count(cache):
    hits, misses = cache.hits, cache.misses
    cache.hits = cache.misses = 0
    return hits, misses


@pytest.fixture(scope="module")
def sd15(tm):
    return tm.tiny_sd15(seed=0), tm.tiny_clip(seed=0), tm.tiny_vae(seed=0)


def test_cached_encodings_equal_fresh_ones_and_follow_what_they_depend_on(sd15, tm, tmp_path):
    C = pack("trainer.cache")
    captions = ["a photo of sks dog", "sks dog on grass"]
    fresh = encode(sd15, captions)
    cache = C.EncodingCache(str(tmp_path))
    assert_same(encode(sd15, captions, disk=cache), fresh)
    assert count(cache) == (0, 5)  # two latents, two captions, the empty prompt
    again = C.EncodingCache(str(tmp_path))  # a later run (or a resume) reading the same folder
    assert_same(encode(sd15, captions, disk=again), fresh)
    assert count(again) == (5, 0)
    # Another caption: that caption misses, the latents and the other caption are read back.
    changed = ["a photo of sks dog", "sks dog in snow"]
    assert_same(encode(sd15, changed, disk=again), encode(sd15, changed))
    assert count(again) == (4, 1)
    # Another resolution: every latent and (the latent size is in SD's conditioning key) every caption misses.
    assert_same(encode(sd15, captions, 128, disk=again), encode(sd15, captions, 128))
    assert count(again) == (0, 5)
    # Another text encoder, or a LoRA-style patch on this one: the captions miss, the latents do not.
    other_clip = tm.tiny_clip(seed=1)
    assert_same(encode(sd15, captions, disk=again, clip=other_clip), encode(sd15, captions, clip=other_clip))
    assert count(again) == (2, 3)
    patched = sd15[1].clone()
    key = next(k for k in patched.patcher.model.state_dict() if k.endswith("q_proj.weight"))
    weight = patched.patcher.model.state_dict()[key]
    patched.add_patches({key: (torch.full_like(weight, 0.01),)}, 1.0)
    assert_same(encode(sd15, captions, disk=again, clip=patched), encode(sd15, captions, clip=patched))
    assert count(again) == (2, 3)
    # Another VAE: the latents miss.
    other_vae = tm.tiny_vae(seed=1)
    assert_same(encode(sd15, captions, disk=again, vae=other_vae), encode(sd15, captions, vae=other_vae))
    assert count(again) == (3, 2)


def test_the_node_trains_from_the_cache_as_from_fresh_encodings(sd15, loras_dir, tmp_path, monkeypatch):
    run = pack("trainer.comfy.run")
    monkeypatch.setattr(run, "cache_dir", lambda: str(tmp_path / "cache"))
    model, clip, vae = sd15
    plain = train(model, clip, vae, output_name="plain")[2]["adapters"]
    first = train(model, clip, vae, output_name="cached", cache_encodings=True)[2]["adapters"]
    second = train(model, clip, vae, output_name="cached_again", cache_encodings=True)[2]["adapters"]
    for adapters in (first, second):
        for key, adapter in plain.items():
            for name, tensor in adapter.tensors.items():
                assert torch.allclose(adapters[key].tensors[name], tensor, atol=1e-6), (key, name)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) >= 3  # two latents, a caption, the empty one
