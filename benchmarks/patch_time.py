"""Whole-model patch time through ComfyUI's stock path: TLoRA(2,6) against an equal-target LoRA r4.

What is timed: `ModelPatcher.patch_model` of a patcher that the stock loader built
(`comfy.sd.load_lora_for_models`, what LoraLoader / LoraLoaderModelOnly call) from an
in-memory file, i.e. ComfyUI's own per-weight work (float32 copy, `comfy.lora.calculate_weight`,
rounding back, setting the parameter) around each adapter's `calculate_weight`: ours
(`TLoRAWeightAdapter`, registered as the pack does) for TLoRA(2,6) (`trm:2` + `tr:6`, paper
shapes, every core random), ComfyUI's own `LoRAAdapter` for LoRA r4 (alpha 4, up and down
random) on the same modules. `none` is the same patch with no patches (the host's walk over
the model). Variants are interleaved (rotating order) for `--repeats` rounds after one
warm-up round; each is unpatched after every round (not timed). Median wall time and median
thread CPU time (`time.thread_time`: this thread's user + system time, page faults included,
other processes' time not) per variant.

Models (random weights, built from ComfyUI's own classes):
  sd15  the full-size SD1.5 UNet (ComfyUI's SD15 config, as benchmarks/train_step.py), its
        128 attention projections (to_q/k/v/out.0: 320..1280 wide, cross-attention k/v 768 in)
  flux  ComfyUI's Flux model class at Flux.1-dev's width (hidden 3072, 24 heads, mlp ratio 4)
        with ONE double-stream and ONE single-stream block (the whole 12 B model, 19 + 38 blocks,
        is ~48 GB in float32: too big for this machine); targets: the double block's
        img/txt attn.qkv (9216x3072), attn.proj (3072x3072), mlp.0 (12288x3072), mlp.2
        (3072x12288) and the single block's linear1 (21504x3072) and linear2 (3072x15360).
        Timed per block kind; the whole-model figure is 19 x double + 38 x single.

Accuracy (not timed): after one more patch, every target weight is compared with a float64
reference built here from the file's tensors with plain einsum (never the code under test):
W0 T + s Delta (T contracted core by core on the weight's rows, Delta from the ring chains)
for TLoRA, W0 + (alpha / r) up down for LoRA, on `--check-rows` evenly spaced rows of each
weight (0 = all). Reported: max |patched - reference| in units of eps32 * max|reference|
(eps32 = 2^-23; rounding the exact result to float32 alone gives up to 0.5 there).

    .venv/bin/python benchmarks/patch_time.py --models sd15 flux --repeats 3 --threads 1
    .venv/bin/python benchmarks/patch_time.py --models sd15 --profile    # where TLoRA's patch time goes
    TLORA_COMFY_DIR=.host/ComfyUI-0.12.1 .venv-comfy-0.12/bin/python benchmarks/patch_time.py ...
"""
from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import train_step  # noqa: E402  (the host set-up and the full-size SD1.5 UNet)

VARIANTS = ("none", "lora4", "tlora26")
# Flux.1-dev as comfy.model_detection reports it, with one block of each kind.
FLUX_DEV = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
            "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1, "depth_single_blocks": 1,
            "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
