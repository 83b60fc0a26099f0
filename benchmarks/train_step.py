"""Training-step benchmark: full-size SD1.5 UNet (random weights), batch 1, CPU (or --device cuda).

Configs (all on the same live UNet, base weights frozen):
  floor      frozen forward + backward to the input (activation gradients only, no adapter):
             the least any adapter training step can cost
  builtin    ComfyUI's own TrainLoraNode with its defaults (LoRA rank 8 on every layer plus
             bias/norm diffs, bf16, gradient checkpointing, AdamW lr 5e-4), driven through
             its own TrainSampler by calling the node (one step per call, timed from the
             step's forward to its progress-bar update, which follows optimizer.step)
  builtin32  the same at fp32 (training and LoRA dtype): on a CPU without native bf16 the
             default's bf16 emulation is no fair figure
  lora4      our engine, transform none + residual lora:4 on the attn preset (128 modules)
  lora16     the same with lora:16 (the memory target's baseline)
  tlora26    our engine, TLoRA(2,6): trm:2 + tr:6 on attn
  tlora24    our engine, TLoRA*(2,4): trm:2 + lora:4 on attn
  dense26    a dense reference TLoRA(2,6) that forms T and W0 T + s Delta every step and runs
             F.linear with that weight (how the paper's reference code trains)

Timing: one process, configs interleaved within each repeat (a warm-up round first), median
of the repeats; CUDA runs synchronise around each step.
Peak memory: CPU: one subprocess per config, latent size and checkpointing setting. Baseline =
RSS after the model is built, just before the config's set-up (glibc malloc_trim'ed so it is
live memory). One first step runs (lazy optimizer state, per-layer form choice), malloc_trim
again, then RSS is sampled every 1 ms from /proc/self/statm over two more steps: peak minus
baseline = what a steady training step needs on top of the model (activations, gradients,
adapter and optimizer state). CUDA: the same with torch.cuda.max_memory_allocated, in one
process. Saved for backward (same subprocess, one more step): the bytes autograd keeps from
the forward to the backward (torch.autograd.graph.saved_tensors_hooks), counted once per
storage, the model's and the adapters' parameters and buffers left out: activation memory.
`--checkpointing off on` measures both with gradient checkpointing of the UNet's transformer
blocks off and on (the floor's blocks checkpointed alike).

`--flux-layers` adds, in the same run, forward+backward of Flux's wide-input linears (frozen,
our LoRA r16, TLoRA(2,6); benchmarks/flux_layers.py) at `--flux-tokens`, same clock and repeats.

    .venv/bin/python benchmarks/train_step.py                  # CPU, 16x16 and 32x32 latents
    .venv/bin/python benchmarks/train_step.py --threads 1 --clock thread --repeats 5 --configs floor lora4 lora16 \
        tlora26 tlora24 --memory-sizes 32 64 --checkpointing off on --flux-layers   # issue 25's side-by-side run
    .venv/bin/python benchmarks/train_step.py --json           # one JSON object on stdout
    .venv/bin/python benchmarks/train_step.py --device cuda --sizes 64 128
    TLORA_COMFY_DIR=.host/ComfyUI-0.12.1 .venv-comfy-0.12/bin/python benchmarks/train_step.py   # on 0.12.1
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import ctypes
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from harness.pack import pack_module  # noqa: E402

COMFY_DIR = Path(os.environ.get("TLORA_COMFY_DIR", ROOT / ".host" / "ComfyUI"))
CONFIGS = ("floor", "builtin", "builtin32", "lora4", "lora16", "tlora26", "tlora24", "dense26")
LABELS = {
    "floor": "(1) frozen fwd+bwd floor",
    "builtin": "(2) ComfyUI TrainLoraNode defaults",
    "builtin32": "(2') TrainLoraNode defaults at fp32",
    "lora4": "(3) ours none+lora:4 attn",
    "lora16": "(3') ours none+lora:16 attn",
    "tlora26": "(4) ours TLoRA(2,6) attn",
    "tlora24": "(4*) ours TLoRA*(2,4) attn",
    "dense26": "(5) dense reference TLoRA(2,6)",
}
ENGINE_KINDS = {"lora4": ("none", "lora:4"), "lora16": ("none", "lora:16"), "tlora26": ("trm:2", "tr:6"), "tlora24": ("trm:2", "lora:4"),
                "dense26": ("trm:2", "tr:6")}
# The SD1.5 UNet exactly as comfy.model_detection reports it for a v1-5 checkpoint.
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}


# ----- host setup ----------------------------------------------------------------------------
def setup_host(device: str) -> None:
    """Make ComfyUI importable (its dir first: our repo has a `nodes/` too) and pick CPU/GPU mode."""
    if not (COMFY_DIR / "main.py").is_file():
        sys.exit(f"no ComfyUI at {COMFY_DIR}: run `make bootstrap` first")
    sys.path.insert(0, str(COMFY_DIR))
    import comfy.options  # noqa: F401  (leaves argument parsing off)
    from comfy.cli_args import args
    args.cpu = device == "cpu"
    import utils  # noqa: F401  (ComfyUI's own package must win over any other `utils`)


def pack(sub: str) -> Any:
    """A module of the pack (imported as a package, without its ComfyUI __init__)."""
    return pack_module(sub)


def sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


# ----- the model and one training example ------------------------------------------------------
def build(device: str, seed: int = 0, channels: int = 320) -> dict[str, Any]:
    """Full-size SD1.5 UNet with explicit seeded init (ComfyUI's ops skip init) and its patcher.

    `channels` < 320 gives a narrower UNet of the same layout, for a quick smoke run only.
    """
    import torch
    import comfy.model_patcher
    import comfy.supported_models as sm
    cfg = sm.SD15(dict(SD15_UNET, model_channels=channels))
    cfg.set_inference_dtype(torch.float32, None)
    dev = torch.device(device)
    model = cfg.get_model({}, "", device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.dim() >= 2:  # in place (no temporaries); variance 1/fan_in keeps activations O(1)
                bound = math.sqrt(3.0 / p[0].numel())
                p.uniform_(-bound, bound, generator=gen)
            elif name.endswith("weight"):
                p.fill_(1.0)  # norm scales
            else:
                p.zero_()
    model.eval()
    model.diffusion_model.requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=dev)
    attn = [n for n, _ in model.diffusion_model.named_modules() if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    assert len(attn) == 128, f"expected SD1.5's 128 attention projections, got {len(attn)}"
    return {"model": model, "patcher": patcher, "dm": model.diffusion_model, "device": device}


def example(env: dict[str, Any], size: int, seed: int = 1) -> dict[str, Any]:
    """One latent (4, size, size), a 77-token context, the schedule; x_t/target for the plain steps."""
    import torch
    E = pack("trainer")
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(4, size, size, generator=g) * 0.8
    context = torch.randn(1, 77, 768, generator=g)
    sched = E.Schedule.from_sigmas(env["model"].model_sampling.sigmas, "eps")
    idx = torch.tensor([500])
    noise = torch.randn(1, 4, size, size, generator=g)
    dev = env["device"]
    return {"latent": latent.to(dev), "context": context.to(dev), "sched": sched, "idx": idx,
            "x_t": sched.add_noise(latent[None], noise, idx).to(dev), "target": noise.to(dev),
            "t": sched.timesteps[idx].to(dev), "size": size}


# ----- runners: setup() once, step() per measurement -------------------------------------------
def checkpoint_blocks(dm: Any) -> list[Any]:
    """The blocks gradient checkpointing wraps: the UNet's transformer blocks (as the ComfyUI binding finds them)."""
    blocks = [m for m in dm.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert len(blocks) == 16, f"expected SD1.5's 16 transformer blocks, got {len(blocks)}"
    return blocks


class Floor:
    """Frozen forward + backward to the input; no adapter, no optimizer."""

    def __init__(self, env: dict[str, Any], ex: dict[str, Any], amp: Any, checkpointing: bool = False):
        self.env, self.ex, self.amp, self.checkpointing = env, ex, amp, checkpointing

    def setup(self) -> None:
        if self.checkpointing:  # for the process's lifetime: memory runs are one config per process
            pack("trainer.checkpointing").enable_checkpointing(checkpoint_blocks(self.env["dm"]))

    def step(self) -> None:
        import torch
        import torch.nn.functional as F
        ex = self.ex
        x = ex["x_t"].detach().clone().requires_grad_(True)
        with self.amp():
            out = self.env["dm"](x, ex["t"], context=ex["context"])
        F.mse_loss(out.float(), ex["target"]).backward()
        del x


class Engine:
    """Our trainer (trainer/) on the attn preset; swapped out between its turns."""

    def __init__(self, env: dict[str, Any], ex: dict[str, Any], kind: str, precision: str,
                 checkpointing: bool = False):
        self.env, self.ex, self.kind, self.precision = env, ex, kind, precision
        self.checkpointing = checkpointing

    def setup(self) -> None:
        E = pack("trainer")
        dm, ex = self.env["dm"], self.ex
        transform, residual = ENGINE_KINDS[self.kind]
        adapters = E.create_adapters(dm, E.select_targets(dm, "attn"), transform, residual, "paper", 0,
                                     "diffusion_model.")
        data = E.TrainData([E.Example(ex["latent"], {"c_crossattn": ex["context"]})])
        settings = E.TrainSettings(steps=100000, learning_rate=1e-4, loss="mse", precision=self.precision,
                                   save_every=0, form=os.environ.get("TLORA_BENCH_FORM", "auto"),
                                   gradient_checkpointing=self.checkpointing)
        denoise = lambda x, t, c: dm(x, t, context=c["c_crossattn"])  # noqa: E731
        binding = E.Binding([E.AdapterGroup(dm, "diffusion_model.", adapters)], denoise, ex["sched"], data,
                            device=self.env["device"], progress_bar=False,
                            checkpoint_modules=checkpoint_blocks(dm) if self.checkpointing else ())
        self.trainer = E.Trainer(binding, settings)
        self.trainer.open()
        self._suspend()

    def _suspend(self) -> None:
        self._view = self.trainer.host_view()
        self._view.__enter__()

    def step(self) -> None:
        self._view.__exit__(None, None, None)
        try:
            self.trainer.train_step()
        finally:
            self._suspend()


class DenseTLoRA:
    """Dense reference: W = W0 T + s Delta formed every forward (T, Delta dense), then F.linear."""

    def __init__(self, base: Any, adapter: Any):
        import torch
        from torch import nn
        self.module = nn.Module()
        self.module.base = base
        tensors = {k: v for k, v in adapter.tensors.items() if k != "tlora_scale"}
        self.module.params = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(v.float().clone().to(
            base.weight.device)) for k, v in tensors.items()})
        self.scale = float(adapter.scale)
        self.n_t = sum(k.startswith("tlora_t.") for k in tensors)
        self.n_out = sum(k.startswith("tlora_r.out.") for k in tensors)
        self.n_in = sum(k.startswith("tlora_r.in.") for k in tensors)
        trm, tr = pack("tlora.functional.trm"), pack("tlora.functional.tr")
        F = torch.nn.functional
        p = self.module.params

        def forward(x: Any) -> Any:
            t = trm.dense([p[f"tlora_t__{d}"] for d in range(self.n_t)])
            delta = tr.dense([p[f"tlora_r__out__{d}"] for d in range(self.n_out)],
                             [p[f"tlora_r__in__{d}"] for d in range(self.n_in)])
            weight = base.weight @ t + self.scale * delta
            return F.linear(x, weight.to(x.dtype), base.bias)
        self.module.forward = forward


