"""One training step in the diffusers binding against the same step in the ComfyUI binding (issue 15).

Both sides run the same engine (trainer/loop.py `Trainer.train_step`) with the same settings
(TLoRA(2,6): trm:2 + tr:6 on the attention preset, MSE, fp32, batch 1) on a full-size SD1.5
UNet with random weights, built by each host's own class (ComfyUI's `UNetModel` through
`supported_models.SD15`; diffusers' `UNet2DConditionModel` with SD1.5's config), and each side
calls the model through its binding's denoiser (trainer/comfy/model.py `make_denoiser`;
trainer/diffusers/model.py `denoiser`). The two environments cannot share a process (see
tools/diffusers-requirements.txt), so each side is a long-lived child process in its own
virtualenv, and the parent interleaves them: per round, K steps on one side, then K on the
other. Reported: median step time per side over all timed steps, and the ratio.

    .venv-diffusers/bin/python benchmarks/binding_step.py                 # 16x16 latents, 3 rounds x 3 steps
    .venv-diffusers/bin/python benchmarks/binding_step.py --size 32 --rounds 5 --steps 4 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PYTHONS = {"comfyui": ROOT / ".venv" / "bin" / "python", "diffusers": ROOT / ".venv-diffusers" / "bin" / "python"}
SD15_DIFFUSERS = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                      block_out_channels=(320, 640, 1280, 1280),
                      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                      attention_head_dim=8, norm_num_groups=32)


def _settings(trainer_pkg: Any) -> Any:
    return trainer_pkg.TrainSettings(steps=10 ** 9, learning_rate=1e-4, loss="mse", precision="fp32", save_every=0,
                                     transform="trm:2", residual="tr:6", targets="attn")


def _example(trainer_pkg: Any, size: int) -> tuple[Any, Any]:
    import torch
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, size, size, generator=g) * 0.8, torch.randn(1, 77, 768, generator=g)


def _init_(module: Any) -> None:
    """The same explicit init on both sides (ComfyUI's ops skip init): variance 1/fan_in, unit norms."""
    import math
    import torch
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                bound = math.sqrt(3.0 / p[0].numel())
                p.uniform_(-bound, bound, generator=gen)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def comfyui_trainer(size: int) -> Any:
    """The ComfyUI binding's step: ComfyUI's SD1.5 UNet, its sigmas, make_denoiser."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_step  # the ComfyUI-side model builder of the step benchmark
    train_step.setup_host("cpu")
    from harness.pack import pack_module
    E = pack_module("trainer")
    model_mod = pack_module("trainer.comfy.model")
    env = train_step.build("cpu")
    _init_(env["dm"])
    latent, context = _example(E, size)
    dm = env["dm"]
    adapters = E.create_adapters(dm, E.select_targets(dm, "attn"), "trm:2", "tr:6", "paper", 0, "diffusion_model.")
    data = E.TrainData([E.Example(latent, {"c_crossattn": context})])
    schedule = model_mod.schedule_for(env["model"])  # the binding's own: timesteps are the sigmas it takes
    binding = E.Binding([E.AdapterGroup(dm, "diffusion_model.", adapters)], model_mod.make_denoiser(env["model"]),
                        schedule, data, device="cpu", progress_bar=False)
    return E.Trainer(binding, _settings(E))


def diffusers_trainer(size: int) -> Any:
    """The diffusers binding's step: diffusers' UNet2DConditionModel at SD1.5's config, its scheduler, denoiser()."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    import comfyui_tlora.trainer as E
    from comfyui_tlora.trainer.diffusers import model as dmodel
    unet = UNet2DConditionModel(**SD15_DIFFUSERS).eval()
    unet.requires_grad_(False)
    _init_(unet)
    latent, context = _example(E, size)
    group = E.adapter_group(unet, "diffusion_model.", _settings(E))  # the 128 attention projections, as targets() picks
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000)
    data = E.TrainData([E.Example(latent, {"encoder_hidden_states": context})])
    binding = E.Binding([group], dmodel.denoiser(unet, "sd"), dmodel.schedule_for(scheduler), data,
                        device=torch.device("cpu"), progress_bar=False)
    return E.Trainer(binding, _settings(E))


def child(side: str, size: int, threads: int) -> None:
    """Serve `run K` lines on stdin: K timed steps, one JSON line of seconds each."""
    import torch
    torch.set_num_threads(threads)
    trainer = comfyui_trainer(size) if side == "comfyui" else diffusers_trainer(size)
    trainer.open()
    n_modules = len(trainer.modules)
    trainer.train_step()  # warm-up: optimizer state, the per-layer form choice
    print(json.dumps({"ready": True, "modules": n_modules}), flush=True)
    for line in sys.stdin:
        k = int(line.split()[1])
        times = []
        for _ in range(k):
            t0 = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - t0)
        print(json.dumps({"times": times}), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Start both sides, interleave rounds, print the table (or --json)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16, help="latent side (16 = 128 px)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="steps per side per round")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per side")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=sorted(PYTHONS), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child, a.size, a.threads)
        return 0
    env = dict(os.environ, TLORA_AUTOTUNE="0", OMP_NUM_THREADS=str(a.threads), PYTHONWARNINGS="ignore")
    procs = {}
    for side, python in PYTHONS.items():
        if not python.is_file():
            sys.exit(f"no {python}: run `make bootstrap` first")
        procs[side] = subprocess.Popen([str(python), __file__, "--child", side, "--size", str(a.size),
                                        "--threads", str(a.threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True, env=env, cwd=str(ROOT))
    info = {side: json.loads(p.stdout.readline()) for side, p in procs.items()}
    times: dict[str, list[float]] = {side: [] for side in procs}
    for r in range(a.rounds):
        order = list(procs) if r % 2 == 0 else list(reversed(procs))
        for side in order:
            procs[side].stdin.write(f"run {a.steps}\n")
            procs[side].stdin.flush()
            times[side] += json.loads(procs[side].stdout.readline())["times"]
    for p in procs.values():
        p.stdin.close()
        p.wait(timeout=60)
    medians = {side: statistics.median(t) for side, t in times.items()}
    result = {"size": a.size, "threads": a.threads, "rounds": a.rounds, "steps": a.steps,
              "modules": {s: i["modules"] for s, i in info.items()}, "median_s": medians,
              "all_s": times, "ratio_diffusers_over_comfyui": medians["diffusers"] / medians["comfyui"]}
    if a.json:
        print(json.dumps(result))
        return 0
    print(f"training step, SD1.5 UNet, TLoRA(2,6) on attn ({info['comfyui']['modules']} modules), batch 1, "
          f"{a.size}x{a.size} latent, fp32, {a.threads} thread(s); {a.rounds} rounds x {a.steps} steps interleaved")
    print("| binding | median step s | min | max |")
    print("|---|---|---|---|")
    for side in procs:
        print(f"| {side} | {medians[side]:.3f} | {min(times[side]):.3f} | {max(times[side]):.3f} |")
    print(f"diffusers / ComfyUI = {result['ratio_diffusers_over_comfyui']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
