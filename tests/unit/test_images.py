"""trainer/images.py: the one reader of training images and captions, against pixels known by construction.

Each file is written here with Pillow with values chosen so the right reading is known without
the reader: where the EXIF orientation puts the red half, what a 16-bit mid-grey is in 8 bits.
tests/host/test_image_reader.py checks the same reader against ComfyUI's own LoadImage.
"""
from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from harness.pack import pack_module

images = pack_module("trainer.images")
settings = pack_module("trainer.settings")


def _array(data, mode: str) -> Image.Image:
    import numpy as np
    return Image.fromarray(np.asarray(data, dtype={"I;16": np.uint16, "RGB": np.uint8, "RGBA": np.uint8}[mode]))


def test_exif_orientation_is_applied_as_loadimage_does(tmp_path):
    """Stored 16 wide x 8 high, red left / blue right; orientation 6 shows it turned 90 degrees clockwise."""
    pixels = [[[255, 0, 0]] * 8 + [[0, 0, 255]] * 8] * 8
    exif = Image.Exif()
    exif[0x0112] = 6
    _array(pixels, "RGB").save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=100, subsampling=0)
    (frame,) = images.read_image(str(tmp_path / "rot.jpg"))
    assert tuple(frame.shape) == (16, 8, 3)  # turned upright: 8 wide, 16 high
    top, bottom = frame[:6].mean((0, 1)), frame[-6:].mean((0, 1))  # after turning: red on top, blue below
    assert top[0] > 0.9 and top[2] < 0.1 and bottom[2] > 0.9 and bottom[0] < 0.1


def test_16_bit_greyscale_keeps_its_grey(tmp_path):
    """32768 of 65535 is mid-grey; LoadImage's 1/255 scaling of integer grey gives 128 (it used to read white)."""
    _array([[32768] * 4] * 4, "I;16").save(tmp_path / "grey16.png")
    (frame,) = images.read_image(str(tmp_path / "grey16.png"))
    assert torch.equal(frame, torch.full((4, 4, 3), 128 / 255))


def test_rgba_keeps_its_colour_and_drops_alpha(tmp_path):
    _array([[[200, 10, 0, 128]] * 4] * 4, "RGBA").save(tmp_path / "a.png")
    (frame,) = images.read_image(str(tmp_path / "a.png"))
    assert torch.equal(frame[0, 0], torch.tensor([200, 10, 0]) / 255)


def test_every_frame_of_one_size_is_an_image(tmp_path):
    frames = [_array([[[i * 60, 0, 0]] * 8] * 8, "RGB") for i in range(3)]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    read = images.read_image(str(tmp_path / "anim.webp"))
    assert [round(float(f[0, 0, 0]) * 255) for f in read] == [0, 60, 120]


def test_a_truncated_image_is_refused_by_name(tmp_path):
    _array([[[1, 2, 3]] * 64] * 64, "RGB").save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(settings.TrainingError, match="cannot read training image cut.png"):
        images.read_image(str(tmp_path / "cut.png"))


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    Image.new("1", (20000, 10000)).save(tmp_path / "bomb.png")  # 200 Mpx, 24 kB on disk
    with pytest.raises(settings.TrainingError, match=r"bomb.png is too large to read safely \(20000x10000 pixels"):
        images.read_image(str(tmp_path / "bomb.png"))
    Image.new("1", (10000, 9000)).save(tmp_path / "big.png")  # 90 Mpx: over the limit, under Pillow's own error
    with pytest.raises(settings.TrainingError, match="big.png is too large"):
        images.read_image(str(tmp_path / "big.png"))


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-32"])
def test_captions_in_unicode_encodings_with_their_mark_are_read(tmp_path, encoding):
    (tmp_path / "c.txt").write_bytes(" a café photo \n".encode(encoding))
    assert images.read_caption(str(tmp_path / "c.txt")) == "a café photo"


def test_a_latin1_caption_is_refused_not_guessed(tmp_path):
    (tmp_path / "c.txt").write_bytes("a café".encode("latin-1"))
    with pytest.raises(settings.TrainingError, match=r"caption c.txt is not UTF-8 text \(byte 0xe9 at position 5\)"):
        images.read_caption(str(tmp_path / "c.txt"))


def test_fifos_and_huge_captions_are_refused_without_reading(tmp_path):
    os.mkfifo(tmp_path / "p.png")
    with pytest.raises(settings.TrainingError, match="p.png is not a regular file"):
        images.read_image(str(tmp_path / "p.png"))
    with open(tmp_path / "big.txt", "wb") as f:
        f.truncate(50 * 2 ** 20)
    with pytest.raises(settings.TrainingError, match="caption big.txt is 52,428,800 bytes"):
        images.read_caption(str(tmp_path / "big.txt"))
