"""The host-agnostic training engine (trainer/) on a tiny pure-torch denoiser."""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from harness.pack import pack_module

E = pack_module("trainer")
tformat = pack_module("tlora.format")


# ----- a tiny denoiser with ComfyUI/diffusers-like module names ------------------------------
class Attn(nn.Module):
    def __init__(self, dim: int, ctx: int):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim, bias=False), nn.Linear(ctx, dim, bias=False), \
            nn.Linear(ctx, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out(torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, -1) @ v)


class Block(nn.Module):
    def __init__(self, dim: int, ctx: int):
        super().__init__()
        self.attn1, self.attn2 = Attn(dim, dim), Attn(dim, ctx)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(nn.Module(), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ff.net[0].proj = nn.Linear(dim, 2 * dim)

    def forward(self, x, context=None):
        x = x + self.attn1(x)
        x = x + self.attn2(x, context)
        return x + self.ff.net[2](torch.nn.functional.gelu(self.ff.net[0].proj(x)))


class TinyNet(nn.Module):
    def __init__(self, dim: int = 32, ctx: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv_in = nn.Conv2d(4, dim, 3, padding=1)
        self.time = nn.Linear(1, dim)
        self.blocks = nn.ModuleList([Block(dim, ctx), Block(dim, ctx)])
        self.conv_out = nn.Conv2d(dim, 4, 3, padding=1)

    def forward(self, x, t, context):
        h = self.conv_in(x) + self.time((t.float() / 1000)[:, None])[:, :, None, None]
        b, c, hh, ww = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens, context)
        return self.conv_out(tokens.transpose(1, 2).reshape(b, c, hh, ww))


def denoiser_for(net):
    return lambda x, t, cond: net(x, t, cond["c_crossattn"])


def schedule(prediction="eps"):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return E.Schedule.discrete(torch.cumprod(1 - betas, 0), prediction)


def make_data(n=2, seed=1, size=8, ctx=16):
    g = torch.Generator().manual_seed(seed)
    ex = [E.Example(torch.randn(4, size, size, generator=g) * 0.5,
                    {"c_crossattn": torch.randn(1, 5, ctx, generator=g)}, f"img {i}") for i in range(n)]
    return E.TrainData(ex)


def groups_for(net, preset="attn", transform="trm:2", residual="tr:2", seed=0):
    paths = E.select_targets(net, preset)
    return [E.AdapterGroup(net, "diffusion_model.", E.create_adapters(net, paths, transform, residual,
                                                                     "auto", seed, "diffusion_model."))]


def run(net, tmp_path=None, name="a.safetensors", data=None, resume=None, observer=None, denoiser=None,
        sched=None, **cfg):
    config = settings(resume=resume or "", **cfg)
    path = str(tmp_path / name) if tmp_path is not None else None
    binding = E.Binding(groups_for(net), denoiser or denoiser_for(net), sched or schedule(), data or make_data(),
                        observer=observer, interrupt_types=(Stop,), progress_bar=False)
    return E.Trainer(binding, config, output_path=path).run()


def settings(**cfg):
    """The engine tests' settings: 6 steps of plain MSE, no periodic saves, unless asked otherwise."""
    return E.TrainSettings(**{"steps": 6, "loss": "mse", "save_every": 0, **cfg})


class Stop(Exception):
    """Stands in for ComfyUI's InterruptProcessingException."""


def stop_at(step):
    def observer(report):
        if report.step == step:
            raise Stop()
    return observer


@torch.no_grad()
def eval_loss(net, adapters, data, sched, n=32):
    """Mean denoising MSE at fixed (noise, t) draws with the given adapters attached."""
    module = pack_module("tlora.module")
    paths = {k.removeprefix("diffusion_model."): v for k, v in adapters.items()}
    wrapped = module.attach(net, paths, trainable=False) if paths else {}
    try:
        g = torch.Generator().manual_seed(123)
        total = 0.0
        for i in range(n):
            ex = data.instance[i % len(data.instance)]
            x0 = ex.latent[None]
            noise = torch.randn(x0.shape, generator=g)
            idx = torch.randint(1000, (1,), generator=g)
            pred = net(sched.add_noise(x0, noise, idx), sched.timesteps[idx], ex.cond["c_crossattn"])
            total += float(((pred - sched.target(x0, noise, idx)) ** 2).mean())
        return total / n
    finally:
        module.detach(net, list(wrapped))


# ----- schedule, data helpers ------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["eps", "v", "flow"])
def test_schedule_split_inverts_add_noise(prediction):
    sched = E.Schedule.flow(torch.linspace(1, 1e-3, 1000)) if prediction == "flow" else schedule(prediction)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    idx = torch.tensor([5, 400, 990])
    x_t = sched.add_noise(x0, noise, idx)
    rx0, rnoise = sched.split(x_t, sched.target(x0, noise, idx), idx)
    assert torch.allclose(rx0, x0, atol=1e-4) and torch.allclose(rnoise, noise, atol=1e-4)


def test_from_sigmas_matches_alphas():
    sched = schedule()
    a = sched.signal ** 2
    again = E.Schedule.from_sigmas(((1 - a) / a).sqrt())
    assert torch.allclose(again.signal, sched.signal) and torch.allclose(again.noise, sched.noise)


def test_fit_image_and_buckets():
    img = torch.rand(40, 100, 3)
    out = E.fit_image(img, 32, 32)
    assert out.shape == (32, 32, 3) and 0 <= out.min() and out.max() <= 1
    # Center crop of an upscale-free case: exactly the middle columns.
    same = E.fit_image(torch.arange(8 * 16 * 3, dtype=torch.float32).reshape(8, 16, 3) / 400, 8, 8)
    assert torch.equal(same, (torch.arange(8 * 16 * 3, dtype=torch.float32).reshape(8, 16, 3) / 400)[:, 4:12])
    assert E.choose_size(100, 40, 512, buckets=False) == (512, 512)
    w, h = E.choose_size(1000, 500, 512, buckets=True)
    assert w > h and w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512
    assert E.choose_size(600, 600, 512, buckets=True) == (512, 512)
    sizes = [t.shape for t in E.prepare_images([torch.rand(64, 128, 4), torch.rand(50, 50, 3)], 256, buckets=True)]
    assert sizes[0][2] == 3 and sizes[0][1] > sizes[0][0] and sizes[1] == (256, 256, 3)


def test_collate_conds_repeats_to_lcm():
    a, b = {"c": torch.ones(1, 2, 3)}, {"c": torch.zeros(1, 3, 3)}
    out = E.collate_conds([a, b])["c"]
    assert out.shape == (2, 6, 3) and out[0].sum() == 18


def test_select_targets_presets():
    net = TinyNet()
    attn = E.select_targets(net, "attn")
    assert len(attn) == 16 and all(p.endswith(("to_q", "to_k", "to_v", "to_out.0")) for p in attn)
    assert len(E.select_targets(net, "attn-ff")) == 20
    with pytest.raises(E.TrainingError):
        E.select_targets(net, "everything")


def test_config_validation_messages():
    with pytest.raises(E.TrainingError, match="loss"):
        E.TrainSettings(loss="l1").validate()
    with pytest.raises(E.TrainingError, match="warm-up"):
        E.TrainSettings(steps=5, warmup_steps=9).validate()


# ----- training -------------------------------------------------------------------------------
def test_loss_goes_down_and_model_is_left_untouched():
    net = TinyNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    data, sched = make_data(), schedule()
    base = eval_loss(net, {}, data, sched)
    result = run(net, steps=40, learning_rate=1e-2, data=data)
    after = eval_loss(net, result.adapters, data, sched)
    assert after < 0.9 * base, (base, after)
    # Base weights never modified, module tree restored, requires_grad restored.
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(type(m).__name__ == "TLoRAModule" for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())
    assert result.steps_done == 40 and not result.partial and len(result.history) == 40


def test_only_adapter_params_train_and_base_weight_not_copied():
    net = TinyNet()
    seen = {}

    def observer(report):
        wrapped = net.blocks[0].attn1.to_q
        seen["type"] = type(wrapped).__name__
        seen["same_weight"] = wrapped.base.weight is net_weight
        seen["base_grad"] = wrapped.base.weight.requires_grad
        seen["adapter_grad"] = all(p.requires_grad for p in wrapped.adapter_params.values())
    net_weight = net.blocks[0].attn1.to_q.weight
    run(net, steps=1, observer=observer)
    assert seen == {"type": "TLoRAModule", "same_weight": True, "base_grad": False, "adapter_grad": True}


def test_seed_determinism():
    a, b = run(TinyNet(), steps=4, seed=3), run(TinyNet(), steps=4, seed=3)
    c = run(TinyNet(), steps=4, seed=4)
    key = next(iter(a.adapters))
    assert all(torch.equal(a.adapters[k].tensors[s], b.adapters[k].tensors[s])
               for k in a.adapters for s in a.adapters[k].tensors)
    assert not torch.equal(a.adapters[key].tensors["tlora_r.out.0"], c.adapters[key].tensors["tlora_r.out.0"])


def test_save_metadata_and_sidecar(tmp_path):
    result = run(TinyNet(), tmp_path, steps=3, learning_rate=1e-3)
    loaded = tformat.load(result.path)
    meta = loaded.metadata
    assert meta["tlora.train.steps"] == "3" and meta["tlora.train.partial"] == "false"
    assert meta["tlora.train.loss"] == "mse" and meta["tlora.train.seed"] == "0"
    assert float(meta["tlora.train.final_loss"]) == pytest.approx(result.final_loss, rel=1e-4)
    assert meta["tlora.train.dataset_size"] == "2" and meta["tlora.train.time"]
    assert set(loaded.adapters) == set(result.adapters)
    sidecar = E.state_path_for(result.path)
    assert sidecar.endswith("a.tlora-state") and os.path.exists(sidecar)
    with open(sidecar, "rb") as f:
        assert f.read(9)[8:9] == b"{"  # a safetensors header, not a pickle
    state = E.TrainState.read(sidecar)
    assert state.step == 3 and state.run_token == meta["tlora.train.run_token"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("schedule_kind", ["constant", "cosine"])
def test_resume_equals_uninterrupted(tmp_path, schedule_kind):
    kw = dict(steps=8, learning_rate=2e-3, lr_schedule=schedule_kind, warmup_steps=3, grad_accum=2,
              batch_size=2)
    full = run(TinyNet(), tmp_path, "full.safetensors", **kw)
    with pytest.raises(Stop):
        run(TinyNet(), tmp_path, "cut.safetensors", observer=stop_at(5), **kw)
    partial = tformat.load(str(tmp_path / "cut.safetensors"))
    assert partial.metadata["tlora.train.partial"] == "true" and partial.metadata["tlora.train.steps"] == "5"
    resumed = run(TinyNet(), tmp_path, "cut.safetensors", resume=str(tmp_path / "cut.safetensors"), **kw)
    assert resumed.steps_done == 8 and not resumed.partial
    for key, adapter in full.adapters.items():
        for suffix, tensor in adapter.tensors.items():
            assert torch.allclose(resumed.adapters[key].tensors[suffix], tensor, atol=1e-6), (key, suffix)
    assert [h["lr"] for h in resumed.history] == pytest.approx([h["lr"] for h in full.history])
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-5)


def test_lr_warmup_then_cosine():
    result = run(TinyNet(), steps=6, learning_rate=1e-3, lr_schedule="cosine", warmup_steps=2)
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] == pytest.approx(1e-3 / 3) and lrs[1] == pytest.approx(2e-3 / 3)
    assert lrs[2] == pytest.approx(1e-3) and lrs[3] < lrs[2] and lrs[5] < lrs[4]


