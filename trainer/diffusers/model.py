"""The diffusers side of a run: the pipeline, its family, schedule, denoiser and text encoding.

Families trained here are the UNet pipelines (SD1.5 and SD2-style `StableDiffusionPipeline`,
`StableDiffusionXLPipeline`); others are refused by name. Module names in the file are
ComfyUI's generic ones (`tlora.diffusers_names` owns the mapping), so a run here gives the
file a run in ComfyUI would.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...tlora import arch as tarch
from ...tlora import diffusers_names as dnames
from ..data import Cond
from ..schedule import Schedule
from ..settings import TrainingError

# Pipeline classes this binding trains -> how their text conditioning is built.
UNET_PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}


def load_pipeline(model: str, config: str | None = None) -> Any:
    """A pipeline from a local diffusers folder, or a single-file checkpoint with a local config folder; offline."""
    import diffusers
    if os.path.isdir(model):
        try:
            return diffusers.DiffusionPipeline.from_pretrained(model, local_files_only=True)
        except (OSError, ValueError) as err:
            raise TrainingError(f"cannot load the diffusers folder {model}: {err}") from None
    if not os.path.isfile(model):
        raise TrainingError(f"model {model!r} is neither a diffusers folder nor a checkpoint file")
    if not config or not os.path.isdir(config):
        raise TrainingError(f"{os.path.basename(model)} is a single-file checkpoint: give --config, a local "
                            f"diffusers folder (model_index.json and configs) describing it (offline: nothing "
                            f"is downloaded)")
    with open(os.path.join(config, "model_index.json"), encoding="utf-8") as f:
        import json
        class_name = json.load(f).get("_class_name", "")
    if class_name not in UNET_PIPELINES:
        raise TrainingError(f"--config {config} describes a {class_name or 'unknown'} pipeline; single files "
                            f"load as {', '.join(UNET_PIPELINES)}")
    cls = getattr(diffusers, class_name)
    try:
        return cls.from_single_file(model, config=config, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise TrainingError(f"cannot load {os.path.basename(model)} with the config in {config}: {err}") from None


def family(pipe: Any) -> str:
    """`sd` or `sdxl`; a TrainingError naming the pipeline otherwise."""
    name = type(pipe).__name__
    if name not in UNET_PIPELINES:
        raise TrainingError(f"{name} is not trained by this command yet: it trains "
                            f"{' and '.join(UNET_PIPELINES)} (Flux, SD3 and Qwen-Image train in ComfyUI's node)")
    return UNET_PIPELINES[name]


def schedule_for(scheduler: Any) -> Schedule:
    """The training schedule from the pipeline's scheduler (its betas and prediction type)."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    prediction = _PREDICTIONS.get(scheduler.config.get("prediction_type", "epsilon"))
    if alphas is None or prediction is None:
        raise TrainingError(f"{type(scheduler).__name__} ({scheduler.config.get('prediction_type')}) is not a "
                            f"DDPM-style schedule with an eps or v prediction")
    return Schedule.discrete(torch.as_tensor(alphas), prediction)


