"""Training memory, side by side: what each adapter (and block swap, checkpointing) adds over the frozen floor.

Models (ComfyUI's own classes, random seeded weights, fp32, CPU): `sd15` the full SD1.5 UNet at 16x16
latents (128 px), `flux` a full-width Flux (hidden 3072) with one double- and one single-stream block at
32x32 latents (256 image tokens) and 64 text tokens.
Configs: floor (frozen forward + backward to the input), ours `lora4`, `lora16` (none + lora:r),
`tlora26` TLoRA(2,6), `tlora24` TLoRA*(2,4) on the attention preset, `lycoris4` LyCORIS's LoRA r4 on the
same modules (its default module), `builtin` ComfyUI's TrainLoraNode (SD1.5 only: it needs a whole model;
its own LoRA r8 on every layer, fp32); each plain and with gradient checkpointing (`+ckpt`); ours also with
every block swapped (`+swap`: on a CPU the weights stay in RAM, so this shows that swapping adds nothing
to activations; its device saving is the estimate's weights column, measured on a GPU by benchmarks/gpu.py).

Per config, in its own process (a fresh allocator):
  saved    bytes autograd saves for backward in one training forward (saved-tensor hooks, one count per
           storage, weights and inputs left out): device-independent
  peak     peak RSS over two steady training steps minus RSS after the model was built (1 ms sampling)
  est      our estimate (trainer/estimate.py) of the same (adapter state + activations + workspace), and
           its error against `peak`

    .venv/bin/python benchmarks/train_memory.py                      # both models, every config (~25 min)
    .venv/bin/python benchmarks/train_memory.py --models sd15 --configs floor tlora26 --json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as ts  # noqa: E402  (the host set-up, SD1.5 build, RSS sampling and TrainLoraNode runner)

KINDS = {"lora4": ("none", "lora:4"), "lora16": ("none", "lora:16"), "tlora26": ("trm:2", "tr:6"),
         "tlora24": ("trm:2", "lora:4")}
BASE = ("floor", "lora4", "lora16", "tlora26", "tlora24", "lycoris4", "builtin")
CONFIGS = tuple(c + s for c in BASE for s in ("", "+ckpt")) + tuple(
    c + s for c in KINDS for s in ("+swap", "+swap+ckpt"))
MODELS = ("sd15", "flux")
MIB = 2 ** 20
_hooks: list[Any] = []  # host hooks kept for the (one-config) process's life


# ----- models ---------------------------------------------------------------------------------------
def build(model: str, latent: int = 32, text: int = 64) -> dict[str, Any]:
    """The model, its denoiser call, one example and its repeated blocks (Flux: `latent` px / 8 a side, `text` tokens)."""
    import torch
    E = ts.pack("trainer")
    from harness import tiny_models as tm
    if model == "sd15":
        # The host's own build with its loader's reload registered (0.33's TrainLoraNode deep-clones through it).
        channels = int(os.environ.get("TLORA_MEM_CHANNELS", "320"))  # smaller for a smoke run only
        _, base, patcher = tm._build("SD15", dict(ts.SD15_UNET, model_channels=channels), 0, head_channels=None)
        base.diffusion_model.requires_grad_(False)
        env = {"model": base, "patcher": patcher, "dm": base.diffusion_model, "device": "cpu"}
        ex = ts.example(env, 16)
        dm = env["dm"]
        return {**env, "ex": ex, "cond": {"c_crossattn": ex["context"]},
                "denoise": lambda x, t, c: dm(x, t, context=c["c_crossattn"]),
                "blocks": ts.pack("trainer.comfy.model").checkpoint_blocks(dm)}
    hidden = int(os.environ.get("TLORA_MEM_FLUX_HIDDEN", "3072"))  # smaller for a smoke run only
    cfg, base, patcher = tm._build("Flux", tm._flux_config(hidden=hidden, depth=1, single=1), 0, head_channels=None)
    dm = base.diffusion_model
    dm.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    size = latent
    latent = torch.randn(16, size, size, generator=g) * 0.8
    cond = {"c_crossattn": torch.randn(1, text, 4096, generator=g), "y": torch.randn(1, 768, generator=g)}
    sched = E.Schedule.flow(base.model_sampling.sigmas, 1.0)
    idx = torch.tensor([500])
    noise = torch.randn(1, 16, size, size, generator=g)
    ex = {"latent": latent, "context": cond["c_crossattn"], "sched": sched, "idx": idx, "t": sched.timesteps[idx],
          "x_t": sched.add_noise(latent[None], noise, idx), "target": noise - latent[None], "size": size}

    def denoise(x: Any, t: Any, c: dict) -> Any:
        return dm(x, t, c["c_crossattn"], y=c["y"], guidance=torch.full((x.shape[0],), 3.5))
    # What the ComfyUI binding installs for a run (trainer/comfy/run.py), for every config of this process:
    # the host's training flag, kernels with a backward (RoPE), norms fed copies, base weights visible.
    cm, ha = ts.pack("trainer.comfy.model"), ts.pack("trainer.comfy.host_autograd")
    _hooks.extend([*cm.host_training_mode(), *cm.autograd_safe_norms(dm), *cm.differentiable_kernels(),
                   *ha.base_weights_visible(ts.pack("tlora.module").TLoRAModule)])
    return {"model": base, "patcher": patcher, "dm": dm, "device": "cpu", "ex": ex, "cond": cond, "denoise": denoise,
            "blocks": ts.pack("trainer.comfy.model").checkpoint_blocks(dm)}


# ----- configs ----------------------------------------------------------------------------------------
class Ours:
    """Our engine (trainer/) on the attention preset: a training step per call."""

    def __init__(self, env: dict[str, Any], kind: str, ckpt: bool, swap: bool):
        E = ts.pack("trainer")
        dm, ex = env["dm"], env["ex"]
        transform, residual = KINDS[kind]
        adapters = E.create_adapters(dm, E.select_targets(dm, "attn"), transform, residual, "paper", 0,
                                     "diffusion_model.")
        data = E.TrainData([E.Example(ex["latent"], env["cond"])])
        settings = E.TrainSettings(steps=100000, loss="mse", precision="fp32", save_every=0,
                                   gradient_checkpointing=ckpt, offload_blocks=len(env["blocks"]) if swap else 0)
        binding = E.Binding([E.AdapterGroup(dm, "diffusion_model.", adapters)], env["denoise"], ex["sched"], data,
                            device="cpu", progress_bar=False, checkpoint_modules=env["blocks"])
        self.trainer = E.Trainer(binding, settings)
        self.estimate = self.trainer.estimate_memory()
        self.trainer.open()
        self.env = env

    def saved(self) -> int:
        est = ts.pack("trainer.estimate")
        ex, env = self.env["ex"], self.env
        frozen = [*env["dm"].parameters(), *env["dm"].buffers()]
        offload = self.trainer._offload
        if offload is not None:  # swapped weights live in their CPU copies (the parameters hold placeholders)
            frozen += [master for pairs in offload.masters for _, master in pairs]
        x = ex["x_t"].clone()
        # The binding's denoiser: the swap's own saved-tensor hooks would hide what is saved from ours.
        return est.saved_bytes(lambda: self.trainer.binding.denoiser(x, ex["t"], env["cond"]),
                               [*frozen, x, *env["cond"].values()])[0]

    def step(self) -> None:
        self.trainer.train_step()


class Plain:
    """The floor (no adapter) or LyCORIS's LoRA r4 on the same modules, AdamW, an MSE step per call."""

    def __init__(self, env: dict[str, Any], lycoris: bool, ckpt: bool):
        import torch
        self.env, self.params = env, []
        if ckpt:
            ts.pack("trainer.checkpointing").enable_checkpointing(env["blocks"])
        if lycoris:
            from lycoris import LycorisNetwork, create_lycoris
            E = ts.pack("trainer")
            LycorisNetwork.apply_preset({"target_module": [], "target_name": E.select_targets(env["dm"], "attn")})
            self.net = create_lycoris(env["dm"], 1.0, linear_dim=4, linear_alpha=4, algo="lora")
            self.net.apply_to()
            self.params = list(self.net.parameters())
            self.opt = torch.optim.AdamW(self.params, lr=1e-4, foreach=True)

    def _forward(self) -> Any:
        ex, env = self.env["ex"], self.env
        x = ex["x_t"].clone().requires_grad_(not self.params)
        return env["denoise"](x, ex["t"], env["cond"]), x

    def saved(self) -> int:
        est = ts.pack("trainer.estimate")
        env = self.env
        frozen = [*env["dm"].parameters(), *env["dm"].buffers()]
        holder = {}

        def run() -> Any:
            out, holder["x"] = self._forward()
            return out
        ex = env["ex"]
        return est.saved_bytes(run, [*frozen, ex["x_t"], *env["cond"].values()])[0]

    def step(self) -> None:
        import torch.nn.functional as F
        out, _ = self._forward()
        F.mse_loss(out.float(), self.env["ex"]["target"]).backward()
        if self.params:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


