"""The newer flow-matching pipelines in the command-line trainer: Z-Image, Wan, Qwen-Image.

What differs between them is small and said here, each as its pipeline does it (diffusers 0.42):
how a prompt becomes the transformer's conditioning (the pipeline's own `encode_prompt`, padded to
a fixed length so cached captions batch without repeating tokens in a joint-attention stream), how
the VAE's latent is normalised, and how the transformer is called (its timestep convention and
latent layout). Everything returns the flow velocity (noise - x0) the engine's flow schedule
trains on; the schedule's timesteps are the sigmas themselves and each call scales them as its
pipeline does (Wan: sigma x 1000; Qwen-Image: sigma; Z-Image: 1 - sigma). File names come from
the one mapping (tlora/diffusers_names.py) over a table built from the live transformer's config.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ...tlora import arch as tarch
from ...tlora import arch_families as families
from ..data import Cond

# Pipeline classes -> their kind.
PIPELINES = {"ZImagePipeline": "zimage", "WanPipeline": "wan", "QwenImagePipeline": "qwenimage"}
TEXT_TOKENS = {"zimage": 512, "wan": 512, "qwenimage": 512}  # the fixed conditioning length per kind
_LENGTH = "text_length"  # cached conditioning key: how many of the padded tokens are the caption's


def table(kind: str, transformer: nn.Module) -> tarch.Arch:
    """The live transformer's table (any size), for the generic <-> diffusers name mapping."""
    found = families.from_diffusers(type(transformer).__name__, dict(transformer.config))
    if found is not None:
        return tarch.Arch(found[0], found[1], (), "", "", "")
    c = transformer.config  # Qwen-Image: ComfyUI uses diffusers' names
    cfg = tarch.QwenImageConfig(layers=c.num_layers, hidden=c.num_attention_heads * c.attention_head_dim,
                                in_channels=c.in_channels, context=c.joint_attention_dim)
    return tarch.Arch(kind, cfg, (), "", "", "")


def _pad(embeds: Tensor, mask: Tensor | None, length: int) -> tuple[Tensor, Tensor]:
    """(B, L, D) caption states and their (B, L) mask, padded (or cut) to `length` tokens; the mask as a float."""
    b, n, d = embeds.shape
    mask = torch.ones(b, n, device=embeds.device) if mask is None else mask.to(embeds.device).float()
    if n >= length:
        return embeds[:, :length], mask[:, :length]
    pad = length - n
    return (torch.cat([embeds, embeds.new_zeros(b, pad, d)], 1),
            torch.cat([mask, mask.new_zeros(b, pad)], 1))


def text_encoder(pipe: Any, kind: str, device: torch.device) -> Callable[[list[str]], Cond]:
    """prompts -> the transformer's conditioning through the pipeline's own `encode_prompt` (with gradients)."""
    length = TEXT_TOKENS[kind]

    def encode(prompts: list[str]) -> Cond:
        if kind == "zimage":
            embeds, _ = pipe.encode_prompt(list(prompts), device=device, do_classifier_free_guidance=False,
                                           max_sequence_length=length)
            # A list of (tokens_i, D): the caption's own tokens (the pipeline drops the padding).
            lengths = torch.tensor([e.shape[0] for e in embeds], device=device)
            padded = torch.stack([torch.cat([e, e.new_zeros(length - e.shape[0], e.shape[1])]) for e in embeds])
            return {"encoder_hidden_states": padded, _LENGTH: lengths}
        if kind == "wan":
            embeds = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                        max_sequence_length=length, device=device)[0]
            return {"encoder_hidden_states": embeds}  # already zero-padded to `length` by the pipeline
        embeds, mask = pipe.encode_prompt(list(prompts), device=device, max_sequence_length=length)
        embeds, mask = _pad(embeds, mask, length)
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}
    return encode


