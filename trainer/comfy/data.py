"""ComfyUI's data path: IMAGE batches in, VAE latents and CLIP conditionings out, encoded once.

The engine trains from this cache (trainer/data.py holds the host-free resizing and buckets).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import comfy.model_management as mm

from ...tlora.errors import TLoRAError
from ..data import Cond, Example, TrainData, prepare_images


# Families whose latents are video-shaped (B, C, frames, H, W) (Qwen-Image: Wan 2.1's VAE); an image is one frame.
FRAME_AXIS_FAMILIES = ("QwenImage",)


def vae_downscale(vae: Any) -> int:
    """Pixels per latent cell of a ComfyUI VAE (8 for the SD families)."""
    return vae.downscale_ratio if isinstance(getattr(vae, "downscale_ratio", None), int) else 8


def split_images(images: Sequence[Tensor] | Tensor | None) -> list[Tensor]:
    """IMAGE batches (or a list of them, as dataset loaders give) -> a list of (H, W, C) clones."""
    if images is None:
        return []
    batches: list[Any] = [images] if isinstance(images, Tensor) else list(images)
    while any(isinstance(b, (list, tuple)) for b in batches):  # nested lists from list-executing nodes
        batches = [x for b in batches for x in (b if isinstance(b, (list, tuple)) else [b])]
    out = []
    with torch.inference_mode(False):
        for batch in batches:
            if batch is None:
                continue
            if batch.dim() == 3:
                batch = batch[None]
            out.extend(img.detach().clone().float().cpu() for img in batch)
    return out


@dataclass
class Prepared:
    """What prepare_data hands the engine, plus figures for metadata."""

    data: TrainData
    sample_cond: Cond | None
    sample_uncond: Cond | None
    sample_shape: tuple[int, ...] | None
    sizes: list[tuple[int, int]] = field(default_factory=list)


class Encoder:
    """Cached text conditionings for a model (one CLIP pass per distinct prompt)."""

    def __init__(self, base_model: Any, clip: Any, device: torch.device):
        self.base_model, self.clip, self.device = base_model, clip, device
        self._clip_cache: dict[str, list] = {}

    def conditioning(self, text: str) -> list:
        """ComfyUI conditioning for a prompt, as CLIPTextEncode makes it."""
        if text not in self._clip_cache:
            tokens = self.clip.tokenize(text)
            self._clip_cache[text] = self.clip.encode_from_tokens_scheduled(tokens)
        return self._clip_cache[text]

    def model_cond(self, conditioning: list, latent_shape: Sequence[int], downscale: int,
                   keep_grad: bool = False) -> Cond:
        """The model's inputs for a conditioning at a latent size (extra_conds: SDXL's size embedding...).

        keep_grad: leave the graph attached (text-encoder training); cached conds are detached copies.
        """
        cond, extras = conditioning[0][0], dict(conditioning[0][1])
        params = {k: v for k, v in extras.items() if k not in ("hooks", "control", "gligen")}
        params.update(device=self.device, noise=torch.zeros((1, *latent_shape)), cross_attn=cond,
                      prompt_type="positive")
        params.setdefault("width", latent_shape[-1] * downscale)
        params.setdefault("height", latent_shape[-2] * downscale)
        out = self.base_model.extra_conds(**params)
        result = {}
        for key, value in out.items():
            tensor = getattr(value, "cond", None)
            if isinstance(tensor, Tensor):
                result[key] = tensor[:1].to(self.device) if keep_grad else tensor[:1].detach().clone().to(self.device)
        return result

    def cond(self, text: str, latent_shape: Sequence[int], downscale: int) -> Cond:
        """Cached model conditioning for a prompt at a latent size."""
        return self.model_cond(self.conditioning(text), latent_shape, downscale)


def encode_images(vae: Any, base_model: Any, images: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """Model-space latents (C, h, w) for prepared images, batched by size."""
    latents: list[Tensor | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape), []).append(i)
    for indices in groups.values():
        for start in range(0, len(indices), 8):
            chunk = indices[start:start + 8]
            pixels = torch.stack([images[i] for i in chunk])
            raw = vae.encode(pixels[..., :3])
            if raw.dim() == 4 and type(base_model.model_config).__name__ in FRAME_AXIS_FAMILIES:
                raw = raw.unsqueeze(2)  # an image VAE's latent as the one frame these models take
            processed = base_model.process_latent_in(raw.float()).to(device)
            for j, i in enumerate(chunk):
                latents[i] = processed[j].detach().clone()
    return latents  # type: ignore[return-value]


def prepare_data(base_model: Any, clip: Any, vae: Any, images: Sequence[Tensor], captions: Sequence[str],
                 instance_prompt: str, resolution: int, buckets: bool, class_prompt: str = "",
                 num_class_images: int = 0, class_images: Sequence[Tensor] = (), sample_prompt: str = "",
                 sample_every: int = 0, device: torch.device | None = None) -> Prepared:
    """Resize/crop, VAE-encode and CLIP-encode everything once (the engine trains from this cache)."""
    device = device or mm.get_torch_device()
    if not images:
        raise TLoRAError("no training images: connect an IMAGE batch or an image dataset loader")
    downscale = vae_downscale(vae)
    encoder = Encoder(base_model, clip, device)
    with torch.inference_mode(False), torch.no_grad():
        fitted = prepare_images(images, resolution, buckets)
        latents = encode_images(vae, base_model, fitted, device)
        instance = []
        for latent, caption in zip(latents, captions):
            text = caption or instance_prompt
            instance.append(Example(latent, encoder.cond(text, latent.shape, downscale), text))
        data = TrainData(instance)
        if class_images or num_class_images:
            if not class_prompt.strip():
                raise TLoRAError("prior preservation needs a class_prompt (e.g. 'a photo of a dog')")
            if class_images:
                class_fitted = prepare_images(class_images, resolution, buckets)
                for latent in encode_images(vae, base_model, class_fitted, device):
                    data.prior.append(Example(latent, encoder.cond(class_prompt, latent.shape, downscale),
                                                class_prompt))
            shape = (latents[0].shape[0], resolution // downscale, resolution // downscale)
            data.generate_prior = max(int(num_class_images), len(data.prior))
            data.prior_cond = encoder.cond(class_prompt, shape, downscale)
            data.prior_uncond = encoder.cond("", shape, downscale)
            data.prior_shape = shape
        sample_cond = sample_uncond = sample_shape = None
        if sample_every:
            sample_shape = (latents[0].shape[0], resolution // downscale, resolution // downscale)
            sample_cond = encoder.cond(sample_prompt.strip() or instance_prompt, sample_shape, downscale)
            sample_uncond = encoder.cond("", sample_shape, downscale)
            data.sample_cond, data.sample_uncond, data.sample_shape = sample_cond, sample_uncond, sample_shape
    return Prepared(data, sample_cond, sample_uncond, sample_shape, [tuple(f.shape[:2]) for f in fitted])
