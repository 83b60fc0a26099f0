"""Time and peak memory of `python -m tlora export-lora`, module by module from a large base file (issue 27).

* ``sdxl``: a TLoRA(2,6) on SDXL's 560 attention projections (the paper's targets, random trained-looking
  cores) exported at a rank against an SDXL-shaped base: every denoiser weight of `tlora.arch`'s SDXL table
  (2.57 G parameters, 5.1 GB as float16), random, written tensor by tensor (the file is never held in memory).
* ``big``: one large weight (default 12288 x 3072, Flux.1's MLP-in) with a TLoRA(2,6), to measure what one
  module costs above the process's baseline: the peak is a few copies of the largest weight in float64
  (the delta, the SVD's copy, U, the workspace), which extrapolates to larger bases (Flux.2-dev).

Each export runs in a subprocess (`OMP_NUM_THREADS` as given, one by default: the machine is shared); its
peak RSS comes from `wait4` on that process, and a baseline subprocess (the same imports, nothing converted)
is measured the same way.

    .venv/bin/python benchmarks/export.py                 # both parts (about 5.5 GB of temporary files)
    .venv/bin/python benchmarks/export.py --part big --rows 12288 --cols 3072
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tlora import ModuleAdapter, arch, save_file  # noqa: E402

_ST = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def write_safetensors_streaming(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, seed: int) -> int:
    """A safetensors file of N(0, 1/fan_in) weights, each drawn and written in turn; returns its size in bytes."""
    item = torch.tensor([], dtype=dtype).element_size()
    header, offset = {}, 0
    for key, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        header[key] = {"dtype": _ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + n * item]}
        offset += n * item
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key, shape in shapes.items():
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            f.write((torch.randn(shape, generator=gen) / fan_in ** 0.5).to(dtype).contiguous().view(torch.uint8)
                    .numpy().tobytes())
    return os.path.getsize(path)


def trained_adapter(shape: tuple[int, ...], seed: int) -> ModuleAdapter:
    """A TLoRA(2,6) moved away from its identity / zero start (every core random, as after training)."""
    gen = torch.Generator().manual_seed(seed)
    start = ModuleAdapter.create(shape, "trm:2", "tr:6", generator=gen)
    tensors = {k: (v if k == "tlora_scale" else v + 0.05 * torch.randn(v.shape, generator=gen))
               for k, v in start.tensors.items()}
    return ModuleAdapter(tensors, weight_shape=shape)


def measured(argv: list[str], threads: int) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, stdout) of a subprocess."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=str(ROOT))
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} exited with {proc.returncode}")
    return wall, usage.ru_maxrss / 1024, out


def export(adapter: Path, base: Path, out: Path, rank: int, threads: int) -> dict:
    wall, peak, text = measured([sys.executable, "-m", "tlora", "export-lora", str(adapter), "--base", str(base),
                                 "--rank", str(rank), "-o", str(out), "--json", "--no-progress"], threads)
    report = json.loads(text)
    return {"seconds": wall, "peak_rss_mib": peak, "modules": report["modules"], "params": report["params"],
            "rel_error": report["rel_error"], "output_error": report["output_error"]}


def baseline(threads: int) -> float:
    """Peak RSS (MiB) of a process that imports what an export imports and converts nothing."""
    code = "import torch, safetensors, tqdm; import tlora.cli, tlora.convert"
    return measured([sys.executable, "-c", code], threads)[1]


def part_sdxl(folder: Path, rank: int, threads: int) -> dict:
    table = {name: shape for name, shape, _ in arch.ARCHS["sdxl"].denoiser_modules()}
    base = folder / "sdxl_base.safetensors"
    t0 = time.perf_counter()
    size = write_safetensors_streaming(base, {f"model.{k}.weight": s for k, s in table.items()}, torch.float16, 0)
    written = time.perf_counter() - t0
    targets = arch.targets("sdxl", "attn")
    adapter = folder / "sdxl_tlora.safetensors"
    save_file({n: trained_adapter(s, i) for i, (n, s) in enumerate(targets.items())}, adapter)
    result = export(adapter, base, folder / "sdxl_lora.safetensors", rank, threads)
    return {"base_bytes": size, "base_params": sum(torch.Size(s).numel() for s in table.values()),
            "base_written_s": written, "targets": len(targets), "rank": rank, **result}


def part_big(folder: Path, rows: int, cols: int, rank: int, threads: int) -> dict:
    base = folder / "big_base.safetensors"
    write_safetensors_streaming(base, {"model.diffusion_model.big.weight": (rows, cols)}, torch.bfloat16, 1)
    adapter = folder / "big_tlora.safetensors"
    save_file({"diffusion_model.big": trained_adapter((rows, cols), 7)}, adapter)
    result = export(adapter, base, folder / "big_lora.safetensors", rank, threads)
    return {"shape": [rows, cols], "float64_mib": rows * cols * 8 / 2 ** 20, "rank": rank, **result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("sdxl", "big", "both"), default="both")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--rows", type=int, default=12288)
    p.add_argument("--cols", type=int, default=3072)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tmp", default=None, help="folder for the temporary files (default: the system's)")
    args = p.parse_args(argv)
    out: dict = {"threads": args.threads, "torch": torch.__version__, "cpu": os.cpu_count()}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp)
        out["baseline_rss_mib"] = baseline(args.threads)
        if args.part in ("sdxl", "both"):
            out["sdxl"] = part_sdxl(folder, args.rank, args.threads)
            print(json.dumps(out["sdxl"]), flush=True)
        if args.part in ("big", "both"):
            out["big"] = part_big(folder, args.rows, args.cols, 64, args.threads)
            big = out["big"]
            big["copies_of_the_weight"] = (big["peak_rss_mib"] - out["baseline_rss_mib"]) / big["float64_mib"]
            print(json.dumps(out["big"]), flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
