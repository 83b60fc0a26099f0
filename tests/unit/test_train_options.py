"""Training options (issue 25): optimizers, the parts' own rates, EMA, timestep draws, captions, validation.

Each on the engine's tiny denoiser (tests/unit/test_engine.py's TinyNet): the references are
independent (the libraries' own optimizers stepped by hand, the EMA recomputed in float64 from the
weights each step left, the draw distribution from its closed-form CDF), never the trainer's output.
"""
from __future__ import annotations

import hashlib
import math

import pytest
import torch

from harness.pack import pack_module
from tests.unit.test_engine import (E, Stop, TinyNet, eval_loss, groups_for, make_data, run, schedule, settings,
                                    stop_at, tformat)

O = pack_module("trainer.optim")
EMA = pack_module("trainer.ema")


def trainer_for(net, tmp_path=None, name="a.safetensors", data=None, observer=None, **cfg):
    """The engine's Trainer on the tiny net (test_engine.run's, kept for tests that look inside the run)."""
    binding = E.Binding(groups_for(net), lambda x, t, c: net(x, t, c["c_crossattn"]), schedule(),
                        data or make_data(), observer=observer, interrupt_types=(Stop,), progress_bar=False)
    return E.Trainer(binding, settings(**cfg), output_path=str(tmp_path / name) if tmp_path is not None else None)


def params_of(result):
    return {f"{k}.{n}": t for k, a in result.adapters.items() for n, t in a.tensors.items()}


def same(a, b, tol=0.0):
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    worst = max((pa[k] - pb[k]).abs().max().item() for k in pa)
    assert worst <= tol, worst


# (optimizer, learning rate, transform and residual rate scales): prodigyopt takes one rate for every part.
# Prodigy estimates its step size from d0 = 1e-6 up: it needs a few more steps to move.
OPTIMIZERS = [("adamw", 3e-3, 2.0, 0.5, 8), ("prodigy", 1.0, 1.0, 1.0, 14), ("adafactor", 3e-3, 2.0, 0.5, 8)]


@pytest.mark.parametrize("optimizer, lr, t_scale, r_scale, steps", OPTIMIZERS)
def test_each_optimizer_trains_the_tiny_twin_and_resumes_exactly(tmp_path, optimizer, lr, t_scale, r_scale, steps):
    data, sched = make_data(), schedule()
    cfg = dict(optimizer=optimizer, learning_rate=lr, steps=steps, transform_lr_scale=t_scale,
               residual_lr_scale=r_scale)
    full = run(TinyNet(), tmp_path, "full.safetensors", data=data, **cfg)
    before = eval_loss(TinyNet(), {}, data, sched)
    after = eval_loss(TinyNet(), full.adapters, data, sched)
    assert after < before * 0.98, (optimizer, before, after)
    with pytest.raises(Stop):
        run(TinyNet(), tmp_path, "part.safetensors", data=data, observer=stop_at(3), save_every=1, **cfg)
    path = str(tmp_path / "part.safetensors")
    assert tformat.load(path).metadata["tlora.train.optimizer"] == optimizer
    resumed = run(TinyNet(), tmp_path, "part.safetensors", data=data, resume=path, **cfg)
    same(full, resumed)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_parts_get_their_own_rates_as_the_library_optimizer_would_step_them():
    """One step with transform x3 / residual x0.5: each tensor moves as torch's AdamW moves it at that rate."""
    trainer = trainer_for(TinyNet(), steps=1, learning_rate=1e-2, transform_lr_scale=3.0, residual_lr_scale=0.5,
                          max_grad_norm=1e6)
    trainer.open()
    try:
        named = trainer._ordered_params()
        groups = {g["name"]: g["lr"] for g in trainer._optimizer.param_groups}
        assert groups == {"transform": pytest.approx(3e-2), "residual": pytest.approx(5e-3)}
        assert {O.part_of(n) for n, _ in named} == {"transform", "residual"}
        before = [p.detach().clone() for _, p in named]
        # The reference: torch's AdamW, one group per tensor at the rate its part should get.
        ref_params = [torch.nn.Parameter(b.clone()) for b in before]
        trainer.train_step()
        grads = [p.grad.detach().clone() for _, p in named]
        ref = torch.optim.AdamW([{"params": [rp], "lr": 1e-2 * (3.0 if O.part_of(n) == "transform" else 0.5)}
                                 for rp, (n, _) in zip(ref_params, named)], weight_decay=1e-4, eps=1e-8)
        for rp, g in zip(ref_params, grads):
            rp.grad = g
        ref.step()
        for (n, p), rp in zip(named, ref_params):
            assert torch.allclose(p.detach(), rp.detach(), atol=1e-7, rtol=0), n
    finally:
        trainer.close()


