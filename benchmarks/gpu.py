"""The GPU check (issue 25, 5): step time and peak device memory of the adapters people compare, on real shapes.

Models (ComfyUI's own classes, random seeded weights, bf16): the SDXL UNet at 128x128 latents (1024 px) and
a Flux transformer (hidden 3072; 19 double + 38 single blocks unless --flux-depth says otherwise) at 64x64
latents (1024 image tokens) with 256 text tokens.
Configs: `tlora26` TLoRA(2,6), `tlora24` TLoRA*(2,4), `lora16` our LoRA r16 (attention preset, our engine,
bf16 autocast, AdamW; fp32 on a CPU), `builtin` ComfyUI's TrainLoraNode (its LoRA r16 on every layer, bf16 training), each
with every block resident and with block swap (ours: offload_blocks = all but two of the blocks; the
node: its own `offloading` input where the host has it). Gradient checkpointing on throughout (what a
12-24 GB card needs at these sizes).

Per config: median step time over --steps steps after one warm-up step, and the peak device memory over
them minus the memory held before the config's set-up (CUDA's allocator peak; on a CPU, peak RSS: the
figures of a CPU run only show the script works); for ours, the memory estimate's adapter + activations +
workspace (trainer/estimate.py, what the run adds to the loaded model) and its error against that peak. Writes a markdown table (--out, else stdout) for
docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/gpu.py --out gpu.md                     # on a GPU machine (~10 min on an H200)
    .venv/bin/python benchmarks/gpu.py --tiny --device cpu --steps 1    # the tiny shapes the test suite runs
"""
from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as ts  # noqa: E402  (host set-up, RSS sampling)

CONFIGS = ("tlora26", "tlora24", "lora16", "builtin")
KINDS = {"tlora26": ("trm:2", "tr:6"), "tlora24": ("trm:2", "lora:4"), "lora16": ("none", "lora:16")}
MODELS = ("sdxl", "flux")


def build(model: str, device: str, tiny: bool, flux_depth: tuple[int, int]) -> dict[str, Any]:
    """A bf16 model of the host's own classes on the device, one example, its blocks."""
    import torch
    from harness import tiny_models as tm
    E = ts.pack("trainer")
    g = torch.Generator().manual_seed(1)
    # bf16 weights and autocast on a GPU; a CPU's autocast has no fp32 policy for the UNet's group norms.
    dtype = torch.bfloat16 if device == "cuda" else None
    if model == "sdxl":
        pooled = 32 if tiny else 1280
        ucfg = tm.sdxl_unet_config(pooled_dim=pooled) if tiny else \
            tm.sdxl_unet_config(320, 2048, pooled, (1, 2, 4), 2, (0, 2, 10))
        _, base, patcher = tm._build("SDXL", ucfg, 0, head_channels=None if tiny else 64, dtype=dtype)
        side, ctx, channels = (8 if tiny else 128), ucfg["context_dim"], 4
        # y: the UNet's whole label vector (our denoiser's input); pooled: the text encoder's part the node takes.
        cond = {"c_crossattn": torch.randn(1, 77, ctx, generator=g), "y": torch.randn(1, ucfg["adm_in_channels"],
                                                                                    generator=g)}
        env_extra = {"pooled": torch.randn(1, pooled, generator=g)}
        dm = base.diffusion_model
        denoise = lambda x, t, c: dm(x, t, context=c["c_crossattn"], y=c["y"])  # noqa: E731
    else:
        cfg = tm._flux_config(hidden=128, depth=1, single=1, context=64, vec=32) if tiny else \
            tm._flux_config(depth=flux_depth[0], single=flux_depth[1])
        _, base, patcher = tm._build("Flux", cfg, 0, head_channels=None, dtype=dtype)
        side, channels = (8 if tiny else 64), 16
        cond = {"c_crossattn": torch.randn(1, 8 if tiny else 256, cfg["context_in_dim"], generator=g),
                "y": torch.randn(1, cfg["vec_in_dim"], generator=g)}
        env_extra = {"pooled": cond["y"]}
        dm = base.diffusion_model

        def denoise(x: Any, t: Any, c: dict) -> Any:
            return dm(x, t, c["c_crossattn"], y=c["y"], guidance=torch.full((x.shape[0],), 3.5, device=x.device))
    dm.to(device)
    dm.requires_grad_(False)
    latent = torch.randn(channels, side, side, generator=g)
    sched = E.Schedule.from_sigmas(base.model_sampling.sigmas, "eps") if model == "sdxl" else \
        E.Schedule.flow(base.model_sampling.sigmas, 1.0)
    cond = {k: v.to(device, dtype or torch.float32) for k, v in cond.items()}
    return {**env_extra, "model": base, "patcher": patcher, "dm": dm, "denoise": denoise, "latent": latent, "cond": cond,
            "sched": sched, "device": device, "blocks": ts.pack("trainer.comfy.model").checkpoint_blocks(dm)}