def test_periodic_checkpoint_is_partial(tmp_path):
    seen = []

    def observer(report):
        if os.path.exists(tmp_path / "p.safetensors"):
            seen.append(tformat.read_metadata(str(tmp_path / "p.safetensors"))["tlora.train.steps"])
    run(TinyNet(), tmp_path, "p.safetensors", steps=5, save_every=2, observer=observer)
    assert seen[:2] == ["2", "2"] and "4" in seen
    assert tformat.read_metadata(str(tmp_path / "p.safetensors"))["tlora.train.partial"] == "false"


def test_nan_loss_stops_and_keeps_last_good(tmp_path):
    """A NaN loss at step 4 is the output of the adapter after step 3: the one after step 2 is kept."""
    net = TinyNet()
    calls = {"n": 0}

    def poisoned(x, t, cond):
        calls["n"] += 1
        out = net(x, t, cond["c_crossattn"])
        return out * float("nan") if calls["n"] == 4 else out
    with pytest.raises(E.TrainingDiverged, match="step 4") as info:
        run(net, tmp_path, "n.safetensors", steps=6, denoiser=poisoned)
    assert "a.safetensors" not in str(info.value) and "n.safetensors" in str(info.value)
    loaded = tformat.load(str(tmp_path / "n.safetensors"))
    assert loaded.metadata["tlora.train.steps"] == "2" and loaded.metadata["tlora.train.partial"] == "true"
    assert "adapter from step 2" in str(info.value)
    assert loaded.metadata["tlora.train.stopped"] == "diverged"
    assert all(bool(torch.isfinite(t).all()) for a in loaded.adapters.values() for t in a.tensors.values())
    assert not any(type(m).__name__ == "TLoRAModule" for m in net.modules())
    assert E.RUNS.runs()[-1]["status"] == "diverged"
    clean = run(TinyNet(), steps=2)  # what the kept adapter must be: two clean steps (same seed)
    for key, adapter in clean.adapters.items():
        for suffix, tensor in adapter.tensors.items():
            assert torch.equal(loaded.adapters[key].tensors[suffix], tensor), (key, suffix)


