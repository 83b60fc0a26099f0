"""A run that diverges in real ComfyUI keeps only an adapter that still renders (issue 28 item 1).

The issue's run: lr 1.0, DCO, 40 steps, no periodic saves. Its "last good" file rendered a black
image (mean 0, std 0) through the stock loader: the adapter the NaN loss came from.
"""
from __future__ import annotations

import pytest

from tests.host.test_train import pack, sd15, tm, train  # noqa: F401  (fixtures)


def test_a_diverged_run_keeps_an_adapter_that_renders_or_says_none_exists(sd15, tm, loras_dir):
    import torch
    import nodes
    model, clip, vae = sd15
    engine = pack("trainer")
    with pytest.raises(engine.TrainingDiverged) as info:
        train(model, clip, vae, steps=40, learning_rate=1.0, loss="dco", save_every=0, output_name="diverged")
    message = str(info.value)
    path = loras_dir / "diverged.safetensors"
    if "Nothing was saved" in message:
        assert not path.exists() and not (loras_dir / "diverged.tlora-state").exists()
        return
    assert path.is_file() and not (loras_dir / "diverged.tlora-state").exists()
    pos, neg = tm.encode_text(clip, "a photo of sks dog"), tm.encode_text(clip, "")
    stock, _ = nodes.LoraLoader().load_lora(model.patcher, clip, path.name, 1.0, 1.0)
    for seed in range(3):
        latent = tm.sample(stock, seed=seed, positive=pos, negative=neg, steps=4)
        assert bool(torch.isfinite(latent).all()), f"seed {seed}: the kept adapter gives non-finite latents"
        image = vae.decode(latent)
        assert bool(torch.isfinite(image).all()) and float(image.std()) > 0, f"seed {seed}: a flat image"
