"""How a host plugs into the engine: the modules to adapt, a denoiser and its schedule, data, callbacks.

A host (ComfyUI today: trainer/comfy/) builds one `Binding` per run and hands it to
`Trainer` with the run's `TrainSettings`; the engine never imports a host.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..tlora import arch as tarch
from ..tlora.adapter import ModuleAdapter
from ..tlora.module import TLoRAModule
from ..tlora.runtime import geometry_of
from ..tlora.spec import DEFAULT_RESIDUAL, DEFAULT_TRANSFORM
from .data import Cond, Denoiser, TextCond, TrainData
from .distributed import Distributed
from .runs import StepReport
from .schedule import Schedule
from .settings import TARGET_PRESETS, TrainingError, TrainSettings, check_adapter_size, derived_seed


@dataclass
class AdapterGroup:
    """Modules of one root to adapt: file keys are `prefix + path`, or `names[path]` where given.

    `names` lets a host whose module paths are not the file's names (diffusers' `down_blocks...`
    for ComfyUI's generic `diffusion_model.input_blocks...`) write and resume the common names.
    """

    root: nn.Module
    prefix: str
    adapters: dict[str, ModuleAdapter]
    names: Mapping[str, str] = field(default_factory=dict)

    def file_key(self, path: str) -> str:
        """The name a module's adapter has in the file."""
        return self.names.get(path) or self.prefix + path


@dataclass
class Binding:
    """What a host gives the engine for one run.

    denoiser(x_t, timestep, cond) returns the model's prediction in its schedule's target
    space; `encode` (text-encoder training) maps captions to conditioning with gradients;
    `decode` turns a preview latent into an (H, W, 3) image; `interrupt_check` raises one of
    `interrupt_types` when the user cancelled; `metadata` / `file_config` are the host's
    facts for the file (base model name, architecture). `extra_params` are trained beside the
    TLoRA modules but never saved: another adapter family a benchmark compares (e.g. ComfyUI's
    own weight adapters), or the weights themselves for a full fine-tune.
    """

    groups: Sequence[AdapterGroup]
    denoiser: Denoiser
    schedule: Schedule
    data: TrainData
    device: torch.device | str | None = None
    encode: Callable[[list[str]], Cond] | None = None
    decode: Callable[[Tensor], Tensor] | None = None
    checkpoint_modules: Sequence[nn.Module] = ()
    interrupt_types: tuple[type[BaseException], ...] = ()
    interrupt_check: Callable[[], None] | None = None
    observer: Callable[[StepReport], None] | None = None
    progress_bar: bool = True
    metadata: Mapping[str, Any] = field(default_factory=dict)
    file_config: Mapping[str, Any] = field(default_factory=dict)
    extra_params: Sequence[nn.Parameter] = ()
    distributed: Distributed | None = None  # several processes (see trainer/distributed.py); None: one
    # A caption's cached conditioning for a latent shape (shuffled tags, caption dropout, preview prompts);
    # `downscale` pixels per latent cell (a preview's own size). None: those options are refused.
    text_cond: TextCond | None = None
    downscale: int = 8
    # Measure the run's memory before every run (trainer/estimate.py: three small extra passes of the model);
    # a memory_budget asks for it too, and Trainer.estimate_memory() gives it without training.
    estimate_memory: bool = False


def select_targets(root: nn.Module, preset: str = "attn", with_convs: bool = False,
                   text_encoder: bool = False) -> list[str]:
    """Dotted paths under root for a targets preset, by role on the live model (tlora.arch's rules).

    Only Linear and ungrouped Conv2d layers are adapted (a module that merely holds a 2-D `weight`,
    such as a mixture-of-experts gate, is not a linear map of its input).
    """
    if preset not in TARGET_PRESETS:
        raise TrainingError(f"unknown targets preset {preset!r}; expected one of {TARGET_PRESETS}")
    groups = tarch.preset_groups(preset, text_encoder=text_encoder, with_convs=with_convs)
    paths = []
    for name, module in root.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                continue
        elif not isinstance(module, nn.Linear):
            continue
        if tarch.path_in_groups(name, groups, conv=isinstance(module, nn.Conv2d)):
            paths.append(name)
    return paths


def create_adapters(root: nn.Module, paths: Sequence[str], transform: str = DEFAULT_TRANSFORM,
                    residual: str = DEFAULT_RESIDUAL, shapes: str = "paper", seed: int = 0,
                    prefix: str = "") -> dict[str, ModuleAdapter]:
    """Fresh adapters (identity transform, zero residual) for each path, seeded.

    Their size is estimated from the layout first: ranks that would not fit in memory are
    refused before any tensor is made.
    """
    # The layer's logical shape (the core's Geometry): a quantized layer's stored weight may be packed (GGUF).
    layer_shapes = {p: geometry_of(root.get_submodule(p)).weight_shape for p in paths}
    check_adapter_size(list(layer_shapes.values()), transform, residual, shapes)
    generator = torch.Generator().manual_seed(int(seed))
    out = {}
    for path in paths:
        out[path] = ModuleAdapter.create(layer_shapes[path], transform, residual, shapes,
                                         generator=generator, name=prefix + path)
    return out


def adapter_group(root: nn.Module, prefix: str, settings: TrainSettings, text_encoder: bool = False,
                  seed_offset: int = 0) -> AdapterGroup:
    """Fresh adapters on the modules of root that the settings' targets preset names (settings checked first)."""
    settings.validate()
    paths = select_targets(root, settings.targets, settings.with_convs and not text_encoder, text_encoder)
    return AdapterGroup(root, prefix, create_adapters(root, paths, settings.transform, settings.residual,
                                                      settings.shapes, derived_seed(settings.seed, seed_offset), prefix))


@contextlib.contextmanager
def host_view(groups: Sequence[AdapterGroup]) -> Iterator[None]:
    """The model's own module tree while a host touches it (decode, model management).

    A host may unload/offload or re-patch the model while decoding a preview; it must see
    its modules where it put them, not our wrappers. The same TLoRAModule objects (and
    the optimizer's parameters) go back afterwards.
    """
    swapped = []
    for group in groups:
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
