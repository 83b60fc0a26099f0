"""A folder of training images with `.txt` captions beside them (kohya's and diffusers' layout), encoded once."""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

from ..data import Cond, Example, prepare_images
from ..settings import TrainingError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_folder(folder: str) -> tuple[list[Tensor], list[str], list[str]]:
    """(images as (H, W, 3) floats in [0, 1], captions ('' where no .txt), file names), sorted by name."""
    from PIL import Image, UnidentifiedImageError
    if not os.path.isdir(folder):
        raise TrainingError(f"no image folder at {folder}")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise TrainingError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images, captions = [], []
    for name in names:
        try:
            with Image.open(os.path.join(folder, name)) as img:
                rgb = img.convert("RGB")
                images.append(torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
                              .view(rgb.height, rgb.width, 3).float() / 255)
        except (OSError, UnidentifiedImageError) as err:
            raise TrainingError(f"cannot read training image {name}: {err}") from None
        caption_path = os.path.join(folder, os.path.splitext(name)[0] + ".txt")
        caption = ""
        if os.path.isfile(caption_path):
            with open(caption_path, encoding="utf-8") as f:
                caption = f.read().strip()
        captions.append(caption)
    return images, captions, names


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
