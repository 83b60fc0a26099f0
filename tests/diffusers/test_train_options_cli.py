"""The command-line trainer's issue-25 options: the same settings as the node, through diffusers pipelines.

Disk cache: a run from cached encodings trains what a run from fresh ones does, and a changed caption
adds only its own entry. The options run end to end on the tiny SD1.5 pipeline and the file says what
was used. The engine-level behaviour of each option is tested in tests/unit.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.diffusers.test_diffusers_train import COMMON, _meta, _ok, cli, work  # noqa: F401  (fixture)


def _entries(folder: Path) -> set[str]:
    return {p.name for p in folder.rglob("*.safetensors")}


def test_a_run_from_cached_encodings_trains_what_a_fresh_run_does(work: Path) -> None:  # noqa: F811
    cache = work / "cache"
    args = ["--steps", "2", "--output-name", "c", *COMMON]
    _ok(cli(work, "--output-dir", str(work / "fresh"), *args))
    _ok(cli(work, "--output-dir", str(work / "first"), "--cache-encodings", "--cache-dir", str(cache), *args))
    entries = _entries(cache)
    assert len(entries) >= 3 + 2  # three latents, their captions and the empty prompt
    _ok(cli(work, "--output-dir", str(work / "second"), "--cache-encodings", "--cache-dir", str(cache), *args))
    assert _entries(cache) == entries  # everything was read back
    fresh = load_file(str(work / "fresh" / "c.safetensors"))
    for run in ("first", "second"):
        cached = load_file(str(work / run / "c.safetensors"))
        assert all(torch.allclose(cached[k], fresh[k], atol=1e-6) for k in fresh)
    changed = work / "images_changed"  # the same images, one caption edited
    shutil.copytree(work / "images", changed)
    (changed / "img0.txt").write_text("a photo of zwx cat", encoding="utf-8")
    _ok(cli(work, "--output-dir", str(work / "third"), "--cache-encodings", "--cache-dir", str(cache),
            "--data", str(changed), *args))
    assert len(_entries(cache) - entries) == 1  # the new caption only


def test_the_new_options_run_end_to_end_and_the_file_says_what_was_used(work: Path) -> None:  # noqa: F811
    out = work / "options"
    done = cli(work, "--output-dir", str(out), "--output-name", "o", "--steps", "3", *COMMON,
               "--optimizer", "adafactor", "--learning-rate", "0.001", "--residual-lr-scale", "4",
               "--ema-decay", "0.9", "--timestep-sampling", "shift", "--timestep-shift", "3",
               "--caption-dropout", "0.3", "--shuffle-tags", "--validation-split", "0.34", "--validate-every", "3",
               "--offload-blocks", "2", "--gradient-checkpointing", "--checkpoint-blocks", "1",
               "--sample-every", "3", "--sample-steps", "2", "--sample-prompt", "a dog\na cat --w 128 --s 2")
    _ok(done)
    meta = _meta(out / "o.safetensors")
    assert meta["tlora.train.optimizer"] == "adafactor" and meta["tlora.train.residual_lr_scale"] == "4.0"
    assert meta["tlora.train.weights"].startswith("ema:") and meta["tlora.train.timestep_sampling"] == "shift"
    assert meta["tlora.train.validation_images"] == "1" and float(meta["tlora.train.validation_loss"]) > 0
    assert meta["tlora.train.offload_blocks"] == "2"
    assert (out / "o.step000003.png").exists() and (out / "o.step000003.2.png").exists()


def test_estimate_says_what_the_run_needs_and_what_brings_it_under_a_budget(work: Path) -> None:  # noqa: F811
    done = cli(work, "--output-dir", str(work / "est"), "--estimate", *COMMON)
    _ok(done)
    assert "tlora-train: this run needs about" in done.stdout and "activations" in done.stdout
    assert not (work / "est" / "tlora_subject.safetensors").exists()  # nothing trained
    over = cli(work, "--output-dir", str(work / "est"), "--estimate", "--memory-budget", "0.5", "--batch-size", "64",
               "--resolution", "1024", *COMMON[2:])
    _ok(over)
    assert "over the budget of 0.5 GiB:" in over.stdout and "brings it to about" in over.stdout, over.stdout
