"""A folder of training images with `.txt` captions beside them (kohya's and diffusers' layout), encoded once.

The folder is read by trainer/images.py, the reader that matches ComfyUI's LoadImage.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..data import Cond, Example, prepare_images
from ..images import IMAGE_SUFFIXES, read_folder  # noqa: F401  (the binding's reader)


def examples(images: list[Tensor], captions: list[str], default_prompt: str, resolution: int, buckets: bool,
             encode_image: Callable[[Tensor], Tensor], encode_text: Callable[[list[str]], Cond]) -> list[Example]:
    """Cached examples: each image resized/cropped (buckets optional), VAE-encoded, its caption encoded once."""
    prepared = prepare_images(images, resolution, buckets)
    cache: dict[str, Cond] = {}
    out = []
    for image, caption in zip(prepared, captions):
        prompt = caption or default_prompt
        if prompt not in cache:
            with torch.no_grad():
                cache[prompt] = {k: v.detach() for k, v in encode_text([prompt]).items()}
        out.append(Example(encode_image(image[None])[0], dict(cache[prompt]), prompt))
    return out
