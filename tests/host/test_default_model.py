"""The embedded default model (tools/build_default_model.py, proving/) in stock ComfyUI.

Two groups:
* tiny build, end to end (about a minute): the script writes a checkpoint that ComfyUI's own
  CheckpointLoaderSimple loads as SD1.5, a re-run returns at once, the 320-wide file computes
  exactly what the narrow twin was trained to, and an interrupted training stage resumes to the
  same weights.
* the real default model (skipped unless built): sampling prompts such as "a red circle on a
  blue background" gives that, measured analytically (background = border colour, object colour
  at the object, circle vs square by how much of its box the object fills).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from harness import comfy_host as ch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "build_default_model.py"
ARTIFACTS = ROOT / "tests" / "artifacts"


@pytest.fixture(scope="module")
def D(comfy_host):
    """proving.default_model, imported once the in-process host is set up."""
    from proving import default_model
    return default_model


def _run_script(*args: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, TLORA_TORCH_THREADS=os.environ.get("TLORA_TORCH_THREADS", "1"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.perf_counter() - t0


def _load_with_stock_node(path: Path, name: str):
    """(model, clip, vae) through ComfyUI's own CheckpointLoaderSimple node, from models/checkpoints."""
    import nodes
    link = ch.models_dir("checkpoints") / name
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(path)
    import folder_paths
    folder_paths.filename_list_cache.clear()
    return nodes.CheckpointLoaderSimple().load_checkpoint(name)


def _save_grid(rows: list[np.ndarray], name: str) -> Path:
    """Write image rows (uint8) as a PNG under tests/artifacts/ for a human to look at."""
    from PIL import Image
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    grid = np.concatenate(rows, 0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)
    return path


# --------------------------------------------------------------------------- tiny build (about a minute)

@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory, comfy_host):
    """A --tiny build by the script in a private cache folder: (checkpoint, cache folder, seconds)."""
    cache = tmp_path_factory.mktemp("proving_cache")
    out = cache / "tiny.safetensors"
    proc, seconds = _run_script("--tiny", "--out", str(out), "--cache-dir", str(cache), "--quiet")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    return out, cache, seconds