def _zimage(transformer: nn.Module) -> Callable[[Tensor, Tensor, Cond], Tensor]:
    def run(x_t: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        b = x_t.shape[0]
        lengths = cond[_LENGTH].reshape(-1).tolist()
        states = [cond["encoder_hidden_states"][i, :int(n)] for i, n in enumerate(lengths)]
        latents = list(x_t.unsqueeze(2).unbind(0))  # each (C, 1, H, W), as the pipeline hands them
        t = (1 - sigma.to(x_t.dtype)).expand(b)  # Z-Image is told 1 - sigma (1000 - t) / 1000
        out = transformer(latents, t, states, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)  # it predicts x0 - noise
    return run


def _wan(transformer: nn.Module) -> Callable[[Tensor, Tensor, Cond], Tensor]:
    def run(x_t: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        t = (sigma.to(x_t.dtype) * 1000).expand(x_t.shape[0])  # the scheduler's timestep (sigma x 1000)
        return transformer(hidden_states=x_t, timestep=t, encoder_hidden_states=cond["encoder_hidden_states"],
                           return_dict=False)[0]
    return run


def _qwenimage(transformer: nn.Module) -> Callable[[Tensor, Tensor, Cond], Tensor]:
    def run(x_t: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        lat = x_t[:, :, 0]  # the one frame of an image
        b, c, h, w = lat.shape
        # The pipeline's packing: 2x2 latent patches as tokens (a permutation: the loss is unchanged).
        packed = lat.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        mask = cond["encoder_hidden_states_mask"]
        out = transformer(hidden_states=packed, timestep=sigma.to(packed.dtype).expand(b),
                          encoder_hidden_states=cond["encoder_hidden_states"], encoder_hidden_states_mask=mask,
                          img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        return out[:, :, None]
    return run


def denoiser(transformer: nn.Module, kind: str) -> Callable[[Tensor, Tensor, Cond], Tensor]:
    """(x_t, sigma, cond) -> the flow velocity, the transformer called as its pipeline calls it."""
    return {"zimage": _zimage, "wan": _wan, "qwenimage": _qwenimage}[kind](transformer)


def video_vae(vae: nn.Module) -> bool:
    """A video VAE (Wan's, Qwen-Image's): 5-D latents normalised by the config's per-channel mean and std."""
    return getattr(vae.config, "latents_mean", None) is not None and getattr(vae.config, "z_dim", None) is not None


def _stats(vae: nn.Module, like: Tensor) -> tuple[Tensor, Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=like.dtype, device=like.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=like.dtype, device=like.device).view(shape)
    return mean, std


def encode_video(vae: nn.Module, pixels: Tensor) -> Tensor:
    """(B, H, W, 3) stills in [0, 1] -> normalised (B, C, 1, h, w) latents, each image one frame (the mode)."""
    with torch.no_grad():
        x = (pixels.movedim(-1, 1).to(vae.device, vae.dtype) * 2 - 1)[:, :, None]
        latent = vae.encode(x).latent_dist.mode().float()
        mean, std = _stats(vae, latent)
        return (latent - mean) / std


def decode_video(vae: nn.Module, latent: Tensor) -> Tensor:
    """A normalised (B, C, F, h, w) latent -> its first frame as an (H, W, 3) image in [0, 1]."""
    with torch.no_grad():
        z = latent.to(vae.device, vae.dtype)
        mean, std = _stats(vae, z)
        x = vae.decode(z * std + mean).sample
    return ((x[0, :, 0].float().clamp(-1, 1) + 1) / 2).movedim(0, -1).cpu()


def vae_scale(vae: nn.Module) -> int:
    """Pixels per latent cell of a VAE (its spatial compression)."""
    for value in (getattr(vae, "spatial_compression_ratio", None), getattr(vae.config, "scale_factor_spatial", None)):
        if isinstance(value, int):
            return value
    if getattr(vae.config, "block_out_channels", None):
        return 2 ** (len(vae.config.block_out_channels) - 1)
    return 2 ** len(vae.config.temperal_downsample)  # the Wan-style video VAEs: one halving per stage
