"""Training images and captions from files, read as ComfyUI's LoadImage reads images (host-free; Pillow).

ComfyUI's node gets its images from LoadImage; every other host (the command-line trainer) reads
files here, so the same photo trains the same pixels everywhere: each frame EXIF-transposed,
32/16-bit integer greyscale scaled by 1/255 as LoadImage scales mode "I" (Pillow opens 16-bit
PNGs as "I;16", which LoadImage's own test misses, so ComfyUI 0.3.75/0.12.1 read them white:
docs/TRAINING.md), then converted to RGB in [0, 1]; frames of another size than the first are
skipped, MPO files give their first picture. Unlike LoadImage, a truncated or broken file is
refused rather than completed with grey, and so is a decompression bomb (over Pillow's
MAX_IMAGE_PIXELS): one line naming the file each time.
"""
from __future__ import annotations

import codecs
import os
import stat

import torch
from torch import Tensor

from .settings import TrainingError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# A caption is a line or two; a file larger than this is a mistake (a 50 MB one took minutes to encode).
MAX_CAPTION_BYTES = 64 * 1024
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_INTEGER_GREY = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def check_regular(path: str, what: str) -> None:
    """TrainingError unless path is a regular file (a FIFO or device would block the reader forever)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise TrainingError(f"cannot read {what} {os.path.basename(path)}: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        raise TrainingError(f"{what} {os.path.basename(path)} is not a regular file (a FIFO, device or folder)")


def read_image(path: str) -> list[Tensor]:
    """The frames of an image file as (H, W, 3) float32 in [0, 1], as ComfyUI's LoadImage gives them."""
    from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError
    name = os.path.basename(path)
    check_regular(path, "training image")
    frames: list[Tensor] = []
    try:
        with Image.open(path) as img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.width * img.height > limit:
                raise Image.DecompressionBombError(f"{img.width}x{img.height}")
            for frame in ImageSequence.Iterator(img):
                frame = ImageOps.exif_transpose(frame)
                if frame.mode in _INTEGER_GREY:  # LoadImage's scaling of mode "I", for every integer grey
                    frame = frame.convert("I").point(lambda v: v * (1 / 255))
                rgb = frame.convert("RGB")
                if frames and tuple(frames[0].shape[:2]) != (rgb.height, rgb.width):
                    continue  # as LoadImage: frames of another size are left out
                frames.append(torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
                              .view(rgb.height, rgb.width, 3).float() / 255)
                if img.format == "MPO":
                    break  # a camera's multi-picture JPEG: LoadImage keeps its first picture
    except Image.DecompressionBombError:
        raise TrainingError(f"training image {name} is too large to read safely ({_pixels(path)}; Pillow's "
                            f"decompression-bomb limit is {Image.MAX_IMAGE_PIXELS:,} pixels): scale it down") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise TrainingError(f"cannot read training image {name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return frames


def _pixels(path: str) -> str:
    """An image's size from its header, for messages ("20000x10000 pixels")."""
    from PIL import Image
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # only the header is read here
        with Image.open(path) as img:
            return f"{img.width}x{img.height} pixels"
    except Exception:  # the size is a courtesy in a message that is already being raised
        return "size unknown"
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def read_caption(path: str) -> str:
    """A caption file's text, stripped: UTF-8, or UTF-8/16/32 with a byte-order mark (Notepad's "Unicode")."""
    name = os.path.basename(path)
    check_regular(path, "caption")
    size = os.path.getsize(path)
    if size > MAX_CAPTION_BYTES:
        raise TrainingError(f"caption {name} is {size:,} bytes; a caption is a line or two of text "
                            f"(at most {MAX_CAPTION_BYTES // 1024} KiB)")
    with open(path, "rb") as f:
        raw = f.read(MAX_CAPTION_BYTES + 1)
    encoding = next((enc for bom, enc in _BOMS if raw.startswith(bom)), "utf-8")
    try:
        return raw.decode(encoding).strip()
    except UnicodeDecodeError as err:
        raise TrainingError(f"caption {name} is not {encoding.upper()} text (byte 0x{raw[err.start]:02x} at "
                            f"position {err.start}): save it as UTF-8") from None


def read_folder(folder: str) -> tuple[list[Tensor], list[str], list[str]]:
    """(images as (H, W, 3) floats in [0, 1], captions ('' where no .txt), file names), sorted by name.

    A file with several frames (an animated WebP) gives each frame, with the file's caption.
    """
    if not os.path.isdir(folder):
        raise TrainingError(f"no image folder at {folder}")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise TrainingError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images, captions, sources = [], [], []
    for name in names:
        frames = read_image(os.path.join(folder, name))
        caption_path = os.path.join(folder, os.path.splitext(name)[0] + ".txt")
        caption = read_caption(caption_path) if os.path.lexists(caption_path) else ""
        images += frames
        captions += [caption] * len(frames)
        sources += [name] * len(frames)
    return images, captions, sources
