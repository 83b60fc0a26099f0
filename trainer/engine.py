"""Host-agnostic TLoRA training: a denoiser, a noise schedule, cached data in; an adapter file out.

The engine knows nothing about nodes or ComfyUI. It is given:
* `groups`: the live modules to adapt (a root nn.Module, the file prefix of its modules and
  {dotted path: ModuleAdapter}); adapters are attached activation-side with
  tlora.module.attach, so base weights are never modified, copied or trained;
* `denoiser(x_t, timestep, cond) -> prediction` in the model's own target space
  (eps, v or flow velocity) and the matching `Schedule`;
* `TrainData`: latents and text conditionings computed once by the caller (cached).

Losses: denoising MSE on the model's own target, or DCO
(-log sigmoid(-beta (L_model - L_ref)), the reference being the same model with every
adapter at strength 0, computed under no_grad, so no second model is held in memory),
plus optional prior preservation. AdamW, torch lr schedulers, grad clipping, gradient
accumulation, gradient checkpointing, autocast, seed-determinism, atomic checkpoints
with a safetensors training-state sidecar (never pickle) for exact resume.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import re
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import Tensor, nn

try:  # a console bar is nice to have, never required
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

from ..tlora import format as tformat
from ..tlora.adapter import ModuleAdapter
from ..tlora.errors import TLoRAError
from ..tlora.module import TLoRAModule, attach, detach

Cond = dict[str, Tensor]
Denoiser = Callable[[Tensor, Tensor, Cond], Tensor]

PREDICTIONS = ("eps", "v", "flow")
LOSSES = ("mse", "dco")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")
TARGET_PRESETS = ("attn", "attn-ff", "all-linear")
STATE_VERSION = "1"
STATE_SUFFIX = ".tlora-state"


class TrainingError(TLoRAError):
    """Training cannot start or continue as asked (bad settings, data, or resume file)."""


class TrainingDiverged(TrainingError):
    """The loss (or the gradient) became NaN/inf; the last good adapter was kept."""


# ----- noise schedule ---------------------------------------------------------------------
@dataclass
class Schedule:
    """A training noise schedule: x_t = a_t x0 + b_t noise, and what the model predicts.

    eps / v: discrete DDPM schedule (a_t = sqrt(alphas_cumprod), b_t = sqrt(1 - alphas_cumprod)),
    timestep passed to the model = the index. flow: rectified flow, a_t = 1 - s_t, b_t = s_t,
    target noise - x0, timestep = s_t * multiplier.
    """

    prediction: str
    signal: Tensor  # a_t per index (float64)
    noise: Tensor  # b_t per index (float64)
    timesteps: Tensor  # what the denoiser receives for each index (float32)

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise TrainingError(f"unknown prediction type {self.prediction!r}; expected one of {PREDICTIONS}")

    @classmethod
    def discrete(cls, alphas_cumprod: Tensor, prediction: str = "eps") -> "Schedule":
        """DDPM schedule from alphas_cumprod (index t -> timestep t)."""
        a = alphas_cumprod.detach().double().cpu()
        return cls(prediction, a.sqrt(), (1 - a).clamp_min(0).sqrt(), torch.arange(len(a), dtype=torch.float32))

    @classmethod
    def from_sigmas(cls, sigmas: Tensor, prediction: str = "eps") -> "Schedule":
        """DDPM schedule from k-diffusion sigmas (sigma = sqrt((1 - a) / a))."""
        s = sigmas.detach().double().cpu()
        return cls.discrete(1.0 / (1.0 + s * s), prediction)

    @classmethod
    def flow(cls, sigmas: Tensor, multiplier: float = 1000.0) -> "Schedule":
        """Rectified-flow schedule from its sigmas in (0, 1]."""
        s = sigmas.detach().double().cpu()
        return cls("flow", 1 - s, s, (s * multiplier).float())

    def __len__(self) -> int:
        return len(self.timesteps)

    def _coef(self, values: Tensor, idx: Tensor, like: Tensor) -> Tensor:
        return values[idx.cpu()].to(like.device, torch.float32).view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: Tensor, noise: Tensor, idx: Tensor) -> Tensor:
        """x_t for clean latents x0, noise and schedule indices."""
        return self._coef(self.signal, idx, x0) * x0 + self._coef(self.noise, idx, x0) * noise

    def target(self, x0: Tensor, noise: Tensor, idx: Tensor) -> Tensor:
        """What the model should predict at these indices."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "v":
            return self._coef(self.signal, idx, x0) * noise - self._coef(self.noise, idx, x0) * x0
        return noise - x0

    def split(self, x_t: Tensor, pred: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(x0, noise) implied by a prediction at x_t (used by the sampler)."""
        a, b = self._coef(self.signal, idx, x_t), self._coef(self.noise, idx, x_t)
        if self.prediction == "eps":
            return (x_t - b * pred) / a.clamp_min(1e-8), pred
        if self.prediction == "v":
            return a * x_t - b * pred, b * x_t + a * pred
        return x_t - b * pred, x_t + a * pred


# ----- data ---------------------------------------------------------------------------------
@dataclass
class Example:
    """One training item: a clean latent (C, h, w) and its cached conditioning (batch 1)."""

    latent: Tensor
    cond: Cond
    caption: str = ""


@dataclass
class TrainData:
    """Instance examples and optional prior-preservation (class) examples."""

    instance: list[Example]
    prior: list[Example] = field(default_factory=list)
    # Prior preservation with generated class images: how many and from which conditioning.
    generate_prior: int = 0
    prior_cond: Cond | None = None
    prior_uncond: Cond | None = None
    prior_shape: tuple[int, ...] | None = None


def collate_conds(conds: Sequence[Cond]) -> Cond:
    """Concatenate batch-1 conditionings along the batch axis.

    Token sequences of different lengths (long prompts are 154, 231... tokens) are repeated
    to their least common multiple, as ComfyUI does: repeating a whole key/value sequence
    leaves cross-attention's output unchanged.
    """
    out: Cond = {}
    for key in conds[0]:
        parts = [c[key] for c in conds]
        if all(p.dim() == 3 for p in parts) and len({p.shape[1] for p in parts}) > 1:
            lcm = math.lcm(*(p.shape[1] for p in parts))
            parts = [p.repeat(1, lcm // p.shape[1], 1) for p in parts]
        out[key] = torch.cat(parts, 0)
    return out


def bucket_sizes(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) buckets of about resolution^2 pixels, sides multiples of `step`."""
    area = resolution * resolution
    sizes = set()
    width = step
    while width <= resolution * max_ratio:
        height = int(area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_ratio:
            sizes.add((width, height))
        width += step
    sizes.add((resolution // step * step or step,) * 2)
    return sorted(sizes)


def choose_size(width: int, height: int, resolution: int, buckets: bool) -> tuple[int, int]:
    """Training size (w, h) for an image: the square resolution, or its closest aspect bucket."""
    if not buckets:
        return resolution, resolution
    aspect = math.log(width / height)
    return min(bucket_sizes(resolution), key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))


def fit_image(image: Tensor, width: int, height: int) -> Tensor:
    """Resize (H, W, C) in [0, 1] to cover (width, height), then center-crop to exactly that."""
    src_h, src_w = image.shape[0], image.shape[1]
    scale = max(width / src_w, height / src_h)
    new_w, new_h = max(width, round(src_w * scale)), max(height, round(src_h * scale))
    chw = image.movedim(-1, 0)[None].float()
    if (new_h, new_w) != (src_h, src_w):
        # antialias keeps downscaled subjects free of aliasing (bicubic overshoot is clamped).
        chw = F.interpolate(chw, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return chw[0, :, top:top + height, left:left + width].movedim(0, -1).clamp(0, 1)


def prepare_images(images: Sequence[Tensor], resolution: int, buckets: bool = False) -> list[Tensor]:
    """Each (H, W, C) image resized + center-cropped to the resolution (or its aspect bucket)."""
    out = []
    for image in images:
        width, height = choose_size(int(image.shape[1]), int(image.shape[0]), resolution, buckets)
        out.append(fit_image(image[..., :3], width, height))
    return out


# ----- which modules ----------------------------------------------------------------------
_GROUP_PATTERNS = {
    "attn": re.compile(r"(^|\.)attn[12]\.(to_q|to_k|to_v|to_out\.0)$"),
    "ff": re.compile(r"(^|\.)ff\.net\.(0\.proj|2)$"),
    "proj": re.compile(r"(^|\.)(proj_in|proj_out)$"),
    "conv": re.compile(r"(^|\.)(in_layers\.2|out_layers\.3|skip_connection|op|upsample\.conv|"
                       r"[0-9]+\.conv)$"),
    "te_attn": re.compile(r"(^|\.)self_attn\.(q_proj|k_proj|v_proj|out_proj)$"),
    "te_mlp": re.compile(r"(^|\.)mlp\.(fc1|fc2)$"),
}
_PRESET_GROUPS = {"attn": ("attn",), "attn-ff": ("attn", "ff"), "all-linear": ("attn", "ff", "proj")}
_TE_PRESET_GROUPS = {"attn": ("te_attn",), "attn-ff": ("te_attn", "te_mlp"), "all-linear": ("te_attn", "te_mlp")}


def select_targets(root: nn.Module, preset: str = "attn", with_convs: bool = False,
                   text_encoder: bool = False) -> list[str]:
    """Dotted paths under root for a targets preset (the rules of tlora.arch, by module name)."""
    if preset not in TARGET_PRESETS:
        raise TrainingError(f"unknown targets preset {preset!r}; expected one of {TARGET_PRESETS}")
    groups = _TE_PRESET_GROUPS[preset] if text_encoder else _PRESET_GROUPS[preset] + (("conv",) if with_convs else ())
    paths = []
    for name, module in root.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() not in (2, 4):
            continue
        if weight.dim() == 4 and getattr(module, "groups", 1) != 1:
            continue
        if any(_GROUP_PATTERNS[g].search(name) for g in groups):
            paths.append(name)
    return paths


def create_adapters(root: nn.Module, paths: Sequence[str], transform: str = "trm:2", residual: str = "tr:6",
                    shapes: str = "paper", seed: int = 0, prefix: str = "") -> dict[str, ModuleAdapter]:
    """Fresh adapters (identity transform, zero residual) for each path, seeded."""
    generator = torch.Generator().manual_seed(int(seed))
    out = {}
    for path in paths:
        weight = root.get_submodule(path).weight
        out[path] = ModuleAdapter.create(tuple(weight.shape), transform, residual, shapes,
                                         generator=generator, name=prefix + path)
    return out


@dataclass
class AdapterGroup:
    """Modules of one root to adapt: file keys are `prefix + path`."""

    root: nn.Module
    prefix: str
    adapters: dict[str, ModuleAdapter]


# ----- configuration ----------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Every knob of a run (defaults follow the paper's subject-driven setting)."""

    steps: int = 500
    learning_rate: float = 1e-4
    batch_size: int = 1
    grad_accum: int = 1
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    loss: str = "mse"
    dco_beta: float = 1000.0
    prior_loss_weight: float = 1.0
    weight_decay: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    seed: int = 0
    save_every: int = 0
    sample_every: int = 0
    sample_steps: int = 20
    sample_cfg: float = 5.0
    form: str = "auto"
    progress_bar: bool = True

    def validate(self) -> None:
        """Raise TrainingError naming the first setting that cannot work."""
        checks = [
            (self.steps >= 1, f"steps must be >= 1 (got {self.steps})"),
            (self.learning_rate > 0, f"learning rate must be > 0 (got {self.learning_rate})"),
            (self.batch_size >= 1, f"batch size must be >= 1 (got {self.batch_size})"),
            (self.grad_accum >= 1, f"gradient accumulation must be >= 1 (got {self.grad_accum})"),
            (self.lr_schedule in LR_SCHEDULES, f"lr schedule must be one of {LR_SCHEDULES}"),
            (0 <= self.warmup_steps < max(self.steps, 1) or self.warmup_steps == 0,
             f"warm-up ({self.warmup_steps}) must be shorter than the run ({self.steps} steps)"),
            (self.loss in LOSSES, f"loss must be one of {LOSSES} (got {self.loss!r})"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS} (got {self.precision!r})"),
            (self.save_every >= 0 and self.sample_every >= 0, "save_every/sample_every must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(message)


# ----- run-state registry (read by the web UI's /tlora/runs route) -------------------------
class RunRegistry:
    """Latest state, loss history and summary of recent runs, by run id (thread-safe).

    A record: run_id, status (running/done/cancelled/diverged/failed), started, finished,
    whatever start() was given (steps, start_step, loss_kind, path, and from a host: node,
    prompt_id, file_name), `state` (the latest step's figures plus the latest `sample`),
    `history` (step, loss, lr per step) and `summary` (steps_done, final_loss, partial,
    file_name when this run saved a file, message when it stopped on an error).
    """

    def __init__(self, keep: int = 32):
        self._lock = threading.Lock()
        self._runs: dict[str, dict[str, Any]] = {}
        self._keep = keep

    def start(self, run_id: str, **info: Any) -> None:
        """Register a run as running."""
        with self._lock:
            self._runs[run_id] = {"run_id": run_id, "status": "running", "started": time.time(),
                                  "history": [], "state": {}, "summary": {}, **info}
            while len(self._runs) > self._keep:
                self._runs.pop(next(iter(self._runs)))

    def update(self, run_id: str, state: Mapping[str, Any]) -> None:
        """Record a step: latest state plus one (step, loss, lr) history point."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return
            previous = run["state"]
            run["state"] = dict(state)
            if "sample" not in state and "sample" in previous:
                run["state"]["sample"] = previous["sample"]  # the latest sample stays until a newer one
            run["history"].append({k: state[k] for k in ("step", "loss", "lr") if k in state})

    def set_sample(self, run_id: str, sample: Mapping[str, Any]) -> None:
        """Record the run's newest sample (e.g. a host's image reference with its step)."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None:
                run["state"] = {**run["state"], "sample": dict(sample)}

    def finish(self, run_id: str, status: str, **summary: Any) -> None:
        """Mark a run done/cancelled/diverged/failed with a summary."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None:
                run["status"] = status
                run["summary"] = dict(summary)
                run["finished"] = time.time()

    def get(self, run_id: str) -> dict[str, Any] | None:
        """A copy of one run's record (None if unknown)."""
        with self._lock:
            run = self._runs.get(run_id)
            return None if run is None else {**run, "history": list(run["history"])}

    def runs(self) -> list[dict[str, Any]]:
        """Short records of every kept run, oldest first."""
        with self._lock:
            return [{k: v for k, v in r.items() if k != "history"} for r in self._runs.values()]


RUNS = RunRegistry()


# ----- reports ------------------------------------------------------------------------------
@dataclass
class StepReport:
    """What observers get after every optimizer step."""

    run_id: str
    step: int
    steps: int
    loss: float
    mse: float
    lr: float
    step_time: float
    eta: float
    grad_norm: float
    sample: Tensor | None = None  # (H, W, 3) in [0, 1], only on steps that made one
    sample_latent: Tensor | None = None


@dataclass
class TrainResult:
    """A finished (or stopped) run."""

    run_id: str
    adapters: dict[str, ModuleAdapter]
    steps_done: int
    steps: int
    final_loss: float | None
    history: list[dict[str, float]]
    path: str | None
    partial: bool
    metadata: dict[str, str]
    last_sample: Tensor | None = None


# ----- atomic files ---------------------------------------------------------------------------
def state_path_for(adapter_path: str) -> str:
    """The training-state sidecar beside an adapter file (`name.safetensors` -> `name.tlora-state`).

    Not `.safetensors`, so ComfyUI's `loras` list never offers it as an adapter.
    """
    root, ext = os.path.splitext(adapter_path)
    return (root if ext.lower() == ".safetensors" else adapter_path) + STATE_SUFFIX


def atomic_write(path: str, data: bytes) -> None:
    """Write bytes beside the target and rename over it: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tlora-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass
class TrainState:
    """What exact resume needs besides the adapter: optimizer, scheduler, RNG, step."""

    step: int
    run_token: str
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    generator: Tensor
    param_names: list[str]
    scaler: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """safetensors bytes: tensors as tensors, everything else as JSON metadata (no pickle)."""
        tensors: dict[str, Tensor] = {"rng.generator": self.generator.clone()}
        state = {}
        for index, entry in self.optimizer["state"].items():
            plain = {}
            for key, value in entry.items():
                if isinstance(value, Tensor):
                    tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous().clone()
                else:
                    plain[key] = value
            state[str(index)] = plain
        meta = {
            "tlora.state.version": STATE_VERSION,
            "step": str(self.step),
            "run_token": self.run_token,
            "param_names": json.dumps(self.param_names),
            "optimizer.param_groups": json.dumps(_jsonable(self.optimizer["param_groups"])),
            "optimizer.plain_state": json.dumps(_jsonable(state)),
            "scheduler": json.dumps(_jsonable(self.scheduler)),
            "scaler": json.dumps(_jsonable(self.scaler)) if self.scaler is not None else "null",
            "extra": json.dumps(_jsonable(self.extra)),
        }
        return _st_save(tensors, metadata=meta)

    @classmethod
    def read(cls, path: str) -> "TrainState":
        """Parse a sidecar written by to_bytes (TrainingError if it is not one)."""
        try:
            with open(path, "rb") as f:
                raw = f.read()
            meta = tformat.read_header(path)[0].get("__metadata__", {})
            tensors = _st_load(raw)
            if meta.get("tlora.state.version") != STATE_VERSION:
                raise ValueError(f"unknown state version {meta.get('tlora.state.version')!r}")
            plain = json.loads(meta["optimizer.plain_state"])
            state: dict[int, dict[str, Any]] = {}
            for key, value in tensors.items():
                if key.startswith("optim."):
                    _, index, name = key.split(".", 2)
                    state.setdefault(int(index), {})[name] = value
            for index, entry in plain.items():
                state.setdefault(int(index), {}).update(entry)
            return cls(step=int(meta["step"]), run_token=meta["run_token"],
                       optimizer={"state": state, "param_groups": json.loads(meta["optimizer.param_groups"])},
                       scheduler=json.loads(meta["scheduler"]), generator=tensors["rng.generator"],
                       param_names=json.loads(meta["param_names"]), scaler=json.loads(meta["scaler"]),
                       extra=json.loads(meta["extra"]))
        except (OSError, KeyError, ValueError, TLoRAError) as err:
            raise TrainingError(f"training state {path} is unreadable ({err}); delete it to continue "
                                f"from the adapter's weights only") from None


# ----- sampling ----------------------------------------------------------------------------
@torch.no_grad()
def ddim_sample(denoiser: Denoiser, schedule: Schedule, cond: Cond, uncond: Cond | None, shape: Sequence[int],
                steps: int = 20, cfg: float = 5.0, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None) -> Tensor:
    """Deterministic DDIM (eta 0) from pure noise: a preview/class-image sampler for any schedule."""
    x = torch.randn(tuple(shape), generator=generator).to(device)
    batch = x.shape[0]
    indices = torch.linspace(len(schedule) - 1, 0, max(int(steps), 1)).round().long().unique_consecutive()
    c = collate_conds([cond] * batch)
    both = collate_conds([cond] * batch + [uncond] * batch) if uncond is not None and cfg != 1 else None
    for i, index in enumerate(indices):
        idx = index.repeat(batch)
        t = schedule.timesteps[idx].to(device)
        with _autocast(x.device.type, autocast_dtype):
            if both is not None:
                out = denoiser(torch.cat([x, x]), torch.cat([t, t]), {k: v.to(device) for k, v in both.items()})
                pos, neg = out.float().chunk(2)
                pred = neg + cfg * (pos - neg)
            else:
                pred = denoiser(x, t, {k: v.to(device) for k, v in c.items()}).float()
        x0, eps = schedule.split(x, pred, idx)
        if i + 1 == len(indices):
            return x0
        nxt = indices[i + 1].repeat(batch)
        x = schedule.add_noise(x0, eps, nxt)
    return x


def _autocast(device_type: str, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype)


_PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----- gradient checkpointing ----------------------------------------------------------------
def _checkpoint_forward(original: Callable) -> Callable:
    def forward(*args: Any, **kwargs: Any) -> Any:
        # Only when building a graph: no-grad passes (DCO reference, previews) run plainly.
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(original, *args, use_reentrant=False, **kwargs)
        return original(*args, **kwargs)
    return forward


def enable_checkpointing(modules: Sequence[nn.Module]) -> list[tuple[nn.Module, Any]]:
    """Recompute each module's activations in backward; returns what restore_checkpointing needs."""
    undo = []
    for module in modules:
        had = module.__dict__.get("forward")
        module.forward = _checkpoint_forward(module.forward)
        undo.append((module, had))
    return undo


def restore_checkpointing(undo: Sequence[tuple[nn.Module, Any]]) -> None:
    """Undo enable_checkpointing."""
    for module, had in undo:
        if had is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = had


# ----- the trainer ---------------------------------------------------------------------------
def _lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up then constant or cosine decay, from torch's own schedulers."""
    lrs = torch.optim.lr_scheduler
    warm = int(config.warmup_steps)
    after = max(config.steps - warm, 1)
    main = (lrs.CosineAnnealingLR(optimizer, T_max=after, eta_min=0.0) if config.lr_schedule == "cosine"
            else lrs.ConstantLR(optimizer, factor=1.0, total_iters=0))
    if warm <= 0:
        return main
    warmup = lrs.LinearLR(optimizer, start_factor=1.0 / (warm + 1), end_factor=1.0, total_iters=warm)
    return lrs.SequentialLR(optimizer, [warmup, main], milestones=[warm])


def _fast_forward(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> None:
    """Advance a fresh schedule to `steps` (resuming without its saved state)."""
    with warnings.catch_warnings():  # "step() before optimizer.step()" is intended here
        warnings.simplefilter("ignore")
        for _ in range(steps):
            scheduler.step()


def _adamw(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the multi-tensor (foreach) implementation on every device.

    A TLoRA has several small tensors per module (about 1,150 on SD1.5's attention): the
    per-tensor loop torch uses on CPUs by default costs more than the maths there. Not
    `fused`: its kernel does not bump the parameters' version counters, which
    tlora.module reads to know the transform has left its identity start.
    """
    kwargs = dict(lr=config.learning_rate, betas=tuple(config.adam_betas), weight_decay=config.weight_decay, eps=1e-8)
    try:
        return torch.optim.AdamW(params, foreach=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, **kwargs)


def _clip(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """clip_grad_norm_ over many small tensors: foreach (one call) where the device allows it."""
    try:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    except RuntimeError:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


class Trainer:
    """One training run over live modules; call run() once."""

    def __init__(self, groups: Sequence[AdapterGroup], denoiser: Denoiser, schedule: Schedule, data: TrainData,
                 config: TrainConfig, *, output_path: str | None = None, metadata: Mapping[str, Any] | None = None,
                 file_config: Mapping[str, Any] | None = None, resume_path: str | None = None,
                 checkpoint_modules: Sequence[nn.Module] = (), interrupt_types: tuple[type[BaseException], ...] = (),
                 observer: Callable[[StepReport], None] | None = None,
                 decode: Callable[[Tensor], Tensor] | None = None,
                 sample_cond: Cond | None = None, sample_uncond: Cond | None = None,
                 sample_shape: Sequence[int] | None = None, encode: Callable[[list[str]], Cond] | None = None,
                 device: torch.device | str | None = None, run_id: str | None = None,
                 registry: RunRegistry = RUNS, run_info: Mapping[str, Any] | None = None,
                 interrupt_check: Callable[[], None] | None = None):
        config.validate()
        if not data.instance:
            raise TrainingError("no training images: connect at least one image")
        if not any(g.adapters for g in groups):
            raise TrainingError("no modules to adapt: the targets preset matched nothing in this model")
        self.groups = list(groups)
        self.denoiser, self.schedule, self.data, self.config = denoiser, schedule, data, config
        self.output_path, self.resume_path = output_path, resume_path
        self.metadata = dict(metadata or {})
        self.file_config = dict(file_config or {})
        self.checkpoint_modules = list(checkpoint_modules)
        self.interrupt_types = tuple(interrupt_types) + (KeyboardInterrupt,)
        # Raises one of interrupt_types when the user cancelled (polled where no observer runs).
        self.interrupt_check = interrupt_check
        self.observer, self.decode, self.encode = observer, decode, encode
        self.sample_cond, self.sample_uncond, self.sample_shape = sample_cond, sample_uncond, sample_shape
        self.device = torch.device(device) if device is not None else data.instance[0].latent.device
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.registry = registry
        self.run_info = dict(run_info or {})  # extra registry fields from the host (node id, prompt id...)
        self.saved_path: str | None = None  # set once this run has written its file
        self.run_token = uuid.uuid4().hex
        self.modules: dict[str, TLoRAModule] = {}
        self.history: list[dict[str, float]] = []
        self.step = 0
        self.last_sample: Tensor | None = None
        self._gen_state: Tensor | None = None
        self._start_step = 0

    # ----- setup ------------------------------------------------------------------------
    def _ordered_params(self) -> list[tuple[str, nn.Parameter]]:
        named = []
        for key in sorted(self.modules):
            for name, param in sorted(self.modules[key].adapter_params.items()):
                named.append((f"{key}.{name}", param))
        return named

    def _load_resume(self) -> TrainState | None:
        """Adapters from the resume file (replacing fresh ones) and its state sidecar if usable."""
        path = self.resume_path
        loaded = tformat.load(path)
        for group in self.groups:
            for p in list(group.adapters):
                key = group.prefix + p
                if key not in loaded.adapters:
                    raise TrainingError(f"cannot resume from {os.path.basename(path)}: it has no adapter for "
                                        f"{key} (was it trained with other targets or on another model?)")
                adapter = loaded.adapters[key]
                adapter.check_fits(tuple(group.root.get_submodule(p).weight.shape))
                group.adapters[p] = adapter
        extra = set(loaded.adapters) - {g.prefix + p for g in self.groups for p in g.adapters}
        if extra:
            raise TrainingError(f"cannot resume from {os.path.basename(path)}: it adapts {len(extra)} modules "
                                f"this run does not target (e.g. {sorted(extra)[0]}); pick the same targets")
        steps_in_file = int(loaded.metadata.get("tlora.train.steps", "0") or 0)
        sidecar = state_path_for(path)
        if os.path.exists(sidecar):
            state = TrainState.read(sidecar)
            if state.step == steps_in_file and state.run_token == loaded.metadata.get("tlora.train.run_token"):
                return state
            warning = (f"training state {os.path.basename(sidecar)} is from step {state.step}, the adapter from "
                       f"step {steps_in_file}: continuing from the adapter's weights with a fresh optimizer")
        else:
            warning = (f"no training state beside {os.path.basename(path)}: continuing from its weights with "
                       f"a fresh optimizer")
        self.metadata.setdefault("tlora.train.resume_note", warning)
        self._warm_start_step = steps_in_file
        return None

    # ----- the loop ---------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train; save; return the result. Interrupts save a partial file and re-raise."""
        # ComfyUI (and others) run nodes under inference_mode: training needs autograd back.
        with torch.inference_mode(False), torch.enable_grad():
            try:
                self.open()
            except BaseException as err:
                # Nothing trained yet (bad resume file, class images failed...): the registry
                # still learns that this run ended, and how.
                self.close()
                status = "cancelled" if isinstance(err, self.interrupt_types) else "failed"
                if self.registry.get(self.run_id) is None:
                    self._register()
                self.registry.finish(self.run_id, status, **self._summary(status, err))
                raise
            try:
                return self._loop()
            finally:
                self.close()

    def _register(self) -> None:
        cfg = self.config
        self.registry.start(self.run_id, **{**self.run_info, "steps": cfg.steps, "path": self.output_path,
                                            "loss_kind": cfg.loss, "start_step": self.step})

    def _summary(self, status: str, error: BaseException | None = None) -> dict[str, Any]:
        """The registry's summary of a run that ended with `status`."""
        summary: dict[str, Any] = {
            "steps_done": self.step, "final_loss": self.history[-1]["loss"] if self.history else None,
            "path": self.output_path, "partial": status != "done",
            "file_name": os.path.basename(self.saved_path) if self.saved_path else None}
        if error is not None and status in ("diverged", "failed"):
            summary["message"] = (str(error) or type(error).__name__)[:500]
        return summary

    def open(self) -> None:
        """Attach the adapters, build optimizer and schedule (restoring a resume state), make class images.

        run() = open(), train_step() until done, close(); the pieces are public for callers
        that drive steps themselves (benchmarks, step-wise UIs). Call close() even if this raises.
        """
        cfg = self.config
        self._warm_start_step = 0
        self._frozen: list[nn.Parameter] = []
        self._undo_ckpt: list = []
        state = self._load_resume() if self.resume_path else None
        for group in self.groups:
            for param in group.root.parameters():
                if param.requires_grad:
                    self._frozen.append(param)
                    param.requires_grad_(False)
        for group in self.groups:
            wrapped = attach(group.root, group.adapters, strength=1.0, form=cfg.form, trainable=True)
            for path, module in wrapped.items():
                module.adapter_params.to(self.device)
                module.scale = module.scale.to(self.device)
                self.modules[group.prefix + path] = module
        if cfg.gradient_checkpointing:
            self._undo_ckpt = enable_checkpointing(self.checkpoint_modules)
        named = self._ordered_params()
        self._params = [p for _, p in named]
        optimizer = _adamw(self._params, cfg)
        scheduler = _lr_scheduler(optimizer, cfg)
        self._amp_dtype = _PRECISION_DTYPES[cfg.precision]
        scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        generator = torch.Generator().manual_seed(int(cfg.seed))
        if state is not None:
            names = [n for n, _ in named]
            if state.param_names != names:
                raise TrainingError("training state does not match this run's adapters (different targets "
                                    "or kinds); delete the .tlora-state file to continue from weights only")
            optimizer.load_state_dict(state.optimizer)
            saved_total = state.extra.get("total_steps", cfg.steps)
            if saved_total == cfg.steps and state.extra.get("lr_schedule", cfg.lr_schedule) == cfg.lr_schedule:
                scheduler.load_state_dict(state.scheduler)
            else:
                # Another length or schedule: the new schedule, taken to the current step.
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] = cfg.learning_rate
                scheduler = _lr_scheduler(optimizer, cfg)
                _fast_forward(scheduler, state.step)
                self.metadata.setdefault("tlora.train.resume_note", (
                    f"resumed at step {state.step} with {cfg.steps} total steps ({cfg.lr_schedule}) instead of "
                    f"{saved_total} ({state.extra.get('lr_schedule')}): the new schedule continues from there"))
            if scaler is not None and state.scaler:
                scaler.load_state_dict(state.scaler)
            generator.set_state(state.generator)
            self.step = state.step
            self.run_token = state.run_token
            self.history = [h for h in state.extra.get("history", []) if h.get("step", 0) <= state.step]
        elif self._warm_start_step:
            # Weights only: keep counting from the file's steps so names/metadata stay honest.
            self.step = min(self._warm_start_step, cfg.steps)
            generator.manual_seed(int(cfg.seed) + self.step)
            _fast_forward(scheduler, self.step)
        self._start_step = self.step
        self._generator = generator
        self._gen_state = generator.get_state()
        self._optimizer, self._scheduler, self._scaler = optimizer, scheduler, scaler
        self._times: list[float] = []
        self._register()
        self._prior = self._prior_examples(self._amp_dtype)

    def close(self) -> None:
        """Undo open(): checkpointing off, adapters detached, base parameters' requires_grad restored."""
        restore_checkpointing(getattr(self, "_undo_ckpt", []))
        for group in self.groups:
            detach(group.root, list(group.adapters))
        for param in getattr(self, "_frozen", []):
            if not param.is_inference():  # torch refuses requires_grad on those here
                param.requires_grad_(True)
        self._frozen, self._undo_ckpt = [], []

    def train_step(self) -> StepReport:
        """One optimizer step (over grad_accum micro-batches), then history, saves, previews, observer."""
        cfg = self.config
        optimizer, scheduler, scaler = self._optimizer, self._scheduler, self._scaler
        started = time.perf_counter()
        with torch.inference_mode(False), torch.enable_grad():
            optimizer.zero_grad(set_to_none=True)
            loss_sum = mse_sum = 0.0
            for _ in range(cfg.grad_accum):
                loss, mse = self._micro_step(self._generator, self._prior, self._amp_dtype)
                if not math.isfinite(loss.item()):
                    self._diverged("loss", loss.item())
                scaled = loss / cfg.grad_accum
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_sum += loss.item() / cfg.grad_accum
                mse_sum += mse / cfg.grad_accum
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = float(_clip(self._params, cfg.max_grad_norm))
            if not math.isfinite(grad_norm) and scaler is None:
                self._diverged("gradient norm", grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
        self.step += 1
        self._gen_state = self._generator.get_state()
        elapsed = time.perf_counter() - started
        self._times.append(elapsed)
        point = {"step": self.step, "loss": loss_sum, "mse": mse_sum, "lr": lr}
        self.history.append(point)
        recent = self._times[-20:]
        eta = max(cfg.steps - self.step, 0) * (sum(recent) / len(recent))
        # The step is done: the registry knows it before previews or saves can fail.
        self.registry.update(self.run_id, {**point, "step_time": elapsed, "eta": eta,
                                           "grad_norm": grad_norm, "steps": cfg.steps})
        sample, sample_latent = self._maybe_sample(self._amp_dtype)
        if self.output_path and cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
            self.save(self.output_path, partial=True)
        report = StepReport(self.run_id, self.step, cfg.steps, loss_sum, mse_sum, lr, elapsed, eta,
                            grad_norm, sample, sample_latent)
        if self.observer is not None:
            self.observer(report)
        return report

    def _loop(self) -> TrainResult:
        cfg = self.config
        bar = None
        if cfg.progress_bar and tqdm is not None:
            bar = tqdm(total=cfg.steps, initial=self.step, desc="Training TLoRA", smoothing=0.05)
        status = "failed"
        error: BaseException | None = None
        try:
            while self.step < cfg.steps:
                report = self.train_step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{report.loss:.4f}", lr=f"{report.lr:.2e}")
            result = self._finish(partial=False)
            status = "done"
            return result
        except self.interrupt_types:
            status = "cancelled"
            self._save_partial("cancelled")
            raise
        except TrainingDiverged as err:
            status, error = "diverged", err
            raise
        except BaseException as err:
            error = err
            raise
        finally:
            if bar is not None:
                bar.close()
            if status == "failed" and self.step > self._start_step and self.output_path:
                # Any other crash: the steps done so far are still worth keeping.
                self._save_partial("failed")
            self.registry.finish(self.run_id, status, **self._summary(status, error))

    def _diverged(self, what: str, value: float) -> None:
        kept = ""
        if self.output_path and self.step > 0:
            self._save_partial("diverged")
            kept = (f" The adapter from step {self.step} (the last good one) was saved to "
                    f"{os.path.basename(self.output_path)}, marked partial.")
        elif self.step == 0:
            kept = " Nothing was saved: no step had completed."
        raise TrainingDiverged(f"training stopped: the {what} became {value} at step {self.step + 1}.{kept} "
                               f"Lower the learning rate or use fp32/bf16 precision.")

    def _save_partial(self, reason: str) -> None:
        if not self.output_path or self.step == 0:
            return  # nothing trained yet: an untouched adapter is not worth a file
        try:
            self.save(self.output_path, partial=True, reason=reason)
        except Exception as err:  # never mask the original error
            self.metadata["tlora.train.save_error"] = str(err)

    # ----- one micro-batch ------------------------------------------------------------------
    def _draw(self, examples: list[Example], generator: torch.Generator) -> list[Example]:
        """A random batch from one size bucket (bucket chosen in proportion to its size)."""
        buckets: dict[tuple[int, ...], list[int]] = {}
        for i, ex in enumerate(examples):
            buckets.setdefault(tuple(ex.latent.shape), []).append(i)
        keys = sorted(buckets)
        if len(keys) > 1:
            weights = torch.tensor([len(buckets[k]) for k in keys], dtype=torch.float64)
            key = keys[int(torch.multinomial(weights, 1, generator=generator))]
        else:
            key = keys[0]
        pool = buckets[key]
        if len(pool) >= self.config.batch_size:
            picks = torch.randperm(len(pool), generator=generator)[: self.config.batch_size]
        else:
            picks = torch.randint(len(pool), (self.config.batch_size,), generator=generator)
        return [examples[pool[int(i)]] for i in picks]

    def _conds(self, batch: list[Example]) -> Cond:
        if self.encode is not None:
            return self.encode([ex.caption for ex in batch])
        return {k: v.to(self.device) for k, v in collate_conds([ex.cond for ex in batch]).items()}

    def _noised(self, batch: list[Example], generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x0 = torch.stack([ex.latent for ex in batch]).to(self.device, torch.float32)
        # Noise and timesteps come from the run's own CPU generator: identical on any device,
        # and its state is all that resume needs to replay the same draws.
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        idx = torch.randint(len(self.schedule), (x0.shape[0],), generator=generator)
        return x0, noise, idx, self.schedule.add_noise(x0, noise, idx)

    def _set_strength(self, strength: float) -> None:
        for module in self.modules.values():
            module.strength = strength

    def _per_sample_mse(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)

    def _micro_step(self, generator: torch.Generator, prior: list[Example],
                    amp_dtype: torch.dtype | None) -> tuple[Tensor, float]:
        cfg = self.config
        batch = self._draw(self.data.instance, generator)
        x0, noise, idx, x_t = self._noised(batch, generator)
        t = self.schedule.timesteps[idx].to(self.device)
        target = self.schedule.target(x0, noise, idx)
        prior_parts = None
        if prior:
            prior_batch = self._draw(prior, generator)
            prior_parts = self._noised(prior_batch, generator), prior_batch
        ref_mse = None
        if cfg.loss == "dco":
            # The reference is this very model with every adapter at strength 0 (= the base).
            with torch.no_grad():
                self._set_strength(0.0)
                try:
                    with _autocast(self.device.type, amp_dtype):
                        ref = self.denoiser(x_t, t, self._conds(batch))
                finally:
                    self._set_strength(1.0)
                ref_mse = self._per_sample_mse(ref, target)
        with _autocast(self.device.type, amp_dtype):
            pred = self.denoiser(x_t, t, self._conds(batch))
        mse = self._per_sample_mse(pred, target)
        if ref_mse is not None:
            loss = -F.logsigmoid(-cfg.dco_beta * (mse - ref_mse)).mean()
        else:
            loss = mse.mean()
        if prior_parts is not None:
            (p_x0, p_noise, p_idx, p_xt), p_batch = prior_parts
            with _autocast(self.device.type, amp_dtype):
                p_pred = self.denoiser(p_xt, self.schedule.timesteps[p_idx].to(self.device), self._conds(p_batch))
            # DreamBooth's prior term: plain denoising MSE on the class images.
            loss = loss + cfg.prior_loss_weight * self._per_sample_mse(
                p_pred, self.schedule.target(p_x0, p_noise, p_idx)).mean()
        return loss, float(mse.mean().detach())

    # ----- prior images, previews -------------------------------------------------------------
    def _prior_examples(self, amp_dtype: torch.dtype | None) -> list[Example]:
        data = self.data
        examples = list(data.prior)
        missing = data.generate_prior - len(examples)
        if missing > 0:
            if data.prior_cond is None or data.prior_shape is None:
                raise TrainingError("prior preservation needs a class prompt to generate class images")
            # A generator of its own: the same class images on resume, whatever the main RNG did.
            gen = torch.Generator().manual_seed(int(self.config.seed) + 7919)
            self._set_strength(0.0)
            try:
                for _ in range(missing):
                    if self.interrupt_check is not None:
                        self.interrupt_check()  # class images take a while: Cancel works between them
                    latent = ddim_sample(self.denoiser, self.schedule, data.prior_cond, data.prior_uncond,
                                         (1, *data.prior_shape), self.config.sample_steps, self.config.sample_cfg,
                                         gen, self.device, amp_dtype)
                    examples.append(Example(latent[0].detach(), data.prior_cond))
            finally:
                self._set_strength(1.0)
        return examples

    def _maybe_sample(self, amp_dtype: torch.dtype | None) -> tuple[Tensor | None, Tensor | None]:
        cfg = self.config
        if not (cfg.sample_every and self.sample_cond is not None and self.sample_shape is not None):
            return None, None
        if self.step % cfg.sample_every and self.step != cfg.steps:
            return None, None
        latent = self.sample(amp_dtype)
        image = None
        if self.decode is not None:
            # Inference only: no graph may reach into the host's decoder (its weights can be
            # inference tensors, which autograd refuses to save), and none is needed.
            with self.host_view(), torch.no_grad():
                image = self.decode(latent)
            if isinstance(image, Tensor):
                image = image.detach()
        self.last_sample = image
        return image, latent

    def sample(self, amp_dtype: torch.dtype | None = None) -> Tensor:
        """A preview latent from the sample prompt with the adapters as they are now (fixed seed)."""
        gen = torch.Generator().manual_seed(int(self.config.seed) + 104729)
        return ddim_sample(self.denoiser, self.schedule, self.sample_cond, self.sample_uncond,
                           (1, *self.sample_shape), self.config.sample_steps, self.config.sample_cfg, gen,
                           self.device, amp_dtype)

    @contextlib.contextmanager
    def host_view(self) -> Iterator[None]:
        """The model's own module tree while a host touches it (decode, model management).

        A host may unload/offload or re-patch the model while decoding a preview; it must see
        its modules where it put them, not our wrappers. The same TLoRAModule objects (and
        the optimizer's parameters) go back afterwards.
        """
        swapped = []
        for group in self.groups:
            for path in group.adapters:
                parent_path, _, child = path.rpartition(".")
                parent = group.root.get_submodule(parent_path) if parent_path else group.root
                module = getattr(parent, child)
                if isinstance(module, TLoRAModule):
                    setattr(parent, child, module.base)
                    swapped.append((parent, child, module))
        try:
            yield
        finally:
            for parent, child, module in swapped:
                setattr(parent, child, module)

    # ----- saving ------------------------------------------------------------------------------
    def current_adapters(self) -> dict[str, ModuleAdapter]:
        """The adapters as trained so far, keyed by file prefix (float32, CPU)."""
        return {key: module.to_adapter() for key, module in self.modules.items()}

    def _train_metadata(self, partial: bool, reason: str | None) -> dict[str, str]:
        cfg = self.config
        final = self.history[-1]["loss"] if self.history else None
        now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
        meta = {
            "tlora.train.steps": str(self.step),
            "tlora.train.total_steps": str(cfg.steps),
            "tlora.train.partial": "true" if partial else "false",
            "tlora.train.lr": repr(cfg.learning_rate),
            "tlora.train.lr_schedule": cfg.lr_schedule,
            "tlora.train.warmup_steps": str(cfg.warmup_steps),
            "tlora.train.loss": cfg.loss,
            "tlora.train.final_loss": "" if final is None else f"{final:.6g}",
            "tlora.train.dataset_size": str(len(self.data.instance)),
            "tlora.train.batch_size": str(cfg.batch_size),
            "tlora.train.grad_accum": str(cfg.grad_accum),
            "tlora.train.precision": cfg.precision,
            "tlora.train.seed": str(cfg.seed),
            "tlora.train.time": now,
            "tlora.train.run_id": self.run_id,
            "tlora.train.run_token": self.run_token,
            "tlora.train.prediction": self.schedule.prediction,
            "ss_steps": str(self.step),
            "ss_learning_rate": repr(cfg.learning_rate),
            "ss_num_train_images": str(len(self.data.instance)),
            "ss_seed": str(cfg.seed),
            "ss_training_finished_at": now,
        }
        if cfg.loss == "dco":
            meta["tlora.train.dco_beta"] = repr(cfg.dco_beta)
        if self.data.prior or self.data.generate_prior:
            meta["tlora.train.prior_loss_weight"] = repr(cfg.prior_loss_weight)
            meta["tlora.train.num_class_images"] = str(max(len(self.data.prior), self.data.generate_prior))
        if reason:
            meta["tlora.train.stopped"] = reason
        meta.update({k: str(v) for k, v in self.metadata.items()})
        return meta

    def save(self, path: str, partial: bool, reason: str | None = None) -> dict[str, str]:
        """Adapter file + state sidecar, both atomic; returns the metadata written."""
        metadata = self._train_metadata(partial, reason)
        state = TrainState(self.step, self.run_token, self._optimizer.state_dict(), self._scheduler.state_dict(),
                           self._gen_state, [n for n, _ in self._ordered_params()],
                           self._scaler.state_dict() if self._scaler is not None else None,
                           {"history": self.history[-10000:], "total_steps": self.config.steps,
                            "lr_schedule": self.config.lr_schedule})
        # Sidecar first: a crash in between leaves a newer sidecar, which resume detects
        # (step/run token mismatch) and then falls back to the adapter's weights.
        atomic_write(state_path_for(path), state.to_bytes())
        tformat.save_file(self.current_adapters(), path, metadata=metadata, config=self.file_config)
        if self.output_path and os.path.abspath(path) == os.path.abspath(self.output_path):
            self.saved_path = path
        return metadata

    def _finish(self, partial: bool) -> TrainResult:
        metadata = self._train_metadata(partial, None)
        if self.output_path:
            metadata = self.save(self.output_path, partial=partial)
        return TrainResult(self.run_id, self.current_adapters(), self.step, self.config.steps,
                           self.history[-1]["loss"] if self.history else None, list(self.history),
                           self.output_path, partial, metadata, self.last_sample)


__all__ = [
    "AdapterGroup", "Cond", "Denoiser", "Example", "RUNS", "RunRegistry", "Schedule", "StepReport",
    "TrainConfig", "TrainData", "TrainResult", "TrainState", "Trainer", "TrainingDiverged", "TrainingError",
    "atomic_write", "bucket_sizes", "choose_size", "collate_conds", "create_adapters", "ddim_sample",
    "enable_checkpointing", "fit_image", "prepare_images", "restore_checkpointing", "select_targets",
    "state_path_for",
]