FLUX_BLOCKS = {"double": (19, [f"double_blocks.0.{s}_{m}" for s in ("img", "txt")
                               for m in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")]),
               "single": (38, ["single_blocks.0.linear1", "single_blocks.0.linear2"])}
EPS32 = 2.0 ** -23


# ----- models ----------------------------------------------------------------------------------
def _random_init(module: Any, seed: int) -> None:
    """Every parameter random in place (ComfyUI's ops skip init): variance 1/fan_in, norms 1, biases 0."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                bound = math.sqrt(3.0 / p[0].numel())
                p.uniform_(-bound, bound, generator=gen)
            elif name.endswith(("weight", "scale")):
                p.fill_(1.0)
            else:
                p.zero_()


def build_flux(seed: int = 0) -> Any:
    """ComfyUI's Flux model at Flux.1-dev width with one double and one single block, and its patcher."""
    import torch
    import comfy.model_patcher
    import comfy.supported_models as sm
    cfg = sm.Flux(dict(FLUX_DEV))
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, "", device=torch.device("cpu"))
    _random_init(model.diffusion_model, seed)
    model.eval()
    model.diffusion_model.requires_grad_(False)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def targets(patcher: Any, paths: list[str]) -> dict[str, tuple[int, ...]]:
    """{module path: weight shape} of the given diffusion-model paths."""
    sd = patcher.model.diffusion_model.state_dict()
    return {p: tuple(sd[f"{p}.weight"].shape) for p in paths}


# ----- files -----------------------------------------------------------------------------------
def tlora_file(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, Any]:
    """A TLoRA(2,6) file's tensors for these modules (`diffusion_model.<path>.tlora_*`), every core random."""
    import torch
    ModuleAdapter = train_step.pack("tlora.adapter").ModuleAdapter
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for path, shape in shapes.items():
        start = ModuleAdapter.create(shape, "trm:2", "tr:6", "paper", generator=gen)
        for key, value in start.tensors.items():
            if key.startswith("tlora_t."):  # trained-looking: identity start + noise
                value = value + 0.1 * torch.randn(value.shape, generator=gen) / value.shape[-1]
            elif key.startswith("tlora_r.out."):  # the zero-started core gets values too
                value = torch.randn(value.shape, generator=gen) / math.sqrt(value.shape[-1])
            sd[f"diffusion_model.{path}.{key}"] = value
    return sd


def lora_file(shapes: dict[str, tuple[int, ...]], seed: int, rank: int = 4) -> dict[str, Any]:
    """A LoRA r4 file (kohya-style lora_up/lora_down/alpha, alpha = rank) for the same modules."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for path, (out_f, in_f) in shapes.items():
        sd[f"diffusion_model.{path}.lora_up.weight"] = torch.randn(out_f, rank, generator=gen) / math.sqrt(rank)
        sd[f"diffusion_model.{path}.lora_down.weight"] = torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)
        sd[f"diffusion_model.{path}.alpha"] = torch.tensor(float(rank))
    return sd


def load_stock(patcher: Any, sd: dict[str, Any], strength: float, expect: int) -> Any:
    """The patcher LoraLoaderModelOnly would return (comfy.sd.load_lora_for_models)."""
    import comfy.sd
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, dict(sd), strength, 0)
    got = len(patched.patches)
    if got != expect:
        sys.exit(f"the stock loader claimed {got} weights, expected {expect}")
    return patched


# ----- float64 references (plain einsum on the file's tensors; never the code under test) -----
def ref_rows_times_t(rows: Any, cores: list[Any]) -> Any:
    """rows @ T in float64, T[(i..), (j..)] = trace(A_1[i_1, j_1] ... A_D[i_D, j_D]) contracted core by core."""
    import torch
    n, r = rows.shape[0], cores[0].shape[-1]
    f = [c.shape[0] for c in cores]
    y = torch.einsum("nip,ijab->npjab", rows.double().reshape(n, f[0], -1), cores[0].double())
    done = f[0]
    for d in range(1, len(cores)):
        rest = y.shape[1] // f[d]
        y = torch.einsum("nipJab,ijbc->npJjac", y.reshape(n, f[d], rest, done, r, r), cores[d].double())
        done *= f[d]
        y = y.reshape(n, rest, done, r, r)
    return torch.einsum("nJaa->nJ", y.reshape(n, done, r, r))


def ref_ring(cores: list[Any]) -> Any:
    """Product of ring cores along their chain in float64: (n_1, R, R)... -> (n_1...n_D, R, R), row-major."""
    import torch
    m = cores[0].double()
    for c in cores[1:]:
        m = torch.einsum("nab,kbc->nkac", m, c.double()).reshape(-1, m.shape[1], c.shape[2])
    return m


def ref_tlora_rows(w0: Any, sd: dict[str, Any], prefix: str, rows: Any, strength: float) -> Any:
    """W0 + sigma (W0 T + s Delta - W0) on the chosen rows of a linear weight, float64."""
    import torch

    def cores(part: str) -> list[Any]:
        out = []
        while f"{prefix}.{part}.{len(out)}" in sd:
            out.append(sd[f"{prefix}.{part}.{len(out)}"])
        return out
    w = w0[rows].double()
    up = ref_ring(cores("tlora_r.out"))[rows]
    delta = torch.einsum("oab,iba->oi", up, ref_ring(cores("tlora_r.in")))
    target = ref_rows_times_t(w, cores("tlora_t")) + float(sd[f"{prefix}.tlora_scale"]) * delta
    return w + strength * (target - w)


def ref_lora_rows(w0: Any, sd: dict[str, Any], prefix: str, rows: Any, strength: float) -> Any:
    """W0 + sigma (alpha / r) up down on the chosen rows, float64 (ComfyUI's LoRA rule)."""
    up, down = sd[f"{prefix}.lora_up.weight"].double(), sd[f"{prefix}.lora_down.weight"].double()
    alpha = float(sd[f"{prefix}.alpha"]) / down.shape[0]
    return w0[rows].double() + strength * alpha * (up[rows] @ down)


def accuracy(patched: Any, base: dict[str, Any], sd: dict[str, Any], kind: str, strength: float,
             check_rows: int) -> dict[str, float]:
    """Max error of every patched target weight in units of eps32 * max|reference| (worst and median over modules)."""
    import torch
    patched.patch_model(device_to=torch.device("cpu"))
    try:
        live = patched.model.diffusion_model.state_dict()
        units = {}
        for path, w0 in base.items():
            n = w0.shape[0]
            rows = torch.arange(n) if not check_rows or check_rows >= n else \
                torch.linspace(0, n - 1, check_rows).round().long().unique()
            prefix = f"diffusion_model.{path}"
            ref = (ref_tlora_rows if kind == "tlora26" else ref_lora_rows)(w0, sd, prefix, rows, strength)
            got = live[f"{path}.weight"][rows].double()
            units[path] = float((got - ref).abs().max() / (EPS32 * ref.abs().max()))
    finally:
        patched.unpatch_model(device_to=torch.device("cpu"))
    worst = max(units, key=units.get)
    return {"max_units": units[worst], "median_units": statistics.median(units.values()), "worst_module": worst}


# ----- timing ----------------------------------------------------------------------------------
def time_variants(patchers: dict[str, Any], repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and thread-CPU seconds of patch_model per variant (interleaved, one warm-up round)."""
    import torch
    cpu = torch.device("cpu")
    names = list(patchers)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu_t: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(repeats + 1):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            p = patchers[name]
            w0, c0 = time.perf_counter(), time.thread_time()
            p.patch_model(device_to=cpu)
            w1, c1 = time.perf_counter(), time.thread_time()
            p.unpatch_model(device_to=cpu)
            if rep:  # round 0 is the warm-up (allocator, compiled chain's first load and self-check)
                wall[name].append(w1 - w0)
                cpu_t[name].append(c1 - c0)
    return {k: {"wall_s": statistics.median(wall[k]), "cpu_s": statistics.median(cpu_t[k]),
                "wall_range_s": [min(wall[k]), max(wall[k])]} for k in names}


def measure(label: str, patcher: Any, shapes: dict[str, tuple[int, ...]], args: argparse.Namespace,
            seed: int) -> dict[str, Any]:
    """Times, ratios and accuracy of none / LoRA r4 / TLoRA(2,6) on these target modules of one model."""
    files = {"lora4": lora_file(shapes, seed), "tlora26": tlora_file(shapes, seed + 1)}
    patchers = {"none": patcher.clone()}
    for name, sd in files.items():
        patchers[name] = load_stock(patcher, sd, args.strength, len(shapes))
    patchers = {k: patchers[k] for k in VARIANTS}
    log(args, f"{label}: {len(shapes)} target weights, {sum(math.prod(s) for s in shapes.values()) / 1e6:.1f} M "
              f"elements; timing {args.repeats} rounds")
    times = time_variants(patchers, args.repeats)
    out: dict[str, Any] = {"modules": len(shapes), "shapes": sorted({f"{o}x{i}" for o, i in shapes.values()}),
                           "times": times}
    for clock in ("wall_s", "cpu_s"):
        out[f"ratio_{clock[:-2]}"] = times["tlora26"][clock] / times["lora4"][clock]
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        patchers["tlora26"].patch_model(device_to=__import__("torch").device("cpu"))
        prof.disable()
        patchers["tlora26"].unpatch_model(device_to=__import__("torch").device("cpu"))
        print(f"--- profile: TLoRA(2,6) patch of {label} ---")
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    if not args.no_accuracy:
        sd = patcher.model.diffusion_model.state_dict()
        base = {p: sd[f"{p}.weight"].detach().clone() for p in shapes}
        out["accuracy"] = {k: accuracy(patchers[k], base, files[k], k, args.strength, args.check_rows)
                           for k in ("lora4", "tlora26")}
    log(args, f"{label}: " + json.dumps(out))
    return out


def log(args: argparse.Namespace, msg: str) -> None:
    print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)


def report(results: dict[str, Any]) -> str:
    """Markdown tables of the results."""
    lines = ["| set | modules | none (s) | LoRA r4 (s) | TLoRA(2,6) (s) | TLoRA / LoRA | LoRA err | TLoRA err |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in results["sets"].items():
        t = r["times"]
        acc = r.get("accuracy", {})
        err = {k: f"{acc[k]['max_units']:.2f}" if k in acc else "-" for k in ("lora4", "tlora26")}
        for clock, name in (("wall_s", "wall"), ("cpu_s", "CPU")):
            lines.append(f"| {label} ({name}) | {r['modules']} | {t['none'][clock]:.3f} | {t['lora4'][clock]:.3f} | "
                         f"{t['tlora26'][clock]:.3f} | **{r['ratio_' + clock[:-2]]:.2f}x** | {err['lora4']} | "
                         f"{err['tlora26']} |")
    for label, w in results.get("whole", {}).items():
        for clock, name in (("wall", "wall"), ("cpu", "CPU")):
            lines.append(f"| {label} ({name}) | {w['modules']} | {w[f'none_{clock}_s']:.2f} | "
                         f"{w[f'lora4_{clock}_s']:.2f} | {w[f'tlora26_{clock}_s']:.2f} | "
                         f"**{w[f'ratio_{clock}']:.2f}x** | | |")
    lines.append("errors: max |patched - float64 reference| / (eps32 * max|reference|), worst module")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=("sd15", "flux"), default=["sd15", "flux"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--check-rows", type=int, default=256, help="rows of each weight checked (0: all)")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--profile", action="store_true", help="cProfile one TLoRA patch per set")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    train_step.setup_host("cpu")
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    adapter_mod = train_step.pack("nodes.comfy_adapter")
    if not adapter_mod.register():
        sys.exit("could not register the TLoRA weight adapter with ComfyUI")
    native = train_step.pack("tlora.functional.trm").native_status()
    results: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                               "host": str(train_step.COMFY_DIR), "native": native, "strength": args.strength,
                               "repeats": args.repeats, "sets": {}, "whole": {}}
    if "sd15" in args.models:
        env = train_step.build("cpu")
        paths = [n for n, _ in env["dm"].named_modules() if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
        results["sets"]["sd15 attn"] = measure("sd15 attn", env["patcher"], targets(env["patcher"], paths), args, 10)
        del env
    if "flux" in args.models:
        patcher = build_flux()
        for kind, (count, paths) in FLUX_BLOCKS.items():
            results["sets"][f"flux {kind} block"] = measure(f"flux {kind} block", patcher, targets(patcher, paths),
                                                            args, 20 if kind == "double" else 30)
        sets = [results["sets"][f"flux {k}"] for k in ("double block", "single block")]
        counts = [FLUX_BLOCKS[k][0] for k in ("double", "single")]
        whole = {f"{v}_{clock}": sum(c * s["times"][v][clock] for c, s in zip(counts, sets))
                 for v in VARIANTS for clock in ("wall_s", "cpu_s")}
        whole["modules"] = sum(c * len(FLUX_BLOCKS[k][1]) for c, k in zip(counts, ("double", "single")))
        whole["ratio_wall"] = whole["tlora26_wall_s"] / whole["lora4_wall_s"]
        whole["ratio_cpu"] = whole["tlora26_cpu_s"] / whole["lora4_cpu_s"]
        results["whole"]["flux whole model (19 x double + 38 x single, extrapolated)"] = whole
    results["command"] = " ".join([os.path.basename(sys.executable)] + sys.argv)
    if args.json:
        print(json.dumps(results))
    else:
        print(f"torch {results['torch']}, {results['threads']} threads, host {results['host']}, "
              f"strength {args.strength}, {args.repeats} rounds; compiled chain: {native}")
        print(report(results))


if __name__ == "__main__":
    main()
