"""Every training setting, once: name, type, default, range, help, node input and metadata key.

`TrainSettings` is the one object a run is described by. Hosts build their inputs from it
(the ComfyUI node's inputs are generated from `SETTINGS`; a command line can do the same)
and the engine reads it. Adding a setting is one field here plus the one place that uses it:
its node input, validation, metadata and file config follow from the field's `Spec`.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..tlora.adapter import layout
from ..tlora.arch import PRESETS as TARGET_PRESETS
from ..tlora.functional.trm import FORMS as TRANSFORM_FORMS
from ..tlora.errors import TLoRAError
from .prompts import parse_previews
from ..tlora.shapes import SHAPE_PRESETS
from ..tlora.spec import DEFAULT_RESIDUAL, DEFAULT_TRANSFORM, Kind, parse_residual, parse_transform

LOSSES = ("mse", "dco")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")
TIMESTEP_SAMPLINGS = ("auto", "uniform", "logit-normal", "sigmoid", "shift")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")
PRECISION_CHOICES = ("auto", *PRECISIONS)
MAX_SEED = 0xFFFFFFFFFFFFFFFF
FORMS = ("auto", *TRANSFORM_FORMS)
# Largest ranks a run may ask for. Past these a factor outgrows the dense matrix it stands for
# (a TRM core is n x n x R x R, a TR core n x R x R) or, for LoRA, any weight's width: the
# paper's ranks are trm:2 and tr:6, and trm:3000 or lora:100000 only ever asked for gigabytes.
MAX_RANKS = {"trm": 32, "tr": 64, "lora": 1024}
# What training holds per adapter parameter (float32) at the least: the value, its gradient, AdamW's two
# moments and the divergence guard's six kept copies (trainer/guard.py; trainer/estimate.py counts the
# optimizer and the EMA as chosen).
TRAIN_BYTES_PER_PARAM = 10 * 4


class TrainingError(TLoRAError):
    """Training cannot start or continue as asked (bad settings, data, or resume file)."""


@dataclass(frozen=True)
class Spec:
    """What a host and the file need to know about one setting besides its type and default."""

    help: str
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: tuple[str, ...] | None = None
    node_name: str | None = None  # the node input's name when it differs from the field's
    required: bool = False  # a required node input (else optional)
    multiline: bool = False
    # A setting without a node input says why (a test checks every field has one or the other).
    no_node: str | None = None
    # "loras": the host offers its adapter files as the options (a file to resume from).
    host_choices: str | None = None
    # Metadata keys this setting's value is written to: a key, or (key, fmt(value, settings)).
    meta: tuple = ()
    meta_when: Callable[[Any], bool] | None = None  # write them only when this holds for the settings
    config: str | None = None  # key in the file's tlora.config

    def input_name(self, name: str) -> str:
        """The node input's name for a field."""
        return self.node_name or name


def _setting(default: Any, help: str, **spec: Any) -> Any:
    return field(default=default, metadata={"spec": Spec(help, **spec)})


