"""`python -m tlora export-lora / fit / merge`: the conversions of tlora/convert.py from the command line.

Every check (inputs exist and fit the base, ranks, error targets, the output's folder) runs before
any weight is read, and the output is written once, atomically, at the end: a bad input prints one
line and writes nothing (tlora/cli.py turns the error into exit status 2).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

import torch

from . import arch as arch_mod
from . import shapes as shapes_mod
from .basefile import open_checkpoint
from .convert import Input, LoRATarget, TLoRATarget, convert, read_input, report_text, write_result
from .errors import TLoRAError
from .fit import DEFAULT_ITERS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _rank(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rank must be an integer >= 1 (got {text!r})") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"rank must be an integer >= 1 (got {text!r})")
    return value


def _error(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"the error target must be a number >= 0, e.g. 0.05 (got {text!r})")
    return value


def _common(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--base", required=True, help="the base checkpoint (.safetensors) the inputs were made for")
    p.add_argument("-o", "--output", help=f"output file (default: {default_out})")
    p.add_argument("--arch", choices=sorted(arch_mod.ARCHS),
                   help="the base's released architecture, for the file's metadata (and diffusers UNet names)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written tensors")
    p.add_argument("--modules", action="store_true", help="report every module, not only the totals")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _lora_target(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--rank", type=_rank, help="LoRA rank of every module (capped at the weight's own rank)")
    g.add_argument("--max-error", type=_error, metavar="E",
                   help="per module, the smallest rank whose relative Frobenius error is at most E (e.g. 0.05)")


def _tlora_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transform", default=None, help="none | diag | trm:R (fit default trm:2)")
    p.add_argument("--residual", default=None, help="none | lora:r | tr:R (fit default lora:8)")
    p.add_argument("--shapes", choices=shapes_mod.SHAPE_PRESETS, default="paper")
    p.add_argument("--alpha", type=float, default=1.0, help="residual scale s = alpha / sqrt(rank)")
    p.add_argument("--iters", type=int, default=DEFAULT_ITERS, help="Adam iterations per module for the transform")
    p.add_argument("--seed", type=int, default=0)


def add_parsers(sub: Any) -> None:
    """Add export-lora, fit and merge to `python -m tlora`'s subcommands."""
    e = sub.add_parser("export-lora", help="a TLoRA as an ordinary LoRA for any host (truncated SVD per module)")
    e.add_argument("adapter", help="the TLoRA file")
    _common(e, "<adapter>_lora_r<R>.safetensors beside the adapter")
    _lora_target(e, required=True)
    f = sub.add_parser("fit", help="a LoRA file, or a fine-tuned checkpoint against its base, as a TLoRA")
    f.add_argument("source", help="a LoRA file, a TLoRA file or a fine-tuned checkpoint")
    _common(f, "<source>_tlora.safetensors beside the source")
    _tlora_target(f)
    f.add_argument("--targets", choices=arch_mod.PRESETS, default="attn", help="a fine-tune's weights to fit")
    f.add_argument("--text-encoder", action="store_true", help="a fine-tune's CLIP weights too")
    f.add_argument("--with-convs", action="store_true", help="a fine-tune's ResBlock and sampler convs too")
    m = sub.add_parser("merge", help="several TLoRAs/LoRAs at given weights as one LoRA (or one fitted TLoRA)")
    m.add_argument("inputs", nargs="+", metavar="FILE[:WEIGHT]", help="input files, each at a weight (default 1)")
    _common(m, "required")
    _lora_target(m, required=False)
    _tlora_target(m)


def _weighted(text: str) -> tuple[str, float]:
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def _check_output(path: str, inputs: list[str]) -> str:
    """The output path, refused (one line) before any work if it cannot be written or is an input."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise TLoRAError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise TLoRAError(f"output folder {folder} is not writable")
    if os.path.isdir(path):
        raise TLoRAError(f"output {path} is a folder")
    for source in inputs:
        if os.path.exists(path) and os.path.exists(source) and os.path.samefile(path, source):
            raise TLoRAError(f"output {path} is one of the inputs")
    return path


def _stem(path: str) -> str:
    return os.path.splitext(path)[0]


def _run(args: argparse.Namespace, inputs: list[Input], out: str, target: LoRATarget | TLoRATarget,
         groups: tuple[str, ...] = ("attn",)) -> int:
    base = open_checkpoint(args.base, arch=args.arch)
    arch = args.arch or next((i.config.get("arch") for i in inputs if i.config.get("arch") in arch_mod.ARCHS), None)
    result = convert(inputs, base, target, groups, progress=not args.no_progress)
    write_result(result, out, inputs, base.label, arch, DTYPES[args.dtype])
    if args.json:
        print(json.dumps({"output": out, **result.summary(), "module_reports": [m.row() for m in result.modules]}))
    else:
        print(report_text(result, out, args.modules))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`export-lora`: one TLoRA file as a LoRA."""
    target = LoRATarget(args.rank, args.max_error)
    suffix = f"r{args.rank}" if args.rank is not None else f"e{args.max_error:g}"
    out = _check_output(args.output or f"{_stem(args.adapter)}_lora_{suffix}.safetensors", [args.adapter, args.base])
    inp = read_input(args.adapter)
    if inp.kind != "tlora":
        raise TLoRAError(f"{inp.label} is not a TLoRA file (it holds {inp.kind} weights); merge converts LoRAs")
    return _run(args, [inp], out, target)


def _tlora_target_of(args: argparse.Namespace) -> TLoRATarget:
    return TLoRATarget(args.transform or "trm:2", args.residual or "lora:8", args.shapes, args.alpha, args.iters,
                       args.seed)


def cmd_fit(args: argparse.Namespace) -> int:
    """`fit`: a LoRA, TLoRA or fine-tuned checkpoint as a TLoRA of the given kind."""
    target = _tlora_target_of(args)
    out = _check_output(args.output or f"{_stem(args.source)}_tlora.safetensors", [args.source, args.base])
    groups = arch_mod.preset_groups(args.targets, with_convs=args.with_convs)
    if args.text_encoder:
        groups += arch_mod.preset_groups(args.targets, text_encoder=True)
    return _run(args, [read_input(args.source)], out, target, groups)


def cmd_merge(args: argparse.Namespace) -> int:
    """`merge`: inputs summed in weight space at their weights, written as a LoRA or a fitted TLoRA."""
    if not args.output:
        raise TLoRAError("merge needs -o OUTPUT")
    as_tlora = args.transform is not None or args.residual is not None
    if as_tlora == (args.rank is not None or args.max_error is not None):
        raise TLoRAError("merge writes a LoRA (--rank R or --max-error E) or a TLoRA (--transform/--residual): "
                         "give one of them")
    target = _tlora_target_of(args) if as_tlora else LoRATarget(args.rank, args.max_error)
    pairs = [_weighted(t) for t in args.inputs]
    out = _check_output(args.output, [p for p, _ in pairs] + [args.base])
    inputs = [read_input(p, w) for p, w in pairs]
    if any(i.kind == "checkpoint" for i in inputs):
        raise TLoRAError(f"merge takes TLoRA and LoRA files; {next(i.label for i in inputs if i.kind == 'checkpoint')} "
                         f"is a checkpoint (fit it first)")
    return _run(args, inputs, out, target)


COMMANDS = {"export-lora": cmd_export, "fit": cmd_fit, "merge": cmd_merge}
