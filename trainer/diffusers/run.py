"""One training run on a diffusers pipeline, on one process or many under `accelerate launch`.

The binding is built here and the engine (trainer/loop.py) trains; accelerate is the only
distributed machinery: `AccelerateProcesses` hands the engine its process index and count, its
DDP wrapper (over the adapter parameters only), `no_sync` and `reduce`.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...tlora import arch as tarch
from .. import outputs
from ..binding import AdapterGroup, Binding, create_adapters
from ..cache import EncodingCache, fingerprint
from ..data import TrainData
from ..distributed import AdapterParams, Distributed
from ..loop import Trainer
from ..runs import TrainResult
from ..settings import TrainingError, TrainSettings, derived_seed
from . import data as ddata
from . import model as dmodel


class AccelerateProcesses(Distributed):
    """The engine's view of accelerate's processes (one Accelerator per run)."""

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator
        self.rank = int(accelerator.process_index)
        self.world = int(accelerator.num_processes)

    def wrap(self, holder: AdapterParams) -> nn.Module | None:
        """accelerate's DDP wrapper around the adapter parameters (one process: none)."""
        return self.accelerator.prepare(holder) if self.world > 1 else None

    @contextlib.contextmanager
    def no_sync(self, wrapped: nn.Module | None) -> Iterator[None]:
        """accelerate's no_sync for micro-batches before the last of a step."""
        if wrapped is None:
            yield
            return
        with self.accelerator.no_sync(wrapped):
            yield

    def mean(self, value: Tensor) -> Tensor:
        """accelerate's reduce (mean over processes)."""
        return self.accelerator.reduce(value, "mean") if self.world > 1 else value


@dataclass
class Job:
    """Where a command-line run reads and writes (the settings say how it trains)."""

    model: str  # a diffusers pipeline folder, or a single-file checkpoint with `config`
    data_dir: str
    output_dir: str
    config: str | None = None
    class_dir: str | None = None
    cache_dir: str | None = None  # cached latents and text-encoder outputs (cache_encodings); None: default_cache_dir


def default_cache_dir() -> str:
    """Where the command line caches encodings: $TLORA_CACHE_DIR/encodings, else ~/.cache/tlora/encodings."""
    root = os.environ.get("TLORA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tlora")
    return os.path.join(root, "encodings")


def check_job(job: Job, settings: TrainSettings) -> None:
    """TrainingError, before anything loads, for paths that cannot work (each named as the options name them)."""
    if job.config is not None and not os.path.isdir(job.config):
        raise TrainingError(f"--config {job.config}: no such folder (give a local diffusers folder)")
    for option, folder in (("--data", job.data_dir), ("--class-data", job.class_dir)):
        if folder is not None and not os.path.isdir(folder):
            raise TrainingError(f"{option} {folder}: no such folder")
    dmodel.refuse_adapter_file(job.model)
    if settings.sample_every:
        out = os.path.realpath(job.output_dir)
        for option, folder in (("--data", job.data_dir), ("--class-data", job.class_dir)):
            if folder is not None and os.path.realpath(folder) == out:
                raise TrainingError(f"--output-dir is the {option} folder: its previews would be training images "
                                    f"of the next run; write into another folder")
    try:
        os.makedirs(job.output_dir, exist_ok=True)
    except OSError as err:
        raise TrainingError(f"cannot make the output folder {job.output_dir}: {err.strerror or err}") from None
    outputs.check_writable(job.output_dir)


def precision_for(settings: TrainSettings, accelerator: Any) -> TrainSettings:
    """`auto` precision follows accelerate's mixed-precision configuration (`--mixed_precision`, its config file)."""
    configured = getattr(accelerator, "mixed_precision", "no")
    if settings.precision == "auto" and configured in ("fp16", "bf16"):
        return settings.replace(precision=configured)
    return settings