def test_a_resume_with_other_part_rates_follows_the_new_rates_and_says_so(tmp_path):
    data = make_data()
    with pytest.raises(Stop):
        run(TinyNet(), tmp_path, "a.safetensors", data=data, observer=stop_at(3), save_every=1)
    path = str(tmp_path / "a.safetensors")
    result = run(TinyNet(), tmp_path, "a.safetensors", data=data, resume=path, transform_lr_scale=4.0)
    note = result.metadata["tlora.train.resume_note"]
    assert "x4/x1 instead of x1/x1" in note and result.metadata["tlora.train.transform_lr_scale"] == "4.0"


def test_ema_weights_are_what_the_file_says(tmp_path):
    """The file holds min(d, (1+k)/(10+k))-decayed averages of the weights each step left (float64 reference)."""
    trajectory = []

    def record(report):
        trajectory.append({n: p.detach().double().clone() for n, p in trainer._ordered_params()})
    trainer = trainer_for(TinyNet(), tmp_path, "ema.safetensors", observer=record, ema_decay=0.8, steps=12,
                          learning_rate=1e-2)
    trainer.run()
    ref = None
    for k, weights in enumerate(trajectory):
        d = 0.0 if k == 0 else min(0.8, (1 + k) / (10 + k))
        ref = dict(weights) if ref is None else {n: d * ref[n] + (1 - d) * w for n, w in weights.items()}
    loaded = tformat.load(str(tmp_path / "ema.safetensors"))
    assert loaded.metadata["tlora.train.weights"].startswith("ema: exponential moving average") \
        and "12 steps" in loaded.metadata["tlora.train.weights"]
    for name, want in ref.items():
        key, _, suffix = name.rpartition(".")
        got = loaded.adapters[key].tensors[suffix.replace("__", ".")]
        assert torch.allclose(got.double(), want, atol=2e-6, rtol=0), name
    last = trajectory[-1]
    assert any((ref[n] - last[n]).abs().max() > 1e-4 for n in ref)  # the average is not the last weights


def test_ema_run_resumes_exactly(tmp_path):
    data = make_data()
    cfg = dict(ema_decay=0.9, steps=7, learning_rate=1e-2)
    full = run(TinyNet(), tmp_path, "full.safetensors", data=data, **cfg)
    with pytest.raises(Stop):
        run(TinyNet(), tmp_path, "part.safetensors", data=data, observer=stop_at(4), save_every=1, **cfg)
    path = str(tmp_path / "part.safetensors")
    resumed = run(TinyNet(), tmp_path, "part.safetensors", data=data, resume=path, **cfg)
    same(full, resumed)


def test_prodigy_with_separate_part_rates_is_refused_naming_the_settings():
    with pytest.raises(E.TrainingError, match="prodigy .* set transform_lr_scale and residual_lr_scale alike"):
        E.TrainSettings(optimizer="prodigy", learning_rate=1.0, residual_lr_scale=2.0).validate()


def test_adamw8bit_without_a_gpu_is_refused_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bitsandbytes decides")
    with pytest.raises(E.TrainingError, match="^optimizer adamw8bit needs a CUDA GPU.*choose adamw, prodigy or adafactor$"):
        E.TrainSettings(optimizer="adamw8bit").validate()


def test_old_single_group_sidecar_loads_into_parts(tmp_path):
    """A sidecar from before parts had rates (one group) resumes exactly at equal rates."""
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))]
    named = [("m.tlora_t__0", params[0]), ("m.tlora_r__in__0", params[1])]
    one = torch.optim.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    one.step()
    saved = one.state_dict()
    cfg = settings(learning_rate=1e-2)
    split = O.make_optimizer(named, cfg)
    assert not O.load_canonical(split, params, saved)
    for a, b in zip([one.state[p] for p in params], [split.state[p] for p in params]):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert math.isclose(split.param_groups[0]["lr"], 1e-2)


# ----- timestep draws ---------------------------------------------------------------------------------
TS = pack_module("trainer.timesteps")


