#!/usr/bin/env python3
"""Write the harness's small SD1.5-format checkpoint that stock ComfyUI loads with CheckpointLoaderSimple.

    .venv/bin/python tools/make_checkpoint.py [--out PATH] [--seed N] [--dtype fp16|fp32] [--force]

Full-width but shallow UNet (320 channels, context 768, one level, one res block with a
transformer), a TAESD VAE and a full CLIP-L text encoder, all seeded random weights (~300 MB
in fp16). Idempotent: an existing file is kept unless --force. Prints the path.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from harness import tiny_models  # noqa: E402  (needs ROOT on sys.path first)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the checkpoint if needed, print its path."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output .safetensors (default: .cache/tlora-tiny-sd15-s<seed>-v<N>.safetensors)")
    ap.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    ap.add_argument("--dtype", choices=["fp16", "fp32", "bf16"], default="fp16", help="stored dtype (default fp16)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the file exists")
    a = ap.parse_args(argv)
    out = a.out or str(tiny_models.default_checkpoint_path(a.seed))
    if os.path.isfile(out) and not a.force:
        print(out)
        return 0
    t0 = time.perf_counter()
    path = tiny_models.ensure_checkpoint(out, seed=a.seed, force=a.force, dtype=a.dtype)
    size = os.path.getsize(path) / 2 ** 20
    print(f"wrote {path} ({size:.0f} MiB) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