def test_dco_starts_at_log2_and_trains():
    result = run(TinyNet(), steps=3, loss="dco", learning_rate=1e-3)
    assert result.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(h["loss"]) and h["mse"] > 0 for h in result.history)


def test_prior_preservation_generated_and_supplied(tmp_path):
    data = make_data()
    data.generate_prior = 2
    data.prior_cond = {"c_crossattn": torch.randn(1, 5, 16)}
    data.prior_uncond = {"c_crossattn": torch.zeros(1, 5, 16)}
    data.prior_shape = (4, 8, 8)
    result = run(TinyNet(), tmp_path, data=data, steps=2, sample_steps=3, prior_loss_weight=0.5)
    assert result.metadata["tlora.train.num_class_images"] == "2"
    supplied = make_data()
    supplied.prior = make_data(seed=5).instance
    with_prior = run(TinyNet(), data=supplied, steps=2)
    without = run(TinyNet(), data=make_data(), steps=2)
    assert with_prior.history[0]["loss"] != pytest.approx(without.history[0]["loss"])


def test_gradient_checkpointing_gives_same_result():
    kw = dict(steps=3, learning_rate=1e-3)
    plain = run(TinyNet(), **kw)
    net = TinyNet()
    config = settings(gradient_checkpointing=True, **kw)
    binding = E.Binding(groups_for(net), denoiser_for(net), schedule(), make_data(),
                        checkpoint_modules=list(net.blocks), progress_bar=False)
    ckpt = E.Trainer(binding, config).run()
    assert "forward" not in net.blocks[0].__dict__
    for key, adapter in plain.adapters.items():
        for suffix, tensor in adapter.tensors.items():
            assert torch.allclose(ckpt.adapters[key].tensors[suffix], tensor, atol=1e-6)


