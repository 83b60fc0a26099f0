"""Train TLoRA inside a ComfyUI graph (thin: the work is in ../trainer).

The node's setting inputs are generated from `trainer.settings.TrainSettings`: one field
there is one input here, with its type, default, range, options and help text.
"""
from __future__ import annotations

import uuid
from typing import Any

import folder_paths
from comfy_api.latest import io, ui

from ..tlora import arch as tarch
from ..tlora.errors import TLoRAError
from ..trainer import settings as S
from ..trainer.chart import loss_curve
from ..trainer.comfy import run as comfy_run
from ..trainer.comfy.data import split_clips, split_images
from ..trainer.data import split_captions
from ..trainer.outputs import sanitize_output_name
from ..trainer.runs import TrainResult
from . import apply
from .comfy_adapter import register_train_adapter

CATEGORY = "training/TLoRA"
NONE = "[none]"
TLORA_ADAPTER = io.Custom("TLORA_ADAPTER")

# TrainLoraNode (ComfyUI's built-in trainer) lists adapter_maps; TLoRA joins it there.
register_train_adapter()

# Inputs that are data, not settings, and the setting each one goes before (saved workflows
# keep widget values by position, so the order is the node's contract).
DATA_INPUTS_BEFORE = {
    "class_prompt": [io.String.Input("captions", default="", multiline=True, optional=True,
                                     tooltip="Per-image captions: a text list (dataset loaders) or one per line.")],
    "resume": [io.Image.Input("class_images", optional=True)],
}


def _resume_options() -> list[str]:
    return [NONE] + [n for n in folder_paths.get_filename_list("loras") if n.lower().endswith(".safetensors")]


def setting_input(name: str, default: Any, spec: S.Spec) -> Any:
    """The node input for one training setting."""
    common = {"tooltip": spec.help, "optional": not spec.required}
    input_name = spec.input_name(name)
    if spec.host_choices == "loras":
        return io.Combo.Input(input_name, options=_resume_options(), default=NONE, **common)
    if spec.options is not None:
        return io.Combo.Input(input_name, options=list(spec.options), default=default, **common)
    bounds = {k: getattr(spec, k) for k in ("min", "max", "step") if getattr(spec, k) is not None}
    if isinstance(default, bool):
        return io.Boolean.Input(input_name, default=default, **common)
    if isinstance(default, int):
        return io.Int.Input(input_name, default=default, **bounds, **common)
    if isinstance(default, float):
        return io.Float.Input(input_name, default=default, **bounds, **common)
    return io.String.Input(input_name, default=default, multiline=spec.multiline, **common)


def setting_inputs() -> list[Any]:
    """Every setting that has a node input, in TrainSettings order, with the data inputs in place."""
    inputs: list[Any] = []
    for f, spec in S.specs():
        if spec.no_node:
            continue
        inputs.extend(DATA_INPUTS_BEFORE.get(f.name, []))
        inputs.append(setting_input(f.name, f.default, spec))
    return inputs


def _first(value: Any) -> Any:
    """is_input_list hands every input as a list: scalars are its first item."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def settings_from_inputs(values: dict[str, Any]) -> S.TrainSettings:
    """TrainSettings from the node's inputs (lists, as is_input_list gives them); resume becomes a full path."""
    settings = S.from_values({k: _first(v) for k, v in values.items()}, by_input_name=True)
    resume_name = settings.resume or NONE
    if resume_name == NONE:
        return settings.replace(resume="")
    resume_path = folder_paths.get_full_path("loras", resume_name)
    if resume_path is None:
        raise TLoRAError(f"resume file {resume_name!r} is not in the loras folder")
    return settings.replace(resume=resume_path)


def adapter_payload(result: TrainResult, file_name: str, arch: str | None) -> dict[str, Any]:
    """What flows on a TLORA_ADAPTER wire: adapters by file prefix, metadata, file name."""
    return {"adapters": dict(result.adapters), "metadata": dict(result.metadata), "file_name": file_name,
            "path": result.path, "arch": arch, "steps": result.steps_done, "history": list(result.history)}


