"""How much device memory a run needs, before it trains, and which setting would bring it under a budget.

    total = frozen weights on the device + adapter state + activations saved for backward + workspace

Weights: every parameter and buffer of the adapted models on the run's device, less the swapped blocks
(offload_blocks) but RESIDENT of them. Adapter state: per parameter its value, gradient, optimizer state,
the divergence guard's copies (trainer/guard.py) and the EMA. Activations: measured on the live model
(adapters attached, checkpointing as set) by three small real forward passes at latent sides g, 2g and 3g,
counting the bytes autograd saves (torch's saved-tensor hooks, one count per storage, weights and inputs
left out); the count is a quadratic in the token count (linear layers and convolutions are linear in it,
attention scores quadratic), fitted exactly through the three and evaluated at the run's latent size,
times the batch. Workspace: what backward holds beside the saved tensors (the gradients in flight), taken
as WORKSPACE_FACTOR times the largest saved tensor at the run's size. docs/BENCHMARKS.md gives the error
against measured peaks.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .data import Cond
from .guard import KEEP_RECENT, KEEP_SPREAD
from .offload import RESIDENT
from .optim import optimizer_bytes_per_param
from .sampling import PRECISION_DTYPES, autocast
from .settings import TrainSettings

GIB = 2 ** 30
WORKSPACE_FACTOR = 2
PROBE_SIDES = (1, 2, 3)  # multiples of the probe granularity


@dataclass
class MemoryEstimate:
    """A run's device memory in bytes, by part, and the suggestion that brings it under a budget."""

    weights: int
    adapter: int
    activations: int
    workspace: int
    offloaded: int = 0  # weights kept on the CPU (not in the total)
    suggestion: str = ""
    variants: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Bytes on the device at the step's peak."""
        return self.weights + self.adapter + self.activations + self.workspace

    def describe(self) -> str:
        """One line: the total and its parts in GiB."""
        text = (f"about {self.total / GIB:.2f} GiB of device memory (frozen weights {self.weights / GIB:.2f}, "
                f"adapter and optimizer {self.adapter / GIB:.3f}, activations {self.activations / GIB:.2f}, "
                f"backward workspace {self.workspace / GIB:.2f})")
        if self.offloaded:
            text += f"; {self.offloaded / GIB:.2f} GiB of swapped weights on the CPU"
        return text


def saved_bytes(run: Callable[[], Tensor], exclude: Sequence[Tensor]) -> tuple[int, int]:
    """(bytes autograd saves for backward in run(), the largest saved storage), one count per storage.

    `exclude`: tensors whose storage is not the pass's own (weights, inputs). run() returns the output,
    whose graph is dropped after counting.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude if t.numel()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip and storage.nbytes():
            seen[ptr] = storage.nbytes()
        # Detached: an output saved by the node that made it would otherwise hold that node (its grad_fn)
        # from inside it, a cycle no collector frees (every probe's graph would stay in memory).
        return t.detach()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(seen.values()), max(seen.values(), default=0)


def _fit(tokens: Sequence[float], values: Sequence[float], at: float) -> float:
    """The quadratic through three (tokens, value) points, at `at` (Lagrange form: exact for a quadratic)."""
    total = 0.0
    for i, (xi, yi) in enumerate(zip(tokens, values)):
        term = yi
        for j, xj in enumerate(tokens):
            if j != i:
                term *= (at - xj) / (xi - xj)
        total += term
    return total


def activation_curve(denoiser: Callable[[Tensor, Tensor, Cond], Tensor], latent: Tensor, cond: Cond,
                     timestep: Tensor, exclude: Sequence[Tensor], granularity: int = 8
                     ) -> Callable[[int], tuple[float, float]]:
    """tokens -> (bytes saved for backward, largest saved storage) for one sample, from three small real passes."""
    lead = tuple(latent.shape[:-2])
    points, largest = [], []
    generator = torch.Generator().manual_seed(0)
    for k in PROBE_SIDES:
        side = k * granularity
        x = torch.randn((1, *lead, side, side), generator=generator).to(latent.device)
        with torch.enable_grad():
            total, big = saved_bytes(lambda: denoiser(x, timestep, cond), [*exclude, x, *cond.values()])
        points.append((side * side, total))
        largest.append(big)
    tokens = [p[0] for p in points]
    values = [p[1] for p in points]

    def at(n_tokens: int) -> tuple[float, float]:
        # The largest storage scales with the tokens (an activation) or their square (attention scores).
        scale = n_tokens / tokens[-1]
        big = largest[-1] * (scale if largest[-1] <= largest[0] * tokens[-1] / tokens[0] * 1.5 else scale * scale)
        return max(_fit(tokens, values, n_tokens), 0.0), big
    return at


def adapter_bytes(n_params: int, settings: TrainSettings) -> int:
    """Value, gradient, optimizer state, the guard's kept copies and the EMA, per adapter parameter (float32)."""
    per = 4 + 4 + optimizer_bytes_per_param(settings.optimizer) + 4 * (KEEP_RECENT + KEEP_SPREAD)
    if settings.ema_decay > 0:
        per += 4
    return n_params * per


def weight_bytes(roots: Sequence[nn.Module], device: torch.device, trained: set[int]) -> int:
    """Bytes of the frozen parameters and buffers of these models that sit on the device."""
    seen, total = set(), 0
    for root in roots:
        for t in [*root.parameters(), *root.buffers()]:
            if id(t) in trained or id(t) in seen or t.device.type != device.type:
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def block_bytes(blocks: Sequence[nn.Module], trained: set[int]) -> list[int]:
    """Each block's frozen parameter bytes."""
    return [sum(p.numel() * p.element_size() for p in b.parameters() if id(p) not in trained) for b in blocks]


