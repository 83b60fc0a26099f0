"""A whole training step on a full-width Flux block pair: frozen floor, LoRA r16, TLoRA(2,6), TLoRA(1,6).

`benchmarks/flux_layers.py` times Flux's widest-input linears alone, where the transform costs most.
This times what a user's step is made of: ComfyUI 0.33's own Flux classes at full width (hidden 3072),
one double-stream and one single-stream block, attention, modulations, RoPE, the loss, the backward and
the optimizer step (our engine's `train_step`, as the node and the command line run it), with every
config's adapters on the `attn` preset. Random seeded weights, fp32, CPU.

With `--inputs-need-grad` (the default) the denoiser's inputs (latent and text context) require
gradients, as the activations entering every block but the first do in a whole model: there, every
adapted linear's input gradient is computed anyway. Without it, the only double block's q/k/v weights
have nothing trainable upstream, so a LoRA skips their input-gradient GEMM, which TLoRA still needs
(T's gradient is taken from W0^T gy): that is one block of Flux's 57, but half of this pair.

Configs are interleaved within each repeat (rotating order), each suspended (`Trainer.host_view`)
while the others run; per config the median, per repeat the ratio to LoRA r16. Next to the measured
ratio, the multiply-add bound of the adapted linears alone (`flux_layers.macs` over the block pair's
targets: the attention and the rest of the block dilute it further).

    .venv/bin/python benchmarks/flux_step.py --latent 64 --text 128 --repeats 3 --threads 1 --clock thread
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
import flux_layers  # noqa: E402
import train_memory as tm  # noqa: E402  (the Flux block pair's build and our engine's runner)
import train_step as ts  # noqa: E402  (the host set-up)

CONFIGS = ("floor", "lora16", "tlora26", "tlora16")
tm.KINDS.setdefault("tlora16", ("trm:1", "tr:6"))


class Suspended:
    """One of our configs, its adapters out of the model while the others step (train_step.Engine's turn-taking)."""

    _suspend, step = ts.Engine._suspend, ts.Engine.step

    def __init__(self, env: dict[str, Any], kind: str):
        self.trainer = tm.Ours(env, kind, ckpt=False, swap=False).trainer  # built and opened
        self._suspend()


def adapted_linears(env: dict[str, Any]) -> list[tuple[int, int, int]]:
    """(out, in, tokens) of each linear the `attn` preset adapts in the block pair."""
    E = ts.pack("trainer")
    ex, dm = env["ex"], env["dm"]
    image = (ex["size"] // 2) ** 2
    text = ex["context"].shape[1]
    shapes = []
    for name in E.select_targets(dm, "attn"):
        weight = dm.get_submodule(name).weight
        tokens = text if ".txt_" in f".{name}" else image if ".img_" in f".{name}" else image + text
        shapes.append((weight.shape[0], weight.shape[1], tokens))
    return shapes


def bound(env: dict[str, Any], top: str) -> float:
    """Multiply-add ratio top / lora16 over the adapted linears alone."""
    shapes = adapted_linears(env)
    return (sum(flux_layers.macs(top, o, i, t) for o, i, t in shapes)
            / sum(flux_layers.macs("lora16", o, i, t) for o, i, t in shapes))


def run(latent: int, text: int, repeats: int, clock: Callable[[], float], warmup: int = 1,
        log: Callable[[str], None] = print, inputs_need_grad: bool = True) -> dict[str, Any]:
    """{config: {"median_s", "runs_s"}, "ratio": {...}, "bound": {...}, "targets": n}."""
    ts.setup_host("cpu")
    env = tm.build("flux", latent=latent, text=text)
    if inputs_need_grad:
        denoise = env["denoise"]

        def with_input_grads(x: Any, t: Any, c: dict) -> Any:
            cond = {**c, "c_crossattn": c["c_crossattn"].detach().requires_grad_(True)}
            return denoise(x.detach().requires_grad_(True), t, cond)
        env["denoise"] = with_input_grads
    runners = {c: tm.Plain(env, lycoris=False, ckpt=False) if c == "floor" else Suspended(env, c) for c in CONFIGS}
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for rep in range(warmup + repeats):
        for config in CONFIGS[rep % len(CONFIGS):] + CONFIGS[:rep % len(CONFIGS)]:
            t0 = clock()
            runners[config].step()
            elapsed = clock() - t0
            if rep >= warmup:
                times[config].append(elapsed)
            log(f"  {'warm-up' if rep < warmup else f'repeat {rep - warmup + 1}'} {config:8s} {elapsed:7.3f} s")
    out: dict[str, Any] = {c: {"median_s": statistics.median(v), "runs_s": v} for c, v in times.items()}
    out["ratio"], out["bound"] = {}, {}
    for top in ("tlora26", "tlora16"):
        per = [a / b for a, b in zip(times[top], times["lora16"])]
        out["ratio"][top] = {"median": statistics.median(per), "range": [min(per), max(per)]}
        out["bound"][top] = bound(env, top)
    out["targets"], out["hidden"] = len(adapted_linears(env)), env["dm"].hidden_size
    out["inputs_need_grad"] = inputs_need_grad
    return out


def format_table(res: dict[str, Any], latent: int, text: int) -> str:
    """Markdown: step times, and the ratios beside the adapted linears' bound."""
    image = (latent // 2) ** 2
    lines = [f"Flux block pair (1 double + 1 single, hidden {res['hidden']}), {image} image + {text} text tokens, "
             f"`attn` preset ({res['targets']} linears), inputs {'' if res['inputs_need_grad'] else 'not '}"
             "requiring gradients, one training step (s, median):",
             "| floor | LoRA r16 | TLoRA(2,6) | TLoRA(1,6) |", "|---:|---:|---:|---:|",
             "| " + " | ".join(f"{res[c]['median_s']:.3f}" for c in CONFIGS) + " |", "",
             "| config | / LoRA r16 (range) | bound of the adapted linears |", "|---|---|---:|"]
    for top, label in (("tlora26", "TLoRA(2,6)"), ("tlora16", "TLoRA(1,6)")):
        r = res["ratio"][top]
        lines.append(f"| {label} | **{r['median']:.3f}** ({r['range'][0]:.3f}-{r['range'][1]:.3f}) | "
                     f"{res['bound'][top]:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64, help="latent side (pixels / 8); image tokens = (latent/2)^2")
    parser.add_argument("--text", type=int, default=128, help="text tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall")
    parser.add_argument("--inputs-need-grad", action=argparse.BooleanOptionalAction, default=True,
                        help="the denoiser's inputs require gradients, as every block's but the first in a whole model")
    args = parser.parse_args()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        parser.error("--clock thread measures one CPU thread: use it with --threads 1")
    res = run(args.latent, args.text, args.repeats, time.thread_time if args.clock == "thread" else time.perf_counter,
              inputs_need_grad=args.inputs_need_grad)
    print(format_table(res, args.latent, args.text))


if __name__ == "__main__":
    main()
