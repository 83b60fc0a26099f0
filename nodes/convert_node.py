"""Export a TLoRA as an ordinary LoRA against the MODEL (and CLIP) in the graph (the work is tlora/convert.py).

The base weights are the live model's own, found through ComfyUI's key maps (every name form the host
takes: generic, kohya, diffusers, whose Flux/SD3 q/k/v are row slices of fused weights); the LoRA is
written into the first `loras` folder with a counter, never over an existing file, so the stock
LoRA loaders list it at once.
"""
from __future__ import annotations

import os
from typing import Any

import folder_paths
from comfy_api.latest import io, ui

from ..tlora import arch as arch_mod
from ..tlora.basefile import Located, WeightBase
from ..tlora.convert import Input, LoRATarget, convert, report_text, write_result
from ..tlora.errors import TLoRAError
from ..tlora.fileio import parse_json
from . import apply
from .loader_nodes import CATEGORY, file_fingerprint, lora_names, resolve


def _weight(root: Any, key: str) -> Any:
    """A live weight as a plain tensor (quantized ones dequantized), unpatched."""
    import comfy.utils
    value = comfy.utils.get_attr(root, key)
    if type(value).__name__ == "QuantizedTensor":  # ComfyUI 0.33's fp8/nvfp4 layouts
        value = value.dequantize()
    return value.detach()


def live_base(model: Any, clip: Any = None) -> WeightBase:
    """A `WeightBase` over a MODEL's (and a CLIP's) own weights, named as ComfyUI's key maps name them.

    Every loaded model is unloaded first: a model patched in place for sampling holds patched weights.
    """
    import comfy.lora
    import comfy.model_management as mm
    import comfy.utils
    mm.unload_all_models()
    parts = [(model.model, comfy.lora.model_lora_keys_unet(model.model, {}), "")]
    if clip is not None:
        parts.append((clip.cond_stage_model, comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}),
                      arch_mod.TE_PREFIX))
    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, tuple[Any, str]] = {}
    aliases: dict[str, Located] = {}
    for root, key_map, prefix in parts:
        for name, target in key_map.items():
            span = None
            if not isinstance(target, str):
                if len(target) != 2 or target[1] is None or target[1][0] != 0:
                    continue  # a row permutation (swapped modulation halves): the weight's own name still works
                target, span = target[0], ((int(target[1][1]), int(target[1][2])),)
            generic = prefix + target[:-len(".weight")]
            if generic not in shapes:
                try:
                    shape = tuple(comfy.utils.get_attr(root, target).shape)
                except AttributeError:
                    continue
                if len(shape) not in (2, 4):
                    continue
                shapes[generic], where[generic] = shape, (root, target)
            aliases[name] = Located(generic, span)
    host_model = type(model.model.model_config).__name__
    archs = arch_mod.archs_for_host_model(host_model)
    return WeightBase(shapes, lambda g: _weight(*where[g]), aliases, "the MODEL/CLIP",
                      "sd15" if archs == ("sd15",) else "sdxl")


def _arch_of(model: Any, config: dict) -> str | None:
    archs = arch_mod.archs_for_host_model(type(model.model.model_config).__name__)
    if config.get("arch") in archs:
        return config["arch"]
    return archs[0] if len(archs) == 1 else None


def output_path(filename_prefix: str) -> tuple[str, str]:
    """(full path, name in the loras list) of the next free `<prefix>_<counter>_.safetensors` in the loras folder."""
    folder = folder_paths.get_folder_paths("loras")[0]
    full_folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, folder)
    os.makedirs(full_folder, exist_ok=True)
    name = f"{filename}_{counter:05}_.safetensors"
    return os.path.join(full_folder, name), os.path.join(subfolder, name) if subfolder else name


class TLoRAExportLoRA(io.ComfyNode):
    """Write a TLoRA as an ordinary LoRA (truncated SVD per weight) that every host's stock loader reads."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRAExportLoRA", display_name="Export TLoRA as LoRA", category=CATEGORY,
            description="Writes the adapter's effect on this model's own weights (W0 T + s Delta - W0) as an "
                        "ordinary LoRA into the loras folder: the best approximation at a rank, or the smallest rank "
                        "per module meeting a relative error. For sharing with people who do not have this pack; the "
                        "report says what the approximation loses. Frees loaded models first.",
            inputs=[io.Model.Input("model"), io.Combo.Input("adapter_name", options=lora_names()),
                    io.Int.Input("rank", default=32, min=0, max=4096,
                                 tooltip="LoRA rank of every module (capped at the weight's). 0: use max_error."),
                    io.Float.Input("max_error", default=0.05, min=0.0, max=1.0, step=0.005,
                                   tooltip="With rank 0: per module, the smallest rank whose relative Frobenius "
                                           "error of the weight change is at most this."),
                    io.String.Input("filename_prefix", default="tlora_export/lora"),
                    io.Clip.Input("clip", optional=True, tooltip="Needed when the adapter has text-encoder modules.")],
            outputs=[io.String.Output(display_name="report")], is_output_node=True)

    @classmethod
    def fingerprint_inputs(cls, adapter_name, **kwargs) -> Any:
        """The file's stamp: a replaced file re-runs this node."""
        return file_fingerprint(adapter_name)

    @classmethod
    def execute(cls, model, adapter_name, rank, max_error, filename_prefix, clip=None) -> io.NodeOutput:
        import comfy.utils
        target = LoRATarget(rank=int(rank)) if rank else LoRATarget(max_error=float(max_error))
        adapters, metadata = apply.load_cached(resolve(adapter_name), adapter_name)
        if clip is None and any(p.startswith(apply.TEXT_ENCODER_PREFIXES) for p in adapters):
            raise TLoRAError(f"TLoRA {adapter_name!r} has text-encoder modules: connect the CLIP it was made for")
        try:
            config = parse_json(metadata.get("tlora.config", "{}"))
        except ValueError:
            config = {}
        config = config if isinstance(config, dict) else {}
        inp = Input(os.path.basename(adapter_name), "tlora", 1.0, dict(adapters), config=config)
        base = live_base(model, clip)
        bar = comfy.utils.ProgressBar(1)
        result = convert([inp], base, target, progress=False,
                         on_step=lambda done, total: bar.update_absolute(done, total))
        path, name = output_path(filename_prefix)
        write_result(result, path, [inp], "the MODEL", _arch_of(model, config), replace=False)
        text = report_text(result, name)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


NODES = [TLoRAExportLoRA]
