"""ComfyUI glue for the engine: MODEL/CLIP/VAE/IMAGE in, progress bar, events, cancel, files out.

Also the weight-side train module that lets ComfyUI's built-in TrainLoraNode train TLoRA
(`comfy.weight_adapter.adapter_maps["TLoRA"]`).
"""
from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import comfy.model_management as mm
import comfy.model_sampling as cms
import comfy.utils
import folder_paths

from ..tlora import arch as tarch
from ..tlora.adapter import ModuleAdapter
from ..tlora.errors import TLoRAError
from ..tlora.functional import tr, trm
from . import engine as E

try:
    from comfy.weight_adapter import WeightAdapterTrainBase
except ImportError:  # pragma: no cover - hosts without the weight-adapter registry
    WeightAdapterTrainBase = nn.Module  # type: ignore[misc,assignment]

log = logging.getLogger("ComfyUI-TLoRA")
EVENT = "tlora.train"
UNET_PREFIX = "diffusion_model."
TE_PREFIX = "text_encoders."
# What a user may call an adapter file: one name, no folders, no traversal, no drive letters.
_SAFE_NAME = re.compile(r"^[\w][\w\-. ()+\[\]]*$")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


# ----- files --------------------------------------------------------------------------------
def sanitize_output_name(name: str) -> str:
    """`name` -> `name.safetensors` if it is one plain file name; TLoRAError naming the problem otherwise."""
    raw = "" if name is None else str(name)
    text = raw.strip()
    problem = None
    if not text:
        problem = "it is empty"
    elif "/" in text or "\\" in text or os.sep in text or (os.altsep and os.altsep in text):
        problem = "it contains a folder separator (files are always saved directly in the loras folder)"
    elif ".." in text or text.startswith("."):
        problem = "it starts with a dot or contains '..'"
    elif os.path.isabs(text) or re.match(r"^[A-Za-z]:", text):
        problem = "it is an absolute path"
    elif any(ord(c) < 32 for c in text) or not _SAFE_NAME.match(text):
        problem = "it has characters other than letters, digits, space and - _ . ( ) + [ ]"
    elif len(text) > 120:
        problem = "it is longer than 120 characters"
    stem = text[: -len(".safetensors")] if text.lower().endswith(".safetensors") else text
    if problem is None and (not stem or stem.split(".")[0].lower() in _WINDOWS_RESERVED):
        problem = "it is a reserved device name"
    if problem:
        raise TLoRAError(f"output_name {raw!r} was refused: {problem}. Use a plain name like 'sks_dog'.")
    return stem + ".safetensors"


def loras_dir() -> str:
    """The first `loras` folder (where new adapters are written)."""
    folder = folder_paths.get_folder_paths("loras")[0]
    os.makedirs(folder, exist_ok=True)
    return folder


def output_path(output_name: str, resume_path: str | None = None) -> tuple[str, str]:
    """(full path, file name) for a new adapter; an existing file is never overwritten by a new run.

    Resuming into the same name continues that file; otherwise `name_2`, `name_3`... are used.
    """
    file_name = sanitize_output_name(output_name)
    folder = loras_dir()
    path = os.path.join(folder, file_name)
    if os.path.realpath(os.path.dirname(path)) != os.path.realpath(folder):
        raise TLoRAError(f"output_name {output_name!r} was refused: it leaves the loras folder")
    if resume_path and os.path.realpath(resume_path) == os.path.realpath(path):
        return path, file_name
    stem = file_name[: -len(".safetensors")]
    n = 2
    while os.path.exists(path) or os.path.exists(E.state_path_for(path)):
        file_name = f"{stem}_{n}.safetensors"
        path = os.path.join(folder, file_name)
        n += 1
    return path, file_name


# ----- the model ----------------------------------------------------------------------------
def schedule_for(base_model: Any) -> E.Schedule:
    """The training schedule of a ComfyUI BaseModel, read from its model_sampling."""
    ms = base_model.model_sampling
    discrete = isinstance(ms, cms.ModelSamplingDiscrete) and type(ms).timestep is cms.ModelSamplingDiscrete.timestep
    if discrete and not isinstance(ms, (cms.EDM, cms.X0, getattr(cms, "IMG_TO_IMG", cms.X0))):
        if isinstance(ms, cms.V_PREDICTION):
            return E.Schedule.from_sigmas(ms.sigmas, "v")
        if isinstance(ms, cms.EPS):
            return E.Schedule.from_sigmas(ms.sigmas, "eps")
    raise TLoRAError(f"training supports eps- and v-prediction diffusion models (SD1.x/SD2.x/SDXL); this "
                     f"model samples with {type(ms).__mro__[1].__name__}")


