"""Training options (issue 25): optimizers, the parts' own rates, EMA, timestep draws, captions, validation.

Each on the engine's tiny denoiser (tests/unit/test_engine.py's TinyNet): the references are
independent (the libraries' own optimizers stepped by hand, the EMA recomputed in float64 from the
weights each step left, the draw distribution from its closed-form CDF), never the trainer's output.
"""
from __future__ import annotations

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
