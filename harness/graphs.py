"""API-format graph builders for the harness (plain dicts, the format POST /prompt takes)."""
from __future__ import annotations

from typing import Optional


def txt2img(ckpt_name: str, text: str = "a photo of a cat", *, negative: Optional[str] = "",
            seed: int = 1, steps: int = 2, cfg: float = 2.0, width: int = 64, height: int = 64,
            sampler_name: str = "euler", scheduler: str = "normal", output: str = "PreviewImage",
            filename_prefix: str = "tlora_test") -> dict:
    """CheckpointLoaderSimple -> CLIPTextEncode(s) -> EmptyLatentImage -> KSampler -> VAEDecode -> output.

    Node ids: "ckpt", "pos", "neg" (absent when negative is None: the positive is reused, which
    saves one text-encoder pass), "latent", "sampler", "decode", "out". `output` is
    "PreviewImage" (temp dir) or "SaveImage" (output dir).
    """
    g: dict = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler_name,
            "scheduler": scheduler, "positive": ["pos", 0], "negative": ["pos", 0],
            "latent_image": ["latent", 0], "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "out": {"class_type": output, "inputs": {"images": ["decode", 0]}},
    }
    if negative is not None:
        g["neg"] = {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["ckpt", 1]}}
        g["sampler"]["inputs"]["negative"] = ["neg", 0]
    if output == "SaveImage":
        g["out"]["inputs"]["filename_prefix"] = filename_prefix
    return g


def blank_image(width: int = 64, height: int = 64, color: int = 0, output: str = "PreviewImage") -> dict:
    """EmptyImage -> output: the cheapest graph that runs and produces a UI output (no models)."""
    return {
        "img": {"class_type": "EmptyImage", "inputs": {"width": width, "height": height, "batch_size": 1, "color": color}},
        "out": {"class_type": output, "inputs": {"images": ["img", 0]}},
    }