def make_denoiser(base_model: Any) -> E.Denoiser:
    """The diffusion model's raw output (eps or v) for x_t at discrete timestep t."""
    diffusion_model = base_model.diffusion_model
    dtype = base_model.manual_cast_dtype or base_model.get_dtype()

    def denoise(x_t: Tensor, t: Tensor, cond: E.Cond) -> Tensor:
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
    """`sd15`/`sdxl` when every module of that architecture's table fits this model, else None."""
    name = {"SD15": "sd15", "SDXL": "sdxl"}.get(type(base_model.model_config).__name__)
    if name is None:
        return None
    shapes = {UNET_PREFIX + k: tuple(v.shape) for k, v in base_model.diffusion_model.state_dict().items()}
    try:
        table = tarch.targets(name, "all-linear")
    except Exception:
        return None
    ok = all(shapes.get(k + ".weight") == tuple(s) for k, s in table.items())
    return name if ok else None


def checkpoint_blocks(root: nn.Module) -> list[nn.Module]:
    """The transformer blocks gradient checkpointing wraps."""
    try:
        from comfy.ldm.modules.attention import BasicTransformerBlock
    except ImportError:  # pragma: no cover
        return []
    return [m for m in root.modules() if isinstance(m, BasicTransformerBlock)]


# ----- data ---------------------------------------------------------------------------------
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


