"""A folder of training images with `.txt` captions beside them (kohya's and diffusers' layout), encoded once.

The folder is read by trainer/images.py, the reader that matches ComfyUI's LoadImage.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..cache import EncodingCache
from ..data import Cond, Example, prepare_images
from ..images import IMAGE_SUFFIXES, read_folder  # noqa: F401  (the binding's reader)


def examples(images: list[Tensor], captions: list[str], default_prompt: str, resolution: int, buckets: bool,
             encode_image: Callable[[Tensor], Tensor], encode_text: Callable[[list[str]], Cond],
             disk: EncodingCache | None = None, vae_identity: str = "", device: torch.device | str = "cpu",
             text_cond: Callable[[str, tuple[int, ...]], Cond] | None = None) -> list[Example]:
    """Cached examples: each image resized/cropped (buckets optional), VAE-encoded, its caption encoded once.

    With `disk`, latents come from and go to the disk cache under `vae_identity` (on `device`), and
    captions through `text_cond` (`cached_text`, which reads the same cache).
    """
    prepared = prepare_images(images, resolution, buckets)
    cache: dict[str, Cond] = {}

    def one(image: Tensor) -> Tensor:
        with torch.no_grad():
            return encode_image(image[None])[0]
    if disk is None:
        latents = [one(image) for image in prepared]
    else:
        latents = disk.latents(prepared, vae_identity, lambda misses: [one(m) for m in misses], device)
    out = []
    for latent, caption in zip(latents, captions):
        prompt = caption or default_prompt
        if prompt not in cache:
            if text_cond is not None:
                cache[prompt] = text_cond(prompt, ())
            else:
                with torch.no_grad():
                    cache[prompt] = {k: v.detach() for k, v in encode_text([prompt]).items()}
        out.append(Example(latent, dict(cache[prompt]), prompt))
    return out


def cached_text(encode_text: Callable[[list[str]], Cond], disk: EncodingCache | None, identity: str,
                device: torch.device | str) -> Callable[[str, tuple[int, ...]], Cond]:
    """A caption's conditioning without gradients, from the disk cache when there is one (the binding's text_cond)."""
    def encode(text: str, shape: tuple[int, ...] = ()) -> Cond:
        def fresh() -> Cond:
            with torch.no_grad():
                return {k: v.detach() for k, v in encode_text([text]).items()}
        # diffusers' encode_prompt does not depend on the latent size: the key leaves the shape out.
        return fresh() if disk is None else disk.cond(text, (), identity, fresh, device)
    return encode
