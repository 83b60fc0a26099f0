"""Training on flow-matching transformers (Flux, SD3/SD3.5) inside the real host, in-process, on CPU.

Tiny twins from the host's own classes: the diffusion model (harness.tiny_models.tiny_dit), its
multi-encoder CLIP with ComfyUI's real tokenizers (Flux: CLIP-L + T5; SD3: CLIP-L + CLIP-G) and a
16-channel TAESD. The training node runs as the executor calls it; the saved file is then applied
by the stock loader and ours and compared with the dense reference.
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.host import tlora_refs as R
from tests.host.test_train import images, train

FLOW = ("flux", "sd3", "qwen-image")


@pytest.fixture(scope="module", params=FLOW)
def flow_model(request, tm):
    """(family, tiny model, its CLIP, a 16-channel VAE).

    Qwen-Image's text encoder is Qwen2.5-VL, whose vision tower the host builds at full size
    (about 670 M parameters) whatever the config: its tiny twin is conditioned by the tiny Flux
    CLIP (a real host encoder with a 64-wide T5 sequence, which is what the twin's txt_in takes).
    """
    family = request.param
    clip = tm.tiny_clip(seed=0, kind="flux" if family == "qwen-image" else family)
    return family, tm.tiny_dit(family, seed=0), clip, tm.tiny_vae(0, latent_channels=16)


def _subject(n: int = 2):
    """Two smooth images the model can fit in a few steps."""
    return images(n=n, size=64, seed=4)


def test_schedule_is_the_models_flow_with_its_shift(flow_model):
    """Velocity target, the model's own shifted sigmas, logit-normal weights that sum to one."""
    family, m, _, _ = flow_model
    schedule = R.pack("trainer.comfy.model").schedule_for(m.model)
    ms = m.model.model_sampling
    assert schedule.prediction == "flow"
    assert torch.equal(schedule.noise, ms.sigmas.double())
    # The denoiser gets the sigma; the host turns it into what the network is told (sigma x its multiplier).
    assert torch.equal(schedule.timesteps, ms.sigmas.float())
    x0, noise = torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8)
    idx = torch.tensor([len(schedule) // 3])
    s = float(ms.sigmas[idx])
    assert torch.allclose(schedule.add_noise(x0, noise, idx), (1 - s) * x0 + s * noise, atol=1e-6)
    assert torch.equal(schedule.target(x0, noise, idx), noise - x0)
    w = schedule.weights
    assert w is not None and math.isclose(float(w.sum()), 1.0, rel_tol=1e-9)
    middle, edge = int(w.argmax()), len(w) - 1
    assert abs(middle - len(w) / 2) <= 2 and w[edge] < w[middle] / 50  # logit-normal: mode at t = 0.5


def _denoising_error(patcher, vae, clip, imgs, caption: str) -> float:
    """x0 error of the host's own apply_model at fixed noise and sigmas 0.3/0.5/0.7 (independent of the trainer)."""
    from harness import tiny_models as tm
    patcher.patch_model(device_to=torch.device("cpu"))
    try:
        base = patcher.model
        with torch.no_grad():
            raw = vae.encode(imgs[..., :3]).float()
            if type(base.model_config).__name__ == "QwenImage":
                raw = raw.unsqueeze(2)  # Qwen-Image takes (B, C, frames, H, W); the image is one frame
            lat = base.process_latent_in(raw)
            text = tm.encode_text(clip, caption)
            noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(0))
            total = 0.0
            for sigma in (0.3, 0.5, 0.7):
                x = sigma * noise + (1 - sigma) * lat  # CONST noise scaling
                conds = base.extra_conds(noise=x, cross_attn=text[0][0].expand(x.shape[0], -1, -1),
                                         pooled_output=text[0][1]["pooled_output"].expand(x.shape[0], -1),
                                         device=x.device)
                kwargs = {k: v.process_cond(batch_size=x.shape[0], device=x.device).cond for k, v in conds.items()}
                denoised = base.apply_model(x, torch.full((x.shape[0],), sigma), **kwargs)
                total += float(((denoised.float() - lat) ** 2).mean())
        return total / 3
    finally:
        patcher.unpatch_model(device_to=torch.device("cpu"))


@pytest.mark.parametrize("loss", ["mse", "dco"])
def test_a_few_steps_lower_the_loss_and_both_loaders_apply_the_file(flow_model, loras_dir, loss):
    """The trained file lowers the host's denoising error on the subject; stock and our loader apply it exactly."""
    family, m, clip, vae = flow_model
    imgs, caption = _subject(), "a photo of sks dog"
    out = train(m, clip, vae, imgs, instance_prompt=caption, steps=30, learning_rate=5e-3, loss=loss,
                output_name=f"flow_{family}_{loss}", batch_size=2)
    payload = out[2]
    assert payload["metadata"]["tlora.train.prediction"] == "flow"
    assert payload["steps"] == 30 and all(math.isfinite(h["loss"]) for h in payload["history"])
    name = payload["file_name"]
    assert (loras_dir / name).is_file()
    before = _denoising_error(m.patcher, vae, clip, imgs, caption)
    after = _denoising_error(R.tlora_model_only(m.patcher, name, 1.0), vae, clip, imgs, caption)
    # DCO holds the base model's behaviour (beta 1000), so it moves less in 30 steps than plain MSE.
    factor = 0.9 if loss == "mse" else 0.98
    assert after < factor * before, f"{family} {loss}: denoising error {before:.4f} -> {after:.4f}"
    adapters = R.pack("tlora.format").load_file(str(loras_dir / name))
    keys = [f"{p}.weight" for p in adapters]
    attn = [n for n, mod in m.model.diffusion_model.named_modules()
            if isinstance(mod, torch.nn.Linear) and R.pack("tlora.arch").path_in_groups(n, ("attn",))]
    assert sorted(keys) == sorted(f"diffusion_model.{n}.weight" for n in attn)  # targets=attn: every attention weight
    base = R.base_weights(m.patcher, keys)
    for got in (R.patched_weights(R.stock_model_only(m.patcher, name, 1.0), keys),
                R.patched_weights(R.tlora_model_only(m.patcher, name, 1.0), keys)):
        for prefix, adapter in adapters.items():
            key = f"{prefix}.weight"
            R.assert_close64(got[key], R.ref_patched(base[key], adapter.tensors, 1.0), f"{family} {key}")


def test_gradient_checkpointing_of_transformer_blocks_changes_nothing(flow_model):
    """Checkpointed DiT blocks (recomputed in the backward) train the same adapter as plain ones."""
    family, m, clip, vae = flow_model
    blocks = R.pack("trainer.comfy.model").checkpoint_blocks(m.model.diffusion_model)
    expected = {"flux": {"DoubleStreamBlock", "SingleStreamBlock"}, "sd3": {"JointBlock"},
                "qwen-image": {"QwenImageTransformerBlock"}}[family]
    assert blocks and {type(b).__name__ for b in blocks} >= expected
    runs = [train(m, clip, vae, _subject(), steps=3, learning_rate=5e-3, loss="mse", output_name=f"gc_{family}",
                  gradient_checkpointing=flag)[2]["adapters"] for flag in (False, True)]
    assert runs[0].keys() == runs[1].keys()
    for prefix in runs[0]:
        for name, t in runs[0][prefix].tensors.items():
            torch.testing.assert_close(runs[1][prefix].tensors[name], t, rtol=1e-5, atol=1e-6,
                                       msg=lambda msg: f"{family} {prefix}.{name}: {msg}")