class Dense:
    """Training step with DenseTLoRA wrappers (same loss, AdamW, clipping as the engine)."""

    def __init__(self, env: dict[str, Any], ex: dict[str, Any], amp: Any):
        self.env, self.ex, self.amp = env, ex, amp

    def setup(self) -> None:
        import torch
        E = pack("trainer")
        dm = self.env["dm"]
        paths = E.select_targets(dm, "attn")
        adapters = E.create_adapters(dm, paths, "trm:2", "tr:6", "paper", 0)
        self.slots = []
        params = []
        for path in paths:
            parent_path, _, child = path.rpartition(".")
            parent = dm.get_submodule(parent_path)
            wrapper = DenseTLoRA(getattr(parent, child), adapters[path])
            self.slots.append((parent, child, wrapper.module))
            params += list(wrapper.module.params.values())
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)

    def step(self) -> None:
        import torch
        import torch.nn.functional as F
        ex = self.ex
        for parent, child, module in self.slots:
            setattr(parent, child, module)
        try:
            self.opt.zero_grad(set_to_none=True)
            with self.amp():
                out = self.env["dm"](ex["x_t"], ex["t"], context=ex["context"])
            F.mse_loss(out.float(), ex["target"]).backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
        finally:
            for parent, child, module in self.slots:
                setattr(parent, child, module.base)


