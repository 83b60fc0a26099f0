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
from ..cache import EncodingCache, fingerprint
from ..data import Cond, Example, TrainData, prepare_images


# Cached conditioning keys for the host's constant conds (CONDConstant: Lumina 2's / Z-Image's token
# count...), kept as one-element tensors so batches collate; the denoiser hands back the Python value.
CONST_PREFIX = "const:"


def vae_downscale(vae: Any) -> int:
    """Pixels per latent cell of a ComfyUI VAE (8 for the SD families, 16 for Flux.2's and Wan 2.2's)."""
    spatial = getattr(vae, "spacial_compression_encode", None)
    if callable(spatial):
        try:
            value = spatial()
            if isinstance(value, int) and value > 0:
                return value
        except Exception:  # noqa: BLE001  (a VAE class of a custom node without the ratio)
            pass
    return vae.downscale_ratio if isinstance(getattr(vae, "downscale_ratio", None), int) else 8


def latent_dimensions(base_model: Any) -> int:
    """Spatial(-temporal) dimensions of the model's latents: 2 for images, 3 for video (frames, h, w)."""
    return int(getattr(base_model.latent_format, "latent_dimensions", 2))


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


def split_clips(clips: Sequence[Tensor] | Tensor | None) -> list[Tensor]:
    """IMAGE batches (or a list of them) -> one (frames, H, W, C) clone per batch: each batch is one clip."""
    if clips is None:
        return []
    batches: list[Any] = [clips] if isinstance(clips, Tensor) else list(clips)
    while any(isinstance(b, (list, tuple)) for b in batches):  # nested lists from list-executing nodes
        batches = [x for b in batches for x in (b if isinstance(b, (list, tuple)) else [b])]
    with torch.inference_mode(False):
        return [(b if b.dim() == 4 else b[None]).detach().clone().float().cpu() for b in batches if b is not None]


@dataclass
class Prepared:
    """What prepare_data hands the engine, plus figures for metadata."""

    data: TrainData
    sample_cond: Cond | None
    sample_uncond: Cond | None
    sample_shape: tuple[int, ...] | None
    sizes: list[tuple[int, int]] = field(default_factory=list)
    encoder: "Encoder | None" = None  # captions encoded later (shuffled tags, dropout, previews) go through it
    downscale: int = 8


class Encoder:
    """Cached text conditionings for a model (one CLIP pass per distinct prompt)."""

    def __init__(self, base_model: Any, clip: Any, device: torch.device, disk: EncodingCache | None = None):
        self.base_model, self.clip, self.device = base_model, clip, device
        self._clip_cache: dict[str, list] = {}
        self.disk = disk
        self.text_identity = text_identity(base_model, clip) if disk is not None else ""

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
            elif isinstance(tensor, (bool, int, float)) and type(value).__name__ == "CONDConstant":
                result[CONST_PREFIX + key] = torch.tensor([tensor], device=self.device)
        return result

    def cond(self, text: str, latent_shape: Sequence[int], downscale: int) -> Cond:
        """Cached model conditioning for a prompt at a latent size (from the disk cache when there is one)."""
        if self.disk is None:
            return self.model_cond(self.conditioning(text), latent_shape, downscale)
        return self.disk.cond(text, tuple(latent_shape), self.text_identity,
                              lambda: self.model_cond(self.conditioning(text), latent_shape, downscale), self.device)


def _to_model_latent(raw: Tensor, dims: int) -> Tensor:
    """A VAE's output as the model's latent batch: an image VAE's (B, C, h, w) is one frame each on video latents."""
    if dims == 3 and raw.dim() == 4:
        return raw.unsqueeze(2)
    return raw


def encode_images(vae: Any, base_model: Any, images: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """Model-space latents for prepared images, batched by size: (C, h, w), or (C, 1, h, w) on video latents.

    A video VAE (latent_dim 3) reads a batch as the frames of one clip (as VAE Encode does): stills
    are encoded one at a time, each its own one-frame clip.
    """
    dims = latent_dimensions(base_model)
    per_call = 1 if getattr(vae, "latent_dim", 2) == 3 else 8
    latents: list[Tensor | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape), []).append(i)
    for indices in groups.values():
        for start in range(0, len(indices), per_call):
            chunk = indices[start:start + per_call]
            pixels = torch.stack([images[i] for i in chunk])
            raw = _to_model_latent(vae.encode(pixels[..., :3]), dims)
            processed = base_model.process_latent_in(raw.float()).to(device)
            for j, i in enumerate(chunk):
                latents[i] = processed[j].detach().clone()
    return latents  # type: ignore[return-value]


def encode_clip(vae: Any, base_model: Any, frames: Tensor, device: torch.device) -> Tensor:
    """A clip's latent (C, t, h, w): a video VAE encodes the frames together (its own temporal
    compression), an image VAE frame by frame, stacked on the frame axis."""
    raw = vae.encode(frames[..., :3])
    if raw.dim() == 4:  # an image VAE: (frames, C, h, w)
        raw = raw.movedim(0, 1)[None]
    return base_model.process_latent_in(raw.float()).to(device)[0].detach().clone()


def check_latents(base_model: Any, latents: Sequence[Tensor]) -> None:
    """One line when the VAE's latents are not what the model takes (channels, image vs video shape)."""
    want = getattr(base_model.latent_format, "latent_channels", None)
    dims = latent_dimensions(base_model)
    for latent in latents[:1]:
        if latent.dim() != dims + 1 or (isinstance(want, int) and latent.shape[0] != want):
            raise TLoRAError(f"the VAE gives {latent.shape[0]}-channel latents of shape {tuple(latent.shape[1:])}; "
                             f"{type(base_model.model_config).__name__} takes {want}-channel "
                             f"{'video' if dims == 3 else 'image'} latents: connect the VAE that belongs to the model")


