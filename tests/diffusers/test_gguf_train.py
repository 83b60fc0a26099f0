"""The command-line trainer on a GGUF denoiser (diffusers' GGUF loading through the `gguf` package).

A tiny Flux pipeline's transformer is written as a Q8_0 .gguf (harness/quantized.write_gguf) and
trained by `tlora-train --model t.gguf --config <pipeline folder>` in a subprocess, as a user runs it.
Then, in this process: the denoiser's GGUFLinear layers run the trained file activation-side (its
weights never dequantized into the model, their bytes unchanged) and denoise the training images
better than without it at fixed noise; and the file is a normal TLoRA file that fuses into the float
pipeline exactly (dense float64 reference of each adapted weight).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("gguf")

from comfyui_tlora.tlora import format as tformat  # noqa: E402
from comfyui_tlora.trainer.diffusers import inference as A  # noqa: E402
from comfyui_tlora.trainer.diffusers import model as dmodel  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from harness import tiny_diffusers as td  # noqa: E402
from harness.quantized import write_gguf  # noqa: E402
from tests.host import tlora_refs as R  # noqa: E402

# Whole modules of ComfyUI's attn preset and their diffusers layers (slices keep diffusers names).
WHOLE = {"diffusion_model.double_blocks.0.img_attn.proj": "transformer_blocks.0.attn.to_out.0",
         "diffusion_model.double_blocks.0.txt_attn.proj": "transformer_blocks.0.attn.to_add_out",
         "diffusion_model.single_blocks.0.linear2": "single_transformer_blocks.0.proj_out"}


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TLORA_AUTOTUNE="0",
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def denoising_error(pipe, images: Path, seed: int = 3) -> float:
    """Flow-matching velocity MSE of the pipeline's transformer on the training images at fixed noise and sigmas."""
    import numpy as np
    from PIL import Image
    p = dmodel.parts(pipe)
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize((64, 64)))).float() / 255
                          for f in sorted(images.glob("*.png"))])  # (B, H, W, 3) in [0, 1]
    assert len(pixels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = dmodel.encode_images(pipe.vae, pixels)
        cond = dmodel.text_encoder(p)(["a photo of sks dog"] * len(latents))
        run = dmodel.denoiser(p.denoiser, p.kind)
        total = 0.0
        for sigma in (0.3, 0.5, 0.7):
            noise = torch.randn(latents.shape, generator=g)
            x_t = (1 - sigma) * latents + sigma * noise
            pred = run(x_t, torch.full((len(latents),), sigma), cond)
            total += float(((pred.float() - (noise - latents)) ** 2).mean())
    return total / 3


def gguf_bytes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.as_tensor().clone() for n, p in model.named_parameters() if type(p).__name__ == "GGUFParameter"}


def test_the_command_line_trainer_trains_on_a_gguf_transformer(tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline, FluxTransformer2DModel
    folder = td.save_flux(tmp_path / "pipe", seed=0)
    td.write_images(tmp_path / "images", count=2)
    float_transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    write_gguf(str(tmp_path / "t.gguf"), float_transformer.state_dict(), "gguf_q8_0", "flux")
    done = subprocess.run(
        [sys.executable, "-m", "comfyui_tlora.trainer.diffusers", "--model", str(tmp_path / "t.gguf"), "--config",
         folder, "--data", str(tmp_path / "images"), "--output-dir", str(tmp_path / "out"), "--output-name", "g",
         "--steps", "30", "--learning-rate", "0.01", "--resolution", "64", "--loss", "mse", "--quiet",
         "--transform", "trm:2", "--residual", "lora:2", "--instance-prompt", "a photo of sks dog"],
        cwd=str(tmp_path), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = tmp_path / "out" / "g.safetensors"
    adapters = tformat.load(str(trained)).adapters  # a normal file: the core's reader validates every module
    assert set(WHOLE) <= set(adapters)

    pipe = dmodel.load_pipeline(str(tmp_path / "t.gguf"), folder)  # the trainer's own GGUF loading
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q).__name__ == "GGUFLinear"
    stored = gguf_bytes(pipe.transformer)
    before = denoising_error(pipe, tmp_path / "images")
    handle = A.load_tlora(pipe, str(trained), strength=1.0)
    after = denoising_error(pipe, tmp_path / "images")
    handle.remove()
    assert after < 0.9 * before, (before, after)
    now = gguf_bytes(pipe.transformer)
    assert stored and all(torch.equal(now[k], v) for k, v in stored.items()), "the GGUF weights changed"

    float_pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    base = {k: v.clone() for k, v in float_pipe.transformer.state_dict().items()}
    A.load_tlora(float_pipe, str(trained), strength=1.0)
    A.fuse(float_pipe)
    fused = float_pipe.transformer.state_dict()
    for generic, layer in WHOLE.items():
        key = layer + ".weight"
        R.assert_close64(fused[key], R.ref_patched(base[key], adapters[generic].tensors, 1.0), generic)
    for name, adapter in adapters.items():  # diffusers-named slices (q/k/v, proj_mlp) are whole diffusers layers
        if name.startswith("transformer."):
            key = name.removeprefix("transformer.") + ".weight"
            R.assert_close64(fused[key], R.ref_patched(base[key], adapter.tensors, 1.0), name)
    A.unfuse(float_pipe)
