"""Train TLoRA inside real ComfyUI 0.3.75 (in-process, tiny seeded models, CPU)."""
from __future__ import annotations

import importlib
import math
import os

import pytest

from harness import comfy_host as ch


@pytest.fixture(scope="module")
def tm(comfy_host):
    """tiny_models, once the in-process host is up (the pack must have loaded)."""
    comfy_host.require_pack()
    from harness import tiny_models
    return tiny_models


def pack(sub: str):
    """A pack submodule as ComfyUI imported it (the pack lives under a mangled module name)."""
    return importlib.import_module(f"{ch.pack_module_name()}.{sub}")


@pytest.fixture(scope="module")
def sd15(tm):
    """Tiny SD1.5-shaped model, CLIP and VAE (module-scoped: training never changes base weights)."""
    return tm.tiny_sd15(seed=0), tm.tiny_clip(seed=0), tm.tiny_vae(seed=0)


def images(n: int = 2, size: int = 64, seed: int = 0):
    """Smooth, distinct images (a colour gradient per image) as an IMAGE batch."""
    import torch
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        a, b, c = torch.rand(3, 3, generator=g)
        out.append(torch.stack([a[i] * xs + b[i] * ys + c[i] * xs * ys for i in range(3)], -1).clamp(0, 1))
    return torch.stack(out)


DEFAULTS = dict(instance_prompt="a photo of sks dog", steps=4, output_name="t", transform="trm:2", residual="tr:6",
                targets="attn", learning_rate=1e-3, batch_size=1, resolution=64, loss="mse", seed=0, save_every=0,
                sample_every=0)


def train(model, clip, vae, imgs=None, **kw):
    """Run the TLoRATrain node the way the executor does (inputs as lists, under inference_mode)."""
    import torch
    args = {**DEFAULTS, **kw}
    args = {k: [v] for k, v in args.items()}
    node = ch.node_class("TLoRATrain")
    with torch.inference_mode():
        out = node.execute(model=[model.patcher if hasattr(model, "patcher") else model], clip=[clip], vae=[vae],
                           images=[images() if imgs is None else imgs], **args)
    return out.result


def wrappers_left(model) -> int:
    return sum(type(m).__name__ == "TLoRAModule" for m in model.model.diffusion_model.modules())


@pytest.fixture
def interrupt_at(sd15):
    """Call interrupt_current_processing() at the n-th UNet forward (what Cancel does, mid-step)."""
    import comfy.model_management as mm
    handles = []

    def arm(n: int, model=None):
        target = (model or sd15[0]).model.diffusion_model
        calls = {"n": 0}

        def hook(module, args):
            calls["n"] += 1
            if calls["n"] == n:
                mm.interrupt_current_processing()
        handles.append(target.register_forward_pre_hook(hook))
        return calls
    yield arm
    for h in handles:
        h.remove()
    mm.interrupt_current_processing(False)


def eval_loss(model_patcher, prepared, seed=7, draws=12) -> float:
    """Denoising MSE of a (patched) model on the training examples at fixed noise/timesteps."""
    import torch
    import comfy.model_management as mm
    comfy_model = pack("trainer.comfy.model")
    mm.load_models_gpu([model_patcher], force_full_load=True)
    base = model_patcher.model
    denoise, sched = comfy_model.make_denoiser(base), comfy_model.schedule_for(base)
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.inference_mode(False), torch.no_grad():
        for i in range(draws):
            ex = prepared.data.instance[i % len(prepared.data.instance)]
            x0 = ex.latent[None]
            noise = torch.randn(x0.shape, generator=g)
            idx = torch.randint(50, 950, (1,), generator=g)
            pred = denoise(sched.add_noise(x0, noise, idx), sched.timesteps[idx], ex.cond)
            total += float(((pred - sched.target(x0, noise, idx)) ** 2).mean())
    return total / draws


def prepared_for(model, clip, vae, imgs):
    comfy_data = pack("trainer.comfy.data")
    import torch
    with torch.inference_mode():
        return comfy_data.prepare_data(model.model, clip, vae, comfy_data.split_images(imgs), ["", ""],
                                 DEFAULTS["instance_prompt"], 64, False, device=torch.device("cpu"))


