"""Activation-side vs merged TLoRA on float, fp8 and GGUF layers: per sampling step and per strength change.

Side by side in one run, per real-size layer (ComfyUI's own op classes, random weights, a random
TLoRA(2,6) with paper shapes and every core moved off its start):

  step       one forward of the layer with the adapter at strength 0.8:
               merged      the layer on its merged weight (float, fp8: the host merged it once; the
                           forward is the plain op's: fp8 casts its weight per call). GGUF: ComfyUI-GGUF's
                           way, the patch kept on the weight and merged by `comfy.lora.calculate_weight`
                           into the dequantized weight at every forward.
               activation  our run-time layer around the op's own forward (what `mode=activation` installs)
               base        the op alone, for reference
  strength   what changing the strength costs:
               merged      ModelPatcher.patch_weight_to_device's work for this weight: float32 copy
                           (fp8: dequantized), `comfy.lora.calculate_weight`, rounding back (fp8:
                           stochastic). GGUF does no work at a change: it pays in every step instead.
               activation  a new clone's object patch: the entry at the new strength, tensors shared
  merge      the host merge of one patch into an fp8 / GGUF weight: `calculate_weight` on the
             dequantized weight (GGUF: what it adds to every step; fp8: what a strength change costs)

Layers: SD1.5's attention projections at 512 px (320 wide at 4096 tokens, 640 at 1024, 1280 at 256,
cross-attention k 768 -> 320 at 77) and one Flux.1 double block's linears at full width (qkv 3072 ->
9216, proj, mlp.0 3072 -> 12288, mlp.2 12288 -> 3072) at --flux-tokens tokens (256: a 256 px image;
1024 px would be 4096 and takes minutes per layer on one CPU core). Times: median thread CPU time
(`time.thread_time`) of --repeats interleaved rounds after a warm-up, milliseconds.

    .venv/bin/python benchmarks/quantized.py --repeats 5 --threads 1
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import train_step  # noqa: E402  (the host set-up)

SD15 = [("sd15 attn 320 @4096", 320, 320, 4096), ("sd15 attn 640 @1024", 640, 640, 1024),
        ("sd15 attn 1280 @256", 1280, 1280, 256), ("sd15 cross k 768->320 @77", 320, 768, 77)]
FLUX = [("flux qkv 3072->9216", 9216, 3072), ("flux proj 3072", 3072, 3072), ("flux mlp.0 3072->12288", 12288, 3072),
        ("flux mlp.2 12288->3072", 3072, 12288)]
STRENGTH = 0.8


def random_adapter(shape: tuple[int, int], seed: int) -> Any:
    """TLoRA(2,6), paper shapes, every core random (trained-looking)."""
    import torch
    ModuleAdapter = train_step.pack("tlora.adapter").ModuleAdapter
    gen = torch.Generator().manual_seed(seed)
    start = ModuleAdapter.create(shape, "trm:2", "tr:6", "paper", generator=gen)
    tensors = {}
    for key, value in start.tensors.items():
        if key.startswith("tlora_t."):
            value = value + 0.1 * torch.randn(value.shape, generator=gen) / value.shape[-1]
        elif key.startswith("tlora_r.out."):
            value = torch.randn(value.shape, generator=gen) / math.sqrt(value.shape[-1])
        tensors[key] = value
    return ModuleAdapter(tensors, name="bench")


def make_layer(storage: str, weight: Any, gguf_ops: Any) -> Any:
    """A ComfyUI op Linear holding `weight` as `storage` (float32, fp8 e4m3 with manual cast, GGUF Q8_0)."""
    import gguf
    import torch
    import comfy.ops
    out_f, in_f = weight.shape
    if storage == "float":
        layer = comfy.ops.disable_weight_init.Linear(in_f, out_f, bias=True)
        layer.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
    elif storage == "fp8":
        layer = comfy.ops.manual_cast.Linear(in_f, out_f, bias=True)
        layer.weight = torch.nn.Parameter(weight.to(torch.float8_e4m3fn), requires_grad=False)
    else:
        raw = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q8_0)
        layer = gguf_ops.GGMLOps.Linear(in_f, out_f)
        layer.weight = torch.nn.Parameter(gguf_ops.GGMLTensor(torch.from_numpy(raw), tensor_type=gguf.GGMLQuantizationType.Q8_0,
                                                              tensor_shape=torch.Size(weight.shape)), requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.zeros(out_f), requires_grad=False)
    layer.eval()
    return layer


def timed(fn: Callable[[], Any]) -> float:
    start = time.thread_time()
    fn()
    return (time.thread_time() - start) * 1e3


def bench_layer(label: str, out_f: int, in_f: int, tokens: int, storages: list[str], repeats: int,
                gguf_ops: Any) -> list[dict[str, Any]]:
    import torch
    import comfy.float
    import comfy.lora
    activation = train_step.pack("nodes.activation")
    TLoRAWeightAdapter = train_step.pack("nodes.comfy_adapter").TLoRAWeightAdapter
    runtime = train_step.pack("tlora.runtime")
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f)
    adapter = random_adapter((out_f, in_f), seed=1)
    x = torch.randn(tokens, in_f, generator=gen)
    rows = []
    for storage in storages:
        layer = make_layer(storage, weight, gguf_ops)
        patch = TLoRAWeightAdapter.from_module_adapter(adapter)
        patches = [(STRENGTH, patch, 1.0, None, None)]
        geometry = runtime.geometry_of(layer)
        entry = runtime.Entry(adapter, geometry, strength=STRENGTH)
        forward = activation.LayerForward("bench", layer, geometry, (entry,))

        def host_merge() -> Any:  # ModelPatcher.patch_weight_to_device's work for one weight
            stored = layer.weight
            temp = (gguf_ops.dequant.dequantize_tensor(stored, torch.float32) if storage == "gguf"
                    else stored.to(torch.float32, copy=True))
            merged = comfy.lora.calculate_weight(patches, temp, "bench.weight")
            return comfy.float.stochastic_rounding(merged, torch.float32 if storage == "gguf" else stored.dtype, seed=1)
        merged_layer = make_layer("float", weight, gguf_ops) if storage == "float" else None
        if storage == "fp8":
            merged_layer = comfy.ops.manual_cast.Linear(in_f, out_f, bias=True)
            merged_layer.weight = torch.nn.Parameter(host_merge(), requires_grad=False)
            merged_layer.bias = layer.bias
        elif storage == "float":
            merged_layer.weight = torch.nn.Parameter(host_merge(), requires_grad=False)
        else:  # GGUF keeps the patch on its weight and merges it at every forward
            merged_layer = make_layer("gguf", weight, gguf_ops)
            merged_layer.weight.patches = [(patches, "bench.weight")]

        def new_clone_patch() -> Any:  # what a strength change costs activation-side (a new clone's object patch)
            return activation.LayerForward("bench", layer, geometry, (entry.with_strength(0.5),))
        variants = {"base": lambda: layer(x), "step_merged": lambda: merged_layer(x),
                    "step_activation": lambda: forward(x), "strength_merged": host_merge,
                    "strength_activation": lambda: [new_clone_patch() for _ in range(100)]}
        times: dict[str, list[float]] = {k: [] for k in variants}
        with torch.no_grad():
            for fn in variants.values():  # warm-up: allocator, the form choice of "auto"
                fn()
            for rep in range(repeats):
                order = list(variants)[rep % len(variants):] + list(variants)[:rep % len(variants)]
                for name in order:
                    times[name].append(timed(variants[name]))
        med = {k: statistics.median(v) for k, v in times.items()}
        med["strength_activation"] /= 100
        rows.append({"layer": label, "storage": storage, "tokens": tokens, **{k: round(v, 4) for k, v in med.items()},
                     "step_ratio": round(med["step_activation"] / med["step_merged"], 3),
                     "strength_ratio": round(med["strength_merged"] / max(med["strength_activation"], 1e-9), 1),
                     "form": entry.last_form or forward._layers and next(iter(forward._layers.values())).entries[0].last_form})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def report(rows: list[dict[str, Any]]) -> None:
    print("\n| layer | storage | base | step merged | step activation | act/merged | strength merged | "
          "strength activation | merged/act |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        merged_step = f"{r['step_merged']:.2f}"
        print(f"| {r['layer']} | {r['storage']} | {r['base']:.2f} | {merged_step} | {r['step_activation']:.2f} | "
              f"{r['step_ratio']:.2f} | {r['strength_merged']:.2f} | {r['strength_activation'] * 1e3:.1f} us | "
              f"{r['strength_ratio']:.0f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--flux-tokens", type=int, default=256)
    parser.add_argument("--sets", nargs="+", default=["sd15", "flux"], choices=["sd15", "flux"])
    parser.add_argument("--storages", nargs="+", default=["float", "fp8", "gguf"], choices=["float", "fp8", "gguf"])
    args = parser.parse_args()
    train_step.setup_host("cpu")
    import torch
    torch.set_num_threads(args.threads)
    from harness import quantized
    pack = quantized.gguf_pack()
    import importlib
    gguf_ops = importlib.import_module(pack.__name__ + ".ops")
    gguf_ops.dequant = importlib.import_module(pack.__name__ + ".dequant")
    rows = []
    layers = ([*SD15] if "sd15" in args.sets else []) + \
        ([(n, o, i, args.flux_tokens) for n, o, i in FLUX] if "flux" in args.sets else [])
    for label, out_f, in_f, tokens in layers:
        rows += bench_layer(label, out_f, in_f, tokens, args.storages, args.repeats, gguf_ops)
    print(f"\ntorch {torch.__version__}, {args.threads} thread(s), {args.repeats} repeats, CPU ms (median)")
    report(rows)


if __name__ == "__main__":
    main()