def test_tiny_build_is_a_stock_sd15_checkpoint(tiny_build, D):
    import torch
    out, _, _ = tiny_build
    manifest = json.loads(D.manifest_path(out).read_text())
    assert manifest["key"] == D.BuildConfig.make(tiny=True).key()
    model, clip, vae = _load_with_stock_node(out, "tlora-proving-tiny-test.safetensors")
    assert type(model.model.model_config).__name__ == "SD15"
    assert type(vae.first_stage_model).__name__ == "TAESD"
    unet = model.model.diffusion_model
    assert unet.model_channels == 320
    attn = [n for n, _ in unet.named_modules() if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    assert len(attn) == 32
    cond = D.encode(clip, "a red circle on a blue background")
    assert cond[0][0].shape == (1, 77, 768)
    images = D.generate(model, clip, vae, "a red circle on a blue background", seed=1, steps=2, cfg=2.0)
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8
    again = D.generate(model, clip, vae, "a red circle on a blue background", seed=1, steps=2, cfg=2.0)
    assert np.array_equal(images, again)
    assert torch.isfinite(torch.from_numpy(images.astype(np.float32))).all()


def test_tiny_build_rerun_returns_at_once(tiny_build):
    out, cache, _ = tiny_build
    mtime = out.stat().st_mtime_ns
    proc, _ = _run_script("--tiny", "--out", str(out), "--cache-dir", str(cache), "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(out)
    assert out.stat().st_mtime_ns == mtime


@pytest.mark.skipif(ch.host_version() >= (0, 12), reason="the build's numerics are the same on any host: checked "
                    "once, in the 0.3.75 leg (the environment `make demo` builds with)")
def test_tiny_build_is_bit_identical_whatever_the_thread_environment(tiny_build, tmp_path, D):
    """A second build, with TLORA_TORCH_THREADS=2 in its environment, gives the same tensors bit for bit.

    Thread count and CPU kernel level change the weights (measured), so the build pins both: one thread
    unless --threads says otherwise (then it is another config and another cache key), AVX2 kernels.
    """
    import platform

    import torch
    from safetensors import safe_open
    out, _, _ = tiny_build
    again = tmp_path / "again.safetensors"
    env = dict(os.environ, TLORA_TORCH_THREADS="2")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(again), "--cache-dir", str(tmp_path),
                           "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with safe_open(str(out), "pt") as a, safe_open(str(again), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for name in a.keys():
            x, y = a.get_tensor(name), b.get_tensor(name)
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert x.contiguous().view(-1).view(torch.uint8).equal(y.contiguous().view(-1).view(torch.uint8)), name
    manifest = json.loads(D.manifest_path(again).read_text())
    assert manifest["numerics"]["threads"] == 1
    if platform.machine() in ("x86_64", "AMD64"):
        assert manifest["numerics"]["cpu_capability"] == "AVX2"
    assert D.BuildConfig.make(tiny=True, threads=2).key() != D.BuildConfig.make(tiny=True).key()


def test_wide_checkpoint_computes_the_trained_twin(tiny_build, D):
    """The 320-wide UNet and 64-wide TAESD in the file compute what the narrow twins were trained to."""
    import comfy.sd
    import torch
    from safetensors.torch import load_file

    from proving.narrow import build_narrow_unet
    out, cache, _ = tiny_build
    cfg = D.BuildConfig.make(tiny=True)
    work = cache / f"work-{cfg.key()}"
    narrow = build_narrow_unet(cfg.unet_width)
    narrow.load_state_dict(load_file(str(work / "unet.safetensors")))
    vae_twin = D._narrow_vae(cfg)
    vae_twin.load_state_dict(load_file(str(work / "vae.safetensors")))
    model, _, vae, _ = comfy.sd.load_checkpoint_guess_config(str(out), output_vae=True, output_clip=False)
    wide = model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([17.0, 801.0])
    with torch.no_grad():
        a, b = narrow(x, t, context=c), wide(x, t, context=c)
    assert (a - b).abs().max() <= 1e-4 * (1 + a.abs().max()), float((a - b).abs().max())
    images = torch.rand(2, 64, 64, 3, generator=g)
    with torch.no_grad():
        z_twin = vae_twin.encode(images.movedim(-1, 1))
        z_host = model.model.process_latent_in(vae.encode(images))
        decoded = vae.decode(model.model.process_latent_out(z_twin))
        twin_decoded = vae_twin.decode(z_twin).clamp(0, 1).movedim(1, -1)
    assert torch.allclose(z_twin, z_host, atol=1e-4)
    assert torch.allclose(decoded, twin_decoded, atol=1e-4)


def test_hybrid_resblocks_compute_the_wide_unet(tiny_build, D):
    """The benchmarks' speed-up (narrow ResBlocks inside the wide UNet) changes nothing, adapters included."""
    import comfy.sd
    import torch

    import tlora
    from proving.narrow import hybridize_resblocks
    out, _, _ = tiny_build
    cfg = D.BuildConfig.make(tiny=True)
    model, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(out), output_vae=False, output_clip=False)
    unet = model.model.diffusion_model
    g = torch.Generator().manual_seed(1)
    paths = [n for n, _ in unet.named_modules() if n.endswith((".to_q", ".to_out.0"))]
    adapters = {p: tlora.ModuleAdapter.create(tuple(unet.get_submodule(p).weight.shape), "trm:2", "lora:2",
                                              generator=g, name=p) for p in paths}
    for a in adapters.values():  # move off the identity/zero start so the adapters do something
        for k, v in a.tensors.items():
            if k != "tlora_scale":
                v.add_(0.05 * torch.randn(v.shape, generator=g))
    tlora.attach(unet, adapters)
    x, c, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g), torch.tensor([9.0, 444.0])
    with torch.no_grad():
        wide = unet(x, t, context=c)
        swapped = hybridize_resblocks(unet, cfg.unet_width, cfg.seed)
        hybrid = unet(x, t, context=c)
    assert len(swapped) == 5
    assert (wide - hybrid).abs().max() <= 1e-5 * (1 + wide.abs().max())


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, D, monkeypatch):
    import torch
    cfg = D.BuildConfig.make(tiny=True)
    g = torch.Generator().manual_seed(3)
    latents, conds = torch.randn(6, 4, 8, 8, generator=g), torch.randn(3, 77, 768, generator=g)
    index, empty = torch.tensor([0, 1, 2, 0, 1, 2]), torch.zeros(1, 77, 768)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = D.train_unet(cfg, tmp_path / "a", latents, index, conds, empty, progress=False)

    original = D._Stage.update
    state = {"fired": False}

    def interrupt_once(self, loss):
        if self.step == 3 and not state["fired"]:
            state["fired"] = True
            raise KeyboardInterrupt
        return original(self, loss)

    monkeypatch.setattr(D._Stage, "update", interrupt_once)
    with pytest.raises(KeyboardInterrupt):
        D.train_unet(cfg, tmp_path / "b", latents, index, conds, empty, progress=False)
    assert (tmp_path / "b" / "unet_state.pt").is_file() and not (tmp_path / "b" / "unet.safetensors").exists()
    resumed = D.train_unet(cfg, tmp_path / "b", latents, index, conds, empty, progress=False)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


# --------------------------------------------------------------------------- the real default model

@pytest.fixture(scope="module")
def default_model(comfy_host, D):
    """(model, clip, vae) of the built default model via CheckpointLoaderSimple (skip if not built)."""
    path, cfg = D.default_path(), D.BuildConfig.make()
    if not D.is_built(path, cfg):
        pytest.skip(f"the default model is not built ({path}); build it with "
                    f"`.venv/bin/python tools/build_default_model.py` (about 20 min on 2 shared CPU cores)")
    return _load_with_stock_node(path, "tlora-proving-sd15-test.safetensors")


def test_default_model_follows_prompts(default_model, D):
    """Anchor prompts, three images each: background, object colour, shape and place measured on the images.

    Thresholds sit below what the default build (format 3, the same on every machine) measures:
    background 24/24, colour 24/24, shape 10/24 (docs/QUALITY.md): shapes are the model's weak point
    and what varies most between builds (the format-2 build measured about 17/24).
    """
    from proving import measure as M
    from proving import procedural as P
    model, clip, vae = default_model
    results: dict[str, list[bool]] = {}
    rows, per_prompt = [], {}
    for spec in P.ANCHOR_SPECS:
        images = D.generate(model, clip, vae, spec.caption, seed=0, batch=3, steps=20, cfg=5.0)
        rows.append(np.concatenate(list(images), 1))
        checks = [M.check_caption(im, spec) for im in images]
        per_prompt[spec.caption] = checks
        for c in checks:
            for k, v in c.items():
                results.setdefault(k, []).append(v)
    grid = _save_grid(rows, "default_model_prompts.png")
    rates = {k: sum(v) / len(v) for k, v in results.items()}
    summary = f"rates {rates} (grid: {grid}); per prompt: {per_prompt}"
    assert rates["background"] >= 0.9, summary
    assert rates["colour"] >= 0.8, summary
    assert rates["shape"] >= 0.35, summary
    red_circle = per_prompt["a red circle on a blue background"]
    assert sum(c["background"] and c["colour"] and c["shape"] for c in red_circle) >= 2, summary