# ----- training works -----------------------------------------------------------------------
def test_loss_goes_down_and_outputs(sd15, loras_dir, comfy_host):
    import torch
    model, clip, vae = sd15
    imgs = images()
    prepared = prepared_for(model, clip, vae, imgs)
    before = eval_loss(model.patcher, prepared)
    new_model, new_clip, payload, curve, file_name = train(model, clip, vae, imgs, steps=30, learning_rate=1e-2,
                                                           output_name="down")
    after = eval_loss(new_model, prepared)
    assert after < 0.9 * before, (before, after)
    assert file_name == "down.safetensors" and (loras_dir / file_name).is_file()
    assert new_clip is clip and wrappers_left(model) == 0
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and float(curve.std()) > 0
    meta = payload["metadata"]
    assert meta["tlora.train.steps"] == "30" and meta["tlora.train.partial"] == "false"
    assert meta["tlora.train.resolution"] == "64" and meta["tlora.train.dataset_size"] == "2"
    assert meta["tlora.train.base_model"] and meta["tlora.train.seed"] == "0"
    assert len(payload["adapters"]) == len(model.attention_modules())
    events = [d for e, d, _ in comfy_host.server.events if e == "tlora.train"]
    steps = [d["step"] for d in events if "loss" in d and "status" not in d]
    assert steps[-30:] == list(range(1, 31))
    last = [d for d in events if d.get("step") == 30 and "status" not in d][-1]
    assert {"node", "run_id", "steps", "loss", "lr", "step_time", "eta"} <= set(last)
    assert any(d.get("status") == "done" for d in events)
    engine = pack("trainer")
    record = engine.RUNS.get(last["run_id"])
    assert record["status"] == "done" and len(record["history"]) == 30
    assert record["file_name"] == "down.safetensors" and record["start_step"] == 0
    assert record["node"] is None and record["prompt_id"] is None  # a direct call, outside an execution
    summary = record["summary"]
    assert summary["steps_done"] == 30 and summary["partial"] is False and summary["file_name"] == "down.safetensors"
    done = [d for d in events if d.get("status") == "done" and d["run_id"] == last["run_id"]][-1]
    assert done["file"] == "down.safetensors" and done["partial"] is False and done["steps_done"] == 30


def test_file_roundtrips_through_loaders(sd15, loras_dir, tm):
    import torch
    model, clip, vae = sd15
    new_model, _, payload, _, file_name = train(model, clip, vae, steps=3, learning_rate=1e-2, output_name="rt")
    pos, neg = tm.encode_text(clip, "a photo of sks dog"), tm.encode_text(clip, "")
    sample = lambda patcher: tm.sample(patcher, seed=5, positive=pos, negative=neg, steps=2)
    base, trained = sample(model.patcher), sample(new_model)
    assert not torch.equal(base, trained)
    ours, _ = ch.node_class("TLoRALoader").execute(model.patcher, clip, file_name, 1.0, 1.0).result
    import nodes
    stock, _ = nodes.LoraLoader().load_lora(model.patcher, clip, file_name, 1.0, 1.0)
    assert torch.equal(sample(ours), trained)
    assert torch.equal(sample(stock), trained)
    applied, _ = ch.node_class("TLoRAApplyAdapter").execute(model.patcher, payload, 1.0).result
    assert torch.equal(sample(applied), trained)
    zero, _ = ch.node_class("TLoRAApplyAdapter").execute(model.patcher, payload, 0.0).result
    assert torch.equal(sample(zero), base)


