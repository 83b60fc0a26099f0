"""The command-line trainer on the newer flow pipelines (Z-Image, Wan): real tiny pipelines, the real command.

What a run is checked against: the names the one mapping gives the transformer's attention weights
(generic where a diffusers module is a whole generic weight, its diffusers name where it is a row
slice of ComfyUI's fused weight); the pipeline's own denoising error on the training images,
measured here as the pipeline calls its transformer (its VAE normalisation, its prompt encoding,
its timestep convention), before and after the trained file is fused by diffusers; and ComfyUI's
twin given the same weights (tests/diffusers/families_refs.py), patched by the stock loader and ours,
against diffusers' fused weights.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfyui_tlora.tlora import diffusers_names as N
from comfyui_tlora.tlora import format as tformat

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from harness import tiny_diffusers as td  # noqa: E402

FAMILIES = {"zimage": td.save_zimage, "wan": td.save_wan, "qwenimage": td.save_qwenimage,
            "flux2": td.save_flux2_klein, "chroma": td.save_chroma}
COMFY_PYTHON = ROOT / ".venv" / "bin" / "python"
STRENGTH = 0.7


def _comfy_patch(out: Path, kind: str, weights: Path, trained: Path) -> None:
    """families_refs.comfy_family_patch in the ComfyUI environment (.venv)."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.diffusers.families_refs import "
            f"comfy_family_patch; comfy_family_patch({str(out)!r}, {kind!r}, {str(weights)!r}, {str(trained)!r}, "
            f"{STRENGTH})")
    done = subprocess.run([str(COMFY_PYTHON), "-c", code], cwd=str(ROOT), capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, f"ComfyUI side failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TLORA_AUTOTUNE="0",
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _images(folder: Path) -> torch.Tensor:
    from PIL import Image
    files = sorted(folder.glob("*.png"))
    return torch.stack([torch.tensor(list(Image.open(f).convert("RGB").getdata()), dtype=torch.float32)
                        .view(64, 64, 3) / 255 for f in files])


def _pipeline_error(pipe, kind: str, pixels: torch.Tensor, caption: str) -> float:
    """The flow error |v - (noise - x0)|^2 of the pipeline's transformer as the pipeline itself calls it."""
    torch.manual_seed(0)
    with torch.no_grad():
        x = pixels.movedim(-1, 1) * 2 - 1
        if kind in ("wan", "qwenimage"):
            z = pipe.vae.encode(x[:, :, None]).latent_dist.mode()
            mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
            std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
            x0 = (z - mean) / std
            if kind == "wan":
                text = pipe.encode_prompt([caption] * len(x0), do_classifier_free_guidance=False)[0]
            else:
                text, mask = pipe.encode_prompt([caption] * len(x0))
        elif kind == "flux2":  # the pipeline's own patchify and batch-norm statistics
            z = pipe._patchify_latents(pipe.vae.encode(x).latent_dist.mode())
            mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
            std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
            x0 = (z - mean) / std
            text, text_ids = pipe.encode_prompt([caption] * len(x0), text_encoder_out_layers=(1, 2, 3))
        else:
            z = pipe.vae.encode(x).latent_dist.mode()
            x0 = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
            if kind == "chroma":
                text, _, mask = pipe.encode_prompt([caption] * len(x0), do_classifier_free_guidance=False)[:3]
            else:
                text, _ = pipe.encode_prompt([caption] * len(x0), do_classifier_free_guidance=False)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
        total = 0.0
        for sigma in (0.3, 0.5, 0.7):
            x_t = (1 - sigma) * x0 + sigma * noise
            if kind == "wan":
                v = pipe.transformer(hidden_states=x_t, timestep=torch.full((len(x0),), sigma * 1000),
                                     encoder_hidden_states=text, return_dict=False)[0]
            elif kind == "qwenimage":  # 2x2-packed tokens of the one frame, told sigma, with the text mask
                b, c, _, h, w = x_t.shape
                packed = pipe._pack_latents(x_t[:, :, 0], b, c, h, w)
                out = pipe.transformer(hidden_states=packed, timestep=torch.full((b,), sigma),
                                       encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                                       img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
                v = pipe._unpack_latents(out, h * 8, w * 8, 8)
            elif kind == "flux2":  # one token per latent cell, the pipeline's 4-axis ids, told sigma, no guidance
                b, c, h, w = x_t.shape
                out = pipe.transformer(hidden_states=pipe._pack_latents(x_t), timestep=torch.full((b,), sigma),
                                       guidance=None, encoder_hidden_states=text, txt_ids=text_ids,
                                       img_ids=pipe._prepare_latent_ids(x_t), return_dict=False)[0]
                v = out.permute(0, 2, 1).reshape(b, c, h, w)
            elif kind == "chroma":  # Flux's 2x2 packing and ids, the text mask extended by the image tokens
                b, c, h, w = x_t.shape
                packed = pipe._pack_latents(x_t, b, c, h, w)
                ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
                full = pipe._prepare_attention_mask(b, packed.shape[1], x_t.dtype, mask)
                out = pipe.transformer(hidden_states=packed, timestep=torch.full((b,), sigma),
                                       encoder_hidden_states=text, txt_ids=torch.zeros(text.shape[1], 3),
                                       img_ids=ids, attention_mask=full, return_dict=False)[0]
                v = pipe._unpack_latents(out, h * 8, w * 8, 8)
            else:  # Z-Image: latents as a list of (C, 1, H, W), told 1 - sigma, predicting x0 - noise
                out = pipe.transformer(list(x_t.unsqueeze(2).unbind(0)), torch.full((len(x0),), 1 - sigma), text,
                                       return_dict=False)[0]
                v = -torch.stack(out).squeeze(2)
            total += float(((v - (noise - x0)) ** 2).mean())
    return total / 3


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_the_command_trains_the_pipeline_and_diffusers_applies_the_file(tmp_path: Path, kind: str) -> None:
    """20 steps lower the pipeline's own denoising error once diffusers fuses the file; the names are the mapping's."""
    from diffusers import DiffusionPipeline

    from comfyui_tlora.trainer.diffusers import apply as A
    from comfyui_tlora.trainer.diffusers import flow_families
    FAMILIES[kind](tmp_path / "pipe", seed=0)
    td.write_images(tmp_path / "images", count=2)
    caption = "a photo of sks square number 0"
    done = subprocess.run(
        [sys.executable, "-m", "comfyui_tlora.trainer.diffusers", "--model", str(tmp_path / "pipe"), "--data",
         str(tmp_path / "images"), "--output-dir", str(tmp_path / "out"), "--output-name", "t", "--steps", "20",
         "--learning-rate", "0.02", "--resolution", "64", "--loss", "mse", "--quiet", "--targets", "attn",
         "--batch-size", "2"],
        cwd=str(tmp_path), env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = tmp_path / "out" / "t.safetensors"
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    table = flow_families.table(kind, pipe.transformer)
    expected = set()
    for generic, targets in N.diffusers_rows(table).items():
        if table.denoiser and any(generic == name for name, _, group in table.denoiser_modules() if group == "attn"):
            expected |= {generic} if len(targets) == 1 and targets[0][1] is None else {p for p, _ in targets}
    assert set(tformat.load(str(trained)).adapters) == expected
    pixels = _images(tmp_path / "images")
    with open(tmp_path / "images" / "img0.txt", encoding="utf-8") as f:
        assert f.read() == caption
    before = _pipeline_error(pipe, kind, pixels[:1], caption)
    handle = A.load_tlora(pipe, str(trained), strength=1.0)
    A.fuse(pipe)
    after = _pipeline_error(pipe, kind, pixels[:1], caption)
    A.unfuse(pipe)
    handle.remove()
    assert after < 0.95 * before, f"{kind}: the pipeline's denoising error {before:.4f} -> {after:.4f}"
    if not COMFY_PYTHON.exists():
        pytest.skip("the ComfyUI environment .venv is missing (make bootstrap)")
    from safetensors.torch import load_file
    _comfy_patch(tmp_path / "comfy", kind, tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors",
                 trained)
    base = load_file(str(tmp_path / "comfy" / "base.safetensors"))
    original = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    handle = A.load_tlora(pipe, str(trained), strength=STRENGTH)
    A.fuse(pipe)
    fused = pipe.transformer.state_dict()
    adapted = {p.removeprefix("transformer.") + ".weight" for p in
               (N.diffusers_rows(table)[name][0][0] if name.startswith("diffusion_model.") else name
                for name in tformat.load(str(trained)).adapters)}
    # What diffusers' fuse changed (an adapter whose weight got no gradient, e.g. the last block's text output
    # that the image never reads, stays at its identity start and changes nothing).
    fuse_changed = {k for k in base if not torch.equal(fused[k], original[k])}
    assert fuse_changed and fuse_changed <= adapted
    for label in ("stock", "ours"):
        comfy = load_file(str(tmp_path / "comfy" / f"patched_{label}.safetensors"))
        changed = {k for k in comfy if not torch.equal(comfy[k], base[k])}
        assert changed == fuse_changed, f"{kind} {label}: {changed ^ fuse_changed}"
        for key in comfy:
            torch.testing.assert_close(fused[key], comfy[key], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{kind} {label} {key}: {m}")
    A.unfuse(pipe)
    handle.remove()
