"""ComfyUI's model as the engine needs it: denoiser, trainable weights, blocks, refusals, architecture.

Nothing here names a family: the schedule comes from the model's sampling object as patched
(trainer/comfy/schedule.py), the denoiser is the host's own `apply_model`, the blocks are found by
structure and the targets by role (tlora/arch.py `role_of`). A model the engine cannot train is
refused by what it lacks (`refuse_untrainable`), before any encoding.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ...tlora import arch as tarch
from ...tlora.errors import TLoRAError
from ..binding import AdapterGroup, adapter_group
from ..data import Cond, Denoiser, collate_conds
from ..settings import TrainSettings
from .data import CONST_PREFIX, Encoder, Prepared, latent_dimensions, vae_downscale
from .host_autograd import Restore as _Restore
from .host_autograd import autograd_safe_norms, differentiable_kernels  # noqa: F401  (run.py imports them here)
from .schedule import sampling_of, schedule_for  # noqa: F401  (the binding's schedule, re-exported)


class _RawOutput(nn.Module):
    """A sampling object whose network input and output pass through unchanged (the rest delegates).

    The engine's schedule already gives the network's input (a x0 + b noise) and takes its raw
    output as the target's space; the host's `timestep`, `process_timestep`, conditioning casts,
    latent (un)packing and wrappers in between are the host's own.
    """

    def __init__(self, sampling: Any) -> None:
        super().__init__()
        object.__setattr__(self, "_sampling", sampling)

    def calculate_input(self, sigma: Tensor, x: Tensor) -> Tensor:
        return x

    def calculate_denoised(self, sigma: Tensor, output: Tensor, x: Tensor) -> Tensor:
        return output

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_sampling"), name)


def _host_value(key: str, value: Tensor) -> Any:
    """A cached conditioning value as the host's conds hand it: constants back to their Python value."""
    return value.reshape(-1)[0].item() if key.startswith(CONST_PREFIX) else value


