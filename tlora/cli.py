"""Command line: `python -m tlora plan ...`, `python -m tlora inspect FILE`, `python -m tlora native`,
`python -m tlora export-lora / fit / merge` (tlora/convert_cli.py).

Errors (bad arguments, unusable files) print one line on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import torch

from . import __version__
from . import arch as arch_mod
from . import convert_cli
from . import shapes as shapes_mod
from .errors import TLoRAError
from .format import load, summarize
from .planner import plan
from .spec import DEFAULT_RESIDUAL, DEFAULT_TRANSFORM

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _CliError(Exception):
    """A user error the CLI reports as one line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise _CliError(f"{self.prog}: error: {message} (see: python -m {self.prog} --help)")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _size(n: int) -> str:
    return f"{_fmt_int(n)} bytes ({n / 2**20:.2f} MiB)"


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `python -m tlora`."""
    parser = _Parser(prog="tlora", description="TLoRA adapters: plan sizes, inspect files, convert to and from LoRAs.")
    parser.add_argument("--version", action="version", version=f"tlora {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    p = sub.add_parser("plan", help="parameter count and file size of an adapter before training")
    p.add_argument("--arch", choices=sorted(arch_mod.ARCHS), default="sd15")
    p.add_argument("--transform", default=DEFAULT_TRANSFORM, help=f"none | diag | trm:R (default {DEFAULT_TRANSFORM})")
    p.add_argument("--residual", default=DEFAULT_RESIDUAL, help=f"none | lora:r | tr:R (default {DEFAULT_RESIDUAL})")
    p.add_argument("--targets", choices=arch_mod.PRESETS, default="attn")
    p.add_argument("--shapes", choices=shapes_mod.SHAPE_PRESETS, default="paper")
    p.add_argument("--text-encoder", action="store_true", help="also adapt the text encoder(s)")
    p.add_argument("--with-convs", action="store_true", help="also adapt ResBlock and sampler convs")
    p.add_argument("--alpha", type=float, default=1.0, help="residual scale s = alpha / sqrt(rank)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="file dtype for the size")
    p.add_argument("--modules", action="store_true", help="list every module, not groups")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    i = sub.add_parser("inspect", help="validate a TLoRA file and summarise it")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    n = sub.add_parser("native", help="whether the compiled CPU kernels are in use (builds them if needed)")
    n.add_argument("--json", action="store_true", help="print one JSON object")
    convert_cli.add_parsers(sub)
    return parser


def _plan_text(result: dict[str, Any], every_module: bool) -> str:
    lines = [f"TLoRA plan: {result['arch']}, targets {result['targets']}"
             f"{' + text encoder' if result['text_encoder'] else ''}"
             f"{' + convs' if result['with_convs'] else ''}, transform {result['transform']}, "
             f"residual {result['residual']}, shapes {result['shapes']}"]
    rows: list[tuple[str, ...]] = []
    if every_module:
        for m in result["per_module"]:
            rows.append((m["name"], "x".join(map(str, m["shape"])), m["transform"],
                         "x".join(map(str, m["transform_factors"])) or "-", m["residual"],
                         ("x".join(map(str, m["residual_out_factors"])) + " | " +
                          "x".join(map(str, m["residual_in_factors"]))) if m["residual_out_factors"] else "-",
                         _fmt_int(m["params"])))
        head = ("module", "shape", "transform", "T factors", "residual", "R factors out | in", "params")
    else:
        groups: dict[tuple, list[int]] = {}
        for m in result["per_module"]:
            key = (tuple(m["shape"]), m["transform"], tuple(m["transform_factors"]), m["residual"],
                   tuple(m["residual_out_factors"]), tuple(m["residual_in_factors"]))
            groups.setdefault(key, [0, m["params"]])[0] += 1
        for (shape, t, tf, r, of, inf), (count, each) in groups.items():
            rows.append((str(count), "x".join(map(str, shape)), t, "x".join(map(str, tf)) or "-", r,
                         ("x".join(map(str, of)) + " | " + "x".join(map(str, inf))) if of else "-",
                         _fmt_int(each), _fmt_int(each * count)))
        head = ("count", "shape", "transform", "T factors", "residual", "R factors out | in", "each", "params")
    widths = [max(len(h), *(len(r[c]) for r in rows)) for c, h in enumerate(head)]
    for row in (head, *rows):
        lines.append("  " + "  ".join(v.rjust(w) if v[:1].isdigit() and c else v.ljust(w)
                                      for c, (v, w) in enumerate(zip(row, widths))).rstrip())
    kinds = "; ".join(f"{k} {_fmt_int(v)}" for k, v in result["params_by_kind"].items())
    lines.append(f"modules: {result['modules']}")
    lines.append(f"params: {_fmt_int(result['params'])} ({kinds})")
    lines.append(f"file size: {_size(result['file_bytes'])} as {result['dtype']} safetensors")
    return "\n".join(lines)


def _cmd_plan(args: argparse.Namespace) -> int:
    result = plan(args.arch, args.transform, args.residual, args.targets, args.shapes,
                  text_encoder=args.text_encoder, with_convs=args.with_convs, alpha=args.alpha,
                  dtype=_DTYPES[args.dtype])
    print(json.dumps(result) if args.json else _plan_text(result, args.modules))
    return 0


def inspect_file(path: str) -> dict[str, Any]:
    """Validate a TLoRA file and return its JSON-able summary (what `inspect --json` prints)."""
    loaded = load(path)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for a in loaded.adapters.values()
                     for t in a.tensors.values()})
    return {"path": path, "file_bytes": loaded.file_bytes,
            "version": loaded.metadata.get("tlora.version", "1"),
            "config": loaded.config, "metadata": loaded.metadata,
            **summarize(loaded.adapters), "dtypes": dtypes}


def _inspect_text(info: dict[str, Any]) -> str:
    cfg, meta = info["config"], info["metadata"]
    kinds = "; ".join(f"{k} {_fmt_int(v)}" for k, v in info["params_by_kind"].items())
    lines = [f"file: {info['path']}", f"size: {_size(info['file_bytes'])}",
             f"format: TLoRA version {info['version']}",
             f"title: {meta.get('modelspec.title', '-')}",
             f"architecture: {meta.get('modelspec.architecture', '-')}"
             f"{' (' + str(cfg['arch']) + ')' if cfg.get('arch') else ''}"]
    settings = [f"{k} {cfg[k]}" for k in ("transform", "residual", "shapes", "targets", "alpha") if k in cfg]
    if settings:
        lines.append("config: " + ", ".join(settings))
    lines += [f"modules: {info['modules']}"
              f" (transforms: {', '.join(f'{k} x{v}' for k, v in info['transform_kinds'].items())};"
              f" residuals: {', '.join(f'{k} x{v}' for k, v in info['residual_kinds'].items())})",
              f"params: {_fmt_int(info['params'])} ({kinds})",
              f"dtypes: {', '.join(info['dtypes'])}"]
    extra = {k: v for k, v in meta.items() if k not in ("tlora.config",)}
    if extra:
        lines.append("metadata:")
        for key in sorted(extra):
            value = _one_line(extra[key])
            lines.append(f"  {key}: {value if len(value) <= 120 else value[:117] + '...'}")
    return "\n".join(lines)


def _cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_file(args.file)
    print(json.dumps(info) if args.json else _inspect_text(info))
    return 0


def _cmd_native(args: argparse.Namespace) -> int:
    from .functional import trm  # imported here: only this command needs the engine

    info = trm.native_status()
    if args.json:
        print(json.dumps(info))
    elif info["in_use"]:
        print(f"compiled CPU kernels in use ({info['threads']} threads): {info['status']}")
    else:
        print(f"compiled CPU kernels not in use, the torch engine runs instead: {info['status']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad arguments or unusable file)."""
    parser = build_parser()
    command = "tlora"
    try:
        args = parser.parse_args(argv)
        command = f"tlora {args.command}" if args.command else command
        if args.command == "plan":
            return _cmd_plan(args)
        if args.command == "inspect":
            return _cmd_inspect(args)
        if args.command == "native":
            return _cmd_native(args)
        if args.command in convert_cli.COMMANDS:
            return convert_cli.COMMANDS[args.command](args)
        parser.print_usage(sys.stderr)
        return 2
    except _CliError as exc:
        print(_one_line(exc), file=sys.stderr)
        return 2
    except (TLoRAError, ValueError, OSError) as exc:
        print(f"{command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # a file must never crash the CLI with a traceback
        print(f"{command}: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 2