class Builtin:
    """ComfyUI's TrainLoraNode with its defaults, one step per call, timed inside its own loop."""

    def __init__(self, env: dict[str, Any], ex: dict[str, Any], steps_per_call: int = 1,
                 clock: Callable[[], float] = time.perf_counter, dtype: str = "bf16"):
        # dtype: its default bf16, or fp32 (bf16 on a CPU without native bf16 is no fair figure).
        self.env, self.ex, self.steps_per_call, self.clock, self.dtype = env, ex, steps_per_call, clock, dtype
        self.times: list[float] = []

    _original_fwd_bwd: Any = None  # TrainSampler's own, kept once (two runners must not wrap it twice)

    def setup(self) -> None:
        import comfy_extras.nodes_train as nt
        self.nt = nt
        if Builtin._original_fwd_bwd is None:
            Builtin._original_fwd_bwd = nt.TrainSampler.fwd_bwd
        original = Builtin._original_fwd_bwd
        marks = self.marks = {}

        def timed_fwd_bwd(sampler: Any, *args: Any, **kwargs: Any) -> Any:
            sync(self.env["device"])
            marks.setdefault("start", self.clock())
            return original(sampler, *args, **kwargs)
        self._timed_fwd_bwd = timed_fwd_bwd

        def hook(value: Any, total: Any, preview: Any, node_id: Any = None, prompt_id: Any = None) -> None:
            sync(self.env["device"])  # the bar moves right after optimizer.step()
            if "start" in marks:
                self.times.append(self.clock() - marks.pop("start"))
        self._hook = hook

    def _install(self) -> None:
        """This runner's timing hooks (each Builtin runner times its own calls)."""
        import comfy.utils
        self.nt.TrainSampler.fwd_bwd = self._timed_fwd_bwd
        comfy.utils.set_progress_bar_global_hook(self._hook)

    def step(self) -> None:
        import torch
        import comfy.model_management as mm
        ex = self.ex
        lat = ex["latent"][None].cpu()
        # Two latent inputs: 0.3.75's TrainLoraNode crashes on a single one (UnboundLocalError multi_res).
        latents = [{"samples": lat}, {"samples": lat.clone()}]
        positive = [[[ex["context"].cpu(), {}]]]
        node = self.nt.TrainLoraNode
        inputs = dict(model=[self.env["patcher"]], latents=latents, positive=positive, batch_size=[1],
                      steps=[self.steps_per_call], grad_accumulation_steps=[1], learning_rate=[0.0005],
                      rank=[8], optimizer=["AdamW"], loss_function=["MSE"], seed=[0], training_dtype=[self.dtype],
                      lora_dtype=[self.dtype], algorithm=["LoRA"], gradient_checkpointing=[True],
                      existing_lora=["[None]"])
        if "bypass_mode" in inspect.signature(node.execute).parameters:  # 0.12's V3 node: two more inputs
            inputs.update(bucket_mode=[False], bypass_mode=[False])
        self._install()
        with torch.inference_mode():  # as ComfyUI's executor runs it
            node.execute(**inputs)
        # Its weight wrappers stay on the modules until the next load: load the plain model.
        mm.load_models_gpu([self.env["patcher"]], force_full_load=True)
        left = [m for m in self.env["dm"].modules() if getattr(m, "weight_function", None)]
        assert not left, "TrainLoraNode's weight wrappers are still attached"

    def last_time(self) -> float:
        return self.times[-1]


