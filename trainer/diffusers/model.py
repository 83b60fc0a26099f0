"""The diffusers side of a run: the pipeline, its family, schedule, denoiser and text encoding.

Families trained here are the UNet pipelines (SD1.5 and SD2-style `StableDiffusionPipeline`,
`StableDiffusionXLPipeline`); others are refused by name. Module names in the file are
ComfyUI's generic ones (`tlora.diffusers_names` owns the mapping; apply.py's `arch_of` reads the
live model's table), so a run here gives the file a run in ComfyUI would.
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
from .apply import arch_of
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


def generic_names(arch: tarch.Arch, component: str, paths: list[str]) -> dict[str, str]:
    """{module path under a pipeline component: generic file name} by tlora.diffusers_names (TrainingError if none)."""
    out, missing = {}, []
    for path in paths:
        # transformers 5's CLIPTextModel has no `text_model.` level; the generic names keep it.
        candidates = [f"{component}.{path}", f"{component}.text_model.{path}"]
        found = next((g for g in (dnames.generic_name(arch, c) for c in candidates) if g), None)
        (missing.append(path) if found is None else out.__setitem__(path, found))
    if missing:
        raise TrainingError(f"no generic name for {component} module {missing[0]} (of {len(missing)}): its layout "
                            f"is not one tlora.arch tables")
    return out


@dataclass
class Parts:
    """What the binding needs of a loaded pipeline."""

    pipe: Any
    kind: str  # sd | sdxl
    unet: nn.Module
    vae: nn.Module
    text_encoders: list[tuple[str, nn.Module]]  # (generic prefix, module)
    components: dict[str, nn.Module]  # pipeline component name -> module (what the name mapping is keyed by)
    family: str | None  # sd15 | sdxl when the UNet is that released table (the file's config says so); else None
    arch: tarch.Arch  # the live model's table (any size) for the name mapping


def parts(pipe: Any) -> Parts:
    """The pipeline's trained and frozen parts, by family."""
    kind = family(pipe)
    encoders = [(f"{tarch.TE_PREFIX}clip_l.transformer.", pipe.text_encoder)]
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if kind == "sdxl":
        encoders.append((f"{tarch.TE_PREFIX}clip_g.transformer.", pipe.text_encoder_2))
        components["text_encoder_2"] = pipe.text_encoder_2
    name, table = arch_of(components)
    released = name if tarch.ARCHS[name].denoiser == table.denoiser else None  # files check shapes by it
    return Parts(pipe, kind, pipe.unet, pipe.vae, encoders, components, released, table)


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
