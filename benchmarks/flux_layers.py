"""Forward+backward of Flux's wide-input linears: frozen, our LoRA r16, TLoRA(2,6), interleaved.

The layers whose input side is widest, where T (which acts on the input) costs most relative to
the frozen layer: `attn.proj` (3072 -> 3072), `mlp.2` (12288 -> 3072) and the single blocks'
`linear2` (15360 -> 3072), at Flux.1's width. Each config is the layer as training runs it: the
frozen torch Linear alone, or wrapped by `TLoRAModule` (our LoRA r16 = transform none + residual
lora:16, up random so nothing is skipped; TLoRA(2,6) = trm:2 + tr:6 in the paper's shapes with
every core random). Batch 1, float32, input requiring grad (as inside a network), weight frozen.

Configs are interleaved within each repeat (rotating order) after a warm-up round; per config the
median over repeats, and per repeat the ratio TLoRA / LoRA r16 (same repeat), so the report gives
the median ratio and its range over repeats. Used by train_step.py (`--flux-layers`); runs alone:

    .venv/bin/python benchmarks/flux_layers.py --tokens 1024 --repeats 5 --threads 1 --clock thread
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LAYERS = (("attn.proj", 3072, 3072), ("mlp.2", 3072, 12288), ("linear2", 3072, 15360))
CONFIGS = ("frozen", "lora16", "tlora26")


def build(out_f: int, in_f: int, seed: int = 0) -> dict[str, Any]:
    """The three configs around one frozen Linear(in_f, out_f)."""
    import torch
    from benchmarks.core import randomised_adapter
    from tlora.adapter import ModuleAdapter
    from tlora.module import TLoRAModule
    gen = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(in_f, out_f)
    base.requires_grad_(False)
    lora = dict(ModuleAdapter.create((out_f, in_f), "none", "lora:16", "paper", generator=gen).tensors)
    lora["tlora_r.up"] = torch.randn(lora["tlora_r.up"].shape, generator=gen) * 0.01  # not the zero start
    return {"frozen": base, "lora16": TLoRAModule(base, ModuleAdapter(lora, weight_shape=(out_f, in_f))),
            "tlora26": TLoRAModule(base, randomised_adapter(out_f, in_f, gen))}


def run(tokens: int, repeats: int, clock: Callable[[], float] = time.perf_counter, warmup: int = 1,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """{layer: {config: {"median_ms", "runs_ms"}, "ratio": {...}}} for LAYERS at `tokens` tokens."""
    import torch
    results: dict[str, Any] = {}
    for name, out_f, in_f in LAYERS:
        mods = build(out_f, in_f)
        x0 = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(1))
        grad = torch.ones(tokens, out_f)

        def step(module: Any) -> None:
            x = x0.detach().requires_grad_(True)
            module(x).backward(grad)
        times: dict[str, list[float]] = {c: [] for c in CONFIGS}
        for rep in range(warmup + repeats):
            order = CONFIGS[rep % len(CONFIGS):] + CONFIGS[:rep % len(CONFIGS)]
            for config in order:
                t0 = clock()
                step(mods[config])
                if rep >= warmup:
                    times[config].append((clock() - t0) * 1e3)
        per_rep = [t / lo for t, lo in zip(times["tlora26"], times["lora16"])]
        row: dict[str, Any] = {c: {"median_ms": statistics.median(v), "runs_ms": v} for c, v in times.items()}
        row["ratio"] = {"tlora26/lora16": statistics.median(per_rep), "range": [min(per_rep), max(per_rep)],
                        "tlora26/frozen": statistics.median(times["tlora26"]) / statistics.median(times["frozen"]),
                        "lora16/frozen": statistics.median(times["lora16"]) / statistics.median(times["frozen"]),
                        "form": mods["tlora26"].last_form}
        results[f"{name} {out_f}x{in_f}"] = row
        log(f"  flux {name} {out_f}x{in_f} n={tokens}: " + " ".join(
            f"{c} {row[c]['median_ms']:.1f} ms" for c in CONFIGS)
            + f" | TLoRA/LoRA r16 {row['ratio']['tlora26/lora16']:.3f} "
              f"({row['ratio']['range'][0]:.3f}-{row['ratio']['range'][1]:.3f})")
    return results


def format_table(results: dict[str, Any], tokens: int) -> str:
    """Markdown table: medians, the median per-repeat ratio and its range."""
    lines = [f"Flux wide-input linears, {tokens} tokens, forward+backward (ms, median):",
             "| layer | frozen | LoRA r16 | TLoRA(2,6) | TLoRA / LoRA r16 (range) | LoRA r16 / frozen | TLoRA / frozen |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for layer, row in results.items():
        r = row["ratio"]
        lines.append(f"| {layer} | {row['frozen']['median_ms']:.1f} | {row['lora16']['median_ms']:.1f} | "
                     f"{row['tlora26']['median_ms']:.1f} | **{r['tlora26/lora16']:.3f}** "
                     f"({r['range'][0]:.3f}-{r['range'][1]:.3f}) | {r['lora16/frozen']:.3f} | "
                     f"{r['tlora26/frozen']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall")
    args = parser.parse_args()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        parser.error("--clock thread measures one CPU thread: use it with --threads 1")
    results = run(args.tokens, args.repeats, time.thread_time if args.clock == "thread" else time.perf_counter)
    print(format_table(results, args.tokens))


if __name__ == "__main__":
    main()