def make_runner(name: str, env: dict[str, Any], ex: dict[str, Any], precision: str,
                clock: Callable[[], float] = time.perf_counter, checkpointing: bool = False) -> Any:
    import torch
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def amp() -> Any:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(env["device"], dtype=dtype)
    if name == "floor":
        return Floor(env, ex, amp, checkpointing)
    if name in ("builtin", "builtin32"):
        return Builtin(env, ex, clock=clock, dtype="fp32" if name == "builtin32" else "bf16")
    if name == "dense26":
        return Dense(env, ex, amp)
    return Engine(env, ex, name, precision, checkpointing)


# ----- memory -------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Peak RSS sampled every `interval` seconds in a thread (torch releases the GIL in its ops)."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self._stop = interval, _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def trim() -> None:
    """Hand freed heap back to the OS so the baseline RSS is live memory only (glibc)."""
    import gc
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def saved_for_backward(dm: Any, step: Callable[[], None]) -> int:
    """Bytes `step()` saves for backward: once per storage, the model's and adapters' parameters and buffers left out."""
    import torch
    resident = {t.untyped_storage().data_ptr() for t in [*dm.parameters(), *dm.buffers()]}
    kept: dict[int, int] = {}

    def pack_hook(t: Any) -> Any:
        key = t.untyped_storage().data_ptr()
        if key not in resident:
            kept[key] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        step()
    return sum(kept.values())


