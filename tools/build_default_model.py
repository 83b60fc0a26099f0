#!/usr/bin/env python3
"""Build the embedded default model: an SD1.5-format checkpoint pretrained on procedural images.

    .venv/bin/python tools/build_default_model.py [--out PATH] [--tiny] [--minutes M] [--seed N]
                                                    [--threads T] [--force] [--quiet]

Stock ComfyUI's CheckpointLoaderSimple detects the result as SD1.5 (320-channel shallow UNet,
TAESD VAE, CLIP-L text encoder). Deterministic from the seed and the thread count (default 1) on
any x86-64 CPU with AVX2 for one torch build (ATen and MKL pinned to AVX2 before torch loads, no
oneDNN or NNPACK; what is left is listed in proving/default_model.py); cached in .cache/default_model/
(work files resume an interrupted build; a finished build returns at once). `--minutes` scales
the training length for that many minutes on the reference machine (2 shared CPU cores); the
steps, not the clock, decide the model. `--tiny` is a ~1 minute smoke build (not a usable model).
Prints the checkpoint path.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pin_numerics() -> None:
    """Set the kernel-pinning variables (proving.default_model.PINNED_NUMERICS) before torch is imported."""
    from proving.default_model import PINNED_NUMERICS  # imports numpy only, not torch
    if "torch" in sys.modules:
        raise RuntimeError("pin_numerics() must run before torch is imported")
    os.environ.update(PINNED_NUMERICS)


def make_default_model(out: Optional[os.PathLike] = None, *, tiny: bool = False, minutes: Optional[float] = None,
                       seed: int = 0, force: bool = False, progress: bool = True,
                       threads: Optional[int] = None, cache_dir: Optional[os.PathLike] = None) -> Path:
    """Build (or find) the default model and return its path (see proving.default_model)."""
    from proving.default_model import make_default_model as build
    return build(out, tiny=tiny, minutes=minutes, seed=seed, force=force, progress=progress, threads=threads,
                 cache_dir=cache_dir, log=lambda m: print(m, file=sys.stderr))


def main(argv: Optional[list[str]] = None) -> int:
    """Parse arguments, build if needed, print the path."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", default=None, help="output .safetensors (default .cache/default_model/tlora-proving-sd15"
                                                "[-tiny].safetensors)")
    ap.add_argument("--tiny", action="store_true", help="tiny smoke build (about a minute; not a usable model)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="training length in reference-machine minutes (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="seed of everything (default 0)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default 1; another count builds a different model)")
    ap.add_argument("--force", action="store_true", help="rebuild the final file even if it is up to date")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--cache-dir", default=None, help="work and default output folder (default .cache/default_model)")
    a = ap.parse_args(argv)
    pin_numerics()
    path = make_default_model(a.out, tiny=a.tiny, minutes=a.minutes, seed=a.seed, force=a.force,
                              progress=not a.quiet, threads=a.threads, cache_dir=a.cache_dir)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