def monte_carlo(kind, levels, n, shift=1.0, mean=0.0, std=1.0, seed=0):
    """Index frequencies drawn as the trainers draw them (z from the distribution, shift, then the bin)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        z = torch.rand(n, generator=g, dtype=torch.float64)
    else:
        m = mean if kind == "logit-normal" else 0.0
        z = torch.sigmoid(m + std * torch.randn(n, generator=g, dtype=torch.float64))
    u = shift * z / (1 + (shift - 1) * z)
    index = (torch.ceil(u * levels) - 1).clamp(0, levels - 1).long()
    return torch.bincount(index, minlength=levels).double() / n


@pytest.mark.parametrize("kind, shift, mean, std", [("uniform", 1.0, 0, 1), ("uniform", 3.0, 0, 1),
                                                    ("logit-normal", 1.0, 0.5, 0.8), ("sigmoid", 1.0, 0, 1.3),
                                                    ("shift", 3.1582, 0, 1.0)])
def test_training_draws_follow_the_sampling_choice(kind, shift, mean, std):
    sched = schedule()
    cfg = settings(timestep_sampling=kind, timestep_shift=shift, logit_mean=mean, logit_std=std)
    trainer = E.Trainer(E.Binding(groups_for(TinyNet()), lambda x, t, c: x, sched, make_data(), progress_bar=False),
                        cfg)
    g = torch.Generator().manual_seed(5)
    drawn = torch.bincount(trainer.schedule.draw(400_000, g), minlength=len(sched)).double() / 400_000
    reference = monte_carlo(kind, len(sched), 400_000, shift, mean, std)
    # Total variation between two 400k-draw histograms over 1000 bins: about 0.03 from sampling alone.
    assert 0.5 * (drawn - reference).abs().sum() < 0.045
    coarse = lambda h: h.view(20, 50).sum(1)  # noqa: E731  (50-level bins: the shape, tightly)
    assert (coarse(drawn) - coarse(reference)).abs().max() < 0.006
    assert trainer.schedule is not sched and sched.weights is None  # the host's schedule is left as it was


def test_auto_keeps_the_hosts_schedule():
    sched = schedule()
    trainer = E.Trainer(E.Binding(groups_for(TinyNet()), lambda x, t, c: x, sched, make_data(), progress_bar=False),
                        settings())
    assert trainer.schedule is sched


# ----- captions, previews, validation --------------------------------------------------------------
def text_cond(text, shape):
    """A stand-in text encoder: a fixed (1, 5, 16) context per text (seeded by the text)."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")
    return {"c_crossattn": torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(seed))}


def caption_data(captions, seed=1):
    g = torch.Generator().manual_seed(seed)
    return E.TrainData([E.Example(torch.randn(4, 8, 8, generator=g) * 0.5, text_cond(c, (4, 8, 8)), c)
                        for c in captions])


def recording_binding(net, data, seen, **extra):
    def denoise(x, t, c):
        seen.append((x.detach().clone(), c["c_crossattn"].detach().clone(), torch.is_grad_enabled()))
        return net(x, t, c["c_crossattn"])
    return E.Binding(groups_for(net), denoise, schedule(), data, progress_bar=False, interrupt_types=(Stop,),
                     text_cond=text_cond, **extra)


def test_shuffled_tags_and_caption_dropout_reach_the_model():
    captions = ["sks dog, red collar, grass, sunny", "sks dog, sofa, indoors"]
    seen = []
    trainer = E.Trainer(recording_binding(TinyNet(), caption_data(captions), seen),
                        settings(steps=30, shuffle_tags=True, keep_tags=1, caption_dropout=0.3, tag_variants=4))
    trainer.run()
    variants = [ex.variants for ex in trainer.data.instance]
    for caption, these in zip(captions, variants):
        tags = caption.split(", ")
        assert len(these) == len(set(these)) == min(4, math.factorial(len(tags) - 1))
        assert all(v.split(", ")[0] == "sks dog" and sorted(v.split(", ")) == sorted(tags) for v in these)
    allowed = {tuple(text_cond(v, None)["c_crossattn"].flatten().tolist()): v for vs in variants for v in vs}
    empty = tuple(text_cond("", None)["c_crossattn"].flatten().tolist())
    used = [tuple(c[0].flatten().tolist()) for _, c, grad in seen if grad]
    assert all(u in allowed or u == empty for u in used)
    dropped = sum(u == empty for u in used) / len(used)
    assert 0.1 < dropped < 0.5  # 30 draws at p = 0.3
    assert len({allowed[u] for u in used if u in allowed}) >= 5  # several orders of each caption trained


def test_caption_options_resume_exactly(tmp_path):
    data = caption_data(["a, b, c, d", "e, f, g"])
    cfg = dict(steps=7, shuffle_tags=True, caption_dropout=0.4, learning_rate=1e-2)

    def go(name, **kw):
        binding = recording_binding(TinyNet(), data, [])
        return E.Trainer(binding, settings(**cfg, **kw), output_path=str(tmp_path / name)).run()
    full = go("full.safetensors")
    binding = recording_binding(TinyNet(), data, [], observer=stop_at(3))
    with pytest.raises(Stop):
        E.Trainer(binding, settings(**cfg, save_every=1), output_path=str(tmp_path / "cut.safetensors")).run()
    resumed = go("cut.safetensors", resume=str(tmp_path / "cut.safetensors"))
    same(full, resumed)


