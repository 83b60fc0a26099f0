"""Latents and text-encoder outputs kept on disk, keyed by content and model, reused across runs and resumes.

An entry's key is a SHA-256 over what the encoding depends on: for a latent, the prepared image's
pixels (after resizing and cropping, so the resolution and bucket are in it) and the VAE's identity;
for a conditioning, the caption, the latent shape (SDXL's size conditioning and the like) and the text
encoder's identity. A model's identity (`fingerprint`) hashes every tensor's name, dtype, shape and a
strided sample of its values, plus what the host adds (patches stacked on it, clip skip, the latent
format): another checkpoint, a LoRA on the text encoder or another clip skip is another key, so a
stale entry is never read. Entries are safetensors files (never pickle) written atomically; one that
cannot be read back whole is encoded again.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from ..tlora.fileio import atomic_write
from .data import Cond

SAMPLES_PER_TENSOR = 64


def _sample(tensor: Tensor) -> bytes:
    """A strided sample of a tensor's values (float64 bytes) and its layout: cheap, and any real change shows."""
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
    values = flat[::step][:SAMPLES_PER_TENSOR].to("cpu", torch.float64)
    return f"{tuple(tensor.shape)}{tensor.dtype}".encode() + values.numpy().tobytes()


def _feed(h: Any, value: Any, depth: int = 0) -> None:
    if depth > 8:
        return
    if isinstance(value, Tensor):
        h.update(_sample(value))
    elif isinstance(value, nn.Module):
        for name, tensor in sorted(value.state_dict().items()):
            h.update(name.encode())
            _feed(h, tensor, depth + 1)
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            h.update(str(key).encode())
            _feed(h, value[key], depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _feed(h, item, depth + 1)
    elif callable(value) and not hasattr(value, "weights"):  # a patch's function: its name, never its address
        h.update(getattr(value, "__qualname__", type(value).__name__).encode())
    elif hasattr(value, "weights") and not isinstance(value, (str, bytes)):  # a host's weight adapter object
        h.update(type(value).__name__.encode())
        _feed(h, getattr(value, "weights"), depth + 1)
    else:
        h.update(repr(value).encode())


def fingerprint(*parts: Any) -> str:
    """A model's identity from its modules, tensors and settings (hex SHA-256)."""
    h = hashlib.sha256()
    for part in parts:
        _feed(h, part)
        h.update(b"\0")
    return h.hexdigest()


class EncodingCache:
    """A folder of cached latents and conditionings; `hits`/`misses` count this run's look-ups."""

    def __init__(self, folder: str):
        self.folder = folder
        self.hits = self.misses = 0
        os.makedirs(folder, exist_ok=True)

    def _path(self, key: str) -> str:
        return os.path.join(self.folder, key[:2], key + ".safetensors")

    def _read(self, key: str) -> dict[str, Tensor] | None:
        path = self._path(key)
        if not os.path.exists(path):
            return None
        try:
            from safetensors import safe_open
            with safe_open(path, "pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
            return load_file(path)
        except Exception:  # noqa: BLE001  (a torn or foreign file: encode again and replace it)
            return None

    def _write(self, key: str, tensors: dict[str, Tensor], kind: str) -> None:
        os.makedirs(os.path.dirname(self._path(key)), exist_ok=True)
        data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        atomic_write(self._path(key), save(data, metadata={"key": key, "kind": kind}))

    @staticmethod
    def latent_key(pixels: Tensor, model: str) -> str:
        """A prepared image's entry key under a VAE identity."""
        h = hashlib.sha256(b"latent\0" + model.encode())
        h.update(f"{tuple(pixels.shape)}{pixels.dtype}".encode())
        h.update(pixels.detach().to("cpu").contiguous().numpy().tobytes())
        return h.hexdigest()

    @staticmethod
    def cond_key(text: str, shape: Iterable[int], model: str) -> str:
        """A caption's entry key for a latent shape under a text-encoder identity."""
        return hashlib.sha256(json.dumps(["cond", model, text, list(shape)]).encode()).hexdigest()

    def latents(self, images: list[Tensor], model: str, encode: Callable[[list[Tensor]], list[Tensor]],
                device: torch.device | str) -> list[Tensor]:
        """Each image's latent: from disk when cached, else encoded (the misses in one call) and stored."""
        keys = [self.latent_key(img, model) for img in images]
        found = [self._read(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        out: list[Tensor | None] = [f["latent"].to(device) if f is not None else None for f in found]
        self.hits += len(images) - len(missing)
        self.misses += len(missing)
        if missing:
            fresh = encode([images[i] for i in missing])
            for i, latent in zip(missing, fresh):
                self._write(keys[i], {"latent": latent}, "latent")
                out[i] = latent
        return out  # type: ignore[return-value]

    def cond(self, text: str, shape: Iterable[int], model: str, encode: Callable[[], Cond],
             device: torch.device | str) -> Cond:
        """A caption's conditioning for a latent shape: from disk when cached, else encoded and stored."""
        key = self.cond_key(text, shape, model)
        found = self._read(key)
        if found is not None:
            self.hits += 1
            return {k: v.to(device) for k, v in found.items()}
        self.misses += 1
        cond = encode()
        self._write(key, cond, "cond")
        return cond
