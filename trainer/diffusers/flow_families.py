"""The newer flow-matching pipelines in the command-line trainer: Z-Image, Wan, Qwen-Image, Flux.2 Klein, Chroma.

What differs between them is small and said here, each as its pipeline does it (diffusers 0.42):
how a prompt becomes the transformer's conditioning (the pipeline's own `encode_prompt`, padded to
a fixed length so cached captions batch without repeating tokens in a joint-attention stream), how
the VAE's latent is normalised, and how the transformer is called (its timestep convention and
latent layout). Everything returns the flow velocity (noise - x0) the engine's flow schedule
trains on; the schedule's timesteps are the sigmas themselves and each call scales them as its
pipeline does (Wan: sigma x 1000; Qwen-Image, Flux.2, Chroma: sigma; Z-Image: 1 - sigma). File names come from
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
from ..settings import TrainingError

# Pipeline classes -> their kind.
PIPELINES = {"ZImagePipeline": "zimage", "WanPipeline": "wan", "QwenImagePipeline": "qwenimage",
             "Flux2KleinPipeline": "flux2", "ChromaPipeline": "chroma"}
# The fixed conditioning length per kind (Flux.2 Klein's and Chroma's pipelines pad to it themselves).
TEXT_TOKENS = {"zimage": 512, "wan": 512, "qwenimage": 512, "flux2": 512, "chroma": 512}
FLUX2_TEXT_LAYERS = (9, 18, 27)  # the Qwen3 layers Flux.2 Klein stacks (the pipeline's default)
_LENGTH = "text_length"  # cached conditioning key: how many of the padded tokens are the caption's
FLUX2_GUIDANCE = 4.0  # Flux.2 dev's guidance input (its pipeline's default scale); Klein has none


def table(kind: str, transformer: nn.Module) -> tarch.Arch:
    """The live transformer's table (any size), for the generic <-> diffusers name mapping."""
    found = families.from_diffusers(type(transformer).__name__, dict(transformer.config))
    if found is None:
        raise TrainingError(f"{type(transformer).__name__}: not a transformer the {kind} pipeline is known to hold")
    return tarch.Arch(found[0], found[1], (), "", "", "")


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
        if kind == "flux2":
            embeds, _ = pipe.encode_prompt(list(prompts), device=device, max_sequence_length=length,
                                           text_encoder_out_layers=_flux2_layers(pipe.text_encoder))
            return {"encoder_hidden_states": embeds}
        if kind == "chroma":
            out = pipe.encode_prompt(list(prompts), device=device, do_classifier_free_guidance=False,
                                     max_sequence_length=length)
            return {"encoder_hidden_states": out[0], "attention_mask": out[2].float()}
        embeds, mask = pipe.encode_prompt(list(prompts), device=device, max_sequence_length=length)
        embeds, mask = _pad(embeds, mask, length)
        return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}
    return encode


def _flux2_layers(text_encoder: nn.Module) -> tuple[int, ...]:
    """The pipeline's three stacked Qwen3 layers; an encoder with fewer layers (a test's) stacks its last three."""
    layers = int(text_encoder.config.num_hidden_layers)
    return FLUX2_TEXT_LAYERS if layers >= max(FLUX2_TEXT_LAYERS) else tuple(range(max(1, layers - 2), layers + 1))


