"""Forward+backward of Flux's wide-input linears: frozen, LoRA r16 (plain and ours), TLoRA(2,6) and
TLoRA(1,6), interleaved, beside the multiply-add bound of each.

The layers whose input side is widest, where T (which acts on the input) costs most relative to
the frozen layer: `attn.proj` (3072 -> 3072), `mlp.2` (12288 -> 3072) and the single blocks'
`linear2` (15360 -> 3072), at Flux.1's width. Each config is the layer as training runs it:
- `frozen`: the torch Linear alone;
- `plain16`: a LoRA r16 written as PEFT writes it (`base(x) + up(down(x)) * scale`, plain torch ops:
  the independent baseline);
- `lora16`: ours, `TLoRAModule` with transform none + residual lora:16;
- `tlora26`: TLoRA(2,6) = trm:2 + tr:6 in the paper's shapes, every core random;
- `tlora16`: TLoRA(1,6) = trm:1 (a Kronecker product of the factors' matrices) + tr:6.
Batch 1, float32, input requiring grad (as inside a network), weight frozen; up/out cores random so
nothing is skipped.

Configs are interleaved within each repeat (rotating order) after a warm-up round; per config the
median over repeats, and per repeat the ratio to LoRA r16 (same repeat), so the report gives the
median ratio and its range over repeats.

`bound` is the ratio of multiply-adds (what the arithmetic allows when the chain runs at the frozen
GEMM's rate): frozen = forward + input gradient (2 t I O); a rank-k low-rank part 3 t k (I + O)
(LoRA r16: k = 16; tr:6: k = 36); the transform's chain as `tlora.forms.chain_macs` counts it
(forward, input gradient, core gradients, recomputed intermediates). `chain G/s` is the compiled
chain alone (forward + backward, `tlora.native`) on that layer's factors, `frozen G/s` the frozen
layer's rate; their ratio is how far the kernel is from the GEMM. Used by train_step.py
(`--flux-layers`); runs alone:

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
CONFIGS = ("frozen", "plain16", "lora16", "tlora26", "tlora16")
RESIDUAL_K = {"lora16": 16, "plain16": 16, "tlora26": 36, "tlora16": 36}  # tr:6 -> R^2 = 36 columns
TRANSFORM_RANK = {"tlora26": 2, "tlora16": 1}


def build(out_f: int, in_f: int, seed: int = 0) -> dict[str, Any]:
    """The configs around one frozen Linear(in_f, out_f)."""
    import torch
    from benchmarks.core import Lora, randomised_adapter
    from tlora.adapter import ModuleAdapter
    from tlora.module import TLoRAModule
    gen = torch.Generator().manual_seed(seed)
    base = torch.nn.Linear(in_f, out_f)
    base.requires_grad_(False)
    lora = dict(ModuleAdapter.create((out_f, in_f), "none", "lora:16", "paper", generator=gen).tensors)
    lora["tlora_r.up"] = torch.randn(lora["tlora_r.up"].shape, generator=gen) * 0.01  # not the zero start
    plain = Lora(base, 16, gen)
    plain.up.data.normal_(0.0, 0.01, generator=gen)
    return {"frozen": base, "plain16": plain,
            "lora16": TLoRAModule(base, ModuleAdapter(lora, weight_shape=(out_f, in_f))),
            "tlora26": TLoRAModule(base, randomised_adapter(out_f, in_f, gen)),
            "tlora16": TLoRAModule(base, randomised_adapter(out_f, in_f, gen, "trm:1"))}


def macs(config: str, out_f: int, in_f: int, tokens: int) -> int:
    """Multiply-adds of one forward+backward of `config` (the frozen weight gets no gradient)."""
    from tlora import forms
    from tlora.shapes import factorize
    total = 2 * tokens * in_f * out_f
    if config in RESIDUAL_K:
        total += 3 * tokens * RESIDUAL_K[config] * (in_f + out_f)
    if config in TRANSFORM_RANK:
        total += forms.chain_macs(factorize(in_f), TRANSFORM_RANK[config], tokens)
    return total


def chain_rate(in_f: int, rank: int, tokens: int, repeats: int, clock: Callable[[], float]) -> float | None:
    """Multiply-adds per second of the compiled chain alone (forward + backward, one thread); None without it."""
    import torch
    from tlora import forms, native
    from tlora.functional._trm_chain import _Chain
    from tlora.functional._trm_native import _transposed_ops, native_lib
    from tlora.shapes import factorize
    sizes = factorize(in_f)
    x = torch.randn(tokens, in_f)
    lib = native_lib(x)
    if lib is None or not 3 <= len(sizes) <= native.MAX_CORES:
        return None
    chain = _Chain(sizes, rank)
    gen = torch.Generator().manual_seed(2)
    ops = chain.operands_detached([torch.randn(n, n, rank, rank, generator=gen) / 4 for n in sizes], 1.0)
    ops_t, h, out = _transposed_ops(ops), torch.randn(tokens, in_f), torch.empty(tokens, in_f)
    grads = [torch.zeros_like(op) for op in ops]
    runs = []
    for _ in range(repeats + 1):
        t0 = clock()
        native.chain_forward(lib, sizes, rank, ops, x, out, tokens, in_f, 1, 0.0, 16, 1)
        native.chain_backward(lib, sizes, rank, ops, ops_t, x, h, out, grads, tokens, in_f, 1, 0.0, 16, 1)
        runs.append(clock() - t0)
    return forms.chain_macs(sizes, rank, tokens) / statistics.median(runs[1:])


def run(tokens: int, repeats: int, clock: Callable[[], float] = time.perf_counter, warmup: int = 1,
        log: Callable[[str], None] = print, layers: tuple = LAYERS) -> dict[str, Any]:
    """{layer: {config: {"median_ms", "runs_ms"}, "ratio": {...}, "bound": {...}, "rate": {...}}}."""
    import torch
    results: dict[str, Any] = {}
    for name, out_f, in_f in layers:
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
        row: dict[str, Any] = {c: {"median_ms": statistics.median(v), "runs_ms": v} for c, v in times.items()}
        ratio: dict[str, Any] = {}
        for top in ("tlora26", "tlora16"):
            for low in ("lora16", "plain16"):
                per_rep = [t / lo for t, lo in zip(times[top], times[low])]
                ratio[f"{top}/{low}"] = statistics.median(per_rep)
                ratio[f"{top}/{low} range"] = [min(per_rep), max(per_rep)]
        ratio["lora16/frozen"] = row["lora16"]["median_ms"] / row["frozen"]["median_ms"]
        ratio["form"] = mods["tlora26"].last_form
        row["ratio"] = ratio
        counted = {c: macs(c, out_f, in_f, tokens) for c in CONFIGS}
        row["bound"] = {f"{top}/lora16": counted[top] / counted["lora16"] for top in ("tlora26", "tlora16")}
        frozen_rate = counted["frozen"] / (row["frozen"]["median_ms"] / 1e3)
        rate = chain_rate(in_f, 2, tokens, max(1, repeats // 2), clock)
        row["rate"] = {"frozen_gmacs": frozen_rate / 1e9, "chain_gmacs": None if rate is None else rate / 1e9}
        results[f"{name} {out_f}x{in_f}"] = row
        log(f"  flux {name} {out_f}x{in_f} n={tokens}: " + " ".join(
            f"{c} {row[c]['median_ms']:.1f} ms" for c in CONFIGS)
            + f" | TLoRA(2,6)/LoRA r16 {ratio['tlora26/lora16']:.3f} (bound {row['bound']['tlora26/lora16']:.3f})"
              f" | TLoRA(1,6)/LoRA r16 {ratio['tlora16/lora16']:.3f}")
    return results


def format_table(results: dict[str, Any], tokens: int) -> str:
    """Markdown tables: medians and ratios with their ranges; the bounds and the rates."""
    def cell(r: dict, key: str) -> str:
        lo, hi = r[f"{key} range"]
        return f"**{r[key]:.3f}** ({lo:.3f}-{hi:.3f})"
    lines = [f"Flux wide-input linears, {tokens} tokens, forward+backward (ms, median):",
             "| layer | frozen | plain LoRA r16 | our LoRA r16 | TLoRA(2,6) | TLoRA(1,6) |",
             "|---|---:|---:|---:|---:|---:|"]
    for layer, row in results.items():
        lines.append(f"| {layer} | " + " | ".join(f"{row[c]['median_ms']:.1f}" for c in CONFIGS) + " |")
    lines += ["", "| layer | TLoRA(2,6) / our LoRA r16 | / plain LoRA r16 | bound | TLoRA(1,6) / our LoRA r16 |"
              " / plain LoRA r16 | bound | chain G/s | frozen G/s |",
              "|---|---|---|---:|---|---|---:|---:|---:|"]
    for layer, row in results.items():
        r, b, rate = row["ratio"], row["bound"], row["rate"]
        chain = "-" if rate["chain_gmacs"] is None else f"{rate['chain_gmacs']:.1f}"
        lines.append(f"| {layer} | {cell(r, 'tlora26/lora16')} | {cell(r, 'tlora26/plain16')} | "
                     f"{b['tlora26/lora16']:.3f} | {cell(r, 'tlora16/lora16')} | {cell(r, 'tlora16/plain16')} | "
                     f"{b['tlora16/lora16']:.3f} | {chain} | {rate['frozen_gmacs']:.1f} |")
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