def _fmt_value(value: Any) -> str:
    """A setting's value as metadata text (the forms the files have always used)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


@dataclass(frozen=True)
class TrainSettings:
    """One training run's settings (defaults follow the paper's subject-driven setting).

    Field order is the ComfyUI node's input order (saved workflows store widget values by
    position): add new settings at the end.
    """

    instance_prompt: str = _setting(
        "a photo of sks dog", "Prompt for every image without its own caption; include a rare token.",
        required=True, meta=("tlora.train.instance_prompt",))
    steps: int = _setting(500, "Optimizer steps in all (a resumed run continues up to this number).",
                          min=1, max=100000, required=True, meta=("tlora.train.total_steps",))
    output_name: str = _setting(
        "tlora_subject", "File name in the loras folder (no folders). An existing file is never overwritten: "
        "_2, _3... are added, unless resuming it.", required=True)
    transform: str = _setting(DEFAULT_TRANSFORM, f"none | diag | trm:R (tensor-ring matrix, R 1-{MAX_RANKS['trm']}).",
                              required=True, config="transform")
    residual: str = _setting(DEFAULT_RESIDUAL, f"none | lora:r (r 1-{MAX_RANKS['lora']}) | tr:R (tensor ring, R "
                                     f"1-{MAX_RANKS['tr']}).", required=True, config="residual")
    targets: str = _setting(
        "attn", "attn: to_q/k/v/out of every attention (the paper's set).", options=TARGET_PRESETS,
        required=True, config="targets",
        meta=(("tlora.train.targets", lambda v, s: v + ("+convs" if s.with_convs else "")),))
    learning_rate: float = _setting(1e-4, "AdamW learning rate.", min=1e-7, max=1.0, step=1e-7, required=True,
                                    meta=("tlora.train.lr", "ss_learning_rate"))
    batch_size: int = _setting(1, "Images per micro-batch (drawn from one size bucket).", min=1, max=64,
                               required=True, meta=("tlora.train.batch_size",))
    resolution: int = _setting(
        512, "Training side in pixels (a multiple of 64).", min=64, max=4096, step=64, required=True,
        meta=("tlora.train.resolution", ("ss_resolution", lambda v, s: f"({v}, {v})")))
    loss: str = _setting("dco", "dco: direct consistency optimisation against the base model (the paper's "
                                "choice); mse: plain denoising loss.", options=LOSSES, required=True,
                         meta=("tlora.train.loss",))
    seed: int = _setting(0, "Seeds the adapters' initialisation, noise and timesteps.", min=0, max=MAX_SEED,
                         required=True, meta=("tlora.train.seed", "ss_seed"))
    save_every: int = _setting(250, "Save a checkpoint (marked partial) every N steps; 0 = only at the end.",
                               min=0, max=100000, required=True)
    sample_every: int = _setting(0, "Make a preview image every N steps (0 = never).", min=0, max=100000,
                                 required=True)
    sample_prompt: str = _setting(
        "", "Preview prompts, one a line (empty = the instance prompt), each with optional kohya-style flags: "
            "--w/--h size, --s steps, --l guidance, --d seed, --n negative prompt.", multiline=True)
    class_prompt: str = _setting("", "Prior preservation: the class, e.g. 'a photo of a dog'.",
                                 meta=("tlora.train.class_prompt",), meta_when=lambda s: bool(s.class_prompt))
    num_class_images: int = _setting(0, "Class images to use; missing ones are generated by the base model.",
                                     min=0, max=1000)
    prior_loss_weight: float = _setting(1.0, "Weight of the prior-preservation loss.", min=0.0, max=100.0,
                                        step=0.05)
    resume: str = _setting("", "Continue a run from its file (and its .tlora-state sidecar).",
                           host_choices="loras")
    lr_schedule: str = _setting("constant", "Learning-rate schedule after the warm-up.", options=LR_SCHEDULES,
                                meta=("tlora.train.lr_schedule",))
    warmup_steps: int = _setting(0, "Linear learning-rate warm-up steps.", min=0, max=100000,
                                 meta=("tlora.train.warmup_steps",))
    grad_accum: int = _setting(1, "Micro-batches per optimizer step.", min=1, max=1024,
                               node_name="grad_accumulation", meta=("tlora.train.grad_accum",))
    precision: str = _setting(
        "auto", "auto: bf16 autocast on GPUs that have it, fp32 otherwise. Adapter weights are always fp32.",
        options=PRECISION_CHOICES, meta=("tlora.train.precision",))
    gradient_checkpointing: bool = _setting(False, "Less memory, about 30% slower.")
    aspect_buckets: bool = _setting(False, "Keep each image's aspect ratio (buckets of about resolution^2 pixels).",
                                    meta=("tlora.train.aspect_buckets",))
    train_text_encoder: bool = _setting(False, "Also adapt the text encoder(s).", config="text_encoder",
                                        meta=("tlora.train.text_encoder",))
    dco_beta: float = _setting(1000.0, "DCO's beta: how hard the loss holds the base model's behaviour.",
                               min=0.0, max=100000.0, step=1.0, meta=("tlora.train.dco_beta",),
                               meta_when=lambda s: s.loss == "dco")
    optimizer: str = _setting(
        "adamw", "adamw (torch), adamw8bit (bitsandbytes, GPU only), prodigy (prodigyopt: sets its own step size, "
                 "use learning_rate 1), adafactor (transformers).", options=OPTIMIZERS,
        meta=("tlora.train.optimizer", "ss_optimizer"))
    transform_lr_scale: float = _setting(
        1.0, "The transform cores' learning rate is learning_rate x this (LoRA+-style separate rates).",
        min=0.0, max=100.0, step=0.05, meta=("tlora.train.transform_lr_scale",),
        meta_when=lambda s: s.transform_lr_scale != 1.0)
    residual_lr_scale: float = _setting(
        1.0, "The residual's learning rate is learning_rate x this (LoRA+ gives a LoRA's B 16x its A).",
        min=0.0, max=100.0, step=0.05, meta=("tlora.train.residual_lr_scale",),
        meta_when=lambda s: s.residual_lr_scale != 1.0)
    ema_decay: float = _setting(
        0.0, "Keep an exponential moving average of the adapter and save it as the file (0 = off; e.g. 0.999).",
        min=0.0, max=0.99999, step=0.0001, meta=("tlora.train.ema_decay",), meta_when=lambda s: s.ema_decay > 0)
    timestep_sampling: str = _setting(
        "auto", "How training noise levels are drawn: auto (the model's trainers' default: logit-normal on flow "
                "models, uniform otherwise), uniform, logit-normal (logit_mean, logit_std), sigmoid (of "
                "logit_std x a normal draw), shift (sigmoid, then timestep_shift). The model's own shift always "
                "applies.", options=TIMESTEP_SAMPLINGS, meta=("tlora.train.timestep_sampling",))
    timestep_shift: float = _setting(
        1.0, "Extra shift of the drawn noise level t -> s t / (1 + (s - 1) t) on top of the model's (1 = none; "
             "all modes but auto).", min=0.01, max=100.0, step=0.05, meta=("tlora.train.timestep_shift",),
        meta_when=lambda s: s.timestep_sampling != "auto")
    logit_mean: float = _setting(0.0, "logit-normal: mean of the normal draw.", min=-10.0, max=10.0, step=0.05,
                                 meta=("tlora.train.logit_mean",),
                                 meta_when=lambda s: s.timestep_sampling == "logit-normal")
    logit_std: float = _setting(1.0, "logit-normal: spread of the normal draw; sigmoid/shift: its scale.", min=0.01,
                                max=10.0, step=0.05, meta=("tlora.train.logit_std",),
                                meta_when=lambda s: s.timestep_sampling in ("logit-normal", "sigmoid", "shift"))
    caption_dropout: float = _setting(
        0.0, "Probability that an image trains with the empty caption instead of its own.", min=0.0, max=1.0,
        step=0.01, meta=("tlora.train.caption_dropout",), meta_when=lambda s: s.caption_dropout > 0)
    shuffle_tags: bool = _setting(
        False, "Shuffle comma-separated tags of each caption (tag_variants orders, encoded once each).",
        meta=("tlora.train.shuffle_tags",), meta_when=lambda s: s.shuffle_tags)
    keep_tags: int = _setting(0, "With shuffle_tags: the first N tags stay in place (kohya's keep_tokens).",
                              min=0, max=1000, meta=("tlora.train.keep_tags",), meta_when=lambda s: s.shuffle_tags)
    validation_split: float = _setting(
        0.0, "Hold out this share of the images (at least one) to report a validation loss on (0 = off).",
        min=0.0, max=0.5, step=0.01, meta=("tlora.train.validation_split",),
        meta_when=lambda s: s.validation_split > 0)
    validate_every: int = _setting(50, "With validation_split: the validation loss every N steps (and at the end).",
                                   min=1, max=100000)
    offload_blocks: int = _setting(
        0, "Keep this many of the model's blocks on the CPU, each brought to the device just before it runs "
           "(prefetched; block swap). Less memory, slower.", min=0, max=10000,
        meta=("tlora.train.offload_blocks",), meta_when=lambda s: s.offload_blocks > 0)
    checkpoint_blocks: int = _setting(
        0, "With gradient_checkpointing: how many blocks recompute in backward, from the first (0 = all). Fewer: "
           "faster, more memory.", min=0, max=10000)
    cache_encodings: bool = _setting(
        False, "Keep latents and text-encoder outputs on disk, keyed by image, caption, size and model: later runs "
               "and resumes skip the encoders.")
    memory_budget: float = _setting(
        0.0, "GiB the run may use on the device: a run estimated over it is refused, naming the setting that "
             "brings it under (0 = only report the estimate).", min=0.0, max=4096.0, step=0.5)
    # ----- settings without a node input (the command line and benchmarks set them) -----
    with_convs: bool = _setting(False, "Also adapt the UNet's ResBlock and sampler convs.", config="with_convs",
                                no_node="the node's targets presets are the paper's linear sets; convs are an "
                                        "expert option of the engine")
    shapes: str = _setting("paper", "How channel counts are factored into tensor-ring cores (paper | auto).",
                           options=("paper", "auto"), config="shapes",
                           no_node="the paper's factorisation is the tested one; `auto` is for experiments")
    sample_steps: int = _setting(20, "DDIM steps of previews and generated class images.", min=1, max=1000,
                                 no_node="previews are a glance, not a render: 20 steps is plenty")
    sample_cfg: float = _setting(5.0, "Classifier-free guidance of previews and class images.", min=0.0,
                                 max=100.0, no_node="fixed at a value that suits every SD family")
    weight_decay: float = _setting(1e-4, "AdamW weight decay.", min=0.0, max=1.0,
                                   no_node="the paper's value; rarely worth changing")
    adam_betas: tuple[float, float] = _setting((0.9, 0.999), "AdamW betas (each in [0, 1)).", min=0.0, max=0.999999,
                                               no_node="torch's defaults; rarely worth changing")
    max_grad_norm: float = _setting(1.0, "Gradient clipping norm.", min=1e-6, max=1e6,
                                    no_node="clipping at 1 keeps DCO stable; rarely worth changing")
    form: str = _setting("auto", "How the transform runs (auto picks the fastest; see tlora/forms.py).",
                         options=FORMS, no_node="a performance knob for benchmarks (TLORA_FORM overrides it too)")
    tag_variants: int = _setting(8, "With shuffle_tags: how many tag orders of each caption are encoded and drawn from.",
                                 min=1, max=64, no_node="eight orders cover what shuffling teaches; each costs one "
                                                        "text-encoder pass and its output's memory")

    def validate(self, label: Callable[[str], str] | None = None) -> None:
        """Raise TrainingError naming the first setting that cannot work (`label`: how the host names a field).

        The one check of every setting for every host (the node's inputs and the command line
        alike): each value inside its Spec's range and finite, options among their options,
        adapter kinds parsed and their ranks within MAX_RANKS, the warm-up shorter than the run.
        """
        name = label or (lambda n: _SPECS[n].input_name(n))
        for f, spec in specs():
            problem = _value_problem(getattr(self, f.name), f.default, spec)
            if problem:
                raise TrainingError(f"{name(f.name)} {problem}")
        for field_name, parse in (("transform", parse_transform), ("residual", parse_residual)):
            try:
                kind = parse(getattr(self, field_name))
            except TLoRAError as err:
                raise TrainingError(f"{name(field_name)}: {err}") from None
            top = MAX_RANKS.get(kind.kind)
            if top is not None and kind.rank > top:
                raise TrainingError(f"{name(field_name)} {kind} asks for rank {kind.rank}; {kind.kind} ranks go up "
                                    f"to {top} (the paper's adapter is trm:2 with tr:6)")
        if self.transform.strip().lower() == "none" and self.residual.strip().lower() == "none":
            raise TrainingError(f"{name('transform')} and {name('residual')} are both none: nothing would train")
        if self.optimizer == "adamw8bit" and not torch.cuda.is_available():
            raise TrainingError(f"{name('optimizer')} adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit optimizer); "
                                f"none is present: choose adamw, prodigy or adafactor")
        if self.optimizer == "prodigy" and self.transform_lr_scale != self.residual_lr_scale:
            raise TrainingError(f"{name('optimizer')} prodigy (prodigyopt) takes one rate for every part: set "
                                f"{name('transform_lr_scale')} and {name('residual_lr_scale')} alike, or use adamw "
                                f"or adafactor for separate rates")
        try:
            parse_previews(self.sample_prompt, self.instance_prompt, self.resolution, self.sample_steps,
                           self.sample_cfg)
        except TLoRAError as err:
            raise TrainingError(f"{name('sample_prompt')}: {err}") from None
        if self.warmup_steps and self.warmup_steps >= self.steps:
            raise TrainingError(f"{name('warmup_steps')}: the warm-up ({self.warmup_steps} steps) must be shorter than the run "
                                f"({self.steps} steps)")

    def replace(self, **changes: Any) -> "TrainSettings":
        """A copy with some settings changed."""
        return dataclasses.replace(self, **changes)

    def metadata(self) -> dict[str, str]:
        """The `tlora.train.*` / `ss_*` metadata these settings write into the file."""
        out: dict[str, str] = {}
        for f, spec in specs():
            if not spec.meta or (spec.meta_when is not None and not spec.meta_when(self)):
                continue
            value = getattr(self, f.name)
            for entry in spec.meta:
                key, fmt = entry if isinstance(entry, tuple) else (entry, None)
                out[key] = fmt(value, self) if fmt is not None else _fmt_value(value)
        return out

    def file_config(self) -> dict[str, Any]:
        """The settings part of the file's `tlora.config` (what the adapter was asked to be)."""
        return {spec.config: getattr(self, f.name) for f, spec in specs() if spec.config}


