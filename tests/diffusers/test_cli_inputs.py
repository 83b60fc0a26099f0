"""The command-line trainer against careless and hostile input: one line and exit 2, nothing written.

Each case is a real file, folder or option a user can give (a real tiny SD1.5 pipeline folder,
real images); the command runs in-process (main()) or, for signals, as a subprocess.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image

from comfyui_tlora.tlora import format as tformat
from comfyui_tlora.trainer.diffusers.cli import main
from tests.diffusers.test_diffusers_train import COMMON, _meta, _popen, _wait_for, td, work  # noqa: F401


def run_main(work: Path, out: Path, *args: str, data: Path | None = None) -> tuple[int, str]:
    """main() as the command runs it; (status, stderr)."""
    import io
    import contextlib
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["--model", str(work / "sd15"), "--data", str(data or work / "images"), "--output-dir",
                       str(out), "--quiet", "--steps", "1", *COMMON, *args])
    return status, err.getvalue()


def refused(status: int, err: str, out: Path, words: str) -> None:
    """Exit 2, one line naming the problem, no traceback, nothing written."""
    assert status == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tlora-train: ") and "Traceback" not in err, err[-2000:]
    assert words in lines[0], lines[0]
    assert not out.exists() or not [p for p in os.listdir(out) if not p.startswith(".")], os.listdir(out)


def folder_with(tmp_path: Path, name: str, write) -> Path:
    """A data folder of one good image plus whatever `write(folder)` adds."""
    folder = tmp_path / name
    td.write_images(folder, count=1)
    write(folder)
    return folder


SETTINGS = [(["--resolution", "0"], "--resolution must be at least 64"),
            (["--resolution", "-64"], "--resolution must be at least 64"),
            (["--seed", str(2 ** 64)], "--seed must be at most"),
            (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
            (["--adam-betas", "1", "1"], "--adam-betas must be at most"),
            (["--transform", "trm:100000"], "--transform trm:100000 asks for rank 100000"),
            (["--residual", "lora:100000"], "--residual lora:100000 asks for rank"),
            (["--sample-steps", "0"], "--sample-steps must be at least 1"),
            (["--num-class-images", "-3"], "--num-class-images must be at least 0"),
            (["--sample-cfg", "nan"], "--sample-cfg must be a finite number"),
            (["--loss", "dco", "--dco-beta", "nan"], "--dco-beta must be a finite number"),
            (["--prior-loss-weight", "nan"], "--prior-loss-weight must be a finite number"),
            (["--learning-rate", "inf"], "--learning-rate must be a finite number"),
            (["--learning-rate", "1e30"], "--learning-rate must be at most 1"),
            (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number")]


@pytest.mark.parametrize("args, words", SETTINGS, ids=[" ".join(a) for a, _ in SETTINGS])
def test_settings_outside_the_nodes_ranges_are_refused(work: Path, tmp_path: Path, args: list[str],
                                                       words: str) -> None:
    status, err = run_main(work, tmp_path / "out", *args)
    refused(status, err, tmp_path / "out", words)


def test_non_utf8_captions_are_refused_and_notepads_utf16_is_read(work: Path, tmp_path: Path) -> None:
    latin = folder_with(tmp_path, "latin", lambda f: (f / "img0.txt").write_bytes("a café photo".encode("latin-1")))
    status, err = run_main(work, tmp_path / "out", data=latin)
    refused(status, err, tmp_path / "out", "caption img0.txt is not UTF-8 text (byte 0xe9 at position 5)")
    from comfyui_tlora.trainer.images import read_caption
    notepad = tmp_path / "notepad.txt"
    notepad.write_bytes("a café photo\r\n".encode("utf-16"))  # with its byte-order mark, as Notepad saves
    assert read_caption(str(notepad)) == "a café photo"


def test_a_decompression_bomb_is_refused_in_one_line(work: Path, tmp_path: Path) -> None:
    bomb = folder_with(tmp_path, "bomb", lambda f: Image.new("1", (20000, 10000)).save(f / "huge.png"))
    status, err = run_main(work, tmp_path / "out", data=bomb)
    refused(status, err, tmp_path / "out", "training image huge.png is too large to read safely (20000x10000 pixels")


def test_a_tlora_file_or_another_models_config_as_model_is_refused(work: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter.safetensors"
    from comfyui_tlora.tlora.adapter import ModuleAdapter
    tformat.save_file({"diffusion_model.x": ModuleAdapter.create((8, 8), "trm:2", "lora:2")}, str(adapter))
    status, err = run_main(work, tmp_path / "out", "--model", str(adapter))
    refused(status, err, tmp_path / "out", "is a TLoRA adapter file, not a base model")
    td.save_sdxl(tmp_path / "sdxl")  # an SD1.5 UNet file read with an SDXL pipeline's config
    unet = work / "sd15" / "unet" / "diffusion_pytorch_model.safetensors"
    status, err = run_main(work, tmp_path / "out", "--model", str(unet), "--config", str(tmp_path / "sdxl"))
    refused(status, err, tmp_path / "out", "with the config in")


def test_a_missing_config_folder_is_named_as_missing(work: Path, tmp_path: Path) -> None:
    unet = work / "sd15" / "unet" / "diffusion_pytorch_model.safetensors"
    status, err = run_main(work, tmp_path / "out", "--model", str(unet), "--config", str(tmp_path / "nowhere"))
    refused(status, err, tmp_path / "out", f"--config {tmp_path / 'nowhere'}: no such folder")


def test_a_fifo_in_the_data_folder_is_refused_not_waited_on(work: Path, tmp_path: Path) -> None:
    fifo = folder_with(tmp_path, "fifo", lambda f: os.mkfifo(f / "pipe.png"))
    status, err = run_main(work, tmp_path / "out", data=fifo)
    refused(status, err, tmp_path / "out", "training image pipe.png is not a regular file")
    caption = folder_with(tmp_path, "fifo_caption", lambda f: ((f / "img0.txt").unlink(), os.mkfifo(f / "img0.txt")))
    status, err = run_main(work, tmp_path / "out", data=caption)
    refused(status, err, tmp_path / "out", "caption img0.txt is not a regular file")


def test_a_huge_caption_is_refused_by_its_size_not_read(work: Path, tmp_path: Path) -> None:
    def huge(folder: Path) -> None:
        with open(folder / "img0.txt", "wb") as f:
            f.truncate(50 * 2 ** 20)  # 50 MB (sparse: nothing to write)
    status, err = run_main(work, tmp_path / "out", data=folder_with(tmp_path, "huge", huge))
    refused(status, err, tmp_path / "out", "caption img0.txt is 52,428,800 bytes")
    assert len(err) < 400  # the text is never echoed


def test_an_output_folder_that_cannot_be_written_is_found_before_training(work: Path, tmp_path: Path) -> None:
    """/sys is read-only even to root (chmod would not stop root, which these tests may run as)."""
    if not os.path.isdir("/sys") or os.access("/sys", os.W_OK) and os.geteuid() != 0:
        pytest.skip("no read-only /sys here")
    import io
    import contextlib
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["--model", str(work / "sd15"), "--data", str(work / "images"), "--output-dir", "/sys",
                       "--quiet", "--steps", "1", *COMMON])
    assert status == 2 and err.getvalue().strip().startswith("tlora-train: cannot write into the output folder /sys")


def test_previews_into_the_data_folder_are_refused(work: Path, tmp_path: Path) -> None:
    data = folder_with(tmp_path, "data", lambda f: None)
    before = sorted(os.listdir(data))
    status, err = run_main(work, data, "--sample-every", "1", data=data)
    assert status == 2 and "--output-dir is the --data folder" in err and sorted(os.listdir(data)) == before


def test_sigterm_saves_a_partial_file_as_ctrl_c_does(work: Path) -> None:
    out = work / "out_term"
    proc = _popen(work, ["--output-dir", str(out), "--output-name", "t", "--steps", "100000", "--save-every", "2",
                         *COMMON])
    try:
        _wait_for(out / "t.safetensors", proc)
        os.killpg(proc.pid, signal.SIGTERM)  # what a job scheduler or a container stop sends
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    meta = _meta(out / "t.safetensors")
    assert meta["tlora.train.partial"] == "true" and meta["tlora.train.stopped"] == "cancelled"
    tformat.load(str(out / "t.safetensors"))


def test_the_command_lines_folder_reader_applies_exif_and_keeps_16_bit_grey(tmp_path: Path) -> None:
    """It read a 16-bit mid-grey PNG as white and ignored EXIF orientation (ComfyUI's LoadImage applies it)."""
    import numpy as np
    from comfyui_tlora.trainer.diffusers.data import read_folder
    halves = np.zeros((8, 16, 3), np.uint8)
    halves[:, :8], halves[:, 8:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    Image.fromarray(halves).save(tmp_path / "a_rot.jpg", exif=exif.tobytes(), quality=100, subsampling=0)
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "b_grey16.png")
    images, captions, names = read_folder(str(tmp_path))
    assert names == ["a_rot.jpg", "b_grey16.png"]
    rot, grey = images
    assert tuple(rot.shape) == (16, 8, 3) and rot[:6, :, 0].mean() > 0.9 and rot[-6:, :, 2].mean() > 0.9
    assert torch.equal(grey, torch.full_like(grey, 128 / 255))  # float32 128/255, as LoadImage divides


def test_sigterm_to_the_accelerate_launcher_saves_a_partial_file(work: Path) -> None:
    """What `docker stop` or a scheduler does: the launcher alone gets SIGTERM and forwards it to its workers."""
    out = work / "out_term2"
    proc = _popen(work, ["--output-dir", str(out), "--output-name", "t2", "--steps", "100000", "--save-every", "2",
                         *COMMON], processes=2)
    try:
        _wait_for(out / "t2.safetensors", proc)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    meta = _meta(out / "t2.safetensors")
    assert meta["tlora.train.stopped"] == "cancelled", (meta.get("tlora.train.stopped"), err[-2000:])
    assert meta["tlora.train.partial"] == "true" and meta["tlora.train.processes"] == "2"
    tformat.load(str(out / "t2.safetensors"))
