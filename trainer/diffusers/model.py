"""The diffusers side of a run: the pipeline, its family, schedule, denoiser and text encoding.

Families trained here: the UNet pipelines (SD1.5 and SD2-style `StableDiffusionPipeline`,
`StableDiffusionXLPipeline`), `FluxPipeline` and `StableDiffusion3Pipeline` (SD3/SD3.5, flow matching),
and the newer flow pipelines `ZImagePipeline`, `WanPipeline`, `QwenImagePipeline` (flow_families.py);
others are refused by name.
Module names in the file are ComfyUI's generic ones where a diffusers module is one whole generic
weight (`tlora.diffusers_names` owns the mapping; apply.py's `arch_of` reads the live model's
table); Flux's and SD3's q/k/v (and Flux's `proj_mlp`), row slices of ComfyUI's fused weights, keep their diffusers
names (`transformer.transformer_blocks.0.attn.to_q`), which ComfyUI's key map, our loaders and
diffusers all read as those slices.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...tlora import arch as tarch
from ...tlora import diffusers_names as dnames
from ...tlora import format as tformat
from ...tlora.errors import TLoRAError
from ...tlora.fileio import parse_json
from . import flow_families as flows
from .inference import arch_of, resolve_path
from ..data import Cond
from ..schedule import Schedule
from ..settings import TrainingError

# Pipeline classes this binding trains -> their kind (how conditioning, schedule and the model call go).
PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "FluxPipeline": "flux",
             "StableDiffusion3Pipeline": "sd3", **flows.PIPELINES}
TRANSFORMER_KINDS = ("flux", "sd3", *flows.PIPELINES.values())
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}
FLUX_GUIDANCE = 3.5  # the distilled guidance Flux.1-dev trains at (diffusers' and our ComfyUI binding's choice)


def refuse_adapter_file(model: str) -> None:
    """TrainingError when --model is an adapter file (a TLoRA or LoRA), not the base model it adapts."""
    if not os.path.isfile(model):
        return
    try:
        header, _, _ = tformat.read_header(model)
    except TLoRAError:
        return  # not safetensors (a .ckpt): from_single_file says what it is
    keys = [k for k in header if k != "__metadata__"]
    if tformat.is_tlora_state_dict(keys) or (keys and all(".lora_" in k or ".alpha" in k for k in keys)):
        kind = "TLoRA" if tformat.is_tlora_state_dict(keys) else "LoRA"
        raise TrainingError(f"--model {os.path.basename(model)} is a {kind} adapter file, not a base model: give "
                            f"the checkpoint or diffusers folder to train on")


def quiet_loading() -> None:
    """No progress bars from diffusers' and transformers' loading (the command's --quiet)."""
    import diffusers
    diffusers.utils.logging.disable_progress_bar()
    try:
        import transformers
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # a pipeline without transformers' encoders
        pass


def load_pipeline(model: str, config: str | None = None) -> Any:
    """A pipeline from a local diffusers folder, or a single-file checkpoint with a local config folder; offline."""
    import diffusers
    if os.path.isdir(model):
        try:
            return diffusers.DiffusionPipeline.from_pretrained(model, local_files_only=True)
        except Exception as err:  # diffusers raises many kinds for a folder that is not a pipeline
            raise TrainingError(f"cannot load the diffusers folder {model}: {_first_line(err)}") from None
    if not os.path.isfile(model):
        raise TrainingError(f"model {model!r} is neither a diffusers folder nor a checkpoint file")
    refuse_adapter_file(model)
    if model.lower().endswith(".gguf"):
        return _gguf_pipeline(model, config)
    if not config:
        raise TrainingError(f"{os.path.basename(model)} is a single-file checkpoint: give --config, a local "
                            f"diffusers folder (model_index.json and configs) describing it (offline: nothing "
                            f"is downloaded)")
    if not os.path.isdir(config):
        raise TrainingError(f"--config {config}: no such folder (give a local diffusers folder)")
    index = os.path.join(config, "model_index.json")
    try:
        with open(index, encoding="utf-8") as f:
            class_name = parse_json(f.read()).get("_class_name", "")
    except (OSError, ValueError, AttributeError) as err:
        raise TrainingError(f"--config {config} is not a diffusers folder (its model_index.json: "
                            f"{getattr(err, 'strerror', None) or err})") from None
    if class_name not in PIPELINES:
        raise TrainingError(f"--config {config} describes a {class_name or 'unknown'} pipeline; single files "
                            f"load as {', '.join(PIPELINES)}")
    cls = getattr(diffusers, class_name)
    try:
        return cls.from_single_file(model, config=config, local_files_only=True)
    except Exception as err:  # a checkpoint of another family than the config raises shape errors of many kinds
        raise TrainingError(f"cannot load {os.path.basename(model)} with the config in {config} (is it that "
                            f"model's config?): {_first_line(err)}") from None


def _gguf_pipeline(model: str, config: str | None) -> Any:
    """The pipeline of --config with its denoiser read from a GGUF file by diffusers' GGUF loading.

    Its GGUFLinear layers keep the file's blocks and dequantize at every call; training wraps them as
    they are (only the adapter is float32). The rest of the pipeline comes from the folder.
    """
    import diffusers
    if not config or not os.path.isdir(config):
        raise TrainingError(f"{os.path.basename(model)} is a GGUF denoiser: give --config, the local diffusers "
                            f"folder of its pipeline (the text encoders, VAE and the denoiser's config come from it)")
    component = next((c for c in ("transformer", "unet") if os.path.isfile(os.path.join(config, c, "config.json"))),
                     None)
    if component is None:
        raise TrainingError(f"--config {config} has no transformer/ or unet/ config for the GGUF denoiser")
    with open(os.path.join(config, component, "config.json"), encoding="utf-8") as f:
        cls = getattr(diffusers, str(parse_json(f.read()).get("_class_name", "")), None)
    if cls is None or not hasattr(cls, "from_single_file"):
        raise TrainingError(f"--config {config}: its {component} cannot be read from a single GGUF file")
    try:
        quantized = diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32)
        denoiser = cls.from_single_file(model, config=config, subfolder=component, local_files_only=True,
                                        quantization_config=quantized)
        return diffusers.DiffusionPipeline.from_pretrained(config, **{component: denoiser}, local_files_only=True)
    except Exception as err:  # a file of another model than the config raises shape errors of many kinds
        raise TrainingError(f"cannot load {os.path.basename(model)} as the {component} of {config}: "
                            f"{_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= 300 else text[:297] + "..."


def family(pipe: Any) -> str:
    """`sd`, `sdxl` or `flux`; a TrainingError naming the pipeline otherwise."""
    name = type(pipe).__name__
    if name not in PIPELINES:
        raise TrainingError(f"{name} is not trained by this command yet: it trains {', '.join(PIPELINES)} "
                            f"(ComfyUI's Train TLoRA node trains any model ComfyUI samples)")
    return PIPELINES[name]


def flow_sigmas(config: Any, image_tokens: int, steps: int = 1000) -> Tensor:
    """The flow-matching sigmas at t = i/steps (i = 1..steps) with the scheduler's shift: its fixed `shift`, or,
    with `use_dynamic_shifting`, the resolution-dependent exponential shift the pipeline samples with."""
    t = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    if config.get("use_dynamic_shifting", False):
        lo, hi = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        base, top = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        mu = base + (top - base) * (image_tokens - lo) / (hi - lo)
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    shift = float(config.get("shift", 1.0))
    return shift * t / (1 + (shift - 1) * t)


def schedule_for(scheduler: Any, image_tokens: int = 1024, kind: str = "sd") -> Schedule:
    """The training schedule from the pipeline's scheduler (DDPM betas + prediction type, or flow matching)."""
    flow = scheduler.config.get("prediction_type") == "flow_prediction" or scheduler.config.get("use_flow_sigmas")
    if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" or flow:
        # Flux's pipeline hands its transformer timestep / 1000 (sigma); SD3's the timestep (sigma x 1000); the
        # newer pipelines' denoisers (flow_families.py) take the sigma and scale it as their pipeline does.
        multiplier = 1.0 if kind == "flux" or kind in flows.PIPELINES.values() else \
            float(scheduler.config.get("num_train_timesteps", 1000))
        config = dict(scheduler.config)
        if "flow_shift" in config and "shift" not in config:  # UniPC/DPM++ in flow mode (Wan's): its flow_shift
            config["shift"] = config["flow_shift"]
        if kind == "flux2":  # Flux.2's pipeline shifts by its own empirical mu, not the scheduler's base/max shift
            return Schedule.flow(flows.flux2_sigmas(image_tokens), multiplier=1.0)
        return Schedule.flow(flow_sigmas(config, image_tokens), multiplier=multiplier)
    alphas = getattr(scheduler, "alphas_cumprod", None)
    prediction = _PREDICTIONS.get(scheduler.config.get("prediction_type", "epsilon"))
    if alphas is None or prediction is None:
        raise TrainingError(f"{type(scheduler).__name__} ({scheduler.config.get('prediction_type')}) is not a "
                            f"DDPM-style schedule with an eps or v prediction")
    return Schedule.discrete(torch.as_tensor(alphas), prediction)


@dataclass
class Parts:
    """What the binding needs of a loaded pipeline."""

    pipe: Any
    kind: str  # sd | sdxl | flux
    denoiser: nn.Module  # the UNet or the transformer
    component: str  # its pipeline component name: unet | transformer
    vae: nn.Module
    text_encoders: list[tuple[str, str, nn.Module]]  # (generic prefix, component, module): the CLIPs we can adapt
    family: str | None  # tlora.arch's name when the denoiser is that released table (the file's config says so)
    arch: tarch.Arch  # the live model's table (any size) for the name mapping


def parts(pipe: Any) -> Parts:
    """The pipeline's trained and frozen parts, by family (T5 is never adapted: tlora.arch tables CLIP only)."""
    kind = family(pipe)
    component = "transformer" if kind in TRANSFORMER_KINDS else "unet"
    if kind in flows.PIPELINES.values():  # LLM / umT5 text encoders: not tabled, never adapted
        table = flows.table(kind, pipe.transformer)
        released = next((n for n, a in tarch.ARCHS.items() if a.denoiser == table.denoiser), None)
        return Parts(pipe, kind, pipe.transformer, component, pipe.vae, [], released, table)
    encoders = [(f"{tarch.TE_PREFIX}clip_l.transformer.", "text_encoder", pipe.text_encoder)]
    if kind in ("sdxl", "sd3"):
        encoders.append((f"{tarch.TE_PREFIX}clip_g.transformer.", "text_encoder_2", pipe.text_encoder_2))
    denoiser = getattr(pipe, component)
    name, table = arch_of({component: denoiser, **{comp: module for _, comp, module in encoders}})
    released = name if name in tarch.ARCHS and tarch.ARCHS[name].denoiser == table.denoiser else None
    return Parts(pipe, kind, denoiser, component, pipe.vae, encoders, released, table)


def targets(p: Parts, preset: str, with_convs: bool = False, text_encoder: str | None = None) -> dict[str, str]:
    """{live module path: its name in the file} for a targets preset, on the denoiser or one CLIP component.

    The preset's modules are tlora.arch's (the same weights as the ComfyUI node's preset); the mapping
    (tlora.diffusers_names) finds them in the diffusers model. A module that is one whole generic weight
    is named generically; a row slice of a fused generic weight (Flux q/k/v, proj_mlp) keeps its
    component-prefixed diffusers path, which ComfyUI's key map, our loaders and diffusers read as that
    slice. Rows stored in another order (the swapped final modulations) are left out.
    """
    if text_encoder is None:
        groups = set(tarch.preset_groups(preset, with_convs=with_convs))
        generic = [name for name, _, group in p.arch.denoiser_modules() if group in groups]
        component, root = p.component, p.denoiser
    else:
        groups = set(tarch.preset_groups(preset, text_encoder=True))
        te_name = {comp: prefix for prefix, comp, _ in p.text_encoders}[text_encoder].split(".")[1]
        table = next(te for te in p.arch.text_encoders if te.name == te_name)
        generic = [name for name, _, group in tarch.text_encoder_modules(table) if group in groups]
        component, root = text_encoder, dict((c, m) for _, c, m in p.text_encoders)[text_encoder]
    rows = dnames.diffusers_rows(p.arch)
    out = {}
    for name in generic:
        pieces_of = rows[name]
        for path, pieces in pieces_of:
            if pieces is not None and len(pieces) > 1:
                continue
            live = resolve_path(root, path[len(component) + 1:])
            out[live] = name if pieces is None and len(pieces_of) == 1 else path
    if not out:
        raise TrainingError(f"the targets preset {preset!r} matched nothing in the {component}")
    return out


def text_encoder(p: Parts) -> Callable[[list[str]], Cond]:
    """prompts -> the UNet's conditioning, through the pipeline's own `encode_prompt` (with gradients)."""
    device = p.denoiser.device
    if p.kind in flows.PIPELINES.values():
        return flows.text_encoder(p.pipe, p.kind, device)

    def encode(prompts: list[str]) -> Cond:
        if p.kind == "flux":
            embeds, pooled, _ = p.pipe.encode_prompt(prompts, prompt_2=None, device=device, num_images_per_prompt=1)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        if p.kind == "sd3":
            embeds, _, pooled, _ = p.pipe.encode_prompt(prompts, None, None, device=device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
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


def flux_image_ids(height: int, width: int, device: torch.device) -> Tensor:
    """Flux's (row, column) position ids of a packed latent's 2x2 patches (the pipeline's own layout)."""
    ids = torch.zeros(height, width, 3, device=device)
    ids[..., 1] = torch.arange(height, device=device)[:, None]
    ids[..., 2] = torch.arange(width, device=device)[None, :]
    return ids.reshape(height * width, 3)


def _flux(transformer: nn.Module) -> Callable[[Tensor, Tensor, Cond], Tensor]:
    guided = bool(transformer.config.get("guidance_embeds", False))

    def run(x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        b, c, h, w = x_t.shape
        # The pipeline's packing: 2x2 latent patches as tokens (a permutation: the loss is unchanged).
        packed = x_t.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        text = cond["encoder_hidden_states"]
        out = transformer(
            hidden_states=packed, timestep=t.to(packed.dtype).expand(b), encoder_hidden_states=text,
            pooled_projections=cond["pooled_projections"],
            guidance=torch.full((b,), FLUX_GUIDANCE, device=x_t.device) if guided else None,
            txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device), img_ids=flux_image_ids(h // 2, w // 2, x_t.device),
            return_dict=False)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    return run


def denoiser(model: nn.Module, kind: str, vae_scale: int = 8) -> Callable[[Tensor, Tensor, Cond], Tensor]:
    """(x_t, timestep, cond) -> the model's prediction (SDXL's size conditioning from the latent's size;
    Flux's packing, position ids and guidance as its pipeline does them)."""
    if kind == "flux":
        return _flux(model)
    if kind in flows.PIPELINES.values():
        return flows.denoiser(model, kind)
    if kind == "sd3":
        def run_sd3(x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
            return model(hidden_states=x_t, timestep=t.to(x_t.dtype).expand(x_t.shape[0]),
                         encoder_hidden_states=cond["encoder_hidden_states"],
                         pooled_projections=cond["pooled_projections"], return_dict=False)[0]
        return run_sd3
    unet = model

    def run(x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        added = None
        if kind == "sdxl":
            added = {"text_embeds": cond["text_embeds"], "time_ids": time_ids(x_t, vae_scale)}
        return unet(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"],
                    added_cond_kwargs=added, return_dict=False)[0]
    return run


def encode_images(vae: nn.Module, pixels: Tensor) -> Tensor:
    """(B, H, W, 3) in [0, 1] -> scaled latents (the distribution's mean: deterministic, as ComfyUI encodes);
    a video VAE's are (B, C, 1, h, w), each image one frame, normalised by the VAE's channel statistics."""
    if flows.video_vae(vae):
        return flows.encode_video(vae, pixels)
    if flows.flux2_vae(vae):
        return flows.encode_flux2(vae, pixels)
    with torch.no_grad():
        x = pixels.movedim(-1, 1).to(vae.device, vae.dtype) * 2 - 1
        latent = vae.encode(x).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latent - shift) * vae.config.scaling_factor).float()


def decode_latent(vae: nn.Module, latent: Tensor) -> Tensor:
    """A latent -> an (H, W, 3) image in [0, 1]."""
    if flows.video_vae(vae):
        return flows.decode_video(vae, latent)
    if flows.flux2_vae(vae):
        return flows.decode_flux2(vae, latent)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        x = vae.decode(latent.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift).sample
    return ((x[0].float().clamp(-1, 1) + 1) / 2).movedim(0, -1).cpu()


def vae_scale(vae: nn.Module) -> int:
    """Pixels per latent cell of the pipeline's VAE (its spatial compression)."""
    return flows.vae_scale(vae)


def checkpoint_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks gradient checkpointing re-runs, found by structure (no class named).

    An item of a ModuleList whose items are one class and each hold an attention (a submodule whose
    name says attn/attention); lists inside a chosen block are left to it. UNets: their transformer
    blocks; DiTs: their (double/single/joint/refiner) blocks.
    """
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for _, module in model.named_modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList) or not len(module):
            continue
        items = list(module)
        if len({type(item) for item in items}) != 1:
            continue
        if all(any(isinstance(m, nn.Linear) and ("attn" in n or "attention" in n) for n, m in item.named_modules())
               for item in items):
            blocks.extend(items)
            inside.update(id(m) for item in items for m in item.modules())
    return blocks