def _num(value: float) -> str:
    """A number as a message shows it (integers whole, floats short)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _value_problem(value: Any, default: Any, spec: Spec) -> str | None:
    """What is wrong with one setting's value against its Spec (None when it is fine)."""
    if isinstance(default, tuple):
        if not isinstance(value, tuple) or len(value) != len(default):
            return f"needs {len(default)} numbers (got {value!r})"
        for item in value:
            problem = _value_problem(item, default[0], spec)
            if problem:
                return problem
        return None
    if isinstance(default, bool) or isinstance(default, str):
        if spec.options is not None and value not in spec.options:
            return f"must be one of {', '.join(spec.options)} (got {value!r})"
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number (got {value})"
    if spec.min is not None and value < spec.min:
        return f"must be at least {_num(spec.min)} (got {_num(value)})"
    if spec.max is not None and value > spec.max:
        return f"must be at most {_num(spec.max)} (got {_num(value)})"
    if isinstance(default, int) and spec.step and spec.step > 1 and (value - (spec.min or 0)) % spec.step:
        return f"must be a multiple of {_num(spec.step)} (got {value})"
    return None


def specs() -> Iterator[tuple[dataclasses.Field, Spec]]:
    """Every setting's dataclass field and Spec, in declaration (node input) order."""
    for f in dataclasses.fields(TrainSettings):
        yield f, f.metadata["spec"]