def child_memory(name: str, size: int, device: str, precision: str, channels: int = 320,
                 steps: int = 2, checkpointing: bool = False) -> dict[str, float]:
    """Run in a fresh process: the peak memory (MB) a steady training step of one config needs.

    Baseline: before the config's set-up. One first step (lazy optimizer state, per-layer
    form choice, scratch buffers) is left out of the peak but what it keeps stays counted;
    the peak is taken over the next `steps` steps. TrainLoraNode runs set-up and its steps
    in one call, so its peak includes its first step.
    """
    import torch
    env = build(device, channels=channels)
    ex = example(env, size)
    runner = make_runner(name, env, ex, precision, checkpointing=checkpointing)
    builtin = isinstance(runner, Builtin)
    if builtin:
        runner.steps_per_call = steps + 1
    if device == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated()
        runner.setup()
        if not builtin:
            runner.step()
            sync(device)
        torch.cuda.reset_peak_memory_stats()
        for _ in range(1 if builtin else steps):
            runner.step()
        sync(device)
        return {"peak_mb": (torch.cuda.max_memory_allocated() - base) / 2 ** 20}
    trim()
    base = _rss_bytes()
    if builtin:
        with RssSampler() as sampler:
            runner.setup()
            runner.step()
        return {"peak_mb": (sampler.peak - base) / 2 ** 20, "base_mb": base / 2 ** 20}
    runner.setup()
    runner.step()
    trim()  # hand back what only the first step needed; what it keeps stays resident
    kept = _rss_bytes() - base
    with RssSampler() as sampler:
        for _ in range(steps):
            runner.step()
    out = {"peak_mb": (sampler.peak - base) / 2 ** 20, "kept_mb": kept / 2 ** 20, "base_mb": base / 2 ** 20}
    if isinstance(runner, (Floor, Engine)):
        out["saved_mb"] = saved_for_backward(env["dm"], runner.step) / 2 ** 20
    return out


