"""ComfyUI's model as the engine needs it: schedule, denoiser, trainable weights, targets, architecture."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import comfy.model_sampling as cms

from ...tlora import arch as tarch
from ...tlora.errors import TLoRAError
from ..binding import AdapterGroup, adapter_group
from ..data import Cond, Denoiser, collate_conds
from ..schedule import Schedule
from ..settings import TrainSettings
from .data import Encoder, Prepared, vae_downscale


# Flow-matching families whose denoiser call, conditioning and latents the binding handles (ComfyUI's
# supported_models class names; Flux2, Chroma, AuraFlow, HiDream, Lumina2/Z-Image, Wan... are refused by name).
FLOW_FAMILIES = {"Flux": "Flux.1 dev", "FluxSchnell": "Flux.1 schnell", "FluxInpaint": "Flux.1 fill",
                 "SD3": "SD3/SD3.5", "QwenImage": "Qwen-Image"}


def schedule_for(base_model: Any) -> Schedule:
    """The training schedule of a ComfyUI BaseModel, read from its model_sampling."""
    ms = base_model.model_sampling
    family = type(base_model.model_config).__name__
    discrete = isinstance(ms, cms.ModelSamplingDiscrete) and type(ms).timestep is cms.ModelSamplingDiscrete.timestep
    if discrete and not isinstance(ms, (cms.EDM, cms.X0, getattr(cms, "IMG_TO_IMG", cms.X0))):
        if isinstance(ms, cms.V_PREDICTION):
            return Schedule.from_sigmas(ms.sigmas, "v")
        if isinstance(ms, cms.EPS):
            return Schedule.from_sigmas(ms.sigmas, "eps")
    if isinstance(ms, cms.CONST) and family in FLOW_FAMILIES:
        # The model's own sigmas carry its shift (SD3: 3.0, Flux: its exponential shift); timestep(sigma)
        # is what BaseModel passes the diffusion model (sigma x 1000 for SD3, sigma for Flux).
        multiplier = float(ms.timestep(torch.tensor(1.0)))
        return Schedule.flow(ms.sigmas, multiplier)
    supported = "SD1.x, SD2.x, SDXL (eps and v-prediction) and " + ", ".join(sorted(set(FLOW_FAMILIES.values())))
    raise TLoRAError(f"TLoRA training does not support {family} models yet (it samples with "
                     f"{type(ms).__mro__[1].__name__}); supported: {supported}")


def make_denoiser(base_model: Any) -> Denoiser:
    """The diffusion model's raw output (eps, v or the flow velocity) for x_t at timestep t."""
    diffusion_model = base_model.diffusion_model
    dtype = base_model.manual_cast_dtype or base_model.get_dtype()

    def denoise(x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        x = x_t
        if "c_concat" in cond:
            x = torch.cat([x, cond["c_concat"].to(x)], 1)
        extra = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in cond.items()
                 if k not in ("c_crossattn", "c_concat")}
        context = cond.get("c_crossattn")
        # The same call BaseModel._apply_model makes, minus its eps->x0 conversion: the loss
        # is taken on the model's own target.
        t = base_model.process_timestep(t.float(), x=x_t, **extra)
        out = diffusion_model(x.to(dtype), t, context=None if context is None else context.to(dtype),
                              control=None, transformer_options={}, **extra)
        return out.float()
    return denoise


def _rope1(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Rotary embedding as ComfyUI's flux/math.py computes it without comfy_kitchen (differentiable)."""
    pairs = x.to(dtype=freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs_cis[..., 0] * pairs[..., 0] + freqs_cis[..., 1] * pairs[..., 1]
    return out.reshape(*x.shape).type_as(x)


def _rope(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    return _rope1(xq, freqs_cis), _rope1(xk, freqs_cis)


class _Restore:
    """Puts a module attribute back (the `.remove()` handle the run keeps with its hooks)."""

    def __init__(self, module: Any, name: str, value: Any) -> None:
        self.module, self.name, self.value = module, name, value

    def remove(self) -> None:
        setattr(self.module, self.name, self.value)


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
    """While training, rotary embeddings in torch where the host uses comfy_kitchen's kernels.

    ComfyUI 0.12 runs Flux's and Qwen-Image's RoPE through comfy_kitchen ops that have no
    backward ("no autograd formula was registered"); the same maths in torch trains. The
    returned handles restore the host's functions. Newer hosts wrap those kernels in functions
    of their own that follow `host_training_mode`'s flag: nothing is swapped there.
    """
    handles = []
    for module_name, names in (("comfy.ldm.flux.math", ("apply_rope", "apply_rope1")),
                               ("comfy.ldm.qwen_image.model", ("apply_rope1",))):
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # pragma: no cover
            continue
        for name in names:
            current = getattr(module, name, None)
            if current is not None and getattr(current, "__module__", "").startswith("comfy_kitchen"):
                handles.append(_Restore(module, name, current))
                setattr(module, name, _rope if name == "apply_rope" else _rope1)
    return handles


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
    """The transformer blocks gradient checkpointing wraps (UNet, Flux, MMDiT and Qwen-Image blocks)."""
    kinds = []
    for module_name, class_names in (("comfy.ldm.modules.attention", ("BasicTransformerBlock",)),
                                     ("comfy.ldm.flux.layers", ("DoubleStreamBlock", "SingleStreamBlock")),
                                     ("comfy.ldm.modules.diffusionmodules.mmdit", ("JointBlock",)),
                                     ("comfy.ldm.qwen_image.model", ("QwenImageTransformerBlock",))):
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # pragma: no cover (a host without that family)
            continue
        kinds += [getattr(module, c) for c in class_names if hasattr(module, c)]
    return [m for m in root.modules() if isinstance(m, tuple(kinds))]


def text_group(clip: Any, settings: TrainSettings) -> AdapterGroup:
    """Adapters on the text encoder's attention (and MLP for the wider presets)."""
    clip.load_model()
    root = clip.cond_stage_model
    make_trainable(root)
    return adapter_group(root, tarch.TE_PREFIX, settings, text_encoder=True, seed_offset=1)


def autograd_safe_norms(root: nn.Module) -> list[Any]:
    """Feed every LayerNorm a copy of its input; returns the hook handles to remove afterwards.

    ComfyUI's CLIP layers add their residuals in place (`x += attn(norm(x))`), which
    overwrites the tensor the norm saved for backward. With a copy, the norm keeps its
    own input and the in-place add touches a tensor nothing saved: gradients flow.
    """
    def clone_input(module: nn.Module, args: tuple) -> tuple:
        return (args[0].clone(), *args[1:]) if args and isinstance(args[0], Tensor) else args
    return [m.register_forward_pre_hook(clone_input) for m in root.modules() if isinstance(m, nn.LayerNorm)]


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