def test_several_previews_with_their_own_size_steps_guidance_and_seed():
    seen, images = [], []
    data = caption_data(["a photo"])
    data.sample_shape, data.sample_cond, data.sample_uncond = (4, 8, 8), text_cond("a photo", None), text_cond("", None)
    binding = recording_binding(TinyNet(), data, seen, decode=lambda latent: latent[0].movedim(0, -1)[..., :3],
                                observer=lambda r: images.append(r.samples), downscale=8)
    prompts = "a dog --w 128 --h 64 --s 3 --l 1\na cat --s 2 --d 9 --n ugly\na cat --s 2 --d 9 --n ugly"
    E.Trainer(binding, settings(steps=2, sample_every=2, sample_prompt=prompts, resolution=64)).run()
    last = images[-1]
    assert [tuple(i.shape) for i in last] == [(8, 16, 3), (8, 8, 3), (8, 8, 3)]
    assert torch.equal(last[1], last[2])  # the same prompt and seed: the same preview
    sampling = [(x.shape, c) for x, c, grad in seen if not grad][:7]  # then the final adapter's output check
    # Preview 1: 3 steps, guidance 1 (no unconditional half); previews 2, 3: 2 steps with the negative prompt.
    assert [x[0] for x, _ in sampling] == [1, 1, 1, 2, 2, 2, 2]
    assert torch.equal(sampling[3][1][1], text_cond("ugly", None)["c_crossattn"][0])
    with pytest.raises(E.TrainingError, match="sample_prompt: preview line 2: --w must be a multiple of 64"):
        settings(sample_prompt="ok\nbad --w 100").validate()


def test_validation_loss_on_held_out_images(tmp_path):
    seen = []
    data = caption_data(["a", "b", "c", "d"])
    binding = recording_binding(TinyNet(), data, seen)
    trainer = E.Trainer(binding, settings(steps=6, validation_split=0.5, validate_every=3, learning_rate=1e-2),
                        output_path=str(tmp_path / "v.safetensors"))
    result = trainer.run()
    held = trainer.validation_examples
    assert len(held) == 2 and len(trainer.data.instance) == 2
    trained_on = [x for x, _, grad in seen if grad]
    for ex in held:  # no training batch ever held a held-out latent (at any noise level it is x_t, so check x0
        for x in trained_on:  # through the recorded inputs' correlation with it)
            assert not any(torch.allclose(row, ex.latent) for row in x)
    assert [v["step"] for v in trainer._validation] == [3, 6]
    # The reference: the file's adapter on a fresh net, MSE at the validation's levels and noise.
    sched, val = schedule(), trainer._validator
    module = pack_module("tlora.module")
    loaded = tformat.load(str(tmp_path / "v.safetensors")).adapters
    net = TinyNet()
    module.attach(net, {k.removeprefix("diffusion_model."): a for k, a in loaded.items()}, trainable=False)
    total = 0.0
    with torch.no_grad():
        for ex, noise in zip(held, val.noise):
            a = torch.sqrt(torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000,
                                                             dtype=torch.float64) ** 2, 0))
            for j, level in enumerate(val.levels.tolist()):
                ac = a[level] ** 2
                x_t = (ac.sqrt() * ex.latent + (1 - ac).sqrt() * noise[j]).float()[None]
                pred = net(x_t, torch.tensor([float(level)]), ex.cond["c_crossattn"])
                total += float(((pred[0] - noise[j]) ** 2).mean()) / len(val.levels)
    assert trainer._validation[-1]["val"] == pytest.approx(total / len(held), rel=1e-4)
    assert result.metadata["tlora.train.validation_images"] == "2"
    assert sorted(val.levels.tolist()) == [124, 374, 624, 874]  # the uniform draw's quantiles


def test_the_chart_plots_the_held_out_loss_beside_the_training_loss():
    chart = pack_module("trainer.chart")
    history = [{"step": i, "loss": 0.7, "mse": 1.0 / i} for i in range(1, 21)]
    plain = chart.loss_curve(history)
    both = chart.loss_curve(history, validation=[{"step": 10, "val": 0.3}, {"step": 20, "val": 0.2}])
    orange = torch.tensor(chart.VALIDATION_COLOUR, dtype=torch.float32) / 255

    def orange_pixels(img):
        return int(((img[0] - orange).abs().max(-1).values < 0.02).sum())
    assert orange_pixels(plain) == 0 and orange_pixels(both) > 50