def measure_memory(name: str, size: int, args: argparse.Namespace, checkpointing: bool = False) -> dict[str, float]:
    """peak_mb (and saved_mb) of one config in its own process (CPU RSS needs a fresh allocator)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", name, "--sizes", str(size), "--device",
           args.device, "--precision", args.precision, "--model-channels", str(args.model_channels),
           "--checkpointing", "on" if checkpointing else "off"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"memory run {name}@{size} failed:\n{res.stderr[-3000:]}")
    return json.loads(lines[-1])


# ----- the benchmark ---------------------------------------------------------------------------------
def log(args: argparse.Namespace, msg: str) -> None:
    if not args.json:
        print(msg, flush=True)
    else:
        print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    env = build(args.device, channels=args.model_channels)
    log(args, f"  UNet built in {time.perf_counter() - started:.1f} s")
    results: dict[str, dict[str, dict[str, float]]] = {c: {} for c in args.configs}
    for size in args.sizes:
        ex = example(env, size)
        clock = time.thread_time if args.clock == "thread" else time.perf_counter
        runners = {name: make_runner(name, env, ex, args.precision, clock) for name in args.configs}
        for name, runner in runners.items():
            runner.setup()
        times: dict[str, list[float]] = {name: [] for name in args.configs}
        builtin_here = args.builtin_sizes is None and size == args.sizes[0] or size in (args.builtin_sizes or ())
        for rep in range(args.warmup + args.repeats):
            for name, runner in runners.items():
                if isinstance(runner, Builtin):
                    # 20-40x slower than the rest: measured once or a few times, never warmed up
                    # (its per-call set-up is outside the timed part anyway).
                    if not builtin_here or not args.warmup <= rep < args.warmup + args.builtin_repeats:
                        continue
                sync(args.device)
                t0 = clock()
                runner.step()
                sync(args.device)
                elapsed = runner.last_time() if isinstance(runner, Builtin) else clock() - t0
                if rep >= args.warmup:
                    times[name].append(elapsed)
                log(args, f"  latent {size}x{size} {'warm-up' if rep < args.warmup else f'repeat {rep - args.warmup + 1}'}"
                          f" {name:8s} {elapsed:7.3f} s")
        for name in args.configs:
            if times[name]:
                results[name][str(size)] = {"step_s": statistics.median(times[name]), "runs": times[name]}
        for name, runner in runners.items():
            if isinstance(runner, Engine):
                runner._view.__exit__(None, None, None)
                runner.trainer.close()
    if args.flux_layers:
        flux = pack_module_file("flux_layers")
        clock = time.thread_time if args.clock == "thread" else time.perf_counter
        results["_flux"] = flux.run(args.flux_tokens, args.repeats, clock, args.warmup, lambda m: log(args, m))
    if not args.no_memory:
        for size in args.memory_sizes or args.sizes:
            for ckpt in args.checkpointing:
                for name in [c for c in args.configs if c in args.memory_configs]:
                    got = measure_memory(name, size, args, checkpointing=ckpt == "on")
                    slot = results[name].setdefault(str(size), {})
                    slot.setdefault("memory", {})[ckpt] = got
                    if ckpt == "off":
                        slot["peak_mb"] = got["peak_mb"]
                    log(args, f"  memory latent {size}x{size} checkpointing {ckpt:3s} {name:8s} "
                              f"peak {got['peak_mb']:8.1f} MB  saved for backward {got.get('saved_mb', float('nan')):8.1f} MiB")
    return results


def pack_module_file(name: str) -> Any:
    """A sibling benchmark module (benchmarks/<name>.py) imported by path."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def per_repeat(results: dict[str, Any], size: str, num: str, den: str) -> list[float]:
    """num / den step time within each repeat (the configs ran back to back in it)."""
    a, b = results.get(num, {}).get(size, {}).get("runs"), results.get(den, {}).get(size, {}).get("runs")
    return [x / y for x, y in zip(a, b)] if a and b else []


def memory_extras(results: dict[str, Any], size: str, ckpt: str, key: str) -> dict[str, float]:
    """Per config: its memory figure minus the floor's (same size, checkpointing and measure)."""
    def get(name: str) -> float | None:
        return results.get(name, {}).get(size, {}).get("memory", {}).get(ckpt, {}).get(key)
    floor = get("floor")
    if floor is None:
        return {}
    return {name: get(name) - floor for name in results if not name.startswith("_") and get(name) is not None}


