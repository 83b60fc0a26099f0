"""Training data, host-free: cached examples, batching of conditionings, sizes and aspect buckets.

A host encodes images and prompts once (trainer/comfy/data.py for ComfyUI); the engine
trains from these cached tensors.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .settings import TrainingError

Cond = dict[str, Tensor]
# denoiser(x_t, timestep, cond) -> the model's prediction in its own target space (eps, v or velocity).
Denoiser = Callable[[Tensor, Tensor, Cond], Tensor]
# text_cond(caption, latent shape) -> the cached (no-grad) conditioning of a caption for latents of that shape.
TextCond = Callable[[str, tuple[int, ...]], Cond]


@dataclass
class Example:
    """One training item: a clean latent (C, h, w) and its cached conditioning (batch 1)."""

    latent: Tensor
    cond: Cond
    caption: str = ""
    # Shuffled-tag variants of the caption and their cached conditionings; the empty caption's (dropout).
    variants: list[str] = field(default_factory=list)
    variant_conds: list[Cond] = field(default_factory=list)
    dropped_cond: Cond | None = None


@dataclass
class TrainData:
    """Instance examples and optional prior-preservation (class) examples."""

    instance: list[Example]
    prior: list[Example] = field(default_factory=list)
    # Prior preservation with generated class images: how many and from which conditioning.
    generate_prior: int = 0
    prior_cond: Cond | None = None
    prior_uncond: Cond | None = None
    prior_shape: tuple[int, ...] | None = None
    # Previews during training: the sample prompt's conditioning, the empty prompt's, latent shape.
    sample_cond: Cond | None = None
    sample_uncond: Cond | None = None
    sample_shape: tuple[int, ...] | None = None
    # The empty prompt's conditioning (classifier-free guidance's other half): the check of a kept
    # adapter's outputs runs it too (trainer/guard.py). Hosts set it; None leaves that part out.
    uncond: Cond | None = None


def collate_conds(conds: Sequence[Cond]) -> Cond:
    """Concatenate batch-1 conditionings along the batch axis.

    Token sequences of different lengths (long prompts are 154, 231... tokens) are repeated
    to their least common multiple, as ComfyUI does: repeating a whole key/value sequence
    leaves cross-attention's output unchanged.
    """
    out: Cond = {}
    for key in conds[0]:
        parts = [c[key] for c in conds]
        if all(p.dim() == 3 for p in parts) and len({p.shape[1] for p in parts}) > 1:
            lcm = math.lcm(*(p.shape[1] for p in parts))
            parts = [p.repeat(1, lcm // p.shape[1], 1) for p in parts]
        out[key] = torch.cat(parts, 0)
    return out


def bucket_sizes(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) buckets of about resolution^2 pixels, sides multiples of `step`."""
    area = resolution * resolution
    sizes = set()
    width = step
    while width <= resolution * max_ratio:
        height = int(area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_ratio:
            sizes.add((width, height))
        width += step
    sizes.add((resolution // step * step or step,) * 2)
    return sorted(sizes)


def choose_size(width: int, height: int, resolution: int, buckets: bool) -> tuple[int, int]:
    """Training size (w, h) for an image: the square resolution, or its closest aspect bucket."""
    if not buckets:
        return resolution, resolution
    aspect = math.log(width / height)
    return min(bucket_sizes(resolution), key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))


def fit_image(image: Tensor, width: int, height: int) -> Tensor:
    """Resize (H, W, C) in [0, 1] to cover (width, height), then center-crop to exactly that."""
    src_h, src_w = image.shape[0], image.shape[1]
    scale = max(width / src_w, height / src_h)
    new_w, new_h = max(width, round(src_w * scale)), max(height, round(src_h * scale))
    chw = image.movedim(-1, 0)[None].float()
    if (new_h, new_w) != (src_h, src_w):
        # antialias keeps downscaled subjects free of aliasing (bicubic overshoot is clamped).
        chw = F.interpolate(chw, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return chw[0, :, top:top + height, left:left + width].movedim(0, -1).clamp(0, 1)


# Below this a "photo" is an icon or a mistake (a 1x1 pixel upscaled to 512 trains on a flat colour).
MIN_IMAGE_SIDE = 16


def prepare_images(images: Sequence[Tensor], resolution: int, buckets: bool = False) -> list[Tensor]:
    """Each (H, W, C) image resized + center-cropped to the resolution (or its aspect bucket)."""
    out = []
    for i, image in enumerate(images):
        if min(int(image.shape[0]), int(image.shape[1])) < MIN_IMAGE_SIDE:
            raise TrainingError(f"training image {i + 1} is {int(image.shape[1])}x{int(image.shape[0])} pixels: "
                                f"too small to learn from (at least {MIN_IMAGE_SIDE} px a side; ideally about the "
                                f"training resolution, {resolution})")
        width, height = choose_size(int(image.shape[1]), int(image.shape[0]), resolution, buckets)
        out.append(fit_image(image[..., :3], width, height))
    return out


def draw_batch(examples: Sequence[Example], batch_size: int, generator: torch.Generator) -> list[Example]:
    """A random batch from one size bucket (bucket chosen in proportion to its size)."""
    buckets: dict[tuple[int, ...], list[int]] = {}
    for i, ex in enumerate(examples):
        buckets.setdefault(tuple(ex.latent.shape), []).append(i)
    keys = sorted(buckets)
    if len(keys) > 1:
        weights = torch.tensor([len(buckets[k]) for k in keys], dtype=torch.float64)
        key = keys[int(torch.multinomial(weights, 1, generator=generator))]
    else:
        key = keys[0]
    pool = buckets[key]
    if len(pool) >= batch_size:
        picks = torch.randperm(len(pool), generator=generator)[:batch_size]
    else:
        picks = torch.randint(len(pool), (batch_size,), generator=generator)
    return [examples[pool[int(i)]] for i in picks]


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
        raise TrainingError(f"got {len(items)} captions for {count} images: give one caption per image "
                         f"(one per line), a single caption, or none")
    return items