class Ours:
    """Our engine: bf16 autocast, gradient checkpointing, optional block swap."""

    def __init__(self, env: dict[str, Any], kind: str, offload: bool):
        E = ts.pack("trainer")
        dm = env["dm"]
        transform, residual = KINDS[kind]
        adapters = E.create_adapters(dm, E.select_targets(dm, "attn"), transform, residual, "auto", 0,
                                     "diffusion_model.")
        data = E.TrainData([E.Example(env["latent"], env["cond"])])
        swap = max(len(env["blocks"]) - 2, 1) if offload else 0
        precision = "bf16" if env["device"] == "cuda" else "fp32"
        settings = E.TrainSettings(steps=100000, loss="mse", precision=precision, save_every=0,
                                   gradient_checkpointing=True, offload_blocks=swap)
        binding = E.Binding([E.AdapterGroup(dm, "diffusion_model.", adapters)], env["denoise"], env["sched"], data,
                            device=env["device"], progress_bar=False, checkpoint_modules=env["blocks"])
        self.trainer = E.Trainer(binding, settings)
        self.estimate = self.trainer.estimate_memory()  # before the run, as the node and the CLI ask for it
        # What the ComfyUI binding installs for a run: the host's training flag, kernels with a backward,
        # norms fed copies, adapted layers showing their base's weight (trainer/comfy/run.py).
        cm, ha = ts.pack("trainer.comfy.model"), ts.pack("trainer.comfy.host_autograd")
        self.hooks = [*cm.host_training_mode(), *cm.autograd_safe_norms(dm), *cm.differentiable_kernels(),
                      *ha.base_weights_visible(ts.pack("tlora.module").TLoRAModule)]
        self.trainer.open()

    def step(self) -> None:
        self.trainer.train_step()

    def close(self) -> None:
        self.trainer.close()
        for hook in self.hooks:
            hook.remove()


class Builtin:
    """ComfyUI's TrainLoraNode, one step per call: LoRA r16, bf16, checkpointing, its offloading as asked."""

    def __init__(self, env: dict[str, Any], offload: bool):
        import comfy_extras.nodes_train as nt
        self.env, self.node = env, nt.TrainLoraNode
        declared = self.node.INPUT_TYPES()
        self.specs = {**declared.get("required", {}), **declared.get("optional", {})}
        self.offload = offload
        if offload and "offloading" not in self.specs:
            raise RuntimeError("this host's TrainLoraNode has no offloading input")

    def step(self) -> None:
        import torch
        import comfy.model_management as mm
        env = self.env
        lat = env["latent"][None].float().cpu()
        cond = env["cond"]
        positive = [[[cond["c_crossattn"].float().cpu(), {"pooled_output": env["pooled"].float().cpu()}]]]
        inputs = dict(model=[env["patcher"]], latents=[{"samples": lat}, {"samples": lat.clone()}],
                      positive=positive, batch_size=[1], steps=[1], grad_accumulation_steps=[1],
                      learning_rate=[0.0005], rank=[16], optimizer=["AdamW"], loss_function=["MSE"], seed=[0],
                      training_dtype=["bf16"], lora_dtype=["bf16"], algorithm=["LoRA"],
                      gradient_checkpointing=[True], existing_lora=["[None]"])
        if "offloading" in self.specs:
            inputs["offloading"] = [self.offload]
        for name in inspect.signature(self.node.execute).parameters:
            spec = self.specs.get(name)
            if name not in inputs and spec is not None and len(spec) > 1 and "default" in spec[1]:
                inputs[name] = [spec[1]["default"]]
        with torch.inference_mode():
            self.node.execute(**inputs)
        mm.load_models_gpu([env["patcher"]], force_full_load=True)

    def close(self) -> None:
        pass


