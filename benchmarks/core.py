"""Per-layer forward+backward cost of TLoRA on SD1.5's 128 attention projections, or on Flux's linears.

For every distinct (out, in) shape of SD1.5's attention modules (to_q/k/v/out of each
self- and cross-attention: C x C, and C x 768 for cross-attention k/v; C = 320 x5 blocks,
640 x5, 1280 x6), this times one forward+backward, batch 1, with the input requiring grad
(as inside a network) and a frozen weight, of:

  frozen   the frozen linear alone
  lora     + LoRA r4 (plain x @ down.T @ up.T, up zero-init, down random, scale 1/sqrt(4))
  auto     + TLoRA(2,6) (trm:2 + tr:6) as TLoRAModule applies it by default (form auto)
  factored / merged / dense   the same module with its transform form forced
  torch    the factored form on the pure-torch engine (TLORA_NATIVE=0: no compiled chain,
           tlora/native), i.e. what runs where no C compiler is available
  ref      + TLoRA(2,6) the reference code's way: T and W0 T (and Delta) formed every step
           from the cores, back-propagated through the full weight
  wside    (information only, not a form of the module) W0 T formed every step in factored
           form (trm.weight_times_t, O*I*sum(n_d)R^2-ish), back-propagated through the full
           weight; the residual applied activation-side
  tonly    (on request) TLoRA(2,6)'s transform alone (form auto, no residual): auto - tonly is
           the residual's share, tonly - frozen the transform's

Cores are random (not the identity start) so no shortcut applies. Variants are interleaved
(rotating order) for each shape, the median per variant is kept, and per-layer medians are
summed over the 128 layers (each distinct shape timed once, times its count).

`--set flux`: Flux.1's linears at hidden 3072 instead (per double-stream block, x19: img and
txt attn.qkv 9216x3072, attn.proj 3072x3072, mlp.0 12288x3072, mlp.2 3072x12288; per
single-stream block, x38: linear1 21504x3072 (fused qkv + MLP in), linear2 3072x15360),
the img stream at `--flux-tokens` image tokens (default 4096: a 1024 px image), the txt stream
at the text tokens (default 512, T5), single blocks at both together; TLoRA(2,6) against
LoRA r16 (`--lora-rank`, default 16 here: what Flux users train), summed over the 228 layers.

    .venv/bin/python benchmarks/core.py [--tokens 1024 4096] [--device cuda] [--json]
    .venv/bin/python benchmarks/core.py --set flux [--flux-tokens 4096 512] --variants frozen lora auto
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tlora import forms, native  # noqa: E402
from tlora import shapes as shapes_mod  # noqa: E402
from tlora.adapter import ModuleAdapter  # noqa: E402
from tlora.functional import tr, trm  # noqa: E402
from tlora.module import TLoRAModule  # noqa: E402

TEXT_DIM, TEXT_TOKENS = 768, 77
# (channels, transformer blocks at that width) of SD1.5's UNet.
LEVELS = ((320, 5), (640, 5), (1280, 6))
VARIANTS = ("frozen", "lora", "auto", "factored", "torch", "merged", "dense", "ref", "wside")
# Not in the default list: TLoRA's transform alone (residual none), to split its cost from the residual's.
EXTRA_VARIANTS = ("tonly",)


# Flux.1 (dev/schnell): hidden 3072, 19 double-stream and 38 single-stream blocks, MLP ratio 4.
FLUX_HIDDEN, FLUX_DOUBLE, FLUX_SINGLE = 3072, 19, 38
FLUX_LINEARS = (("attn.qkv", 3 * FLUX_HIDDEN, FLUX_HIDDEN), ("attn.proj", FLUX_HIDDEN, FLUX_HIDDEN),
                ("mlp.0", 4 * FLUX_HIDDEN, FLUX_HIDDEN), ("mlp.2", FLUX_HIDDEN, 4 * FLUX_HIDDEN))


def layer_shapes(realistic: bool) -> list[dict]:
    """Distinct (out, in, kind) shapes with their module counts (128 in all)."""
    shapes = []
    for channels, blocks in LEVELS:
        shapes.append({"out": channels, "in": channels, "kind": "CxC", "count": 6 * blocks, "text": False})
        shapes.append({"out": channels, "in": TEXT_DIM, "kind": "Cx768", "count": 2 * blocks, "text": realistic})
    assert sum(s["count"] for s in shapes) == 128
    return shapes


def flux_shapes(image_tokens: int, text_tokens: int) -> list[dict]:
    """Flux's adapted linears: double-block img/txt streams and single-block linear1/linear2, with counts and tokens."""
    shapes = []
    for stream, n_tok in (("img", image_tokens), ("txt", text_tokens)):
        for name, out_f, in_f in FLUX_LINEARS:
            shapes.append({"out": out_f, "in": in_f, "kind": f"{stream}_{name}", "count": FLUX_DOUBLE,
                           "tokens": n_tok})
    joint = image_tokens + text_tokens
    shapes.append({"out": 3 * FLUX_HIDDEN + 4 * FLUX_HIDDEN, "in": FLUX_HIDDEN, "kind": "linear1",
                   "count": FLUX_SINGLE, "tokens": joint})
    shapes.append({"out": FLUX_HIDDEN, "in": FLUX_HIDDEN + 4 * FLUX_HIDDEN, "kind": "linear2",
                   "count": FLUX_SINGLE, "tokens": joint})
    return shapes