def test_bf16_autocast_keeps_fp32_adapters():
    result = run(TinyNet(), steps=2, precision="bf16")
    assert all(t.dtype == torch.float32 for a in result.adapters.values() for t in a.tensors.values())
    assert all(math.isfinite(h["loss"]) for h in result.history)


def test_v_prediction_and_previews():
    net = TinyNet()
    decoded = []
    config = settings(steps=4, sample_every=2, sample_steps=3)
    reports = []
    data = make_data()
    data.sample_cond, data.sample_uncond = {"c_crossattn": torch.randn(1, 5, 16)}, {"c_crossattn": torch.zeros(1, 5, 16)}
    data.sample_shape = (4, 8, 8)
    binding = E.Binding(groups_for(net), denoiser_for(net), schedule("v"), data,
                        decode=lambda z: decoded.append(z) or torch.rand(8, 8, 3), observer=reports.append,
                        progress_bar=False)
    result = E.Trainer(binding, config).run()
    assert [r.sample is not None for r in reports] == [False, True, False, True]
    assert len(decoded) == 2 and result.last_sample is not None
    assert reports[-1].eta == 0 and reports[0].steps == 4


def test_registry_records_run():
    result = run(TinyNet(), steps=2)
    record = E.RUNS.get(result.run_id)
    assert record["status"] == "done" and [h["step"] for h in record["history"]] == [1, 2]
    assert record["summary"]["steps_done"] == 2 and record["state"]["step"] == 2