def targets(results: dict[str, Any], sizes: list[int]) -> list[dict[str, Any]]:
    """The issue's targets, per latent size and TLoRA variant (met or not, with the ratio)."""
    out = []

    def add(size: str, what: str, ratio: float | None, ok: bool | None, goal: str) -> None:
        out.append({"latent": int(size), "target": what, "ratio": ratio, "goal": goal, "met": ok})
    for size in map(str, sizes):
        def t(name: str, key: str = "step_s") -> float | None:
            return results.get(name, {}).get(size, {}).get(key)
        for variant in ("tlora26", "tlora24"):
            ours = t(variant)
            if ours is None:
                continue
            tag = "TLoRA(2,6)" if variant == "tlora26" else "TLoRA*(2,4)"
            if t("lora4"):
                r = ours / t("lora4")
                runs = per_repeat(results, size, variant, "lora4")
                spread = f" (repeats {min(runs):.3f}-{max(runs):.3f})" if runs else ""
                add(size, f"{tag} step / lora:4 step{spread}", r, r <= 1.10, "<= 1.10 (issue 25)")
            if t("builtin"):
                r = ours / t("builtin")
                add(size, f"{tag} step / TrainLoraNode step", r, r < 1.0, "< 1.0")
            if t("builtin32"):
                r = ours / t("builtin32")
                add(size, f"{tag} step / TrainLoraNode fp32 step", r, r < 1.0, "< 1.0")
            if t("floor"):
                r = ours / t("floor")
                add(size, f"{tag} step / frozen fwd+bwd floor", r, r <= 1.3, "<= 1.3")
            if t("dense26") and variant == "tlora26":
                r = t("dense26") / ours
                add(size, "dense reference step / TLoRA(2,6) step", r, r >= 1.5, ">= 1.5")
            if t(variant, "peak_mb") is not None and t("lora4", "peak_mb"):
                r = t(variant, "peak_mb") / t("lora4", "peak_mb")
                add(size, f"{tag} peak memory / lora:4 peak memory", r, r <= 1.15, "<= 1.15")
            for ckpt in ("off", "on"):
                # With checkpointing on, what the adapters save lives inside the checkpointed blocks and is
                # recomputed there (not seen by the outer hooks): peak RSS is the figure that counts.
                measures = (("saved_mb", "saved for backward"), ("peak_mb", "peak RSS"))[ckpt == "on":]
                for key, what in measures:
                    extra = memory_extras(results, size, ckpt, key)
                    if variant in extra and extra.get("lora16", 0) > 0.5:
                        r = extra[variant] / extra["lora16"]
                        add(size, f"{tag} {what} over floor / lora:16's (ckpt {ckpt})", r, r <= 1.2, "<= 1.2 (issue 25)")
    for layer, row in results.get("_flux", {}).items():
        r, span = row["ratio"], row["ratio"]["tlora26/lora16 range"]
        out.append({"latent": 0, "target": f"Flux {layer} TLoRA(2,6) / LoRA r16 (repeats {span[0]:.3f}-"
                                           f"{span[1]:.3f}; multiply-add bound {row['bound']['tlora26/lora16']:.3f})",
                    "ratio": r["tlora26/lora16"], "goal": "<= 1.10 (issue 25)", "met": r["tlora26/lora16"] <= 1.10})
    return out


