"""A whole training run on a ComfyUI MODEL/CLIP/VAE: the binding is built here and the engine trains."""
from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

import comfy.model_management as mm
import comfy.utils
import folder_paths

from ...tlora import arch as tarch
from ...tlora.errors import TLoRAError
from ...tlora.module import TLoRAModule
from .. import outputs
from ..binding import Binding, adapter_group
from ..cache import EncodingCache
from ..loop import Trainer
from ..runs import RUNS, RunRegistry, TrainResult
from ..settings import TrainSettings
from .data import prepare_data
from .host_autograd import base_weights_visible
from .model import (arch_of, autograd_safe_norms, checkpoint_blocks, differentiable_kernels, host_training_mode,
                    make_denoiser, make_trainable, refuse_untrainable, schedule_for, text_encode, text_group)
from .progress import ComfyProgress, current_prompt_id, report_end, send_event


def loras_dir() -> str:
    """The first `loras` folder (where new adapters are written)."""
    folder = folder_paths.get_folder_paths("loras")[0]
    os.makedirs(folder, exist_ok=True)
    return folder


def cache_dir() -> str:
    """Where cached latents and text-encoder outputs live: ComfyUI's user folder (kept across restarts)."""
    return os.path.join(folder_paths.get_user_directory(), "tlora", "encodings")


def output_path(output_name: str, resume_path: str | None = None) -> tuple[str, str]:
    """(full path, file name) in the loras folder; an existing file is never overwritten by a new run."""
    return outputs.output_path(loras_dir(), output_name, resume_path)


def resident_patcher(model: Any) -> Any:
    """The patcher a training run uses: `model`, or under dynamic VRAM the host's own non-dynamic delegate.

    ModelPatcherDynamic (the default on GPUs from ComfyUI 0.33; `--fast dynamic_vram` on 0.12)
    streams each layer's weights in per forward through a virtual address range; our adapters
    wrap the live layers and autograd keeps what they saw for the backward pass, which that
    streaming does not plan for. The host itself falls back to `get_non_dynamic_delegate()`
    (the same model reloaded resident, patches kept) for what dynamic loading cannot do (hook
    patches); a training run does the same. Hosts or loaders without that way back are refused
    with what to do.
    """
    is_dynamic = getattr(model, "is_dynamic", None)
    if not (callable(is_dynamic) and is_dynamic()):
        return model
    delegate = getattr(model, "get_non_dynamic_delegate", None)
    if delegate is not None:
        try:
            return delegate()
        except RuntimeError as err:  # a custom loader that registered no way to reload its model
            raise TLoRAError(f"Train TLoRA needs this model resident, and its loader cannot reload it without "
                             f"dynamic VRAM ({err}); load it with a core loader (Load Checkpoint, Load Diffusion "
                             f"Model) or restart ComfyUI without dynamic VRAM (--disable-dynamic-vram)") from None
    raise TLoRAError("Train TLoRA does not train under ComfyUI's dynamic VRAM mode (--fast dynamic_vram), "
                     "which streams weights in per layer; restart ComfyUI without dynamic_vram to train "
                     "(--disable-dynamic-vram on newer ComfyUI)")


def base_model_name(model: Any, prompt: Mapping[str, Any] | None = None, node_id: str | None = None) -> str:
    """The checkpoint a MODEL came from, traced up the graph; else the model's config class name."""
    seen = set()
    current = node_id
    while prompt and current is not None and current not in seen and current in prompt:
        seen.add(current)
        inputs = prompt[current].get("inputs", {})
        for key in ("ckpt_name", "unet_name", "model_name"):
            if isinstance(inputs.get(key), str) and current != node_id:
                return os.path.basename(inputs[key])
        link = inputs.get("model")
        current = str(link[0]) if isinstance(link, list) and link else None
    config = getattr(model.model, "model_config", None)
    return type(config).__name__ if config is not None else type(model.model).__name__


def train(model: Any, clip: Any, vae: Any, images: Sequence[Tensor], captions: Sequence[str],
          settings: TrainSettings, class_images: Sequence[Tensor] = (), node_id: str | None = None,
          run_id: str | None = None, prompt: Mapping[str, Any] | None = None, clips: Sequence[Tensor] = (),
          ) -> tuple[TrainResult, str, str | None]:
    """Train on a ComfyUI model; returns (result, saved file name, arch). Cancel saves a partial file.

    `settings.resume` is a full path (or empty). The run is in `trainer.RUNS` (node id, prompt
    id, file name, every step, the latest sample, how it ended) and every step and the end go
    out as `tlora.train` events; a run that raises ends with a `cancelled`, `diverged` or
    `failed` event before the exception reaches ComfyUI.
    """
    model = resident_patcher(model)
    path, file_name = output_path(settings.output_name, settings.resume or None)
    run_id = run_id or f"{int(time.time())}-{os.urandom(3).hex()}"
    run_info = {"node": node_id, "prompt_id": current_prompt_id(), "file_name": file_name}
    hooks: list[Any] = []
    try:
        with torch.inference_mode(False):
            trainer, arch = _trainer(model, clip, vae, images, captions, settings, class_images, node_id, run_id,
                                     prompt, path, RUNS, run_info, hooks, clips)
            result = trainer.run()
    except BaseException as err:
        report_end(err, RUNS, run_id, run_info, settings)
        raise
    finally:
        for hook in hooks:
            hook.remove()
    if result.path:  # another run may have written this name first: the trainer then took the next free one
        file_name = os.path.basename(result.path)
    send_event({"node": node_id, "run_id": run_id, "status": "done", "step": result.steps_done,
                "steps": settings.steps, "steps_done": result.steps_done, "file": file_name, "partial": False,
                "loss": result.final_loss})
    return result, file_name, arch