def test_sdxl_shaped_model_trains(tm, loras_dir):
    model, clip, vae = tm.tiny_sdxl(seed=0), tm.tiny_clip(seed=0, kind="sdxl"), tm.tiny_vae(seed=0)
    _, _, payload, _, file_name = train(model, clip, vae, steps=3, output_name="xl", loss="dco")
    assert payload["steps"] == 3 and all(math.isfinite(h["loss"]) for h in payload["history"])
    assert (loras_dir / file_name).is_file()
    assert any(".attn2.to_k" in k for k in payload["adapters"])
    assert wrappers_left(model) == 0
    # It learned something: an untrained adapter is the identity (W0 T + s Delta = W0).
    import torch
    key = next(k for k in payload["adapters"] if ".attn2.to_k" in k)
    w = torch.randn(*model.model.state_dict()[key + ".weight"].shape, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(payload["adapters"][key].patched_weight(w), w, atol=1e-7)
    assert payload["metadata"]["tlora.train.loss"] == "dco"


# ----- losses and prior preservation ----------------------------------------------------------
def test_dco_prior_preservation_and_previews(sd15, loras_dir, comfy_host):
    model, clip, vae = sd15
    start = len(comfy_host.server.events)
    _, _, payload, _, _ = train(model, clip, vae, steps=2, loss="dco", output_name="dco",
                                class_prompt="a photo of a dog", num_class_images=1, prior_loss_weight=0.5,
                                sample_every=2, sample_prompt="sks dog on a beach")
    meta = payload["metadata"]
    assert meta["tlora.train.loss"] == "dco" and meta["tlora.train.num_class_images"] == "1"
    assert meta["tlora.train.class_prompt"] == "a photo of a dog"
    events = comfy_host.server.events[start:]
    assert any(e == "progress" and d.get("has_preview") for e, d, _ in events)
    samples = [d["sample"] for e, d, _ in events if e == "tlora.train" and "sample" in d]
    assert samples and samples[-1]["type"] == "temp"
    import folder_paths
    assert os.path.isfile(os.path.join(folder_paths.get_temp_directory(), samples[-1]["subfolder"],
                                       samples[-1]["filename"]))


def test_dco_loss_starts_at_log2_and_prior_adds_to_it(sd15, loras_dir):
    """DCO really runs: with the adapter at its identity start the model equals its reference, so the
    first step's loss is -log sigmoid(0) = ln 2; the prior-preservation term comes on top of it."""
    model, clip, vae = sd15
    plain = train(model, clip, vae, steps=1, loss="dco", output_name="dco_ln2")[2]
    assert plain["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    prior = train(model, clip, vae, steps=1, loss="dco", output_name="dco_prior", class_prompt="a photo of a dog",
                  num_class_images=1, prior_loss_weight=2.0)[2]
    assert prior["history"][0]["loss"] > math.log(2) + 1e-4
    mse = train(model, clip, vae, steps=1, loss="mse", output_name="mse_one")[2]
    assert mse["history"][0]["loss"] == pytest.approx(mse["history"][0]["mse"])
    assert abs(mse["history"][0]["loss"] - math.log(2)) > 1e-3


def test_samples_do_not_change_training(sd15, loras_dir):
    """Previews run on their own generator, without gradients: the adapter is the one a run without them trains."""
    import torch
    model, clip, vae = sd15
    plain = train(model, clip, vae, steps=3, learning_rate=1e-2, output_name="nosample")[2]
    sampled = train(model, clip, vae, steps=3, learning_rate=1e-2, output_name="sampled", sample_every=1)[2]
    assert [h["loss"] for h in sampled["history"]] == [h["loss"] for h in plain["history"]]
    for key, adapter in plain["adapters"].items():
        for suffix, tensor in adapter.tensors.items():
            torch.testing.assert_close(sampled["adapters"][key].tensors[suffix], tensor, atol=0, rtol=0)
    assert wrappers_left(model) == 0


def test_trains_without_a_server(sd15, loras_dir, monkeypatch):
    """No PromptServer instance (scripts, other hosts): events are skipped, training and samples still work."""
    import server
    model, clip, vae = sd15
    monkeypatch.setattr(server.PromptServer, "instance", None)
    _, _, payload, _, name = train(model, clip, vae, steps=2, output_name="no_server", sample_every=1)
    assert payload["steps"] == 2 and (loras_dir / name).is_file()
    record = pack("trainer").RUNS.get(payload["metadata"]["tlora.train.run_id"])
    assert record["status"] == "done" and record["state"]["sample"]["step"] == 2


def test_supplied_class_images_and_captions(sd15, loras_dir):
    model, clip, vae = sd15
    _, _, payload, _, _ = train(model, clip, vae, steps=1, output_name="cap", class_prompt="a dog",
                                class_images=images(1, 48, seed=3), captions="sks dog, red\nsks dog, blue")
    assert payload["metadata"]["tlora.train.num_class_images"] == "1"
    with pytest.raises(Exception, match="3 captions for 2 images"):
        train(model, clip, vae, steps=1, output_name="cap", captions="a\nb\nc")


# ----- never lose work --------------------------------------------------------------------------
def test_cancel_in_process_keeps_partial_file(sd15, loras_dir, interrupt_at, comfy_host):
    import comfy.model_management as mm
    model, clip, vae = sd15
    interrupt_at(4)  # the 4th UNet forward: inside step 4 (one forward per MSE step)
    start = len(comfy_host.server.events)
    with pytest.raises(mm.InterruptProcessingException):
        train(model, clip, vae, steps=10, output_name="cancel")
    fmt = pack("tlora.format")
    loaded = fmt.load(str(loras_dir / "cancel.safetensors"))
    assert loaded.metadata["tlora.train.partial"] == "true"
    assert loaded.metadata["tlora.train.steps"] == "3" and loaded.metadata["tlora.train.stopped"] == "cancelled"
    assert (loras_dir / "cancel.tlora-state").is_file()
    assert wrappers_left(model) == 0
    end = [d for e, d, _ in comfy_host.server.events[start:] if e == "tlora.train"][-1]
    assert end["status"] == "cancelled" and end["steps_done"] == 3 and end["step"] == 3
    assert end["file"] == "cancel.safetensors" and end["partial"] is True
    record = pack("trainer").RUNS.get(end["run_id"])
    assert record["status"] == "cancelled" and [h["step"] for h in record["history"]] == [1, 2, 3]
    assert record["summary"]["steps_done"] == 3 and record["summary"]["file_name"] == "cancel.safetensors"
    assert record["summary"]["partial"] is True


def test_cancel_while_making_class_images(sd15, loras_dir, interrupt_at, comfy_host):
    """Cancel during prior-preservation image generation stops before training: nothing saved, run cancelled."""
    import comfy.model_management as mm
    model, clip, vae = sd15
    calls = interrupt_at(3)  # inside the first class image (DDIM with CFG: one UNet forward per sampler step)
    start = len(comfy_host.server.events)
    with pytest.raises(mm.InterruptProcessingException):
        train(model, clip, vae, steps=4, output_name="cancel_prior", class_prompt="a photo of a dog",
              num_class_images=3)
    assert calls["n"] <= 20, calls  # 20 DDIM steps: the second and third images were never started
    assert not (loras_dir / "cancel_prior.safetensors").exists()
    end = [d for e, d, _ in comfy_host.server.events[start:] if e == "tlora.train"][-1]
    assert end["status"] == "cancelled" and end["steps_done"] == 0 and end["file"] is None
    assert pack("trainer").RUNS.get(end["run_id"])["status"] == "cancelled"
    assert wrappers_left(model) == 0


def test_resume_equals_uninterrupted(sd15, loras_dir, interrupt_at):
    import torch
    import comfy.model_management as mm
    model, clip, vae = sd15
    kw = dict(steps=6, lr_schedule="cosine", warmup_steps=2, learning_rate=5e-3)
    _, _, full, _, _ = train(model, clip, vae, output_name="full", **kw)
    interrupt_at(4)
    with pytest.raises(mm.InterruptProcessingException):
        train(model, clip, vae, output_name="part", **kw)
    mm.interrupt_current_processing(False)
    _, _, resumed, _, name = train(model, clip, vae, output_name="part", resume="part.safetensors", **kw)
    assert name == "part.safetensors" and resumed["metadata"]["tlora.train.partial"] == "false"
    assert resumed["steps"] == 6
    for key, adapter in full["adapters"].items():
        for suffix, tensor in adapter.tensors.items():
            torch.testing.assert_close(resumed["adapters"][key].tensors[suffix], tensor, atol=1e-6, rtol=1e-5)
    assert [h["step"] for h in resumed["history"]] == list(range(1, 7))


def test_new_run_never_overwrites(sd15, loras_dir):
    model, clip, vae = sd15
    first = train(model, clip, vae, steps=1, output_name="keep")[4]
    second = train(model, clip, vae, steps=1, output_name="keep")[4]
    assert (first, second) == ("keep.safetensors", "keep_2.safetensors")


def test_nan_stops_cleanly(sd15, loras_dir, comfy_host):
    import torch
    model, clip, vae = sd15
    engine = pack("trainer")
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 3 else output
    handle = model.model.diffusion_model.out.register_forward_hook(poison)
    try:
        with pytest.raises(engine.TrainingDiverged, match="step 3"):
            train(model, clip, vae, steps=5, output_name="nan")
    finally:
        handle.remove()
    loaded = pack("tlora.format").load(str(loras_dir / "nan.safetensors"))
    # The NaN of step 3 is the output of the adapter after step 2: the one after step 1 is kept.
    assert loaded.metadata["tlora.train.steps"] == "1" and loaded.metadata["tlora.train.stopped"] == "diverged"
    assert loaded.metadata["tlora.train.partial"] == "true"
    assert all(bool(torch.isfinite(t).all()) for a in loaded.adapters.values() for t in a.tensors.values())
    assert wrappers_left(model) == 0
    # The kept adapter is what a clean 1-step run (same seed) trains.
    good = train(model, clip, vae, steps=1, output_name="nan_ref")[2]
    for key, adapter in good["adapters"].items():
        for suffix, tensor in adapter.tensors.items():
            torch.testing.assert_close(loaded.adapters[key].tensors[suffix], tensor, atol=0, rtol=0)
    end = [d for d in comfy_host.server.events_named("tlora.train") if d.get("status") == "diverged"][-1]
    assert "step 3" in end["message"] and end["file"] == "nan.safetensors"
    record = engine.RUNS.get(end["run_id"])
    assert record["status"] == "diverged" and record["summary"]["steps_done"] == 1


def test_crash_mid_run_is_reported_and_kept(sd15, loras_dir, comfy_host):
    """Any other error: partial file of the steps done, registry `failed` with steps_done, a `failed` event."""
    model, clip, vae = sd15
    calls = {"n": 0}

    def boom(module, args):
        calls["n"] += 1
        if calls["n"] == 3:  # inside step 3 (one UNet forward per MSE step)
            raise RuntimeError("boom in the third forward")
    handle = model.model.diffusion_model.register_forward_pre_hook(boom)
    start = len(comfy_host.server.events)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            train(model, clip, vae, steps=6, output_name="crash")
    finally:
        handle.remove()
    end = [d for e, d, _ in comfy_host.server.events[start:] if e == "tlora.train"][-1]
    assert end["status"] == "failed" and "boom in the third forward" in end["message"]
    assert end["steps_done"] == 2 and end["file"] == "crash.safetensors" and end["partial"] is True
    record = pack("trainer").RUNS.get(end["run_id"])
    assert record["status"] == "failed" and record["summary"]["steps_done"] == 2
    assert [h["step"] for h in record["history"]] == [1, 2] and record["state"]["step"] == 2
    meta = pack("tlora.format").read_metadata(str(loras_dir / "crash.safetensors"))
    assert (meta["tlora.train.steps"], meta["tlora.train.partial"], meta["tlora.train.stopped"]) == ("2", "true", "failed")
    assert wrappers_left(model) == 0


def test_crash_while_sampling_counts_the_finished_step(sd15, loras_dir, comfy_host, monkeypatch):
    """A preview that fails after step 2 finished: step 2 is done, recorded and saved."""
    model, clip, vae = sd15
    real = vae.decode
    calls = {"n": 0}

    def decode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("decoder broke")
        return real(*args, **kwargs)
    monkeypatch.setattr(vae, "decode", decode)
    start = len(comfy_host.server.events)
    with pytest.raises(RuntimeError, match="decoder broke"):
        train(model, clip, vae, steps=5, output_name="crash_sample", sample_every=1)
    events = [d for e, d, _ in comfy_host.server.events[start:] if e == "tlora.train"]
    assert [d["step"] for d in events if "status" not in d] == [1]  # step 2's event never went out
    end = events[-1]
    assert end["status"] == "failed" and end["steps_done"] == 2
    record = pack("trainer").RUNS.get(end["run_id"])
    assert [h["step"] for h in record["history"]] == [1, 2] and record["summary"]["steps_done"] == 2
    assert record["state"]["sample"]["step"] == 1  # the latest sample that was made
    meta = pack("tlora.format").read_metadata(str(loras_dir / "crash_sample.safetensors"))
    assert meta["tlora.train.steps"] == "2" and meta["tlora.train.stopped"] == "failed"


def test_failure_before_training_is_reported(sd15, loras_dir, comfy_host):
    """Bad settings found while preparing: nothing saved, the registry and an event say it failed."""
    model, clip, vae = sd15
    start = len(comfy_host.server.events)
    with pytest.raises(Exception, match="multiple of 64"):
        train(model, clip, vae, steps=3, output_name="never", resolution=96)
    end = [d for e, d, _ in comfy_host.server.events[start:] if e == "tlora.train"][-1]
    assert end["status"] == "failed" and "multiple of 64" in end["message"]
    assert end["steps_done"] == 0 and end["file"] is None
    record = pack("trainer").RUNS.get(end["run_id"])
    assert record["status"] == "failed" and record["file_name"] == "never.safetensors"
    assert not (loras_dir / "never.safetensors").exists()


@pytest.mark.parametrize("name", ["../evil", "/tmp/abs", "a/b", "sub\\x", "..", "", "  ", ".hidden", "C:evil",
                                  "con", "x" * 200, "nul\x00"])
def test_hostile_output_name_is_refused(sd15, loras_dir, name):
    model, clip, vae = sd15
    before = set(os.listdir(loras_dir))
    with pytest.raises(Exception, match="refused"):
        train(model, clip, vae, steps=1, output_name=name)
    assert set(os.listdir(loras_dir)) == before


def test_sanitized_names():
    outputs = pack("trainer.outputs")
    assert outputs.sanitize_output_name(" sks dog (v2) ") == "sks dog (v2).safetensors"
    assert outputs.sanitize_output_name("x.safetensors") == "x.safetensors"


# ----- ComfyUI's built-in trainer can train TLoRA -----------------------------------------------
def builtin_train_inputs(node) -> dict:
    """TrainLoraNode's inputs and their defaults, from its own schema (V3 on 0.12+, INPUT_TYPES on 0.3.75)."""
    if hasattr(node, "define_schema"):
        return {i.id: getattr(i, "default", None) for i in node.define_schema().inputs}
    required = node.INPUT_TYPES()["required"]
    return {name: (spec[1].get("default") if len(spec) > 1 else None) for name, spec in required.items()}


def builtin_train(model, clip, tm, bypass: bool = False, **extra):
    """ComfyUI's TrainLoraNode with TLoRA as its algorithm -> (trained model or None, lora state dict, loss map, steps).

    0.3.75 returns (model, lora, loss_map, steps); 0.12 is a V3 node with required bucket_mode
    and bypass_mode inputs returning (lora, loss_map, steps); 0.33 requires quantized_backward,
    checkpoint_depth and offloading too. `extra` sets further inputs (skipped where the host lacks one).
    """
    import torch
    node = ch.node_class("TrainLoraNode")
    gen = torch.Generator().manual_seed(0)
    # Two latent inputs: 0.3.75's TrainLoraNode crashes on a single one (UnboundLocalError multi_res).
    latents = [{"samples": torch.randn(1, 4, 8, 8, generator=gen)} for _ in range(2)]
    pos = tm.encode_text(clip, "a photo of sks dog")
    inputs = dict(model=[model.patcher], latents=latents, positive=[pos], batch_size=[1], steps=[2],
                  grad_accumulation_steps=[1], learning_rate=[1e-3], rank=[4], optimizer=["AdamW"],
                  loss_function=["MSE"], seed=[0], training_dtype=["fp32"], lora_dtype=["fp32"],
                  algorithm=[pack("nodes.comfy_adapter").TRAIN_ALGORITHM], gradient_checkpointing=[False],
                  existing_lora=["[None]"])
    if ch.host_version() >= (0, 12):
        inputs.update(bucket_mode=[False], bypass_mode=[bypass])
    elif bypass:
        pytest.skip(f"{ch.host_label()} has no bypass mode in TrainLoraNode (0.12 added it)")
    if extra:
        missing = set(extra) - set(builtin_train_inputs(node))
        if missing:
            pytest.skip(f"{ch.host_label()}'s TrainLoraNode has no {', '.join(sorted(missing))} input")
        inputs.update({k: [v] for k, v in extra.items()})
    # Inputs this test does not set (0.33 added quantized_backward, checkpoint_depth, offloading) take
    # the node's own defaults, read from its schema: a newer host's new inputs do not break the call.
    for name, default in builtin_train_inputs(node).items():
        inputs.setdefault(name, [default])
    with torch.inference_mode():
        result = node.execute(**inputs).result
    return (None, *result) if len(result) == 3 else result


TRAINLORA_MODES = {
    "weight_mode": (False, {}),
    "bypass_mode_0_12": (True, {}),
    # 0.33: checkpointing below the top level, and weights offloaded between uses (CPU: a no-op move).
    "checkpoint_depth_offloading_0_33": (False, {"gradient_checkpointing": True, "checkpoint_depth": 2,
                                                 "offloading": True}),
}


@pytest.mark.parametrize("mode", list(TRAINLORA_MODES))
def test_trainloranode_trains_tlora(sd15, tm, loras_dir, mode):
    import torch
    import comfy.weight_adapter as wa
    model, clip, vae = sd15
    bypass, extra = TRAINLORA_MODES[mode]
    adapter_module = pack("nodes.comfy_adapter")
    assert wa.adapter_maps[adapter_module.TRAIN_ALGORITHM] is adapter_module.TLoRAWeightAdapter
    _, lora_sd, loss_map, steps = builtin_train(model, clip, tm, bypass, **extra)
    assert steps == 2 and len(loss_map["loss"]) == 2
    tlora_keys = {k: v for k, v in lora_sd.items() if ".tlora_" in k}
    assert any(k.endswith(".tlora_t.0") for k in tlora_keys) and any(k.endswith(".tlora_scale") for k in tlora_keys)
    from safetensors.torch import save_file
    path = loras_dir / f"builtin_{mode}.safetensors"
    save_file({k: v.detach().contiguous() for k, v in tlora_keys.items()}, str(path))
    loaded = pack("tlora.format").load(str(path))
    assert len(loaded.adapters) >= len(model.attention_modules())
    # It trained: some adapter left its identity/zero start.
    key0 = next(k for k in loaded.adapters if k.endswith("attn1.to_q"))
    w = torch.randn(*model.model.state_dict()[key0 + ".weight"].shape, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(loaded.adapters[key0].patched_weight(w), w, atol=1e-7)
    # Both loaders apply the file, and agree.
    import nodes
    stock, _ = nodes.LoraLoader().load_lora(model.patcher, clip, path.name, 1.0, 0.0)
    assert len(stock.patches) == len(loaded.adapters)
    ours = ch.node_class("TLoRALoaderModelOnly").execute(model=model.patcher, adapter_name=path.name,
                                                         strength_model=1.0).result[0]
    probe = tm.encode_text(clip, "a photo of sks dog")
    sample = lambda patcher: tm.sample(patcher, seed=3, positive=probe, negative=None, steps=2)  # noqa: E731
    assert torch.equal(sample(ours), sample(stock))
    # to_train(): an existing TLoRA file continues training in TrainLoraNode.
    cls = adapter_module.TLoRAWeightAdapter
    key = next(iter(loaded.adapters))
    patch = cls.load(key, {f"{key}.{s}": t for s, t in loaded.adapters[key].tensors.items()})
    diff = patch.to_train()
    w = torch.randn(*model.model.state_dict()[key + ".weight"].shape)
    expected = loaded.adapters[key].patched_weight(w)
    torch.testing.assert_close(diff(w), expected, atol=1e-5, rtol=1e-4)


# ----- over HTTP ----------------------------------------------------------------------------------
def _server_train_graph(**train_inputs) -> dict:
    """Tiny checkpoint + two grey images -> TLoRATrain, as an API-format prompt for the test server."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tlora-tiny-sd15.safetensors"}},
        "img": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 8421504}},
        "train": {"class_type": "TLoRATrain", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "images": ["img", 0],
            **{**DEFAULTS, **train_inputs}}},
    }


@pytest.mark.server
def test_cancel_over_http_keeps_partial(comfy_server):
    comfy_server.assert_pack_imported()
    graph = _server_train_graph(steps=2000, output_name="http_cancel", save_every=0)
    with comfy_server.events() as ev:
        pid = comfy_server.post_prompt(graph, client_id=ev.client_id)
        first = ev.wait_for(lambda m: m.get("type") == "tlora.train" and (m.get("data") or {}).get("step", 0) >= 2,
                            timeout=240)
        comfy_server.interrupt()
        end = ev.wait_done(pid, timeout=120)
    assert end["type"] == "execution_interrupted", end
    data = first["data"]
    assert data["node"] == "train" and data["steps"] == 2000 and math.isfinite(data["loss"])
    path = comfy_server.loras_dir / "http_cancel.safetensors"
    assert path.is_file()
    from tlora import format as fmt  # the core, imported top-level (the server process has its own copy)
    meta = fmt.read_metadata(str(path))
    assert meta["tlora.train.partial"] == "true" and int(meta["tlora.train.steps"]) >= 2
    assert meta["tlora.train.base_model"] == "tlora-tiny-sd15.safetensors"
    adapters = fmt.load(str(path)).adapters
    assert adapters and all(".attn1." in k or ".attn2." in k for k in adapters)
    run = comfy_server.get_json(f"/tlora/runs/{data['run_id']}")
    assert run["status"] == "cancelled" and run["summary"]["partial"] is True
    assert run["summary"]["file"] == "http_cancel.safetensors"
    assert run["summary"]["steps_done"] == int(meta["tlora.train.steps"]) == len(run["history"])
    # The partial file is a normal adapter: ComfyUI's server loads it with our loader and samples with it.
    from harness.graphs import txt2img
    graph = txt2img("tlora-tiny-sd15.safetensors", steps=1)
    graph["lora"] = {"class_type": "TLoRALoaderModelOnly", "inputs": {
        "model": ["ckpt", 0], "adapter_name": "http_cancel.safetensors", "strength_model": 1.0}}
    graph["sampler"]["inputs"]["model"] = ["lora", 0]
    from harness.server import history_error, history_ok
    entry = comfy_server.run(graph, timeout=240)
    assert history_ok(entry), history_error(entry)


def test_text_encoder_training_patches_clip(sd15, loras_dir, tm):
    import torch
    model, clip, vae = sd15
    new_model, new_clip, payload, _, file_name = train(model, clip, vae, steps=2, learning_rate=1e-2,
                                                       output_name="te", train_text_encoder=True)
    te_keys = [k for k in payload["adapters"] if k.startswith("text_encoders.")]
    assert te_keys and all(".self_attn." in k for k in te_keys)
    assert new_clip is not clip
    assert not any(type(m).__name__ == "TLoRAModule" for m in clip.cond_stage_model.modules())
    before = tm.encode_text(clip, "a photo of sks dog")[0][0]
    after = tm.encode_text(new_clip, "a photo of sks dog")[0][0]
    assert not torch.equal(before, after)
    ours, ours_clip = ch.node_class("TLoRALoader").execute(model.patcher, clip, file_name, 1.0, 1.0).result
    torch.testing.assert_close(tm.encode_text(ours_clip, "a photo of sks dog")[0][0], after)


def test_gradient_checkpointing_same_adapter(sd15, loras_dir):
    import torch
    model, clip, vae = sd15
    plain = train(model, clip, vae, steps=2, output_name="gc0")[2]
    ckpt = train(model, clip, vae, steps=2, output_name="gc1", gradient_checkpointing=True)[2]
    for key, adapter in plain["adapters"].items():
        for suffix, tensor in adapter.tensors.items():
            torch.testing.assert_close(ckpt["adapters"][key].tensors[suffix], tensor, atol=1e-6, rtol=1e-5)
    blocks = pack("trainer.comfy.model").checkpoint_blocks(model.model.diffusion_model)
    assert blocks and not any("forward" in b.__dict__ for b in blocks)


def test_dataset_loader_graph(comfy_host, host_checkpoint, loras_dir):
    """LoadImageTextDataSetFromFolder (list outputs) -> TLoRATrain, run by ComfyUI's executor."""
    import folder_paths
    import numpy as np
    from PIL import Image
    folder = os.path.join(folder_paths.get_input_directory(), "tlora_ds")
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(images(2, 72)):
        Image.fromarray((img.numpy() * 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))
        with open(os.path.join(folder, f"{i}.txt"), "w") as f:
            f.write(f"a photo of sks dog, view {i}")
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": host_checkpoint}},
        "ds": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": "tlora_ds"}},
        "train": {"class_type": "TLoRATrain", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "images": ["ds", 0],
            "captions": ["ds", 1], **{**DEFAULTS, "steps": 2, "output_name": "ds_graph"}}},
    }
    res = ch.run_prompt(graph)
    assert res.ok, res.describe()
    model, clip, adapter, curve, file_name = res.outputs["train"]
    assert file_name == "ds_graph.safetensors" and (loras_dir / file_name).is_file()
    meta = adapter["metadata"]
    assert meta["tlora.train.dataset_size"] == "2" and meta["tlora.train.base_model"] == host_checkpoint
    assert "images" in res.ui["train"]  # the loss curve shows on the node
    record = pack("trainer").RUNS.get(meta["tlora.train.run_id"])
    assert (record["node"], record["prompt_id"], record["file_name"]) == ("train", res.prompt_id, file_name)