def test_resume_without_sidecar_warm_starts(tmp_path):
    first = run(TinyNet(), tmp_path, "w.safetensors", steps=3)
    os.remove(E.state_path_for(first.path))
    again = run(TinyNet(), tmp_path, "w.safetensors", resume=first.path, steps=5)
    assert again.steps_done == 5 and "fresh optimizer" in again.metadata["tlora.train.resume_note"]


def test_resume_with_other_targets_is_refused(tmp_path):
    first = run(TinyNet(), tmp_path, "r.safetensors", steps=1)
    net = TinyNet()
    paths = E.select_targets(net, "attn-ff")
    groups = [E.AdapterGroup(net, "diffusion_model.", E.create_adapters(net, paths, "trm:2", "tr:2", "auto"))]
    with pytest.raises(E.TrainingError, match="no adapter for"):
        E.Trainer(E.Binding(groups, denoiser_for(net), schedule(), make_data(), progress_bar=False),
                  settings(steps=2, resume=first.path)).run()
    assert not any(type(m).__name__ == "TLoRAModule" for m in net.modules())


def test_runs_under_inference_mode():
    net = TinyNet()
    with torch.inference_mode():
        result = run(net, steps=2, learning_rate=1e-3)
    assert result.steps_done == 2


def test_fp16_autocast_with_grad_scaler(tmp_path):
    result = run(TinyNet(), tmp_path, "h.safetensors", steps=3, precision="fp16", save_every=2)
    assert result.steps_done == 3 and all(math.isfinite(h["loss"]) for h in result.history)
    state = E.TrainState.read(E.state_path_for(result.path))
    assert state.scaler and "scale" in state.scaler


def test_optimizer_steps_are_seen_by_the_modules():
    """The module's identity fast path keys on version counters: the optimizer must bump them."""
    net = TinyNet()
    seen = []

    def observer(report):
        seen.append(net.blocks[0].attn1.to_q._untouched_identity())
    run(net, steps=2, learning_rate=1e-3, observer=observer)
    assert seen == [False, False]


def test_resume_with_more_steps_follows_the_new_schedule(tmp_path):
    kw = dict(learning_rate=1e-3, lr_schedule="cosine")
    first = run(TinyNet(), tmp_path, "x.safetensors", steps=4, **kw)
    longer = run(TinyNet(), tmp_path, "x.safetensors", resume=first.path, steps=8, **kw)
    fresh = run(TinyNet(), steps=8, **kw)
    assert longer.steps_done == 8 and "8 total steps" in longer.metadata["tlora.train.resume_note"]
    # Steps 5..8 use the 8-step cosine's learning rates (never the 4-step one's, which ended at 0).
    assert [h["lr"] for h in longer.history[4:]] == pytest.approx([h["lr"] for h in fresh.history[4:]])