def estimate(settings: TrainSettings, weights: int, blocks: Sequence[int], n_params: int,
             curve: Callable[[int], tuple[float, float]], tokens: int,
             checkpointed: Callable[[], Callable[[int], tuple[float, float]]] | None = None) -> MemoryEstimate:
    """The estimate for these settings, with the cheapest setting that meets settings.memory_budget when over it.

    `blocks`: the swappable blocks' bytes in order; `curve`: the run's activation curve; `checkpointed`: makes
    the curve with gradient checkpointing on (only asked for when the run is over budget; None: not offered).
    """
    def build(cfg: TrainSettings, act_curve: Callable[[int], tuple[float, float]], n_tokens: int) -> MemoryEstimate:
        swapped = blocks[len(blocks) - min(cfg.offload_blocks, len(blocks)):] if cfg.offload_blocks else []
        kept = sorted(swapped, reverse=True)[:RESIDENT]
        saved, big = act_curve(n_tokens)
        return MemoryEstimate(weights - sum(swapped) + sum(kept), adapter_bytes(n_params, cfg),
                              int(saved * cfg.batch_size), int(WORKSPACE_FACTOR * big * cfg.batch_size),
                              sum(swapped) - sum(kept))
    result = build(settings, curve, tokens)
    budget = settings.memory_budget * GIB
    if not budget or result.total <= budget:
        return result
    options: list[tuple[str, MemoryEstimate]] = []
    if checkpointed is not None and not settings.gradient_checkpointing:
        options.append(("gradient_checkpointing on", build(settings.replace(gradient_checkpointing=True),
                                                           checkpointed(), tokens)))
    for count in range(settings.offload_blocks + 1, len(blocks) + 1):
        trial = build(settings.replace(offload_blocks=count), curve, tokens)
        if trial.total <= budget:
            options.append((f"offload_blocks {count}", trial))
            break
    if settings.batch_size > 1:
        options.append(("batch_size 1 (grad_accumulation to keep the batch)",
                        build(settings.replace(batch_size=1), curve, tokens)))
    for res in range(settings.resolution - 64, 63, -64):
        scaled = max(1, int(tokens * (res / settings.resolution) ** 2))
        trial = build(settings.replace(resolution=res), curve, scaled)
        if trial.total <= budget:
            options.append((f"resolution {res}", trial))
            break
    fits = [(name, e) for name, e in options if e.total <= budget]
    result.variants = {name: e.total for name, e in options}
    if fits:
        name, best = fits[0]
        result.suggestion = f"{name} brings it to about {best.total / GIB:.2f} GiB"
    else:
        result.suggestion = "no single setting brings it under: combine them, or a smaller model or adapter"
    return result


def for_trainer(trainer: "Any") -> MemoryEstimate:
    """The estimate of an opened-to-attach Trainer (adapters on, checkpointing and block swap not yet)."""
    from .checkpointing import enable_checkpointing, restore_checkpointing
    cfg, binding = trainer.settings, trainer.binding
    device = trainer.device
    params = [p for _, p in trainer._ordered_params()]
    trained = {id(p) for p in params}
    roots = [g.root for g in trainer.groups]
    frozen = [t for root in roots for t in [*root.parameters(), *root.buffers()] if id(t) not in trained]
    example = max(trainer.data.instance, key=lambda ex: ex.latent.shape[-1] * ex.latent.shape[-2])
    latent = example.latent.to(device, torch.float32)
    cond = {k: v.to(device) for k, v in example.cond.items()}
    t = trainer.schedule.timesteps[len(trainer.schedule) // 2].reshape(1).to(device)
    tokens = int(latent.shape[-1] * latent.shape[-2])
    blocks = list(binding.checkpoint_modules)
    amp = PRECISION_DTYPES[cfg.precision]

    def denoise(x: Tensor, ts: Tensor, c: Cond) -> Tensor:
        with autocast(device.type, amp):
            return binding.denoiser(x, ts, c)
    plain = activation_curve(denoise, latent, cond, t, frozen) if not cfg.gradient_checkpointing or not blocks \
        else None
    ckpt_blocks = blocks[:cfg.checkpoint_blocks] if cfg.checkpoint_blocks else blocks

    def checkpointed_curve() -> Callable[[int], tuple[float, float]]:
        undo = enable_checkpointing(ckpt_blocks)
        try:
            inner = activation_curve(denoise, latent, cond, t, frozen)
        finally:
            restore_checkpointing(undo)

        def at(n: int) -> tuple[float, float]:
            # Backward recomputes one block at a time: its activations come on top of what stays saved,
            # taken as an even share of what the model saves without checkpointing (measured at the probes).
            saved, big = inner(n)
            share = inner_plain(n)[0] / max(len(ckpt_blocks), 1)
            return saved, max(big, share / WORKSPACE_FACTOR)
        return at

    def inner_plain(n: int) -> tuple[float, float]:
        nonlocal plain
        if plain is None:
            plain = activation_curve(denoise, latent, cond, t, frozen)
        return plain(n)
    n_params = sum(p.numel() for p in params)
    weights = weight_bytes(roots, device, trained)
    sizes = block_bytes(blocks, trained)
    if cfg.gradient_checkpointing and blocks:
        return estimate(cfg, weights, sizes, n_params, checkpointed_curve(), tokens)
    return estimate(cfg, weights, sizes, n_params, inner_plain, tokens, checkpointed_curve if blocks else None)