def _ids(rows: int, cols: int, text: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Flux.2's 4-axis (t, h, w, l) position ids of an image's tokens and of the text's (its pipeline's layout)."""
    img = torch.zeros(rows, cols, 4, device=device)
    img[..., 1] = torch.arange(rows, device=device)[:, None]
    img[..., 2] = torch.arange(cols, device=device)[None, :]
    txt = torch.zeros(text, 4, device=device)
    txt[:, 3] = torch.arange(text, device=device)
    return img.reshape(rows * cols, 4), txt


def _flux2(transformer: nn.Module) -> Callable[[Tensor, Tensor, Cond], Tensor]:
    guided = bool(transformer.config.get("guidance_embeds", False))

    def run(x_t: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        b, c, h, w = x_t.shape
        packed = x_t.reshape(b, c, h * w).permute(0, 2, 1)  # the pipeline's packing: one token per latent cell
        text = cond["encoder_hidden_states"]
        img_ids, txt_ids = _ids(h, w, text.shape[1], x_t.device)
        out = transformer(hidden_states=packed, timestep=sigma.to(packed.dtype).expand(b),
                          guidance=torch.full((b,), FLUX2_GUIDANCE, device=x_t.device) if guided else None,
                          encoder_hidden_states=text, txt_ids=txt_ids.expand(b, -1, -1),
                          img_ids=img_ids.expand(b, -1, -1), return_dict=False)[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w)
    return run


def _chroma(transformer: nn.Module) -> Callable[[Tensor, Tensor, Cond], Tensor]:
    def run(x_t: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        b, c, h, w = x_t.shape
        packed = x_t.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x_t.device)
        img_ids[..., 1] = torch.arange(h // 2, device=x_t.device)[:, None]
        img_ids[..., 2] = torch.arange(w // 2, device=x_t.device)[None, :]
        text = cond["encoder_hidden_states"]
        # The text mask extended by the image tokens (the pipeline's _prepare_attention_mask).
        mask = torch.cat([cond["attention_mask"], torch.ones(b, packed.shape[1], device=x_t.device)], 1).bool()
        out = transformer(hidden_states=packed, timestep=sigma.to(packed.dtype).expand(b),
                          encoder_hidden_states=text, txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device),
                          img_ids=img_ids.reshape(-1, 3), attention_mask=mask, return_dict=False)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    return run


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
    return {"zimage": _zimage, "wan": _wan, "qwenimage": _qwenimage, "flux2": _flux2,
            "chroma": _chroma}[kind](transformer)


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


def flux2_vae(vae: nn.Module) -> bool:
    """Flux.2's VAE: 32 channels, 2x2-patchified to 128 and normalised by its batch-norm statistics."""
    return isinstance(getattr(vae, "bn", None), nn.BatchNorm2d)


def _bn(vae: nn.Module, like: Tensor) -> tuple[Tensor, Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def encode_flux2(vae: nn.Module, pixels: Tensor) -> Tensor:
    """(B, H, W, 3) in [0, 1] -> Flux.2's (B, 128, h/2, w/2) latents as its pipeline makes them (the mode)."""
    with torch.no_grad():
        x = pixels.movedim(-1, 1).to(vae.device, vae.dtype) * 2 - 1
        z = vae.encode(x).latent_dist.mode().float()
        b, c, h, w = z.shape
        z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        mean, std = _bn(vae, z)
        return (z - mean) / std


def decode_flux2(vae: nn.Module, latent: Tensor) -> Tensor:
    """A Flux.2 latent -> an (H, W, 3) image in [0, 1]."""
    with torch.no_grad():
        z = latent.to(vae.device, vae.dtype)
        mean, std = _bn(vae, z)
        z = z * std + mean
        b, c, h, w = z.shape
        z = z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)
        x = vae.decode(z).sample
    return ((x[0].float().clamp(-1, 1) + 1) / 2).movedim(0, -1).cpu()


def flux2_sigmas(image_tokens: int, steps: int = 1000) -> Tensor:
    """Flux.2's shifted sigmas: the exponential shift at its pipeline's empirical mu for this many image tokens
    (the 200-step line it interpolates from: the many-step schedule), at t = i / steps."""
    mu = 0.00016927 * image_tokens + 0.45666666
    t = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    return torch.exp(torch.tensor(mu, dtype=torch.float64)) / (torch.exp(torch.tensor(mu, dtype=torch.float64))
                                                               + (1 / t - 1))


def vae_scale(vae: nn.Module) -> int:
    """Pixels per latent cell of a VAE (its spatial compression)."""
    for value in (getattr(vae, "spatial_compression_ratio", None), getattr(vae.config, "scale_factor_spatial", None)):
        if isinstance(value, int):
            return value
    if getattr(vae.config, "block_out_channels", None):
        return 2 ** (len(vae.config.block_out_channels) - 1)
    return 2 ** len(vae.config.temperal_downsample)  # the Wan-style video VAEs: one halving per stage