def still_shape(base_model: Any, channels: int, resolution: int, downscale: int) -> tuple[int, ...]:
    """The latent shape of one generated still at the resolution (one frame on video latents)."""
    side = resolution // downscale
    return (channels,) + (1,) * (latent_dimensions(base_model) - 2) + (side, side)


def prepare_data(base_model: Any, clip: Any, vae: Any, images: Sequence[Tensor], captions: Sequence[str],
                 instance_prompt: str, resolution: int, buckets: bool, class_prompt: str = "",
                 num_class_images: int = 0, class_images: Sequence[Tensor] = (), sample_prompt: str = "",
                 sample_every: int = 0, device: torch.device | None = None,
                 clips: Sequence[Tensor] = (), disk: EncodingCache | None = None) -> Prepared:
    """Resize/crop, VAE-encode and CLIP-encode everything once (the engine trains from this cache).

    `clips` (video models): each a (frames, H, W, C) batch, fitted alike frame by frame and encoded
    as one latent clip, captioned by the instance prompt; stills train as one-frame clips beside them.
    """
    device = device or mm.get_torch_device()
    if not images and not clips:
        raise TLoRAError("no training images: connect an IMAGE batch or an image dataset loader")
    if clips and latent_dimensions(base_model) != 3:
        raise TLoRAError(f"video clips need a video model; {type(base_model.model_config).__name__} takes "
                         f"image latents: connect the frames as training images instead")
    downscale = vae_downscale(vae)
    encoder = Encoder(base_model, clip, device, disk)
    with torch.inference_mode(False), torch.no_grad():
        fitted = prepare_images(images, resolution, buckets)
        if disk is None:
            latents = encode_images(vae, base_model, fitted, device)
        else:
            latents = disk.latents(fitted, vae_identity(vae, base_model),
                                   lambda misses: encode_images(vae, base_model, misses, device), device)
        texts = [caption or instance_prompt for caption in captions]
        for frames in clips:
            fitted_frames = prepare_images(list(frames), resolution, buckets)
            latents.append(encode_clip(vae, base_model, torch.stack(fitted_frames), device))
            texts.append(instance_prompt)
            fitted.append(fitted_frames[0])
        check_latents(base_model, latents)
        instance = [Example(latent, encoder.cond(text, latent.shape, downscale), text)
                    for latent, text in zip(latents, texts)]
        data = TrainData(instance)
        data.uncond = encoder.cond("", latents[0].shape, downscale)
        shape = still_shape(base_model, latents[0].shape[0], resolution, downscale)
        if class_images or num_class_images:
            if not class_prompt.strip():
                raise TLoRAError("prior preservation needs a class_prompt (e.g. 'a photo of a dog')")
            if class_images:
                class_fitted = prepare_images(class_images, resolution, buckets)
                for latent in encode_images(vae, base_model, class_fitted, device):
                    data.prior.append(Example(latent, encoder.cond(class_prompt, latent.shape, downscale),
                                                class_prompt))
            data.generate_prior = max(int(num_class_images), len(data.prior))
            data.prior_cond = encoder.cond(class_prompt, shape, downscale)
            data.prior_uncond = encoder.cond("", shape, downscale)
            data.prior_shape = shape
        sample_cond = sample_uncond = sample_shape = None
        if sample_every:
            sample_shape = shape
            sample_cond = encoder.cond(sample_prompt.strip() or instance_prompt, sample_shape, downscale)
            sample_uncond = encoder.cond("", sample_shape, downscale)
            data.sample_cond, data.sample_uncond, data.sample_shape = sample_cond, sample_uncond, sample_shape
    return Prepared(data, sample_cond, sample_uncond, sample_shape, [tuple(f.shape[:2]) for f in fitted], encoder,
                    downscale)


def _format_identity(base_model: Any) -> dict[str, Any]:
    """The latent format's numbers and tensors (its scale, shift, channel statistics)."""
    fmt = base_model.latent_format
    values = {k: v for k, v in vars(type(fmt)).items() if isinstance(v, (int, float, str, bool))}
    values.update({k: v for k, v in vars(fmt).items() if isinstance(v, (int, float, str, bool, Tensor))})
    return {"format": type(fmt).__name__, **values}


def _weights_at_rest(module: Any, patcher: Any) -> dict[str, Tensor]:
    """A patched model's weights without the patches the host applied to them in memory (its backups).

    Another patcher over the same module (a clone with a LoRA) may have left its patches in the weights;
    the patches themselves are hashed apart.
    """
    state = dict(module.state_dict())
    for key, saved in (getattr(patcher, "backup", None) or {}).items():
        weight = getattr(saved, "weight", None)
        if key in state and isinstance(weight, Tensor):
            state[key] = weight
    return state


def vae_identity(vae: Any, base_model: Any) -> str:
    """What a cached latent depends on besides the image: the VAE's weights and patches, the latent format."""
    patcher = getattr(vae, "patcher", None)
    return fingerprint("vae", _weights_at_rest(vae.first_stage_model, patcher), getattr(patcher, "patches", {}),
                       _format_identity(base_model), latent_dimensions(base_model))


def text_identity(base_model: Any, clip: Any) -> str:
    """What a cached conditioning depends on besides the caption: the text encoders' weights and patches
    (a LoRA on CLIP), clip skip, and the model that turns it into its inputs."""
    return fingerprint("text", _weights_at_rest(clip.cond_stage_model, clip.patcher),
                       getattr(clip.patcher, "patches", {}), clip.layer_idx,
                       type(base_model).__name__, type(getattr(base_model, "model_config", base_model)).__name__)
