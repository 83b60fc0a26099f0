"""Loader and info nodes: apply TLoRA files from `models/loras` with strengths."""
from __future__ import annotations

import os
from typing import Any

import folder_paths
from comfy_api.latest import io, ui

from ..tlora.errors import TLoRAError
from ..tlora.fileio import parse_json
from . import apply
from .display import short_config, short_metadata, short_value

CATEGORY = "loaders/TLoRA"


def lora_names() -> list[str]:
    """The files in ComfyUI's `loras` folders (the same list the stock loaders show)."""
    return folder_paths.get_filename_list("loras")


def resolve(adapter_name: str) -> str:
    """Full path of a name from the `loras` list; anything else is refused."""
    if adapter_name not in lora_names():
        raise TLoRAError(f"adapter {adapter_name!r} is not in the loras folder")
    return folder_paths.get_full_path_or_raise("loras", adapter_name)


def file_fingerprint(adapter_name: str) -> Any:
    """What ComfyUI compares to decide whether a loader runs again: the name and the file's stamp.

    The host re-runs a node only when its inputs change; a file replaced on disk (a periodic
    save, a resume into the same name) must count as a change.
    """
    try:
        return (adapter_name, apply.file_stamp(resolve(adapter_name)))
    except TLoRAError:
        return (adapter_name, None)  # execute() says what is wrong


def _strength(name: str, tooltip: str) -> io.Float.Input:
    return io.Float.Input(name, default=1.0, min=-100.0, max=100.0, step=0.01, tooltip=tooltip)


def _mode() -> io.Combo.Input:
    """How the diffusion model gets the adapter (appended last: saved workflows keep widget values by position)."""
    return io.Combo.Input(
        "mode", options=list(apply.activation.MODES), default="auto", optional=True,
        tooltip="merged: into the weights (fastest sampling on float models). activation: around each layer's "
                "own forward, weights never touched (quantized fp8/int8/nvfp4/GGUF models; a strength change "
                "costs nothing). auto: activation where a weight is quantized or not a plain float tensor, merged "
                "elsewhere. The text encoder is always merged.")


class TLoRALoader(io.ComfyNode):
    """Apply a TLoRA file to a model and its text encoder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRALoader", display_name="Load TLoRA", category=CATEGORY,
            description="Applies a TLoRA (transform + residual) adapter. Strength is linear in weight "
                        "space: 0 is the base model exactly, 1 the trained model, negatives allowed.",
            inputs=[io.Model.Input("model"), io.Clip.Input("clip"),
                    io.Combo.Input("adapter_name", options=lora_names()),
                    _strength("strength_model", "Strength on the diffusion model."),
                    _strength("strength_clip", "Strength on the text encoder."), _mode()],
            outputs=[io.Model.Output(), io.Clip.Output()])

    @classmethod
    def fingerprint_inputs(cls, adapter_name, **kwargs) -> Any:
        """The file's stamp: a replaced file re-runs this node."""
        return file_fingerprint(adapter_name)

    @classmethod
    def execute(cls, model, clip, adapter_name, strength_model, strength_clip, mode="auto") -> io.NodeOutput:
        apply.check_strengths(strength_model=strength_model, strength_clip=strength_clip)
        new_model, new_clip = apply.apply_file(resolve(adapter_name), adapter_name, model, clip,
                                               strength_model, strength_clip, mode=mode)
        return io.NodeOutput(new_model, new_clip)


class TLoRALoaderModelOnly(io.ComfyNode):
    """Apply a TLoRA file to a model only."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRALoaderModelOnly", display_name="Load TLoRA (model only)", category=CATEGORY,
            description="Applies a TLoRA adapter to the diffusion model only.",
            inputs=[io.Model.Input("model"), io.Combo.Input("adapter_name", options=lora_names()),
                    _strength("strength_model", "Strength on the diffusion model."), _mode()],
            outputs=[io.Model.Output()])

    @classmethod
    def fingerprint_inputs(cls, adapter_name, **kwargs) -> Any:
        """The file's stamp: a replaced file re-runs this node."""
        return file_fingerprint(adapter_name)

    @classmethod
    def execute(cls, model, adapter_name, strength_model, mode="auto") -> io.NodeOutput:
        apply.check_strengths(strength_model=strength_model)
        new_model, _ = apply.apply_file(resolve(adapter_name), adapter_name, model, None, strength_model, mode=mode)
        return io.NodeOutput(new_model)