def _train_over_http(comfy_server, graph: dict) -> tuple[str, list, list, list]:
    """Queue a training prompt with a websocket listening: (prompt id, messages, tlora.train events, step events)."""
    with comfy_server.events() as ev:
        pid = comfy_server.post_prompt(graph, client_id=ev.client_id)
        end = ev.wait_done(pid, timeout=300)
        messages = list(ev.messages)
    assert end["type"] == "execution_success", (end, comfy_server.log_tail(40))
    events = [m["data"] for m in messages if m.get("type") == "tlora.train"]
    return pid, messages, events, [e for e in events if "status" not in e]


@pytest.mark.server
def test_samples_during_training_over_http(comfy_server):
    """sample_every in the real server: previews on the progress bar and in events, training finishes."""
    comfy_server.assert_pack_imported()
    graph = _server_train_graph(steps=4, output_name="http_sample", sample_every=2, save_every=0)
    pid, messages, events, steps = _train_over_http(comfy_server, graph)
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    sampled = {e["step"]: e["sample"] for e in steps if "sample" in e}
    assert sorted(sampled) == [2, 4], sampled
    for step, ref in sampled.items():
        assert ref["type"] == "temp" and ref["subfolder"] == "tlora" and ref["step"] == step
        status, body = comfy_server.request("GET", ref["url"])
        assert status == 200 and isinstance(body, bytes) and body[:8] == b"\x89PNG\r\n\x1a\n"
    # Training went on after each sample: every step's loss is finite and the run is complete.
    assert all(math.isfinite(e["loss"]) for e in steps)
    final = [e for e in events if e.get("status")]
    assert final[-1]["status"] == "done" and final[-1]["partial"] is False
    assert final[-1]["file"] == "http_sample.safetensors"
    from tlora import format as fmt
    meta = fmt.read_metadata(str(comfy_server.loras_dir / "http_sample.safetensors"))
    assert meta["tlora.train.steps"] == "4" and meta["tlora.train.partial"] == "false"
    # ComfyUI's progress bar on the node went 1..4 of 4, and each new sample was its preview
    # (binary preview messages: 1/2 = (un)encoded preview, 4 = preview with metadata).
    progress = [(d["value"], d["max"]) for d in (m["data"] for m in messages if m.get("type") == "progress")
                if d.get("node") == "train" and d.get("prompt_id") == pid]
    if ch.host_version() >= (0, 12):
        # 0.12 throttles progress updates (100 ms / 0.5%) except the first and last step and
        # those carrying a preview: steps 1, 2 and 4 always come, in order; our events carry all.
        assert {(1, 4), (2, 4), (4, 4)} <= set(progress) and progress == sorted(set(progress)), progress
    else:
        assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)], progress
    previews = [m for m in messages if m.get("type") == "binary" and m.get("event") in (1, 2, 4)]
    assert len(previews) == 2 and all(m["size"] > 100 for m in previews), previews
    # The console shows tqdm's bar (in the server's log).
    assert any("Training TLoRA" in line and "4/4" in line for line in comfy_server.log_text().splitlines())
    # The registry (read by the web UI after a reload) has the node, prompt, file and latest sample.
    run = comfy_server.get_json(f"/tlora/runs/{steps[0]['run_id']}")
    assert (run["node"], run["prompt_id"], run["file"]) == ("train", pid, "http_sample.safetensors")
    assert run["state"]["sample"]["step"] == 4 and run["state"]["sample"]["filename"] == sampled[4]["filename"]
    assert run["state"]["sample"]["url"] == sampled[4]["url"]
    assert run["summary"]["file"] == "http_sample.safetensors" and run["summary"]["partial"] is False
    assert run["summary"]["steps_done"] == 4 and [h["step"] for h in run["history"]] == [1, 2, 3, 4]
    # Training after a sample went on exactly as without samples (same seed: the same file tensors).
    graph["train"]["inputs"].update(sample_every=0, output_name="http_nosample")
    from harness.server import history_error, history_ok
    entry = comfy_server.run(graph, timeout=300)
    assert history_ok(entry), history_error(entry)
    from safetensors.torch import load_file
    with_samples = load_file(str(comfy_server.loras_dir / "http_sample.safetensors"))
    without = load_file(str(comfy_server.loras_dir / "http_nosample.safetensors"))
    assert with_samples.keys() == without.keys()
    import torch
    assert all(torch.equal(with_samples[k], without[k]) for k in without)


