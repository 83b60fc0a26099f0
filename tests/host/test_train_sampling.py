"""The training schedule is the model's sampling as patched: ModelSampling* nodes in front of Train TLoRA.

Every check is against the host's own sampling functions (noise_scaling, calculate_input,
calculate_denoised of the patched object), never against the pack's schedule code: the
network's training input must be what sampling feeds it, and the training target passed through
the host's calculate_denoised must give back the clean latent exactly.
"""
from __future__ import annotations

import pytest
import torch

from harness import comfy_host as ch
from tests.host import tlora_refs as R
from tests.host.test_train import train

@pytest.fixture(scope="module")
def sd15(tm):
    """(tiny SD1.5, its CLIP, a TAESD): an eps model the patches re-parametrise."""
    return tm.tiny_sd15(seed=0), tm.tiny_clip(seed=0), tm.tiny_vae(0)


def _patched(node: str, patcher, **inputs):
    """The MODEL a ModelSampling* node returns, called as the executor calls it (skips what this host lacks)."""
    cls = ch.node_class(node)
    sampling = inputs.get("sampling")
    spec = getattr(cls, "INPUT_TYPES", None)
    if sampling is not None and callable(spec):
        options = spec()["required"]["sampling"][0]
        if sampling not in options:
            pytest.skip(f"{ch.host_label()}'s {node} has no {sampling!r} sampling")
    fn = getattr(cls, getattr(cls, "FUNCTION", "patch"), None)
    if fn is not None:
        return fn(cls(), patcher, **inputs)[0]
    return cls.execute(model=patcher, **inputs).result[0]  # a V3 node


PATCHES = [
    ("ModelSamplingDiscrete", {"sampling": "v_prediction", "zsnr": True}, "v"),
    ("ModelSamplingDiscrete", {"sampling": "v_prediction", "zsnr": False}, "v"),
    ("ModelSamplingDiscrete", {"sampling": "eps", "zsnr": True}, "eps"),
    ("ModelSamplingDiscrete", {"sampling": "x0", "zsnr": False}, "x0"),
    ("ModelSamplingDiscrete", {"sampling": "lcm", "zsnr": False}, "lcm"),
    ("ModelSamplingContinuousEDM", {"sampling": "edm", "sigma_max": 80.0, "sigma_min": 0.002}, "edm"),
    ("ModelSamplingContinuousEDM", {"sampling": "v_prediction", "sigma_max": 120.0, "sigma_min": 0.002}, "v"),
    ("ModelSamplingContinuousEDM", {"sampling": "eps", "sigma_max": 120.0, "sigma_min": 0.002}, "eps"),
    ("ModelSamplingSD3", {"shift": 4.5}, "flow"),
]


@pytest.mark.parametrize("node,inputs,label", PATCHES, ids=[f"{n}-{'-'.join(map(str, i.values()))}"
                                                           for n, i, _ in PATCHES])
def test_schedule_is_the_patched_sampling(sd15, node, inputs, label):
    """Input = the host's calculate_input(noise_scaling(...)); target -> calculate_denoised -> x0, exactly."""
    m = sd15[0]
    patched = _patched(node, m.patcher, **inputs)
    ms = patched.get_model_object("model_sampling")
    assert ms is not m.model.model_sampling  # the patch is an object patch the sampler uses
    schedule = R.pack("trainer.comfy.model").schedule_for(patched)
    assert schedule.prediction == label
    assert len(schedule) == len(ms.sigmas) and torch.equal(schedule.timesteps, ms.sigmas.float())
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 4, 8, 8, generator=g,
                                                                                      dtype=torch.float64)
    idx = torch.tensor([0, len(schedule) // 3, (2 * len(schedule)) // 3, len(schedule) - 1])
    sigma = ms.sigmas[idx].double()
    x = ms.noise_scaling(sigma, noise.clone(), x0.clone())
    net_input = ms.calculate_input(sigma, x)
    torch.testing.assert_close(schedule.add_noise(x0, noise, idx).double(), net_input, rtol=1e-5, atol=1e-5)
    target = schedule.target(x0, noise, idx).double()
    torch.testing.assert_close(ms.calculate_denoised(sigma, target, x), x0, rtol=1e-4, atol=1e-4)
    # The previews' inverse: (x0, noise) back from the input and a perfect prediction.
    got_x0, got_noise = schedule.split(net_input.float(), target.float(), idx)
    torch.testing.assert_close(got_x0.double(), x0, rtol=1e-3, atol=1e-3)


def test_v_prediction_zsnr_patch_trains_v_and_says_so(sd15, loras_dir):
    """ModelSamplingDiscrete(v_prediction, zsnr) in front of the node: v target, zero-terminal-SNR sigmas, metadata v."""
    import comfy.model_sampling as cms
    m, clip, vae = sd15
    patched = _patched("ModelSamplingDiscrete", m.patcher, sampling="v_prediction", zsnr=True)
    schedule = R.pack("trainer.comfy.model").schedule_for(patched)
    zsnr = cms.rescale_zero_terminal_snr_sigmas(m.model.model_sampling.sigmas.double())
    torch.testing.assert_close(schedule.noise / schedule.signal, zsnr, rtol=1e-4, atol=1e-6)  # b / a = sigma
    out = train(patched, clip, vae, steps=2, output_name="zsnr_v")
    assert out[2]["metadata"]["tlora.train.prediction"] == "v"


def test_img_to_img_flow_patch_is_refused_naming_it(sd15):
    """A sampling that adds no noise has no denoising target: refused in one line naming the patch node."""
    m, clip, vae = sd15
    patched = _patched("ModelSamplingDiscrete", m.patcher, sampling="img_to_img_flow", zsnr=False)
    with pytest.raises(Exception, match=r"^Train TLoRA cannot follow the model's sampling as patched by "
                                        r"ModelSamplingDiscrete .*adds no noise") as err:
        train(patched, clip, vae, steps=2, output_name="i2i")
    assert "\n" not in str(err.value)


def test_audio_model_is_refused_by_what_it_lacks(tm):
    """A model whose latents are not images or clips (Stable Audio, built by the host) is refused before encoding."""
    with pytest.raises(Exception, match=r"^Train TLoRA cannot train StableAudio models: their latents are "
                                        r"audio-shaped \(1-D\)"):
        R.pack("trainer.comfy.model").refuse_untrainable(_meta_audio_model())


def _meta_audio_model():
    """Stable Audio's BaseModel, its transformer on the meta device (its seconds embedders as the host builds them)."""
    import comfy.ldm.audio.embedders as emb
    import comfy.supported_models as sm
    seconds = emb.NumberConditioner(768, min_val=0, max_val=512).state_dict()
    sd = {f"conditioner.conditioners.{which}.{k}": v for which in ("seconds_start", "seconds_total")
          for k, v in seconds.items()}
    return sm.StableAudio({"audio_model": "dit1.0"}).get_model(sd, device=torch.device("meta"))