class Builtin:
    """ComfyUI's TrainLoraNode (train_step.py's runner, fp32), its bytes saved counted inside its own step."""

    def __init__(self, env: dict[str, Any], ckpt: bool):
        self.runner = ts.Builtin(env, env["ex"], dtype="fp32")
        self.runner.setup()
        self.ckpt = ckpt

    def saved(self) -> int:
        import comfy_extras.nodes_train as nt
        est = ts.pack("trainer.estimate")
        original = nt.TrainSampler.fwd_bwd
        counts = []

        def fwd_bwd(sampler: Any, *args: Any, **kwargs: Any) -> Any:
            holder = {}

            def run() -> Any:
                holder["out"] = original(sampler, *args, **kwargs)
                return None
            frozen = [*self.runner.env["dm"].parameters()]
            counts.append(est.saved_bytes(run, frozen)[0])
            return holder["out"]
        nt.TrainSampler.fwd_bwd = fwd_bwd
        try:
            self.step()
        finally:
            nt.TrainSampler.fwd_bwd = original
        return counts[0] if counts else 0

    def step(self) -> None:
        import inspect
        import torch
        import comfy.model_management as mm
        runner, ex = self.runner, self.runner.ex
        node = runner.nt.TrainLoraNode
        lat = ex["latent"][None].cpu()
        # Two latents: 0.3.75's TrainLoraNode crashes on one (train_step.py's runner, with checkpointing as asked).
        inputs = dict(model=[runner.env["patcher"]], latents=[{"samples": lat}, {"samples": lat.clone()}],
                      positive=[[[ex["context"].cpu(), {}]]], batch_size=[1], steps=[1],
                      grad_accumulation_steps=[1], learning_rate=[0.0005], rank=[8], optimizer=["AdamW"],
                      loss_function=["MSE"], seed=[0], training_dtype=["fp32"], lora_dtype=["fp32"],
                      algorithm=["LoRA"], gradient_checkpointing=[self.ckpt], existing_lora=["[None]"])
        # Newer hosts' further inputs (bucket and bypass modes, checkpoint depth, offloading...) at their defaults.
        declared = node.INPUT_TYPES()
        for name in inspect.signature(node.execute).parameters:
            spec = {**declared.get("required", {}), **declared.get("optional", {})}.get(name)
            if name not in inputs and spec is not None and len(spec) > 1 and "default" in spec[1]:
                inputs[name] = [spec[1]["default"]]
        with torch.inference_mode():  # as ComfyUI's executor runs it (no timing hooks: memory only)
            node.execute(**inputs)
        mm.load_models_gpu([runner.env["patcher"]], force_full_load=True)


