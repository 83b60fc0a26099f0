"""The one image reader of the command-line trainer (trainer/images.py) against the host's own LoadImage.

Files in the formats users train from are written here and read by both; where the host reads a
file, the reader must give the same pixels (the node and the command line then train on the same
image). Where they part, the reason is the host's and docs/TRAINING.md says so: ComfyUI 0.3.75 and
0.12.1 read a 16-bit greyscale PNG as white (Pillow opens it as "I;16", which LoadImage's 1/255
rule for mode "I" misses); 0.33's PyAV-first LoadImage refuses some formats outright and decodes
JPEGs with ffmpeg, whose chroma upsampling differs from libjpeg's at colour edges.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from harness import comfy_host as ch
from tests.host.tlora_refs import pack


def _files(folder) -> dict[str, str]:
    """name -> what it tests; every file known pixel by pixel (see tests/unit/test_images.py)."""
    halves = np.zeros((8, 16, 3), np.uint8)
    halves[:, :8] = (255, 0, 0)
    halves[:, 8:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(halves).save(folder / "rot6.jpg", exif=exif.tobytes(), quality=95)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    Image.fromarray(rgba).save(folder / "rgba.png")
    Image.fromarray(halves).convert("P").save(folder / "palette.png", transparency=0)
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(folder / "grey8.png")
    Image.fromarray(halves).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(halves).save(folder / "lossless.webp", lossless=True)
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(folder / "grey16.png")
    return {"rot6.jpg": "EXIF orientation", "rgba.png": "alpha", "palette.png": "palette + transparency",
            "grey8.png": "8-bit grey", "cmyk.jpg": "CMYK", "lossless.webp": "WebP", "grey16.png": "16-bit grey"}


def test_the_trainers_reader_gives_loadimages_pixels(comfy_host, tmp_path):
    comfy_host.require_pack()
    import folder_paths
    images = pack("trainer.images")
    files = _files(tmp_path)
    inputs = folder_paths.get_input_directory()
    compared, refused = [], []
    try:
        for name in files:
            shutil.copy(tmp_path / name, f"{inputs}/tlora_reader_{name}")
        for name, what in files.items():
            ours = torch.stack(images.read_image(str(tmp_path / name)))
            try:
                host = ch.node_class("LoadImage")().load_image(f"tlora_reader_{name}")[0].float().cpu()
            except Exception:  # noqa: BLE001  (0.33's PyAV reader refuses some formats: nothing to compare)
                refused.append(name)
                continue
            if name == "grey16.png":
                # Ours keeps mid-grey (32768/65535 -> 128/255); the older hosts' LoadImage reads white.
                assert torch.equal(ours, torch.full_like(ours, 128 / 255))
                assert torch.equal(host, torch.ones_like(host)) or torch.equal(host, ours), host.unique()
                continue
            assert ours.shape == host.shape, (what, tuple(ours.shape), tuple(host.shape))
            if name.endswith(".jpg") and not torch.equal(ours, host):
                # 0.33 decodes JPEGs with ffmpeg (PyAV), Pillow with libjpeg: their chroma upsampling parts at
                # colour edges; the pixels agree away from them and the orientation is the same.
                assert float((ours - host).abs().mean()) < 0.03, (what, float((ours - host).abs().mean()))
                assert torch.equal(ours[0, :4], host[0, :4]) or float((ours[0, :4] - host[0, :4]).abs().max()) < 0.02
            else:
                assert torch.equal(ours, host), (what, float((ours - host).abs().max()))
            compared.append(name)
    finally:
        for name in files:
            (tmp_path / name).unlink(missing_ok=True)
            import os
            path = f"{inputs}/tlora_reader_{name}"
            if os.path.exists(path):
                os.unlink(path)
    # The orientation case is read by every tested host: the class the hostile round found is always compared.
    assert "rot6.jpg" in compared and "rgba.png" in compared, (compared, refused)