class TLoRABlockWeights(io.ComfyNode):
    """Apply any adapter file (TLoRA, LoRA, LoHa, ...) with separate input/middle/output strengths."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRABlockWeights", display_name="Load Adapter (block weights)", category=CATEGORY,
            description="Applies an adapter file from the loras folder with a strength per UNet block "
                        "group; `overrides` sets single blocks, e.g. `input_blocks.4=0.5, output_blocks.2=0`.",
            inputs=[io.Model.Input("model"), io.Combo.Input("adapter_name", options=lora_names()),
                    _strength("strength_model", "Overall strength."),
                    io.Float.Input("input_blocks", default=1.0, min=-10.0, max=10.0, step=0.05),
                    io.Float.Input("middle_block", default=1.0, min=-10.0, max=10.0, step=0.05),
                    io.Float.Input("output_blocks", default=1.0, min=-10.0, max=10.0, step=0.05),
                    io.Float.Input("other", default=1.0, min=-10.0, max=10.0, step=0.05,
                                   tooltip="Weights outside the three block groups (time embedding, out)."),
                    io.String.Input("overrides", default="", multiline=True, optional=True), _mode()],
            outputs=[io.Model.Output()])

    @classmethod
    def fingerprint_inputs(cls, adapter_name, **kwargs) -> Any:
        """The file's stamp: a replaced file re-runs this node."""
        return file_fingerprint(adapter_name)

    @classmethod
    def execute(cls, model, adapter_name, strength_model, input_blocks, middle_block, output_blocks,
                other, overrides="", mode="auto") -> io.NodeOutput:
        apply.check_strengths(strength_model=strength_model, input_blocks=input_blocks, middle_block=middle_block,
                              output_blocks=output_blocks, other=other)
        parsed = apply.parse_block_overrides(overrides)
        apply.check_overrides_exist(parsed, model.model.state_dict().keys())
        multiplier = apply.block_multiplier(
            {"input": input_blocks, "middle": middle_block, "output": output_blocks, "other": other}, parsed)
        path = resolve(adapter_name)
        if strength_model == 0:
            return io.NodeOutput(model)
        if apply.is_tlora_file(path):
            new_model, _ = apply.apply_file(path, adapter_name, model, None, strength_model, multiplier=multiplier,
                                            mode=mode)
        else:
            new_model = apply.apply_other_file(path, adapter_name, model, strength_model, multiplier, mode=mode)
        return io.NodeOutput(new_model)


def describe(adapter_name: str) -> dict:
    """What a TLoRA file is: config, sizes, base architecture and training metadata."""
    path = resolve(adapter_name)
    adapters, metadata = apply.load_cached(path, adapter_name)
    try:
        config = parse_json(metadata.get("tlora.config", "{}"))
    except ValueError:
        config = {}
    kinds: dict[str, int] = {}
    for adapter in adapters.values():
        kind = f"{adapter.transform} + {adapter.residual}"
        kinds[kind] = kinds.get(kind, 0) + 1
    training = short_metadata({k: v for k, v in metadata.items() if k.startswith(("tlora.train.", "ss_"))})
    return {"name": adapter_name, "file_bytes": os.path.getsize(path), "modules": len(adapters),
            "params": sum(a.num_params() for a in adapters.values()), "kinds": kinds,
            "architecture": short_value(metadata.get("modelspec.architecture", "unknown"), 80),
            "title": short_value(metadata.get("modelspec.title", "")), "config": short_config(config),
            "training": training}


def describe_text(info: dict) -> str:
    """A few readable lines for the node."""
    lines = [f"{info['name']}: {info['params']:,} parameters in {info['modules']} modules, "
             f"{info['file_bytes'] / 1e6:.2f} MB",
             f"architecture: {info['architecture']}",
             "kinds: " + ", ".join(f"{k} x{n}" for k, n in info["kinds"].items())]
    cfg = info["config"]
    if cfg:
        lines.append("config: " + ", ".join(f"{k}={cfg[k]}" for k in ("transform", "residual", "targets", "shapes")
                                            if k in cfg))
    for key, value in sorted(info["training"].items()):
        lines.append(f"{key}: {value}")
    return "\n".join(lines)


class TLoRAInfo(io.ComfyNode):
    """Show what an adapter file is."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRAInfo", display_name="TLoRA Info", category=CATEGORY,
            description="Shows a TLoRA file's config, parameter count, size, base architecture and "
                        "training metadata.",
            inputs=[io.Combo.Input("adapter_name", options=lora_names())],
            outputs=[io.String.Output(display_name="info")], is_output_node=True)

    @classmethod
    def fingerprint_inputs(cls, adapter_name, **kwargs) -> Any:
        """The file's stamp: a replaced file re-runs this node."""
        return file_fingerprint(adapter_name)

    @classmethod
    def execute(cls, adapter_name) -> io.NodeOutput:
        text = describe_text(describe(adapter_name))
        return io.NodeOutput(text, ui=ui.PreviewText(text))


NODES = [TLoRALoader, TLoRALoaderModelOnly, TLoRABlockWeights, TLoRAInfo]
