"""`tlora-train` / `python -m comfyui_tlora.trainer.diffusers`: train a TLoRA on a diffusers pipeline.

    tlora-train --model ./sd15-folder --data ./photos --output-dir ./out --instance-prompt "a photo of sks dog"
    accelerate launch --num_processes 2 -m comfyui_tlora.trainer.diffusers --model ... (the same arguments)

Every training setting of the ComfyUI node is an option here, generated from `TrainSettings`
(same names with dashes, same defaults, ranges and help) and checked by the same
`TrainSettings.validate`, before anything loads. Errors print one line and exit 2; a diverged
run exits 3 (the last adapter whose outputs were finite kept, or none); Ctrl-C saves a partial
file and exits 130, SIGTERM (a scheduler's or accelerate's stop) does the same and exits 143.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from ...tlora.errors import TLoRAError
from ..settings import TrainSettings, from_values, specs


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def parser() -> argparse.ArgumentParser:
    """The command line: the job's paths, then one option per training setting."""
    ap = argparse.ArgumentParser(prog="tlora-train", description=__doc__.splitlines()[0])
    job = ap.add_argument_group("what to train on and where to write")
    job.add_argument("--model", required=True, help="a diffusers pipeline folder (offline), or a single-file "
                                                    "checkpoint together with --config")
    job.add_argument("--config", help="for a single-file checkpoint: a local diffusers folder describing it")
    job.add_argument("--data", required=True, help="folder of training images; a .txt beside an image is its caption")
    job.add_argument("--class-data", help="folder of class images for prior preservation (with --class-prompt)")
    job.add_argument("--output-dir", default="output", help="where the adapter is written (default: ./output)")
    job.add_argument("--quiet", action="store_true", help="no progress bar")
    job.add_argument("--estimate", action="store_true", help="print how much device memory the run needs (and, with "
                                                                "--memory-budget, which setting brings it under) and exit")
    job.add_argument("--cache-dir", help="where --cache-encodings keeps latents and text-encoder outputs (default: "
                                         "$TLORA_CACHE_DIR/encodings or ~/.cache/tlora/encodings)")
    group = ap.add_argument_group("training settings (the ComfyUI node's, same defaults)")
    for f, spec in specs():
        default = f.default
        help_text = spec.help + (f" (default: {default!r})" if default not in ("", None) else "")
        flag = _option(f.name)
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(default, tuple):
            group.add_argument(flag, nargs=len(default), type=type(default[0]), default=None, metavar="X",
                               help=help_text)
        else:
            group.add_argument(flag, type=type(default), default=None, choices=spec.options, help=help_text)
    return ap


def settings_from(args: argparse.Namespace) -> TrainSettings:
    """TrainSettings from parsed options (what was not given keeps the node's default)."""
    values: dict[str, Any] = {f.name: getattr(args, f.name) for f, _ in specs()}
    return from_values(values)


def option_label(name: str) -> str:
    """A setting's name as this command line spells it (`learning_rate` -> `--learning-rate`)."""
    return _option(name)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is (the partial file is saved, marked stopped)."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises Terminated in the main thread while the run lasts (a KeyboardInterrupt to the engine)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    args = parser().parse_args(argv)
    from ..loop import TrainingDiverged
    from .run import Job, check_job, estimate_only, train
    job = Job(args.model, args.data, args.output_dir, args.config, args.class_data, args.cache_dir)
    try:
        settings = settings_from(args)
        settings.validate(label=option_label)  # the node's own check, before anything loads
        check_job(job, settings)
        if args.estimate:
            memory = estimate_only(job, settings)
            print(f"tlora-train: this run needs {memory.describe()}"
                  + (f"; over the budget of {settings.memory_budget:g} GiB: {memory.suggestion}"
                     if memory.suggestion else ""))
            return 0
        with sigterm_as_interrupt():
            result = train(job, settings, progress_bar=not args.quiet)
    except Terminated:
        print("tlora-train: stopped by SIGTERM; the steps done so far were saved (marked partial)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("tlora-train: interrupted; the steps done so far were saved (marked partial)", file=sys.stderr)
        return 130
    except TrainingDiverged as err:
        print(f"tlora-train: {err}", file=sys.stderr)
        return 3
    except (TLoRAError, OSError) as err:
        print(f"tlora-train: {_one_line(err)}", file=sys.stderr)
        return 2
    main_process = os.environ.get("RANK", "0") == "0"  # under accelerate launch only rank 0 wrote it
    if main_process and result.path and result.metadata.get("tlora.train.partial") == "false":
        loss = "" if result.final_loss is None else f", final loss {result.final_loss:.4g}"
        print(f"tlora-train: wrote {result.path} ({result.steps_done} steps{loss})")
    return 0


def _one_line(err: BaseException) -> str:
    """An error as one line (an OSError's own text can span several)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 500 else text[:497] + "..."