def make_denoiser(model: Any) -> Denoiser:
    """The diffusion model's raw output for the network input x_t at noise level sigma, through `apply_model`.

    `model` is the ModelPatcher (its sampling object as patched, its transformer options) or a bare
    BaseModel. The call is BaseModel.apply_model's with the sampling's input scaling and output
    conversion left out (the schedule carries them): conditioning casts, process_timestep, packed
    latents, APPLY_MODEL wrappers and transformer patches are the host's.
    """
    sampling, base, _ = sampling_of(model)
    raw = _RawOutput(sampling)
    options = getattr(model, "model_options", None) or {}
    base_options = dict(options.get("transformer_options", {}))

    def denoise(x_t: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        kwargs = {k.removeprefix(CONST_PREFIX): _host_value(k, v) for k, v in cond.items()
                  if k not in ("c_crossattn", "c_concat")}
        transformer_options = dict(base_options, sigmas=sigma, cond_or_uncond=[0])
        previous = base.model_sampling
        base.model_sampling = raw
        try:
            out = base.apply_model(x_t, sigma, c_concat=cond.get("c_concat"), c_crossattn=cond.get("c_crossattn"),
                                   control=None, transformer_options=transformer_options, **kwargs)
        finally:
            base.model_sampling = previous
        return out.float()
    return denoise


def refuse_untrainable(model: Any) -> None:
    """One line naming what the engine lacks for this model (before any encoding); nothing if it trains.

    The schedule is checked by `schedule_for`; here: a denoiser with linear layers to adapt and
    latents the engine makes from images (image- or video-shaped; audio and 3-D shapes are not).
    """
    _, base, _ = sampling_of(model)
    family = type(getattr(base, "model_config", base)).__name__
    root = getattr(base, "diffusion_model", None)
    if not isinstance(root, nn.Module) or not any(isinstance(m, nn.Linear) for m in root.modules()):
        raise TLoRAError(f"Train TLoRA cannot train {family} models: no diffusion model with linear layers to "
                         f"adapt was found")
    dims = latent_dimensions(base)
    if dims not in (2, 3):
        kind = "audio-shaped (1-D)" if dims == 1 else f"{dims}-D"
        raise TLoRAError(f"Train TLoRA cannot train {family} models: their latents are {kind} "
                         f"({type(base.latent_format).__name__}); it trains on image and video latents")


def host_training_mode() -> list[_Restore]:
    """ComfyUI's own "a training run is on" flag, set for the run as its TrainLoraNode sets it.

    From 0.33 the host reads `comfy.model_management.in_training` to choose differentiable
    paths over kernels without a backward (Flux's and Qwen-Image's RoPE, Lumina's fused QK norm,
    INT8 fused activations, newer families' fused ops). Hosts without the flag get nothing here
    (0.12 is served by `differentiable_rope`). The handle restores the previous value.
    """
    module = importlib.import_module("comfy.model_management")
    if not hasattr(module, "in_training"):
        return []
    handle = _Restore(module, "in_training", module.in_training)
    module.in_training = True
    return [handle]


def differentiable_rope() -> list[_Restore]:
    """The host kernels without a backward swapped for their torch maths (kept name; see host_autograd)."""
    return differentiable_kernels()


def make_trainable(module: nn.Module) -> int:
    """Replace inference-mode parameters/buffers with normal tensors of the same values.

    Models loaded while ComfyUI ran a node under torch.inference_mode hold inference tensors,
    which autograd cannot save for backward (even frozen, their layers need them to pass
    gradients on). One conversion per tensor; values, devices and dtypes are unchanged.
    """
    converted = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and param.is_inference():
                    sub._parameters[name] = nn.Parameter(param.clone(), requires_grad=False)
                    converted += 1
            for name, buf in list(sub._buffers.items()):
                if buf is not None and buf.is_inference():
                    sub._buffers[name] = buf.clone()
                    converted += 1
    return converted


def arch_of(base_model: Any, clip: Any = None) -> str | None:
    """The tlora.arch name (`sd15`, `flux`, `sd35-large`...) whose whole table fits this model, else None."""
    names = tarch.archs_for_host_model(type(base_model.model_config).__name__)
    if not names:
        return None
    shapes = {tarch.UNET_PREFIX + k: tuple(v.shape) for k, v in base_model.diffusion_model.state_dict().items()}
    for name in names:
        table = tarch.targets(name, "all-linear")
        if len(shapes) and all(shapes.get(k + ".weight") == tuple(s) for k, s in table.items()):
            return name
    return None


def checkpoint_blocks(root: nn.Module) -> list[nn.Module]:
    """The repeated blocks gradient checkpointing wraps, found by structure (no class named).

    A block is an item of a ModuleList whose items are all of one class and each holds an
    attention weight (by role); lists inside a chosen block are left to it (HiDream's experts).
    UNets: their transformer blocks; DiTs: their double/single-stream, joint, refiner and
    text-fusion blocks.
    """
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for name, module in root.named_modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList) or not len(module):
            continue
        items = list(module)
        if len({type(item) for item in items}) != 1:
            continue
        prefix = f"{name}." if name else ""
        if all(_holds_attention(item, f"{prefix}{i}") for i, item in enumerate(items)):
            blocks.extend(items)
            inside.update(id(m) for item in items for m in item.modules())
    return blocks


def _holds_attention(block: nn.Module, path: str) -> bool:
    """Whether a block has a weight whose role is attention."""
    return any(isinstance(m, nn.Linear) and tarch.role_of(f"{path}.{n}") == "attn" for n, m in block.named_modules())


def text_group(clip: Any, settings: TrainSettings) -> AdapterGroup:
    """Adapters on the text encoder's attention (and MLP for the wider presets)."""
    clip.load_model()
    root = clip.cond_stage_model
    make_trainable(root)
    return adapter_group(root, tarch.TE_PREFIX, settings, text_encoder=True, seed_offset=1)


def text_encode(base: Any, clip: Any, prepared: Prepared, vae: Any, device: torch.device) -> Callable:
    """Captions -> model conditioning through the (adapted) text encoder, with gradients."""
    downscale = vae_downscale(vae)
    shape = tuple(prepared.data.instance[0].latent.shape)
    encoder = Encoder(base, clip, device)

    def encode(captions: list[str]) -> Cond:
        conds = []
        model = clip.cond_stage_model
        for text in captions:
            # encode_from_tokens minus its load_model(): the model is loaded and wrapped already.
            model.reset_clip_options()
            if clip.layer_idx is not None:
                model.set_clip_options({"layer": clip.layer_idx})
            out = model.encode_token_weights(clip.tokenize(text))
            conds.append(encoder.model_cond([[out[0], {"pooled_output": out[1]}]], shape, downscale, keep_grad=True))
        return collate_conds(conds)
    return encode