def unet_config(config: Any) -> tarch.UNetConfig:
    """tlora's UNetConfig (what fixes generic names) of a diffusers UNet2DConditionModel config."""
    channels = tuple(config["block_out_channels"])
    levels = len(channels)
    per_level = config["layers_per_block"]
    res = tuple(per_level if isinstance(per_level, int) else per_level[i] for i in range(levels))
    depth_cfg = config.get("transformer_layers_per_block", 1)
    depth = [depth_cfg if isinstance(depth_cfg, int) else depth_cfg[i] for i in range(levels)]
    down = [depth[i] if "CrossAttn" in config["down_block_types"][i] else 0 for i in range(levels)]
    up_types = config["up_block_types"]
    up = [depth[i] if "CrossAttn" in up_types[levels - 1 - i] else 0 for i in range(levels)]
    mid = depth[-1] if "CrossAttn" in (config.get("mid_block_type") or "UNetMidBlock2DCrossAttn") else 0
    return tarch.UNetConfig(
        channels[0], tuple(c // channels[0] for c in channels), res,
        tuple(d for i, d in enumerate(down) for _ in range(res[i])), mid,
        tuple(d for i, d in enumerate(up) for _ in range(res[i] + 1)),
        int(config["cross_attention_dim"]), bool(config.get("use_linear_projection", False)))


def generic_names(unet: nn.Module, paths: list[str]) -> dict[str, str]:
    """{UNet module path: generic file name} for these paths (a TrainingError if one has none)."""
    cfg = unet_config(unet.config)
    names = dnames.unet_generic_names(cfg)
    missing = [p for p in paths if p not in names]
    if missing:
        raise TrainingError(f"no generic name for UNet module {missing[0]} (of {len(missing)}): this UNet's "
                            f"layout is not one tlora.arch tables")
    return {p: names[p] for p in paths}


def arch_of(pipe: Any) -> str | None:
    """The tlora architecture whose table this pipeline's UNet matches exactly (None for other sizes)."""
    cfg = unet_config(pipe.unet.config)
    for name in ("sd15", "sdxl"):
        if tarch.ARCHS[name].denoiser == cfg:
            return name
    return None


@dataclass
class Parts:
    """What the binding needs of a loaded pipeline."""

    pipe: Any
    kind: str  # sd | sdxl
    unet: nn.Module
    vae: nn.Module
    text_encoders: list[tuple[str, nn.Module]]  # (generic prefix, module)


def parts(pipe: Any) -> Parts:
    """The pipeline's trained and frozen parts, by family."""
    kind = family(pipe)
    encoders = [(f"{tarch.TE_PREFIX}clip_l.transformer.", pipe.text_encoder)]
    if kind == "sdxl":
        encoders.append((f"{tarch.TE_PREFIX}clip_g.transformer.", pipe.text_encoder_2))
    return Parts(pipe, kind, pipe.unet, pipe.vae, encoders)


def text_encoder(p: Parts, size: tuple[int, int] | None = None) -> Callable[[list[str]], Cond]:
    """prompts -> the UNet's conditioning, through the pipeline's own `encode_prompt` (with gradients)."""
    device = p.unet.device

    def encode(prompts: list[str]) -> Cond:
        if p.kind == "sd":
            embeds, _ = p.pipe.encode_prompt(prompts, device, 1, False)
            return {"encoder_hidden_states": embeds}
        embeds, _, pooled, _ = p.pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}
    return encode


def time_ids(x_t: Tensor, scale: int) -> Tensor:
    """SDXL's size conditioning of a batch: original size = target size = the training size, crop (0, 0)."""
    height, width = x_t.shape[-2] * scale, x_t.shape[-1] * scale
    ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=x_t.device)
    return ids.expand(x_t.shape[0], 6)


def denoiser(unet: nn.Module, kind: str, vae_scale: int = 8) -> Callable[[Tensor, Tensor, Cond], Tensor]:
    """(x_t, timestep, cond) -> the UNet's prediction (SDXL's size conditioning from the latent's size)."""
    def run(x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        added = None
        if kind == "sdxl":
            added = {"text_embeds": cond["text_embeds"], "time_ids": time_ids(x_t, vae_scale)}
        return unet(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"],
                    added_cond_kwargs=added, return_dict=False)[0]
    return run


def encode_images(vae: nn.Module, pixels: Tensor) -> Tensor:
    """(B, H, W, 3) in [0, 1] -> scaled latents (the distribution's mean: deterministic, as ComfyUI encodes)."""
    with torch.no_grad():
        x = pixels.movedim(-1, 1).to(vae.device, vae.dtype) * 2 - 1
        latent = vae.encode(x).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latent - shift) * vae.config.scaling_factor).float()


def decode_latent(vae: nn.Module, latent: Tensor) -> Tensor:
    """A latent -> an (H, W, 3) image in [0, 1]."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        x = vae.decode(latent.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift).sample
    return ((x[0].float().clamp(-1, 1) + 1) / 2).movedim(0, -1).cpu()