def measure(env: dict[str, Any], config: str, offload: bool, steps: int) -> dict[str, Any]:
    """Median step seconds and peak memory (MiB above what was held before the set-up) of one config."""
    import torch
    cuda = env["device"] == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
    sync()
    base = torch.cuda.memory_allocated() if cuda else ts._rss_bytes()
    runner = Builtin(env, offload) if config == "builtin" else Ours(env, config, offload)
    try:
        runner.step()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        with ts.RssSampler() as sampler:
            for _ in range(steps):
                start = time.perf_counter()
                runner.step()
                sync()
                times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() if cuda else sampler.peak) - base
    finally:
        runner.close()
    out = {"step_s": statistics.median(times), "peak_mib": peak / 2 ** 20}
    estimate = getattr(runner, "estimate", None)
    if estimate is not None:  # what the run adds to the loaded model, as `peak` counts it
        out["est_mib"] = (estimate.adapter + estimate.activations + estimate.workspace) / 2 ** 20
    return out


def table(rows: list[dict[str, Any]], device: str) -> str:
    """The markdown table for docs/BENCHMARKS.md (with the ratio to our LoRA r16 on the same model and offload)."""
    lines = [f"| model | config | offload | step (s) | x LoRA r16 | peak {'device' if device == 'cuda' else 'RSS'} "
             f"MiB | x LoRA r16 | estimate MiB (error) |", "|---|---|---|---|---|---|---|---|"]
    ref = {(r["model"], r["offload"]): r for r in rows if r["config"] == "lora16" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['config']} | {'on' if r['offload'] else 'off'} | failed: "
                         f"{r['error'][:90]} | | | | |")
            continue
        base = ref.get((r["model"], r["offload"]))
        ratio = lambda k: f"{r[k] / base[k]:.2f}" if base and base[k] > 0 else ""  # noqa: E731
        # The estimate is printed whenever it was made; its error only against a positive peak (a CPU run at
        # tiny shapes can measure none: its RSS moves by more than such a run adds).
        est = "" if not r.get("est_mib") else f"{r['est_mib']:.0f} " + (
            f"({r['est_mib'] / r['peak_mib'] - 1:+.0%})" if r["peak_mib"] > 0 else "(no peak measured)")
        lines.append(f"| {r['model']} | {r['config']} | {'on' if r['offload'] else 'off'} | {r['step_s']:.3f} | "
                     f"{ratio('step_s')} | {r['peak_mib']:.0f} | {ratio('peak_mib')} | {est} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (the test suite's run: that the script works)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--flux-depth", nargs=2, type=int, default=(19, 38), metavar=("DOUBLE", "SINGLE"))
    ap.add_argument("--out", help="write the markdown table here (and the rows as JSON beside it)")
    args = ap.parse_args(argv)
    ts.setup_host(args.device)
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu.py: no CUDA device here; run with --device cpu --tiny to check the script", file=sys.stderr)
        return 2
    rows = []
    for model in args.models:
        env = build(model, args.device, args.tiny, tuple(args.flux_depth))
        for config in args.configs:
            for offload in (False, True):
                row = {"model": model, "config": config, "offload": offload}
                try:
                    row.update(measure(env, config, offload, args.steps))
                except Exception as err:  # noqa: BLE001  (one config's failure is a row, not the end of the check)
                    row["error"] = f"{type(err).__name__}: {err}".splitlines()[0]
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        del env
        if args.device == "cuda":
            torch.cuda.empty_cache()
    text = table(rows, args.device)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
