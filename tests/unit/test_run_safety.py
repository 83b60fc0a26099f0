"""What a run keeps when it goes wrong, and what it refuses before it starts (the engine, host-free).

The model is tests/unit/test_engine.py's tiny denoiser. Where a run must diverge for real (no
poisoned step), the model overflows as a half-precision model does: its output is NaN once its
transform's entries pass a limit, whatever the input, the way the issue's lr-1.0 runs rendered
black images from the kept file. With lr 0.05 the transform cores grow by about 0.05 a step from
0.5 (0.55, 0.60, 0.65, 0.695, 0.740, ...), so a limit of 0.72 is first passed by the adapter after
step 5.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from harness.pack import pack_module
from tests.unit.test_engine import E, TinyNet, make_data, run, schedule, settings, tformat

module = pack_module("tlora.module")
LIMIT = 0.72


def overflowing(net, limit=LIMIT):
    """The tiny model, NaN everywhere once any attached transform core has an entry above `limit`."""
    def denoise(x, t, cond):
        cores = [p for m in net.modules() if type(m).__name__ == "TLoRAModule"
                 for k, p in m.adapter_params.items() if k.startswith("tlora_t")]
        out = net(x, t, cond["c_crossattn"])
        return out * float("nan") if cores and max(float(p.detach().abs().max()) for p in cores) > limit else out
    return denoise


@torch.no_grad()
def outputs_of(net, adapters, draws=24):
    """The overflowing model's outputs over many (noise, timestep, image) draws with these adapters attached."""
    denoise, sched, data = overflowing(net), schedule(), make_data()
    wrapped = module.attach(net, {k.removeprefix("diffusion_model."): v for k, v in adapters.items()},
                            trainable=False)
    try:
        g = torch.Generator().manual_seed(99)
        out = []
        for i in range(draws):
            ex = data.instance[i % len(data.instance)]
            x0 = ex.latent[None]
            noise = torch.randn(x0.shape, generator=g)
            idx = torch.randint(1000, (1,), generator=g)
            out.append(denoise(sched.add_noise(x0, noise, idx), sched.timesteps[idx], ex.cond))
        return torch.cat(out)
    finally:
        module.detach(net, list(wrapped))


def diverging(net, tmp_path, name, steps, **kw):
    return run(net, tmp_path, name, steps=steps, learning_rate=0.05, form="factored", denoiser=overflowing(net), **kw)


# ----- divergence ----------------------------------------------------------------------------------
def test_a_diverged_run_keeps_an_adapter_whose_outputs_are_finite(tmp_path):
    """The NaN loss of step 6 is the output of the adapter after step 5: the file is the one after step 4."""
    with pytest.raises(E.TrainingDiverged, match="loss became nan at step 6") as info:
        diverging(TinyNet(), tmp_path, "d.safetensors", 40)
    loaded = tformat.load(str(tmp_path / "d.safetensors"))
    assert loaded.metadata["tlora.train.stopped"] == "diverged" and loaded.metadata["tlora.train.steps"] == "4"
    assert "adapter from step 4 is the last whose outputs were finite" in str(info.value)
    assert bool(torch.isfinite(outputs_of(TinyNet(), loaded.adapters)).all())
    # No state sidecar for a diverged save: its optimizer state would be that of another step.
    assert not os.path.exists(tmp_path / "d.tlora-state")


def test_a_final_adapter_with_nan_outputs_is_not_saved_as_finished(tmp_path):
    """The adapter after the last step was never run by a training step: it is checked before it is kept."""
    with pytest.raises(E.TrainingDiverged, match="output of the final adapter became nan at step 5"):
        diverging(TinyNet(), tmp_path, "f.safetensors", 5)
    loaded = tformat.load(str(tmp_path / "f.safetensors"))
    assert loaded.metadata["tlora.train.partial"] == "true" and loaded.metadata["tlora.train.steps"] == "4"
    assert bool(torch.isfinite(outputs_of(TinyNet(), loaded.adapters)).all())