def make(env: dict[str, Any], config: str) -> Any:
    name, *flags = config.split("+")
    ckpt, swap = "ckpt" in flags, "swap" in flags
    if name in KINDS:
        return Ours(env, name, ckpt, swap)
    if name == "builtin":
        return Builtin(env, ckpt)
    return Plain(env, name == "lycoris4", ckpt)


# ----- one config in its own process -------------------------------------------------------------------
def child(model: str, config: str, steps: int = 2) -> dict[str, Any]:
    """saved bytes, peak RSS over steady steps (MiB above the built model), and our estimate where it applies."""
    ts.setup_host("cpu")
    env = build(model)
    ts.trim()
    base = ts._rss_bytes()
    runner = make(env, config)
    saved = runner.saved()
    runner.step()  # lazy optimizer state, forms, scratch: left out of the steady peak, kept counted
    ts.trim()
    with ts.RssSampler() as sampler:
        for _ in range(steps):
            runner.step()
    out: dict[str, Any] = {"model": model, "config": config, "saved_mib": saved / MIB,
                           "peak_mib": (sampler.peak - base) / MIB}
    estimate = getattr(runner, "estimate", None)
    if estimate is not None:
        out["est_mib"] = (estimate.adapter + estimate.activations + estimate.workspace) / MIB
        out["est_saved_mib"] = estimate.activations / MIB
        out["est_device_weights_mib"] = estimate.weights / MIB
    return out


def measure(model: str, config: str) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", model, config]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"model": model, "config": config, "error": res.stderr.strip().splitlines()[-1:]}
    return json.loads(lines[-1])


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table: per model and config, saved and peak MiB, over the floor, ratio to LoRA r16, estimate."""
    lines = ["| model | config | saved MiB | over floor | x LoRA r16's | peak MiB | over floor | x LoRA r16's | "
             "estimate MiB | error |", "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r["model"], r["config"]): r for r in rows}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['config']} | failed: {' '.join(r['error'])[:80]} |")
            continue
        suffix = "+ckpt" if r["config"].endswith("ckpt") else ""
        floor = by.get((r["model"], "floor" + suffix), {})
        ref = by.get((r["model"], "lora16" + suffix), {})
        cells = [r["model"], r["config"]]
        for key in ("saved_mib", "peak_mib"):
            over = r[key] - floor.get(key, math.nan)
            ref_over = ref.get(key, math.nan) - floor.get(key, math.nan)
            cells += [f"{r[key]:.0f}", f"{over:+.0f}", f"{over / ref_over:.2f}" if ref_over > 0 else ""]
        if "est_mib" in r:
            cells += [f"{r['est_mib']:.0f}", f"{(r['est_mib'] - r['peak_mib']) / r['peak_mib'] * 100:+.0f}%"]
        else:
            cells += ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(child(*args._child)), flush=True)
        return
    rows = []
    started = time.time()
    for model in args.models:
        for config in args.configs:
            if config.startswith("builtin") and model != "sd15":
                continue
            rows.append(measure(model, config))
            if not args.json:
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"rows": rows, "seconds": time.time() - started}))
        return
    print(table(rows))
    errors = [abs(r["est_mib"] - r["peak_mib"]) / r["peak_mib"] for r in rows if "est_mib" in r and r["peak_mib"] > 0]
    if errors:
        print(f"\nestimate vs measured peak: median error {statistics.median(errors) * 100:.0f}%, "
              f"largest {max(errors) * 100:.0f}%")
    with contextlib.suppress(Exception):
        print(f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