SETTINGS: tuple[str, ...] = tuple(f.name for f, _ in specs())
_SPECS: dict[str, Spec] = {f.name: spec for f, spec in specs()}


def from_values(values: dict[str, Any], by_input_name: bool = False) -> TrainSettings:
    """Settings from host values ({name: value}); None or missing means the default.

    Values are cast to each field's type (hosts hand ints as floats, flags as 0/1...).
    """
    kwargs = {}
    for f, spec in specs():
        key = spec.input_name(f.name) if by_input_name else f.name
        value = values.get(key)
        if value is None:
            continue
        default = f.default
        if isinstance(default, bool):
            value = bool(value)
        elif isinstance(default, int):
            value = int(value)
        elif isinstance(default, float):
            value = float(value)
        elif isinstance(default, str):
            value = str(value)
        elif isinstance(default, tuple):
            value = tuple(value)
        kwargs[f.name] = value
    unknown = set(values) - {(s.input_name(f.name) if by_input_name else f.name) for f, s in specs()}
    if unknown:
        raise TrainingError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
    return TrainSettings(**kwargs)


def pick_precision(choice: str, device: torch.device) -> str:
    """`auto`: bf16 autocast where the accelerator has it, fp32 on CPUs (fast and exact there)."""
    if choice != "auto":
        return choice
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def derived_seed(seed: int, offset: int) -> int:
    """A seed for a second stream (text encoder, previews, class images), wrapped into torch's range.

    The node allows seeds up to 2**64 - 1; `seed + 1` past that overflowed torch's generator.
    """
    return (int(seed) + int(offset)) % (MAX_SEED + 1)