@pytest.mark.server
def test_every_step_reaches_the_panel_when_the_host_throttles_progress(comfy_server):
    """0.12 throttles `progress` (100 ms / 0.5%): the panel's loss chart, previews and summary
    come from our `tlora.train` events, which must all arrive (on every host)."""
    comfy_server.assert_pack_imported()
    graph = _server_train_graph(steps=24, output_name="http_many", sample_every=12, save_every=0,
                                transform="none", residual="lora:1")
    pid, messages, events, steps = _train_over_http(comfy_server, graph)
    assert [e["step"] for e in steps] == list(range(1, 25))
    assert all(math.isfinite(e["loss"]) and e["steps"] == 24 for e in steps)
    assert sorted(e["step"] for e in steps if "sample" in e) == [12, 24]
    done = [e for e in events if e.get("status")]
    assert len(done) == 1 and done[0]["status"] == "done" and done[0]["steps_done"] == 24
    assert done[0]["file"] == "http_many.safetensors"
    progress = [m["data"]["value"] for m in messages if m.get("type") == "progress"
                and m["data"].get("node") == "train" and m["data"].get("prompt_id") == pid]
    assert progress and progress[0] == 1 and progress[-1] == 24 and progress == sorted(progress)


def test_dynamic_vram_patcher_is_refused_with_a_clear_message_0_12(sd15, loras_dir):
    """0.12's ModelPatcherDynamic (GPU only) streams weights per layer: training refuses it, saying what to do."""
    import comfy.model_patcher as mp
    if not hasattr(mp, "ModelPatcherDynamic"):
        pytest.skip(f"{ch.host_label()} has no dynamic-VRAM model patcher (0.12 added it)")
    if hasattr(mp.ModelPatcherDynamic, "get_non_dynamic_delegate"):
        pytest.skip(f"{ch.host_label()} gives dynamic patchers a resident delegate: training runs on it "
                    f"(test_host_contracts.py); refused only where a loader registered no reload")
    model, clip, vae = sd15
    dynamic = model.patcher.clone()
    dynamic.__class__ = mp.ModelPatcherDynamic  # the real class (its constructor gives CPUs a plain patcher)
    dynamic.non_dynamic_delegate_model = None  # what its __init__ sets (0.33)
    assert dynamic.is_dynamic()
    before = set(loras_dir.iterdir())
    with pytest.raises(pack("tlora.errors").TLoRAError, match="dynamic VRAM.*restart ComfyUI without"):
        train(dynamic, clip, vae, steps=2, output_name="dyn")
    assert set(loras_dir.iterdir()) == before and wrappers_left(model) == 0