def randomised_adapter(out_f: int, in_f: int, gen: torch.Generator, transform: str = "trm:2") -> ModuleAdapter:
    """TLoRA(R,6) (transform trm:R, default R = 2) on a (out, in) weight with every core random (trained-looking)."""
    adapter = ModuleAdapter.create((out_f, in_f), transform, "tr:6", "paper", generator=gen)
    tensors = dict(adapter.tensors)
    for key, value in tensors.items():
        if key.startswith("tlora_t."):
            rank = value.shape[-1]
            tensors[key] = value + 0.1 * torch.randn(value.shape, generator=gen) / rank
        elif key.startswith("tlora_r.out."):
            tensors[key] = torch.randn(value.shape, generator=gen) / math.sqrt(value.shape[-1])
    return ModuleAdapter(tensors, weight_shape=(out_f, in_f))


class Lora(nn.Module):
    """Frozen linear + LoRA of a given rank as plain matmuls (scale 1/sqrt(rank))."""

    def __init__(self, base: nn.Linear, rank: int, gen: torch.Generator):
        super().__init__()
        self.base = base
        fan_in = base.weight.shape[1]
        bound = 1 / math.sqrt(fan_in)
        self.down = nn.Parameter((torch.rand(rank, fan_in, generator=gen) * 2 - 1) * bound)
        self.up = nn.Parameter(torch.zeros(base.weight.shape[0], rank))
        self.scale = 1 / math.sqrt(rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.down.t()) @ self.up.t() * self.scale


class Reference(nn.Module):
    """The reference code's way: W = W0 T + s Delta formed from the cores every step."""

    def __init__(self, base: nn.Linear, adapter: ModuleAdapter):
        super().__init__()
        self.base = base
        self.t_cores = nn.ParameterList([nn.Parameter(c.clone()) for c in adapter.transform_cores])
        self.out_cores = nn.ParameterList([nn.Parameter(c.clone()) for c in adapter.out_cores])
        self.in_cores = nn.ParameterList([nn.Parameter(c.clone()) for c in adapter.in_cores])
        self.scale = adapter.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = trm.dense(list(self.t_cores))
        delta = tr.dense(list(self.out_cores), list(self.in_cores))
        weight = self.base.weight @ t + self.scale * delta
        return F.linear(x, weight, self.base.bias)


class WeightSide(nn.Module):
    """W = W0 T from the cores in factored form every step, plus the residual as x V U^T."""

    def __init__(self, module: TLoRAModule):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        weight = trm.weight_times_t(m.base.weight, m._cores(x.dtype))
        up, down = m.residual_factors(x.dtype)
        return F.linear(x, weight, m.base.bias) + (x @ down) @ (up * m.scale).t()