def adapter_params(weight_shapes: Iterable[Sequence[int]], transform: str | Kind, residual: str | Kind,
                   shapes: str = "paper") -> int:
    """Parameters of fresh adapters on weights of these shapes, counted from the layout (nothing allocated)."""
    if shapes not in SHAPE_PRESETS:
        raise TrainingError(f"shapes must be one of {', '.join(SHAPE_PRESETS)} (got {shapes!r})")
    total = 0
    for shape in weight_shapes:
        _, _, entries = layout(tuple(shape), transform, residual, shapes)
        total += sum(math.prod(s) for s in entries.values())
    return total


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes free for new tensors on a device (None when the platform does not say)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def check_adapter_size(weight_shapes: Sequence[Sequence[int]], transform: str | Kind, residual: str | Kind,
                       shapes: str = "paper", device: torch.device | str = "cpu") -> int:
    """The adapters' parameter count; TrainingError, before anything is allocated, if training them cannot fit.

    Training holds TRAIN_BYTES_PER_PARAM bytes per parameter; this is checked against the memory
    the device has free now (the model's own weights are already loaded).
    """
    params = adapter_params(weight_shapes, transform, residual, shapes)
    need = params * TRAIN_BYTES_PER_PARAM
    free = available_memory(device)
    if free is not None and need > free:
        raise TrainingError(f"transform {transform} with residual {residual} on {len(weight_shapes)} modules is "
                            f"{params:,} parameters: training them needs about {need / 2**30:.1f} GiB, "
                            f"{free / 2**30:.1f} GiB is free; choose smaller ranks")
    return params