def _trainer(model: Any, clip: Any, vae: Any, images: Sequence[Tensor], captions: Sequence[str],
             settings: TrainSettings, class_images: Sequence[Tensor], node_id: str | None, run_id: str,
             prompt: Mapping[str, Any] | None, path: str, registry: RunRegistry, run_info: Mapping[str, Any],
             hooks: list[Any], clips: Sequence[Tensor] = ()) -> tuple[Trainer, str | None]:
    """The engine's Trainer for this ComfyUI run (text-encoder hooks go into `hooks` for the caller to remove)."""
    base = model.model
    device = mm.get_torch_device()
    # What the engine lacks for this model, and its schedule as the sampler will use it (the patcher's
    # model_sampling, ModelSampling* patches included): refused in one line before any encoding.
    refuse_untrainable(model)
    schedule = schedule_for(model)
    # Weights on the device with any upstream patches (stacked LoRAs) applied, then made
    # usable by autograd; the adapters wrap these live layers.
    mm.load_models_gpu([model], force_full_load=True)
    disk = EncodingCache(cache_dir()) if settings.cache_encodings else None
    prepared = prepare_data(base, clip, vae, images, captions, settings.instance_prompt, settings.resolution,
                            settings.aspect_buckets, settings.class_prompt, settings.num_class_images,
                            class_images, settings.sample_prompt, settings.sample_every, device, clips, disk)
    mm.load_models_gpu([model], force_full_load=True)  # the VAE/CLIP may have displaced it
    make_trainable(base.diffusion_model)
    root = base.diffusion_model
    groups = [adapter_group(root, tarch.UNET_PREFIX, settings)]
    encode = None
    if settings.train_text_encoder:
        groups.append(text_group(clip, settings))
        encode = text_encode(base, clip, prepared, vae, device)
    arch = arch_of(base)

    def decode(latent: Tensor) -> Tensor:
        # Called by the engine under no_grad with the model's own modules in place (host_view).
        with torch.inference_mode(False), torch.no_grad():
            latent = base.process_latent_out(latent.float())
            if latent.dim() == 5 and getattr(vae, "latent_dim", 2) != 3:  # an image VAE on video latents
                latent = latent[:, :, 0]
            pixels = vae.decode(latent)
            pixels = pixels.reshape(-1, *pixels.shape[-3:])  # a video VAE's (clips, frames, H, W, C)
            mm.load_models_gpu([model], force_full_load=True)  # back on the device after the VAE
            # If the VAE displaced the model, reloading may have brought back inference-mode
            # weights (e.g. restored from ComfyUI's backups): autograd must be able to save them.
            make_trainable(base.diffusion_model)
        return pixels[0, ..., :3].detach().float().cpu().clone()

    binding = Binding(
        groups, make_denoiser(model), schedule, prepared.data, device=device, encode=encode,
        decode=decode if settings.sample_every else None, checkpoint_modules=checkpoint_blocks(root),
        interrupt_types=(mm.InterruptProcessingException,),
        interrupt_check=mm.throw_exception_if_processing_interrupted,
        observer=ComfyProgress(settings.steps, node_id, run_id, registry),
        progress_bar=comfy.utils.PROGRESS_BAR_ENABLED,
        metadata={"tlora.train.base_model": base_model_name(model, prompt, node_id)},
        file_config={"arch": arch} if arch else {},
        text_cond=lambda text, shape: prepared.encoder.cond(text, shape, prepared.downscale),
        downscale=prepared.downscale)
    hooks.extend(host_training_mode())
    if settings.train_text_encoder:
        hooks.extend(autograd_safe_norms(clip.cond_stage_model))
    # Blocks that add residuals in place onto what their norms saved, kernels without a backward:
    # found on the live host for any family (trainer/comfy/host_autograd.py).
    hooks.extend(autograd_safe_norms(root))
    hooks.extend(differentiable_kernels())
    hooks.extend(base_weights_visible(TLoRAModule))
    return Trainer(binding, settings, output_path=path, run_id=run_id, registry=registry, run_info=run_info), arch