def build(shape: dict, device: torch.device, seed: int, lora_rank: int = 4) -> dict[str, nn.Module]:
    """Every variant for one layer shape (sharing one frozen base)."""
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(shape["in"], shape["out"])
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=gen) / math.sqrt(shape["in"]))
    base.requires_grad_(False)
    adapter = randomised_adapter(shape["out"], shape["in"], gen)
    t_only = ModuleAdapter({k: v for k, v in adapter.tensors.items() if k.startswith("tlora_t.") or k == "tlora_scale"},
                           weight_shape=(shape["out"], shape["in"]))
    mods = {
        "frozen": base,
        "tonly": TLoRAModule(base, t_only, form="auto"),
        "lora": Lora(base, lora_rank, gen),
        "auto": TLoRAModule(base, adapter, form="auto"),
        "factored": TLoRAModule(base, adapter, form="factored"),
        "torch": TLoRAModule(base, adapter, form="factored"),
        "merged": TLoRAModule(base, adapter, form="merged"),
        "dense": TLoRAModule(base, adapter, form="dense"),
        "ref": Reference(base, adapter),
        "wside": WeightSide(TLoRAModule(base, adapter, form="factored")),
    }
    return {k: m.to(device) for k, m in mods.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    """One forward+backward; x is a leaf requiring grad, as inside a network."""
    for p in module.parameters():
        p.grad = None
    x.grad = None
    module(x).backward(grad)


class Engine:
    """Context: variant "torch" runs with the compiled chain switched off (TLORA_NATIVE=0)."""

    def __init__(self, variant: str):
        self.off = variant == "torch"
        self.saved: str | None = None

    def __enter__(self) -> "Engine":
        if self.off:
            self.saved = os.environ.get(native.ENV_NATIVE)
            os.environ[native.ENV_NATIVE] = "0"
        return self

    def __exit__(self, *exc) -> None:
        if self.off:
            if self.saved is None:
                os.environ.pop(native.ENV_NATIVE, None)
            else:
                os.environ[native.ENV_NATIVE] = self.saved


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes the forward keeps for the backward (unique storages, x's own excluded)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() != x.untyped_storage().data_ptr() and not isinstance(t, nn.Parameter):
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    del out
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    return sum(v for k, v in seen.items() if k not in params)


def time_shape(shape: dict, tokens: int, device: torch.device, repeats: int, variants: list[str],
               seed: int, clock=time.perf_counter, lora_rank: int = 4) -> dict:
    """Median (and min) seconds of each variant for one shape, interleaved repeats."""
    mods = build(shape, device, seed, lora_rank)
    n_tok = shape["tokens"] if "tokens" in shape else TEXT_TOKENS if shape["text"] else tokens
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1, n_tok, shape["in"], generator=gen).to(device).requires_grad_(True)
    grad = torch.randn(1, n_tok, shape["out"], generator=gen).to(device)
    for name in variants:  # warm-up; "auto" measures and caches its form here
        with Engine(name):
            step(mods[name], x, grad)
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(repeats):
        order = variants[rep % len(variants):] + variants[:rep % len(variants)]
        for name in order:
            with Engine(name):
                sync(device)
                start = clock()
                step(mods[name], x, grad)
                sync(device)
                times[name].append(clock() - start)
    result = {"tokens": n_tok, "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
              "min_ms": {k: 1e3 * min(v) for k, v in times.items()}, "auto_form": mods["auto"].last_form}
    mem = {}
    for name in variants:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            with Engine(name):
                step(mods[name], x, grad)
            sync(device)
            mem[name] = torch.cuda.max_memory_allocated(device) - before
        else:
            with Engine(name):
                mem[name] = saved_bytes(mods[name], x)
    result["memory_bytes"] = mem
    result["memory_kind"] = "cuda peak during fwd+bwd" if device.type == "cuda" else "saved for backward"
    return result


def run(tokens_list: list[int], device: torch.device, repeats: int, realistic: bool, variants: list[str],
        log=print, clock_name: str = "wall", shape_set: str = "sd15", lora_rank: int = 4,
        flux_tokens: tuple[int, int] = (4096, 512)) -> dict:
    """All shapes at every token count (Flux: one image + text token setting); totals and targets."""
    report = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "dtype": "float32", "batch": 1, "repeats": repeats, "realistic_text_tokens": realistic,
              "clock": clock_name, "native": native.status(), "set": shape_set, "lora_rank": lora_rank,
              "by_tokens": {}}
    clock = time.thread_time if clock_name == "thread" else time.perf_counter
    settings = [(f"{flux_tokens[0]}+{flux_tokens[1]}", flux_shapes(*flux_tokens))] if shape_set == "flux" else \
        [(str(t), layer_shapes(realistic)) for t in tokens_list]
    for label, shapes in settings:
        tokens = int(label.split("+")[0])
        rows = []
        totals = {k: 0.0 for k in variants}
        totals_min = {k: 0.0 for k in variants}
        for i, shape in enumerate(shapes):
            res = time_shape(shape, tokens, device, repeats, variants, seed=1000 + i, clock=clock, lora_rank=lora_rank)
            for k in variants:
                totals[k] += shape["count"] * res["median_ms"][k]
                totals_min[k] += shape["count"] * res["min_ms"][k]
            rows.append({**{k: shape[k] for k in ("out", "in", "kind", "count")}, **res})
            log(f"  tokens {label} {shape['kind']} {shape['out']}x{shape['in']} x{shape['count']} (n={res['tokens']}, "
                f"auto={res['auto_form']}): " + " ".join(f"{k} {res['median_ms'][k]:.2f}" for k in variants))
        entry = {"layers": rows, "total_ms": totals, "total_min_ms": totals_min,
                 "layer_count": sum(s["count"] for s in shapes)}
        if "lora" in totals and "auto" in totals:
            ratio = totals["auto"] / totals["lora"]
            entry["auto_over_lora"] = ratio
            entry["target_1_5x_lora"] = ratio <= 1.5
            entry["stretch_1_3x_lora"] = ratio <= 1.3
        if "ref" in totals and "auto" in totals:
            entry["auto_over_ref"] = totals["auto"] / totals["ref"]
            entry["faster_than_ref"] = totals["auto"] < totals["ref"]
        report["by_tokens"][label] = entry
    report["auto_cache"] = {"|".join(map(str, k)): v for k, v in forms.cached_choices().items()}
    return report