def report(args: argparse.Namespace, results: dict[str, Any], checks: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps({"meta": meta, "configs": results, "targets": checks}, indent=None))
        return
    print(f"\nSD1.5 UNet (width {meta['model_channels']}, random weights), batch 1, {meta['device']}, "
          f"{meta['precision']}, torch {meta['torch']}, {meta['threads']} threads, {meta['clock']} clock, "
          f"{args.repeats} repeats (median), {meta['wall_s']} s, load avg {meta['load_avg_start']:.1f}"
          f"->{meta['load_avg_end']:.1f}")
    header = f"{'config':40s}" + "".join(f"{f'{s}x{s} step s':>14s}{'peak MB':>10s}" for s in args.sizes)
    print(header)
    for name in [c for c in args.configs if c in results]:
        row = f"{LABELS[name]:40s}"
        for s in map(str, args.sizes):
            r = results[name].get(s, {})
            step = f"{r['step_s']:.3f}" if "step_s" in r else "-"
            mem = f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-"
            row += f"{step:>14s}{mem:>10s}"
        print(row)
    for size in map(str, args.memory_sizes or args.sizes):
        if not any("memory" in results[c].get(size, {}) for c in args.configs if c in results):
            continue
        print(f"\nmemory, latent {size}x{size} (MiB; over floor = minus the frozen floor's figure in the same setting):")
        print("| config | ckpt | saved for backward | over floor | peak RSS | over floor |")
        print("|---|---|---:|---:|---:|---:|")
        for ckpt in args.checkpointing:
            saved, peak = memory_extras(results, size, ckpt, "saved_mb"), memory_extras(results, size, ckpt, "peak_mb")
            for name in [c for c in args.configs if c in results]:
                m = results[name].get(size, {}).get("memory", {}).get(ckpt)
                if m is None:
                    continue
                sv = f"{m['saved_mb']:.1f} | {saved.get(name, 0):+.1f}" if "saved_mb" in m else "- | -"
                print(f"| {LABELS[name]} | {ckpt} | {sv} | {m['peak_mb']:.0f} | {peak.get(name, 0):+.0f} |")
    if results.get("_flux"):
        print("\n" + pack_module_file("flux_layers").format_table(results["_flux"], args.flux_tokens))
    print("\ntargets:")
    for c in checks:
        where = f"{c['latent']:>3d}x{c['latent']:<3d}" if c["latent"] else "  flux "
        print(f"  {where} {c['target']:70s} {c['ratio']:.3f}  goal {c['goal']:24s} "
              f"{'MET' if c['met'] else 'NOT MET'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32], help="latent sizes (pixels / 8)")
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=None,
                        help="latent sizes for the memory runs (default: --sizes)")
    parser.add_argument("--memory-configs", nargs="+", default=["floor", "lora4", "lora16", "tlora26", "tlora24"],
                        choices=CONFIGS, help="configs whose peak memory is measured (a subprocess each)")
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off"],
                        help="memory runs with gradient checkpointing of the transformer blocks off and/or on")
    parser.add_argument("--flux-layers", action="store_true",
                        help="also time Flux's wide-input linears (frozen, LoRA r16, TLoRA(2,6)) in this run")
    parser.add_argument("--flux-tokens", type=int, default=1024, help="tokens for --flux-layers")
    parser.add_argument("--builtin-sizes", type=int, nargs="+", default=None,
                        help="latent sizes at which TrainLoraNode is timed (default: the first size)")
    parser.add_argument("--builtin-repeats", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="autocast for our configs, the floor and the dense reference (auto: fp32 on CPU, "
                             "bf16 on CUDA); TrainLoraNode always uses its default (bf16)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--model-channels", type=int, default=320,
                        help="UNet width (320 = SD1.5; smaller only to smoke-test this script)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="thread: CPU time of the training thread (with --threads 1), robust on a busy machine")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.clock == "thread" and (args.threads != 1 or args.device != "cpu"):
        parser.error("--clock thread measures one CPU thread: use it with --device cpu --threads 1")
    if args.precision == "auto":
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    setup_host(args.device)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging
    logging.disable(logging.WARNING)
    if args._child:
        print(json.dumps(child_memory(args._child, args.sizes[0], args.device, args.precision,
                                      args.model_channels, checkpointing=args.checkpointing == ["on"])))
        return
    meta = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "precision": args.precision, "repeats": args.repeats,
            "model_channels": args.model_channels, "clock": args.clock,
            "load_avg_start": os.getloadavg()[0],
            "command": " ".join(["benchmarks/train_step.py", *sys.argv[1:]])}
    started = time.time()
    results = run(args)
    meta["wall_s"] = round(time.time() - started, 1)
    meta["load_avg_end"] = os.getloadavg()[0]
    report(args, results, targets(results, args.sizes), meta)


if __name__ == "__main__":
    main()