def test_divergence_before_any_finite_step_saves_nothing_and_says_so(tmp_path):
    net = TinyNet()
    with pytest.raises(E.TrainingDiverged, match="Nothing was saved: no step of this run had finished"):
        run(net, tmp_path, "none.safetensors", steps=40, learning_rate=0.05, denoiser=overflowing(net, limit=0.4))
    assert os.listdir(tmp_path) == []  # no adapter, no stray sidecar


# ----- names, resume, prior ------------------------------------------------------------------------
def test_two_runs_started_with_one_output_name_both_keep_their_file(tmp_path):
    """Both chose the free name at the start; the second to write takes the next one instead of replacing."""
    def trainer(seed):
        net = TinyNet()
        binding = E.Binding([E.AdapterGroup(net, "diffusion_model.", E.create_adapters(
            net, E.select_targets(net, "attn"), "trm:2", "tr:2", "auto", seed, "diffusion_model."))],
            lambda x, t, c: net(x, t, c["c_crossattn"]), schedule(), make_data(), progress_bar=False)
        path, _ = pack_module("trainer.outputs").output_path(str(tmp_path), "same")
        return E.Trainer(binding, settings(steps=2, seed=seed), output_path=path)
    first, second = trainer(1), trainer(2)
    assert first.output_path == second.output_path  # both picked "same" while it was free
    a, b = first.run(), second.run()
    assert os.path.basename(a.path) == "same.safetensors" and os.path.basename(b.path) == "same_2.safetensors"
    for result, seed in ((a, 1), (b, 2)):
        meta = tformat.read_metadata(result.path)
        assert meta["tlora.train.seed"] == str(seed) and meta["tlora.train.run_id"] == result.run_id
        assert meta["ss_output_name"] == os.path.basename(result.path).removesuffix(".safetensors")
        assert E.TrainState.read(E.state_path_for(result.path)).run_token == meta["tlora.train.run_token"]


def test_resuming_with_another_seed_records_the_seed_that_drew_the_noise(tmp_path):
    full = run(TinyNet(), tmp_path, "full.safetensors", steps=4, seed=3)
    run(TinyNet(), tmp_path, "cut.safetensors", steps=2, seed=3)
    resumed = run(TinyNet(), tmp_path, "cut.safetensors", steps=4, seed=5, resume=str(tmp_path / "cut.safetensors"))
    meta = tformat.read_metadata(resumed.path)
    assert meta["tlora.train.seed"] == "3" and "seed 5 was not used" in meta["tlora.train.resume_note"]
    for key, adapter in full.adapters.items():  # it did continue seed 3's noise: the uninterrupted run's result
        for suffix, tensor in adapter.tensors.items():
            assert torch.allclose(resumed.adapters[key].tensors[suffix], tensor, atol=1e-6), (key, suffix)


def test_a_class_prompt_without_class_images_is_refused():
    """Prior preservation would silently be off while the file records the class prompt."""
    with pytest.raises(E.TrainingError, match="class_prompt is set but prior preservation has no class images"):
        run(TinyNet(), steps=1, class_prompt="a photo of a dog")


# ----- sizes -----------------------------------------------------------------------------------------
def test_ranks_that_cannot_fit_are_refused_before_anything_is_allocated():
    """2**24-wide weights on the meta device hold no memory; the adapters would need hundreds of GiB."""
    root = nn.Module()
    root.lin = nn.Linear(2 ** 24, 2 ** 24, bias=False, device="meta")
    with pytest.raises(E.TrainingError, match=r"training them needs about \d+\.\d GiB"):
        E.create_adapters(root, ["lin"], "none", "lora:1024")


def test_absurd_ranks_are_refused_by_the_settings():
    net = TinyNet()
    for field, value in (("transform", "trm:3000"), ("residual", "lora:100000"), ("residual", "tr:500")):
        with pytest.raises(E.TrainingError, match=f"{field} .* asks for rank"):
            E.adapter_group(net, "diffusion_model.", E.TrainSettings(**{field: value}))