class TLoRATrain(io.ComfyNode):
    """Subject-driven TLoRA fine-tune of a model from a few images, saved to the loras folder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRATrain", display_name="Train TLoRA", category=CATEGORY,
            description="Fine-tunes a TLoRA adapter (transform + residual) on a few images of a subject. "
                        "Saves into the loras folder (periodically too), shows progress, loss and samples, "
                        "and keeps a partial file if cancelled. Resume picks up exactly where a run stopped.",
            is_input_list=True, is_output_node=True,
            inputs=[
                io.Model.Input("model"), io.Clip.Input("clip"), io.Vae.Input("vae"),
                io.Image.Input("images", tooltip="Training images: an IMAGE batch or an image dataset loader."),
                *setting_inputs(),
                # Last, so saved workflows keep their links and widget values in place.
                io.Image.Input("clips", optional=True,
                               tooltip="Video models (Wan...): short clips to train on beside the stills, each "
                                       "IMAGE batch one clip of consecutive frames (as VAE Encode takes a video), "
                                       "captioned by the instance prompt."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The input model with the trained TLoRA applied."),
                io.Clip.Output(display_name="clip", tooltip="The CLIP, with the adapter if the text encoder trained."),
                TLORA_ADAPTER.Output(display_name="adapter"),
                io.Image.Output(display_name="loss_curve"),
                io.String.Output(display_name="file_name"),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt])

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> Any:
        """Never the same: queuing a training graph again trains again (into a new file name).

        ComfyUI would otherwise reuse the cached outputs of an identical graph and report
        success with no run and, if the file was deleted meanwhile, no file.
        """
        return uuid.uuid4().hex

    @classmethod
    def execute(cls, model, clip, vae, images, captions=None, class_images=None, clips=None,
                **values) -> io.NodeOutput:
        model, clip, vae = _first(model), _first(clip), _first(vae)
        images = split_images(images)
        class_images = split_images(class_images)
        clip_list = split_clips(clips)
        settings = settings_from_inputs(values)
        # Refuse a hostile name before any work is done.
        sanitize_output_name(settings.output_name)
        caption_list = split_captions(captions, len(images))
        result, file_name, arch = comfy_run.train(
            model, clip, vae, images, caption_list, settings, class_images,
            node_id=cls.hidden.unique_id if cls.hidden else None, prompt=cls.hidden.prompt if cls.hidden else None,
            clips=clip_list)
        payload = adapter_payload(result, file_name, arch)
        new_model, new_clip = apply_payload(payload, model, clip, 1.0, 1.0)
        curve = loss_curve(result.history, title=f"{file_name}: {settings.loss} loss", validation=result.validation)
        return io.NodeOutput(new_model, new_clip, payload, curve, file_name, ui=ui.PreviewImage(curve, cls=cls))


def apply_payload(payload: dict[str, Any], model, clip, strength_model: float, strength_clip: float):
    """(model, clip) with a TLORA_ADAPTER applied through ComfyUI's patcher: merged on float weights (no
    overhead), activation-side on quantized ones (`auto`, as our loaders: the stored weights stay as they are)."""
    adapters = payload["adapters"]
    has_te = any(k.startswith(tarch.TE_PREFIX) for k in adapters)
    use_clip = clip if has_te else None
    model_patches, clip_patches = apply.plan_patches(adapters, payload.get("metadata", {}),
                                                     payload.get("file_name", "trained adapter"), model, use_clip)
    label = payload.get("file_name", "trained adapter")
    new_model = model if strength_model == 0 else \
        apply.apply_model_patches(model, model_patches, strength_model, None, "auto", label)
    new_clip = clip
    if clip_patches and strength_clip != 0:
        new_clip = apply.add_weighted(clip, clip_patches, strength_clip)
    return new_model, new_clip


class TLoRAApplyAdapter(io.ComfyNode):
    """Apply a TLORA_ADAPTER (e.g. straight from Train TLoRA) at chosen strengths."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRAApplyAdapter", display_name="Apply TLoRA Adapter", category=CATEGORY,
            description="Applies an in-memory TLoRA adapter (the Train TLoRA node's `adapter` output). "
                        "Strength is linear in weight space: 0 is the base model exactly.",
            inputs=[io.Model.Input("model"), TLORA_ADAPTER.Input("adapter"),
                    io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01),
                    io.Clip.Input("clip", optional=True),
                    io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01, optional=True)],
            outputs=[io.Model.Output(), io.Clip.Output()])

    @classmethod
    def execute(cls, model, adapter, strength_model, clip=None, strength_clip=1.0) -> io.NodeOutput:
        apply.check_strengths(strength_model=strength_model, strength_clip=strength_clip)
        new_model, new_clip = apply_payload(adapter, model, clip, strength_model, strength_clip)
        return io.NodeOutput(new_model, new_clip)


NODES = [TLoRATrain, TLoRAApplyAdapter]