def split_captions(captions: Any, count: int) -> list[str]:
    """Per-image captions from a STRING list or newline-separated text ('' = use the instance prompt)."""
    if captions is None:
        return [""] * count
    items = [captions] if isinstance(captions, str) else [c for c in captions if c is not None]
    if len(items) == 1 and isinstance(items[0], str):
        lines = [line.strip() for line in items[0].splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        items = lines
    items = [str(c).strip() for c in items]
    if not items or not any(items):
        return [""] * count
    if len(items) == 1:
        return items * count
    if len(items) != count:
        raise TLoRAError(f"got {len(items)} captions for {count} images: give one caption per image "
                         f"(one per line), a single caption, or none")
    return items


@dataclass
class Prepared:
    """What prepare_data hands the engine, plus figures for metadata."""

    data: E.TrainData
    sample_cond: E.Cond | None
    sample_uncond: E.Cond | None
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
                   keep_grad: bool = False) -> E.Cond:
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

    def cond(self, text: str, latent_shape: Sequence[int], downscale: int) -> E.Cond:
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
    if resolution % 64:
        raise TLoRAError(f"resolution must be a multiple of 64 (got {resolution})")
    downscale = vae.downscale_ratio if isinstance(getattr(vae, "downscale_ratio", None), int) else 8
    encoder = Encoder(base_model, clip, device)
    with torch.inference_mode(False), torch.no_grad():
        fitted = E.prepare_images(images, resolution, buckets)
        latents = encode_images(vae, base_model, fitted, device)
        instance = []
        for latent, caption in zip(latents, captions):
            text = caption or instance_prompt
            instance.append(E.Example(latent, encoder.cond(text, latent.shape, downscale), text))
        data = E.TrainData(instance)
        if class_images or num_class_images:
            if not class_prompt.strip():
                raise TLoRAError("prior preservation needs a class_prompt (e.g. 'a photo of a dog')")
            if class_images:
                class_fitted = E.prepare_images(class_images, resolution, buckets)
                for latent in encode_images(vae, base_model, class_fitted, device):
                    data.prior.append(E.Example(latent, encoder.cond(class_prompt, latent.shape, downscale),
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
    return Prepared(data, sample_cond, sample_uncond, sample_shape, [tuple(f.shape[:2]) for f in fitted])


# ----- progress -----------------------------------------------------------------------------
def _server() -> Any:
    try:
        import server
        return getattr(server.PromptServer, "instance", None)
    except Exception:
        return None


def send_event(data: Mapping[str, Any]) -> None:
    """`tlora.train` to the web UI (no-op without a server, never fails the run)."""
    srv = _server()
    if srv is None:
        return
    try:
        srv.send_sync(EVENT, dict(data), getattr(srv, "client_id", None))
    except Exception as err:  # a UI hiccup must not cost a training run
        log.debug("TLoRA: could not send %s: %s", EVENT, err)


def view_url(filename: str, subfolder: str, kind: str) -> str:
    """ComfyUI's /view address of a file in its temp/output folders."""
    from urllib.parse import urlencode
    return "/view?" + urlencode({"filename": filename, "subfolder": subfolder, "type": kind})


def save_preview(image: Tensor, run_id: str, step: int) -> dict[str, Any] | None:
    """Write a sample to ComfyUI's temp folder; the /view reference the UI can show (with its step)."""
    try:
        from PIL import Image
        folder = os.path.join(folder_paths.get_temp_directory(), "tlora")
        os.makedirs(folder, exist_ok=True)
        name = f"{run_id}_{step:06d}.png"
        array = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype("uint8")
        Image.fromarray(array).save(os.path.join(folder, name))
        return {"filename": name, "subfolder": "tlora", "type": "temp", "step": int(step),
                "url": view_url(name, "tlora", "temp")}
    except Exception as err:
        log.debug("TLoRA: preview not saved: %s", err)
        return None


def current_prompt_id() -> str | None:
    """The id of the prompt ComfyUI is executing (None outside an execution)."""
    try:
        from comfy_execution.utils import get_executing_context
    except Exception:  # older hosts without the context helper: the server's last prompt
        get_executing_context = None
    if get_executing_context is not None:
        try:
            context = get_executing_context()
        except Exception:
            context = None
        value = getattr(context, "prompt_id", None)
        return str(value) if value else None  # a direct call outside an execution has none
    srv = _server()
    value = getattr(srv, "last_prompt_id", None) if srv is not None else None
    return str(value) if isinstance(value, str) and value else None


def to_pil(image: Tensor) -> Any:
    """(H, W, 3) in [0, 1] -> PIL image."""
    from PIL import Image
    return Image.fromarray((image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype("uint8"))


class ComfyProgress:
    """Engine observer: UI progress bar (with the latest sample as preview), events, cancel checks."""

    def __init__(self, steps: int, node_id: str | None, run_id: str, registry: E.RunRegistry | None = None):
        self.bar = comfy.utils.ProgressBar(steps, node_id=node_id) if node_id is not None else comfy.utils.ProgressBar(steps)
        self.node_id, self.run_id = node_id, run_id
        self.registry = registry if registry is not None else E.RUNS
        self.preview = None  # the latest sample, as ComfyUI's preview tuple
        self.sample_ref: dict[str, Any] | None = None

    def __call__(self, report: E.StepReport) -> None:
        new_preview = ref = None
        if report.sample is not None:
            pil = to_pil(report.sample)
            # ComfyUI fits previews into max_size (up or down): never blow a small sample up.
            self.preview = new_preview = ("JPEG", pil, min(512, max(pil.size)))
            ref = save_preview(report.sample, report.run_id, report.step)
            if ref is not None:
                self.sample_ref = ref
                self.registry.set_sample(report.run_id, ref)
        send_event({"node": self.node_id, "run_id": report.run_id, "step": report.step, "steps": report.steps,
                    "loss": report.loss, "mse": report.mse, "lr": report.lr, "step_time": report.step_time,
                    "eta": report.eta, "grad_norm": report.grad_norm if math.isfinite(report.grad_norm) else None,
                    **({"sample": dict(ref)} if report.sample is not None and ref is not None else {})})
        # A new sample becomes the node's progress-bar preview (the frontend keeps showing it
        # until the next one). ProgressBar's hook raises the user's Cancel in a server; the
        # explicit check covers in-process runs whose hook is not installed.
        self.bar.update_absolute(report.step, report.steps, new_preview)
        mm.throw_exception_if_processing_interrupted()


# ----- a whole run ---------------------------------------------------------------------------
@dataclass
class RunSettings:
    """Node inputs, already unwrapped (see nodes/train_node.py)."""

    instance_prompt: str
    steps: int = 500
    output_name: str = "tlora_subject"
    transform: str = "trm:2"
    residual: str = "tr:6"
    targets: str = "attn"
    with_convs: bool = False
    train_text_encoder: bool = False
    learning_rate: float = 1e-4
    batch_size: int = 1
    grad_accum: int = 1
    resolution: int = 512
    aspect_buckets: bool = False
    loss: str = "dco"
    dco_beta: float = 1000.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    class_prompt: str = ""
    num_class_images: int = 0
    prior_loss_weight: float = 1.0
    seed: int = 0
    save_every: int = 0
    sample_every: int = 0
    sample_prompt: str = ""
    sample_steps: int = 20
    precision: str = "auto"
    gradient_checkpointing: bool = False
    resume_path: str | None = None
    shapes: str = "paper"


def pick_precision(choice: str, device: torch.device) -> str:
    """`auto`: bf16 autocast where the accelerator has it, fp32 on CPUs (fast and exact there)."""
    if choice != "auto":
        return choice
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


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
          settings: RunSettings, class_images: Sequence[Tensor] = (), node_id: str | None = None,
          run_id: str | None = None, prompt: Mapping[str, Any] | None = None,
          ) -> tuple[E.TrainResult, str, str | None]:
    """Train on a ComfyUI model; returns (result, saved file name, arch). Cancel saves a partial file.

    The run is in `engine.RUNS` (node id, prompt id, file name, every step, the latest sample,
    how it ended) and every step and the end go out as `tlora.train` events; a run that raises
    ends with a `cancelled`, `diverged` or `failed` event before the exception reaches ComfyUI.
    """
    path, file_name = output_path(settings.output_name, settings.resume_path)
    run_id = run_id or f"{int(time.time())}-{os.urandom(3).hex()}"
    registry = E.RUNS
    run_info = {"node": node_id, "prompt_id": current_prompt_id(), "file_name": file_name}
    base = model.model
    device = mm.get_torch_device()
    hooks: list[Any] = []
    try:
        with torch.inference_mode(False):
            result, arch = _run(model, clip, vae, images, captions, settings, class_images, node_id, run_id, prompt,
                                path, file_name, base, device, registry, run_info, hooks)
    except BaseException as err:
        _report_end(err, registry, run_id, run_info, settings)
        raise
    finally:
        for hook in hooks:
            hook.remove()
    send_event({"node": node_id, "run_id": run_id, "status": "done", "step": result.steps_done,
                "steps": settings.steps, "steps_done": result.steps_done, "file": file_name, "partial": False,
                "loss": result.final_loss})
    return result, file_name, arch


def _run(model: Any, clip: Any, vae: Any, images: Sequence[Tensor], captions: Sequence[str], settings: RunSettings,
         class_images: Sequence[Tensor], node_id: str | None, run_id: str, prompt: Mapping[str, Any] | None,
         path: str, file_name: str, base: Any, device: torch.device, registry: E.RunRegistry,
         run_info: Mapping[str, Any], hooks: list[Any]) -> tuple[E.TrainResult, str | None]:
    """train()'s body (under inference_mode(False)); text-encoder hooks go into `hooks` for the caller to remove."""
    # Weights on the device with any upstream patches (stacked LoRAs) applied, then made
    # usable by autograd; the adapters wrap these live layers.
    mm.load_models_gpu([model], force_full_load=True)
    prepared = prepare_data(base, clip, vae, images, captions, settings.instance_prompt, settings.resolution,
                            settings.aspect_buckets, settings.class_prompt, settings.num_class_images,
                            class_images, settings.sample_prompt, settings.sample_every, device)
    mm.load_models_gpu([model], force_full_load=True)  # the VAE/CLIP may have displaced it
    make_trainable(base.diffusion_model)
    root = base.diffusion_model
    paths = E.select_targets(root, settings.targets, settings.with_convs)
    groups = [E.AdapterGroup(root, UNET_PREFIX, E.create_adapters(
        root, paths, settings.transform, settings.residual, settings.shapes, settings.seed, UNET_PREFIX))]
    encode = None
    if settings.train_text_encoder:
        groups.append(_text_group(clip, settings))
        encode = _text_encode(base, clip, prepared, vae, device)
    arch = arch_of(base)
    config = E.TrainConfig(
        steps=settings.steps, learning_rate=settings.learning_rate, batch_size=settings.batch_size,
        grad_accum=settings.grad_accum, lr_schedule=settings.lr_schedule, warmup_steps=settings.warmup_steps,
        loss=settings.loss, dco_beta=settings.dco_beta, prior_loss_weight=settings.prior_loss_weight,
        precision=pick_precision(settings.precision, device),
        gradient_checkpointing=settings.gradient_checkpointing, seed=settings.seed,
        save_every=settings.save_every, sample_every=settings.sample_every, sample_steps=settings.sample_steps,
        progress_bar=comfy.utils.PROGRESS_BAR_ENABLED)
    progress = ComfyProgress(settings.steps, node_id, run_id, registry)

    def decode(latent: Tensor) -> Tensor:
        # Called by the engine under no_grad with the model's own modules in place (host_view).
        with torch.inference_mode(False), torch.no_grad():
            pixels = vae.decode(base.process_latent_out(latent.float()))
            mm.load_models_gpu([model], force_full_load=True)  # back on the device after the VAE
            # If the VAE displaced the model, reloading may have brought back inference-mode
            # weights (e.g. restored from ComfyUI's backups): autograd must be able to save them.
            make_trainable(base.diffusion_model)
        return pixels[0, ..., :3].detach().float().cpu().clone()

    metadata = {
        "tlora.train.resolution": str(settings.resolution),
        "tlora.train.base_model": base_model_name(model, prompt, node_id),
        "tlora.train.instance_prompt": settings.instance_prompt,
        "tlora.train.targets": settings.targets + ("+convs" if settings.with_convs else ""),
        "tlora.train.text_encoder": "true" if settings.train_text_encoder else "false",
        "tlora.train.aspect_buckets": "true" if settings.aspect_buckets else "false",
        "ss_resolution": f"({settings.resolution}, {settings.resolution})",
        "ss_output_name": file_name[: -len(".safetensors")],
    }
    if settings.class_prompt:
        metadata["tlora.train.class_prompt"] = settings.class_prompt
    file_config = {"transform": settings.transform, "residual": settings.residual, "targets": settings.targets,
                   "shapes": settings.shapes, "with_convs": settings.with_convs,
                   "text_encoder": settings.train_text_encoder}
    if arch:
        file_config["arch"] = arch
    trainer = E.Trainer(
        groups, make_denoiser(base), schedule_for(base), prepared.data, config, output_path=path,
        metadata=metadata, file_config=file_config, resume_path=settings.resume_path,
        checkpoint_modules=checkpoint_blocks(root), interrupt_types=(mm.InterruptProcessingException,),
        observer=progress, decode=decode if settings.sample_every else None, sample_cond=prepared.sample_cond,
        sample_uncond=prepared.sample_uncond, sample_shape=prepared.sample_shape, encode=encode,
        device=device, run_id=run_id, registry=registry, run_info=run_info,
        interrupt_check=mm.throw_exception_if_processing_interrupted)
    if settings.train_text_encoder:
        hooks.extend(autograd_safe_norms(clip.cond_stage_model))
    return trainer.run(), arch


def _report_end(err: BaseException, registry: E.RunRegistry, run_id: str, run_info: Mapping[str, Any],
                settings: RunSettings) -> None:
    """A run raised: make sure the registry says how it ended, and tell the web UI (never raises)."""
    try:
        if isinstance(err, (mm.InterruptProcessingException, KeyboardInterrupt)):
            status = "cancelled"
        elif isinstance(err, E.TrainingDiverged):
            status = "diverged"
        else:
            status = "failed"
        record = registry.get(run_id)
        if record is None:
            # It failed before training started (images, captions, resume file...).
            registry.start(run_id, **{**run_info, "steps": settings.steps, "start_step": 0, "loss_kind": settings.loss})
            registry.finish(run_id, status, steps_done=0, final_loss=None, partial=True, file_name=None,
                            message=(str(err) or type(err).__name__)[:500] if status != "cancelled" else None)
            record = registry.get(run_id)
        elif record.get("status") == "running":
            registry.finish(run_id, status, **{**record.get("summary", {}), "partial": True})
            record = registry.get(run_id)
        summary = dict((record or {}).get("summary") or {})
        status = (record or {}).get("status", status)
        event = {"node": run_info.get("node"), "run_id": run_id, "status": status,
                 "step": summary.get("steps_done", 0), "steps": settings.steps,
                 "steps_done": summary.get("steps_done", 0), "file": summary.get("file_name"),
                 "partial": True, "loss": summary.get("final_loss")}
        if status in ("diverged", "failed"):
            event["message"] = summary.get("message") or (str(err) or type(err).__name__)[:500]
        send_event(event)
    except Exception as report_err:  # the original error matters more
        log.debug("TLoRA: could not report the end of run %s: %s", run_id, report_err)


def _text_group(clip: Any, settings: RunSettings) -> E.AdapterGroup:
    """Adapters on the text encoder's attention (and MLP for the wider presets)."""
    clip.load_model()
    root = clip.cond_stage_model
    make_trainable(root)
    paths = E.select_targets(root, settings.targets, text_encoder=True)
    return E.AdapterGroup(root, TE_PREFIX, E.create_adapters(root, paths, settings.transform, settings.residual,
                                                             settings.shapes, settings.seed + 1, TE_PREFIX))


def autograd_safe_norms(root: nn.Module) -> list[Any]:
    """Feed every LayerNorm a copy of its input; returns the hook handles to remove afterwards.

    ComfyUI's CLIP layers add their residuals in place (`x += attn(norm(x))`), which
    overwrites the tensor the norm saved for backward. With a copy, the norm keeps its
    own input and the in-place add touches a tensor nothing saved: gradients flow.
    """
    def clone_input(module: nn.Module, args: tuple) -> tuple:
        return (args[0].clone(), *args[1:]) if args and isinstance(args[0], Tensor) else args
    return [m.register_forward_pre_hook(clone_input) for m in root.modules() if isinstance(m, nn.LayerNorm)]


def _text_encode(base: Any, clip: Any, prepared: Prepared, vae: Any, device: torch.device) -> Callable:
    """Captions -> model conditioning through the (adapted) text encoder, with gradients."""
    downscale = vae.downscale_ratio if isinstance(getattr(vae, "downscale_ratio", None), int) else 8
    shape = tuple(prepared.data.instance[0].latent.shape)
    encoder = Encoder(base, clip, device)

    def encode(captions: list[str]) -> E.Cond:
        conds = []
        model = clip.cond_stage_model
        for text in captions:
            # encode_from_tokens minus its load_model(): the model is loaded and wrapped already.
            model.reset_clip_options()
            if clip.layer_idx is not None:
                model.set_clip_options({"layer": clip.layer_idx})
            out = model.encode_token_weights(clip.tokenize(text))
            conds.append(encoder.model_cond([[out[0], {"pooled_output": out[1]}]], shape, downscale, keep_grad=True))
        return E.collate_conds(conds)
    return encode


# ----- the loss curve -----------------------------------------------------------------------
def loss_curve(history: Sequence[Mapping[str, float]], width: int = 640, height: int = 360,
               title: str = "TLoRA training loss") -> Tensor:
    """A loss-vs-step chart as an IMAGE (1, H, W, 3), drawn with PIL (matplotlib is optional)."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 64, width - 16, 28, height - 36
    draw.text((left, 8), title, fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    points = [(h["step"], h["loss"]) for h in history if math.isfinite(h.get("loss", math.nan))]
    if points:
        steps = [p[0] for p in points]
        values = [p[1] for p in points]
        lo, hi = min(values), max(values)
        span = (hi - lo) or max(abs(hi), 1e-8)
        x0, x1 = min(steps), max(steps)
        xspan = (x1 - x0) or 1

        def xy(step: float, value: float) -> tuple[float, float]:
            return (left + (step - x0) / xspan * (right - left), bottom - (value - lo) / span * (bottom - top))
        if len(points) > 1:
            draw.line([xy(s, v) for s, v in points], fill=(150, 180, 230), width=1)
            # An EMA on top: per-step loss is noisy (random timesteps), the trend is what matters.
            ema, smooth = values[0], []
            for s, v in points:
                ema = 0.9 * ema + 0.1 * v
                smooth.append(xy(s, ema))
            draw.line(smooth, fill=(20, 60, 200), width=2)
        else:
            cx, cy = xy(*points[0])
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=(20, 60, 200))
        draw.text((4, top), f"{hi:.4g}", fill="black")
        draw.text((4, bottom - 10), f"{lo:.4g}", fill="black")
        draw.text((left, bottom + 6), f"step {x0}", fill="black")
        label = f"step {x1}  final {values[-1]:.4g}"
        draw.text((right - 7 * len(label), bottom + 6), label, fill="black")
    else:
        draw.text((left + 10, (top + bottom) // 2), "no steps recorded", fill="black")
    import numpy as np
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


# ----- ComfyUI's built-in TrainLoraNode ------------------------------------------------------
class TLoRATrainDiff(WeightAdapterTrainBase):
    """Trainable weight-side TLoRA for TrainLoraNode: __call__(W0) = W0 T + s Delta.

    Parameter names are the file's suffixes (`tlora_t.0`, `tlora_r.out.0`, `tlora_scale`...),
    so TrainLoraNode's `{module}.{param}` state dict is a valid TLoRA file as it stands.
    """

    def __init__(self, tensors: Mapping[str, Tensor]):
        super().__init__()
        adapter = ModuleAdapter(dict(tensors))
        self.transform_kind, self.residual_kind = adapter.transform.kind, adapter.residual.kind
        self.tlora_t = nn.ParameterDict()
        self.tlora_r = nn.Module()
        for key, value in adapter.tensors.items():
            param = nn.Parameter(value.detach().float().clone(), requires_grad=key != "tlora_scale")
            parts = key.split(".")
            if parts[0] == "tlora_t":
                self.tlora_t[parts[1]] = param
            elif parts[0] == "tlora_r" and parts[1] in ("out", "in"):
                if not hasattr(self.tlora_r, parts[1]):
                    self.tlora_r.add_module(parts[1], nn.ParameterDict())
                getattr(self.tlora_r, parts[1])[parts[2]] = param
            elif parts[0] == "tlora_r":
                self.tlora_r.register_parameter(parts[1], param)
            else:
                self.tlora_scale = param  # kept as a (frozen) parameter so TrainLoraNode saves it

    @classmethod
    def create(cls, weight: Tensor, rank: int = 8, alpha: float = 1.0, transform: str = "trm:2") -> "TLoRATrainDiff":
        """Fresh adapter for a weight: TRM transform + tensor-ring residual of TrainLoraNode's rank."""
        adapter = ModuleAdapter.create(tuple(weight.shape), transform, f"tr:{int(rank)}", "paper", alpha=float(alpha))
        return cls({k: v.to(weight.device) for k, v in adapter.tensors.items()})

    def _cores(self, group: nn.ParameterDict) -> list[Tensor]:
        return [group[str(d)].float() for d in range(len(group))]

    def __call__(self, w: Tensor) -> Tensor:
        org_dtype = w.dtype
        w32 = w.float()
        out = w32
        if self.transform_kind != "none":
            # (W0 T) on the input-channel axis at every kernel tap, in factored form.
            rows = w32.movedim(1, -1) if w32.dim() == 4 else w32
            flat = rows.reshape(-1, rows.shape[-1])
            if self.transform_kind == "diag":
                moved = flat * self.tlora_t["diag"].float()
            else:
                moved = trm.weight_times_t(flat, self._cores(self.tlora_t))
            moved = moved.reshape(rows.shape)
            out = moved.movedim(-1, 1) if w32.dim() == 4 else moved
        if self.residual_kind == "tr":
            delta = tr.dense(self._cores(self.tlora_r.out), self._cores(getattr(self.tlora_r, "in")))
        elif self.residual_kind == "lora":
            delta = self.tlora_r.up.float() @ self.tlora_r.down.float()
        else:
            delta = None
        if delta is not None:
            out = out + self.tlora_scale.float() * delta.reshape(w32.shape)
        return out.to(org_dtype)

    def passive_memory_usage(self) -> int:
        """Bytes held by the adapter's tensors."""
        return sum(p.numel() * p.element_size() for p in self.parameters())


def register_train_adapter(adapter_cls: type) -> bool:
    """Offer TLoRA in TrainLoraNode's `algorithm` list (adapter_maps["TLoRA"]); False if impossible."""
    try:
        import comfy.weight_adapter as registry
        maps = getattr(registry, "adapter_maps", None)
        if maps is None:
            return False
        if maps.get("TLoRA") is not adapter_cls:
            maps["TLoRA"] = adapter_cls
        return True
    except Exception as err:  # never break the pack's import over an optional registry
        log.warning("TLoRA: could not register with TrainLoraNode (%s)", err)
        return False