def test_gradient_checkpointing_with_a_cold_form_cache():
    """The first forward of a checkpointed block times the transform's forms: those trials must not
    count as tensors saved by the block (torch.utils.checkpoint compares forward and recompute)."""
    forms = pack_module("tlora.forms")
    kw = dict(steps=2, learning_rate=1e-3)

    def run64(checkpointing: bool):
        forms.clear_cache()
        net = TinyNet(dim=64)
        binding = E.Binding(groups_for(net), denoiser_for(net), schedule(), make_data(size=16),
                            checkpoint_modules=list(net.blocks) if checkpointing else (), progress_bar=False)
        return E.Trainer(binding, settings(gradient_checkpointing=checkpointing, **kw)).run()
    plain, ckpt = run64(False), run64(True)
    assert ckpt.steps_done == 2 and forms.cached_choices(), "the forms must have been timed in this run"
    for key, adapter in plain.adapters.items():
        for suffix, tensor in adapter.tensors.items():
            assert torch.allclose(ckpt.adapters[key].tensors[suffix], tensor, atol=1e-5), (key, suffix)


def test_state_sidecar_with_deeply_nested_json_is_named_by_its_file_name(tmp_path):
    from safetensors.torch import load_file, save_file
    first = run(TinyNet(), tmp_path, "deep.safetensors", steps=1)
    sidecar = E.state_path_for(first.path)
    tensors = load_file(sidecar)
    meta = pack_module("tlora.format").read_metadata(sidecar)
    meta["param_names"] = "[" * 200_000 + "]" * 200_000
    save_file(tensors, sidecar, metadata=meta)
    with pytest.raises(E.TrainingError, match="deep.tlora-state is unreadable.*nested too deeply") as err:
        E.TrainState.read(sidecar)
    assert str(tmp_path) not in str(err.value)


def test_resume_from_a_plain_lora_names_the_file_not_its_folder(tmp_path):
    from safetensors.torch import save_file
    plain = tmp_path / "plain_lora.safetensors"
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(4, 2), "lora_unet_x.lora_down.weight": torch.zeros(2, 4)},
              str(plain))
    with pytest.raises(E.TrainingError, match="cannot resume from plain_lora.safetensors") as err:
        run(TinyNet(), tmp_path, "x.safetensors", resume=str(plain), steps=1)
    assert str(tmp_path) not in str(err.value)


@pytest.mark.parametrize("changes, word", [({"residual": "lora:4"}, "residual tr:2"),
                                           ({"transform": "trm:3"}, "transform trm:2")])
def test_resume_with_other_kinds_is_refused_and_writes_nothing(tmp_path, changes, word):
    """A tr:2 file resumed with residual lora:4 used to keep training tr:2 and write tlora.config saying lora:4."""
    first = run(TinyNet(), tmp_path, "k.safetensors", steps=2)
    before = open(first.path, "rb").read()
    net = TinyNet()
    kinds = {"transform": changes.get("transform", "trm:2"), "residual": changes.get("residual", "tr:2")}
    groups = groups_for(net, **kinds)
    with pytest.raises(E.TrainingError, match=f"cannot resume from k.safetensors: it was trained with {word}"):
        E.Trainer(E.Binding(groups, denoiser_for(net), schedule(), make_data(), progress_bar=False),
                  settings(steps=4, resume=first.path, **kinds), output_path=first.path).run()
    assert open(first.path, "rb").read() == before
    assert not any(type(m).__name__ == "TLoRAModule" for m in net.modules())


def test_the_largest_seed_trains_a_second_group():
    """seed = 2**64 - 1 (the node's maximum) with a second adapter group (the text encoder's, seed + 1)."""
    net = TinyNet()
    top = E.TrainSettings().replace(seed=0xFFFFFFFFFFFFFFFF, targets="attn", transform="trm:2", residual="tr:2")
    unet = E.adapter_group(net.blocks[0], "diffusion_model.blocks.0.", top)
    second = E.adapter_group(net.blocks[1], "text_encoders.fake.", top, seed_offset=1)
    binding = E.Binding([unet, second], denoiser_for(net), schedule(), make_data(), progress_bar=False)
    result = E.Trainer(binding, settings(steps=1, seed=0xFFFFFFFFFFFFFFFF)).run()
    assert result.steps_done == 1 and any(k.startswith("text_encoders.") for k in result.adapters)


def test_tiny_training_images_are_refused_by_number():
    with pytest.raises(E.TrainingError, match="training image 2 is 1x1 pixels: too small"):
        E.prepare_images([torch.rand(64, 64, 3), torch.rand(1, 1, 3)], 64)