def build_trainer(job: Job, settings: TrainSettings, accelerator: Any, progress_bar: bool = True) -> Trainer:
    """The engine's Trainer for this run: the pipeline loaded, data encoded, adapters created."""
    settings = precision_for(settings, accelerator)
    settings.validate()
    processes = AccelerateProcesses(accelerator)
    device = accelerator.device
    # The folders first: a bad image or caption is named before the model takes its time to load.
    images, captions, _ = ddata.read_folder(job.data_dir)
    class_images = ddata.read_folder(job.class_dir)[0] if settings.class_prompt and job.class_dir else []
    if not progress_bar:
        dmodel.quiet_loading()
    pipe = dmodel.load_pipeline(job.model, job.config)
    p = dmodel.parts(pipe)
    scale = dmodel.vae_scale(p.vae)
    schedule = dmodel.schedule_for(pipe.scheduler, (settings.resolution // (2 * scale)) ** 2, p.kind)
    for module in (p.denoiser, p.vae, *(m for m in pipe.components.values() if isinstance(m, nn.Module))):
        module.to(device)
        module.requires_grad_(False)
        module.eval()
    encode_text = dmodel.text_encoder(p)

    def encode_image(pixels: Tensor) -> Tensor:
        return dmodel.encode_images(p.vae, pixels)

    disk = EncodingCache(job.cache_dir or default_cache_dir()) if settings.cache_encodings else None
    vae_id = text_id = ""
    if disk is not None:
        vae_id = fingerprint("vae", p.vae, scale, p.kind)
        text_id = fingerprint("text", type(p.pipe).__name__, p.kind,
                              [m for _, m in sorted(pipe.components.items()) if isinstance(m, nn.Module)
                               and m is not p.denoiser and m is not p.vae])
    text_cond = ddata.cached_text(encode_text, disk, text_id, device)
    instance = ddata.examples(images, captions, settings.instance_prompt, settings.resolution,
                              settings.aspect_buckets, encode_image, encode_text, disk, vae_id, device, text_cond)
    train_data = TrainData(instance)
    with torch.no_grad():
        train_data.uncond = encode_text([""])
    if settings.class_prompt:
        if class_images:
            train_data.prior = ddata.examples(class_images, [""] * len(class_images), settings.class_prompt,
                                              settings.resolution, False, encode_image, encode_text)
        with torch.no_grad():
            train_data.prior_cond = encode_text([settings.class_prompt])
            train_data.prior_uncond = encode_text([""])
        train_data.generate_prior = max(settings.num_class_images, len(train_data.prior))
        train_data.prior_shape = tuple(instance[0].latent.shape)
    if settings.sample_every:
        with torch.no_grad():
            train_data.sample_cond = encode_text([settings.sample_prompt or settings.instance_prompt])
            train_data.sample_uncond = encode_text([""])
        train_data.sample_shape = tuple(instance[0].latent.shape)

    names = dmodel.targets(p, settings.targets, settings.with_convs)
    groups: list[AdapterGroup] = [group_for(p.denoiser, tarch.UNET_PREFIX, names, settings, 0)]
    encode = None
    if settings.train_text_encoder:
        for offset, (prefix, component, te) in enumerate(p.text_encoders, start=1):
            names = dmodel.targets(p, settings.targets, text_encoder=component)
            groups.append(group_for(te, prefix, names, settings, offset))
        encode = encode_text

    path, _ = outputs.output_path(job.output_dir, settings.output_name, settings.resume or None)
    arch = p.family

    def decode(latent: Tensor) -> Tensor:
        image = dmodel.decode_latent(p.vae, latent)
        if processes.is_main:
            from PIL import Image
            # One file per preview prompt: the first keeps the name previews always had.
            index = f".{trainer.preview_index + 1}" if trainer.preview_index else ""
            preview = os.path.splitext(trainer.output_path or path)[0] + f".step{trainer.step:06d}{index}.png"
            Image.fromarray((image * 255).round().to(torch.uint8).numpy()).save(preview)
        return image

    binding = Binding(
        groups, dmodel.denoiser(p.denoiser, p.kind, scale), schedule, train_data, device=device, encode=encode,
        decode=decode if settings.sample_every else None,
        checkpoint_modules=checkpoint_blocks(p.denoiser) or dmodel.checkpoint_blocks(p.denoiser),
        progress_bar=progress_bar, distributed=processes, text_cond=text_cond, downscale=scale,
        metadata={"tlora.train.base_model": os.path.basename(os.path.normpath(job.model)),
                  "tlora.train.host": "diffusers", "tlora.train.processes": str(processes.world)},
        file_config={"arch": arch} if arch else {})
    trainer = Trainer(binding, settings, output_path=path)
    return trainer


def group_for(root: nn.Module, prefix: str, names: dict[str, str], settings: TrainSettings, seed_offset: int
              ) -> AdapterGroup:
    """Fresh adapters on these modules of root, named in the file as `names` says (seeded as the node seeds)."""
    adapters = create_adapters(root, list(names), settings.transform, settings.residual, settings.shapes,
                               derived_seed(settings.seed, seed_offset), prefix)
    return AdapterGroup(root, prefix, adapters, names)


def checkpoint_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (UNet spatial transformers, Flux's double and single blocks, SD3's joint blocks): what gradient
    checkpointing re-runs."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    kinds = (BasicTransformerBlock, FluxTransformerBlock, FluxSingleTransformerBlock, JointTransformerBlock)
    return [m for m in model.modules() if isinstance(m, kinds)]


def estimate_only(job: Job, settings: TrainSettings, accelerator: Any | None = None) -> Any:
    """The run's memory estimate (trainer/estimate.py) with the pipeline loaded and the data encoded; no training."""
    check_job(job, settings)
    trainer = build_trainer(job, settings.replace(memory_budget=0.0), accelerator or default_accelerator(), False)
    memory = trainer.estimate_memory()
    if settings.memory_budget:  # the suggestion is made against the budget asked for
        from .. import estimate as est
        budget = settings.memory_budget * est.GIB
        if memory.total > budget:
            trainer.settings = trainer.settings.replace(memory_budget=settings.memory_budget)
            memory = trainer.estimate_memory()
    return memory


def default_accelerator() -> Any:
    """accelerate's Accelerator as `accelerate launch` configured it; several processes on a machine without a
    GPU run on the CPU over gloo (accelerate otherwise wants `--cpu`, whose launcher starts one process)."""
    from accelerate import Accelerator
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=several and not torch.cuda.is_available())


def train(job: Job, settings: TrainSettings, accelerator: Any | None = None, progress_bar: bool = True
          ) -> TrainResult:
    """Train a TLoRA on a diffusers pipeline; the main process writes `output_dir/<output_name>.safetensors`."""
    check_job(job, settings)
    if accelerator is None:
        accelerator = default_accelerator()
    trainer = build_trainer(job, settings, accelerator, progress_bar)
    try:
        return trainer.run()
    finally:
        accelerator.end_training()