def transform_macs(in_features: int, rank: int = 2) -> int:
    """Multiply-adds per token of T's factored forward on the paper shapes: I (n_1 R^2 + middle n_d R^3 + n_D R^2)."""
    factors = shapes_mod.factorize(in_features, "paper")
    per = [n * rank ** (2 if d in (0, len(factors) - 1) else 3) for d, n in enumerate(factors)]
    return in_features * sum(per)


def format_report(report: dict) -> str:
    """A human-readable summary (markdown tables)."""
    rank = report.get("lora_rank", 4)
    lines = [f"device {report['device']}, torch {report['torch']}, {report['threads']} threads, float32, batch 1, "
             f"{report['repeats']} interleaved repeats, median per layer, summed over the set's layers "
             f"(set {report.get('set', 'sd15')}), clock {report['clock']}",
             f"compiled chain (tlora.native): {report.get('native', '?')}"]
    for tokens, entry in report["by_tokens"].items():
        variants = list(entry["total_ms"])
        n_layers = entry.get("layer_count", 128)
        lines.append("")
        lines.append(f"tokens {tokens}:")
        lines.append("| shape (out x in) | count | auto form | " + " | ".join(variants) + " |")
        lines.append("|---|---|---|" + "---|" * len(variants))
        for row in entry["layers"]:
            name = f"{row['kind']} " if report.get("set") == "flux" else ""
            lines.append(f"| {name}{row['out']}x{row['in']} (n={row['tokens']}) | {row['count']} | {row['auto_form']} | "
                         + " | ".join(f"{row['median_ms'][k]:.2f}" for k in variants) + " |")
        lines.append(f"| **sum over {n_layers} layers (ms)** | {n_layers} | | "
                     + " | ".join(f"**{entry['total_ms'][k]:.1f}**" for k in variants) + " |")
        lines.append("| sum of per-layer minima (ms) | | | "
                     + " | ".join(f"{entry['total_min_ms'][k]:.1f}" for k in variants) + " |")
        if "auto_over_lora" in entry:
            r = entry["auto_over_lora"]
            lines.append(f"TLoRA(auto) / LoRA r{rank} = {r:.2f}x: target <= 1.5x "
                         f"{'MET' if r <= 1.5 else 'NOT met'}, stretch <= 1.3x {'MET' if r <= 1.3 else 'NOT met'}")
        if "auto_over_ref" in entry:
            lines.append(f"TLoRA(auto) / reference (W0 T every step) = {entry['auto_over_ref']:.2f}x: faster "
                         f"{'MET' if entry['faster_than_ref'] else 'NOT met'}")
        if {"frozen", "lora", "auto", "tonly"} <= set(variants):
            lines.append("")
            lines.append("where the adapters' time goes (ms over frozen, summed over each shape's layers; modelled T "
                         "forward multiply-adds per token as % of the frozen forward's):")
            lines.append(f"| shape | LoRA r{rank} | TLoRA transform (tonly - frozen) | TLoRA residual (auto - tonly) "
                         "| T MACs / frozen MACs |")
            lines.append("|---|---|---|---|---|")
            for row in entry["layers"]:
                m, c = row["median_ms"], row["count"]
                share = 100.0 * transform_macs(row["in"]) / (row["out"] * row["in"])
                lines.append(f"| {row['kind']} {row['out']}x{row['in']} | {c * (m['lora'] - m['frozen']):.0f} | "
                             f"{c * (m['tonly'] - m['frozen']):.0f} | {c * (m['auto'] - m['tonly']):.0f} | "
                             f"{share:.1f}% |")
        biggest = max(entry["layers"], key=lambda row: row["out"] * row["in"])
        mem = biggest.get("memory_bytes")
        if mem:
            lines.append(f"memory, {biggest['out']}x{biggest['in']} layer ({biggest.get('memory_kind', '')}): "
                         + ", ".join(f"{k} {v / 2 ** 20:.1f} MiB" for k, v in mem.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--realistic", action="store_true",
                        help=f"cross-attention k/v see {TEXT_TOKENS} text tokens instead of --tokens")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + EXTRA_VARIANTS)
    parser.add_argument("--set", choices=("sd15", "flux"), default="sd15", dest="shape_set",
                        help="sd15: SD1.5's 128 attention projections at --tokens; flux: Flux.1's linears")
    parser.add_argument("--flux-tokens", type=int, nargs=2, default=[4096, 512], metavar=("IMAGE", "TEXT"),
                        help="--set flux: image and text tokens (single blocks see both)")
    parser.add_argument("--lora-rank", type=int, default=None, help="LoRA baseline rank (default: 4 sd15, 16 flux)")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="wall: perf_counter; thread: this thread's CPU time (needs --threads 1; "
                             "robust to other processes taking the CPU, not to their cache/memory traffic)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        parser.error("--clock thread measures one thread: use it with --threads 1")
    if args.clock == "thread" and args.device != "cpu":
        parser.error("--clock thread is for --device cpu")
    device = torch.device(args.device)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    rank = args.lora_rank or (16 if args.shape_set == "flux" else 4)
    report = run(args.tokens, device, args.repeats, args.realistic, list(args.variants), log, args.clock,
                 args.shape_set, rank, tuple(args.flux_tokens))
    report["command"] = " ".join([os.path.basename(sys.executable)] + sys.argv)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
