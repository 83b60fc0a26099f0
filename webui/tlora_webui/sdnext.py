"""SD.Next: TLoRA files through its native LoRA path (modules/lora), our module type in `lora_common.module_types`.

SD.Next runs diffusers models. Its loader (`lora_load.load_safetensors`) splits each key at its first
dot, converts kohya UNet names from the ldm layout (`KeyConvert`) and finds the layer by the names it
gave the model (`lora_unet_`, `lora_transformer_`, `lora_te_`/`lora_te1_`/`lora_te2_` + the diffusers
path with underscores); module types then claim each layer's keys. In front of it, a TLoRA file is
renamed for that loader (sdnext_names.py) and, for a model type with a per-family native loader of
fixed lists (`_NATIVE_DISPATCH`: Z-Image, Chroma, ERNIE-Image, Flux.2, Anima, Krea 2), the same
generic path is used for that one file: every family binds our modules by the layer names SD.Next
assigns. Files SD.Next would hand to diffusers/PEFT or nunchaku are refused with one line naming the
model type. A module that does not fit, or names no layer, refuses the whole file (SD.Next logs
the line and skips the file; its other networks still load).

SD.Next adds every network's update, each computed from the layer's weight, to the weight. A TLoRA's
update depends on that weight, so it is computed from the layer's backup (W0) where SD.Next keeps one
("backup" mode); in its default "fuse" mode (no backup) from the weight at activation, and the pass
that removes the network gets back the very update that was added, so removal restores W0.
"""
from __future__ import annotations

import functools
import os
import types

import safetensors
import torch

from . import core, sdnext_names

# While SD.Next's loader reads one renamed file: {layer name: (module name in the file, rows of a fused adapter)}.
_targets: dict[str, tuple[str, torch.Tensor | None]] = {}


def module_type_classes(network: types.ModuleType) -> tuple[type, type]:
    """(ModuleType, NetworkModule) subclasses for SD.Next's `modules.lora.network`."""

    class NetworkModuleTLoRA(network.NetworkModule):
        """One layer's TLoRA (rows of a fused one on a split layer): updown = sigma (W0 T + s Delta - W0)."""

        def __init__(self, net, weights):
            super().__init__(net, weights)
            layer = weights.network_key.partition(".")[0]
            self.source, pick = _targets.get(layer, (layer, None))
            # Claimed under the file's own name: every message names the module as the user wrote it.
            adapter = core.claim(self.source, {f"{self.source}.{k}": v for k, v in weights.w.items()})[0]
            shape = tuple(self.shape) if self.shape is not None else None
            if shape is None or len(shape) not in (2, 4):
                raise core.TLoRAError(f"TLoRA file does not fit this model: {self.source} names "
                                      f"{weights.sd_key}, which has no Linear or Conv2d weight; nothing of it was applied")
            # At load time, so a misfit fails the whole file (SD.Next then skips it with our line).
            if pick is not None and adapter.out_features is not None and len(pick) != shape[0]:
                raise core.TLoRAShapeError(f"TLoRA file does not fit this model: {self.source}: {weights.sd_key} "
                                           f"has {shape[0]} rows, the mapping gives it {len(pick)}; nothing of it "
                                           f"was applied")
            core.check_fits(adapter, (adapter.out_features if pick is not None else shape[0], *shape[1:]))
            self.adapter, self.pick = adapter, pick
            self.added: torch.Tensor | None = None

        def _base(self, target: torch.Tensor) -> torch.Tensor:
            backup = getattr(self.sd_module, "network_weights_backup", None)
            if isinstance(backup, torch.Tensor) and backup.is_floating_point() and backup.shape == target.shape:
                return backup.to(target.device)  # backup mode: `target` may still carry the previous networks
            return target

        def calc_updown(self, target: torch.Tensor) -> tuple[torch.Tensor, None]:
            """(sigma (W0 T + s Delta - W0), no bias), strength folded in; the removal pass gets what was added."""
            fused = getattr(self.sd_module, "network_current_names", ())
            if self.added is not None and any(n and n[0] == self.network.name for n in fused):
                return self.added.to(target.device), None  # fuse mode, removing us: exactly what we added
            sigma = float(self.multiplier())
            base = self._base(target).float()
            if sigma == 0:
                diff = torch.zeros_like(base)  # the base bit for bit
            else:
                shape = base.shape
                geometry = core.Geometry(shape[0], shape[1], tuple(shape[2:]) if len(shape) == 4 else ())
                entry = core.Entry(self.adapter, geometry, strength=sigma, pick=self.pick)
                diff = entry.weight_diff(base)
            self.added = diff.detach()
            return diff, None

    return core.module_type(network.ModuleType, NetworkModuleTLoRA), NetworkModuleTLoRA


def _file_keys(filename: str) -> set[str]:
    with safetensors.safe_open(filename, "pt") as handle:  # the header only
        return set(handle.keys())


def _matched_all(net, expected: dict[str, str], label: str) -> None:
    """Refuse (the core's wording) unless every renamed module became one of our modules in `net`."""
    made = {getattr(m, "source", None) for m in (net.modules.values() if net is not None else ())
            if isinstance(getattr(m, "adapter", None), core.ModuleAdapter)}
    files = sorted(set(expected.values()))
    core.check_all_matched(label, [f"{m}.tlora_scale" for m in files], made)


def loader(original, lora_load: types.ModuleType, shared: types.ModuleType, sd_models: types.ModuleType):
    """lora_load.load_safetensors with TLoRA files renamed for SD.Next's generic path (any model type)."""

    @functools.wraps(original)
    def load_safetensors(name, network_on_disk):
        filename = str(network_on_disk.filename)
        if not filename.lower().endswith(".safetensors") or not shared.sd_loaded:
            return original(name, network_on_disk)
        keys = _file_keys(filename)
        if not core.is_tlora_file(keys):
            return original(name, network_on_disk)
        label = os.path.basename(filename)
        core.check_file(filename, keys)
        pipe = getattr(shared.sd_model, "pipe", shared.sd_model)
        read = sd_models.read_state_dict
        renamed, targets = sdnext_names.rename(read(filename, what="network"), pipe, str(shared.sd_model_type), label)
        dispatch = getattr(lora_load, "_NATIVE_DISPATCH", {})
        native = dispatch.pop(shared.sd_model_type, None)  # the generic path, for this file only
        _targets.clear()
        _targets.update(targets)
        sd_models.read_state_dict = lambda *a, **k: renamed
        try:
            lora_load.lora_cache.pop(name, None)
            net = original(name, network_on_disk)
        finally:
            sd_models.read_state_dict = read
            if native is not None:
                dispatch[shared.sd_model_type] = native
            expected = {layer: source for layer, (source, _) in targets.items()}
            _targets.clear()
        try:
            _matched_all(net, expected, label)
        except core.TLoRAError:
            lora_load.lora_cache.pop(name, None)
            raise
        return net

    load_safetensors._tlora_guard = True
    return load_safetensors


def _refusing(original, label_of, why_of):
    """A loader that refuses TLoRA files (one line, why_of()) and hands every other file to `original`."""

    @functools.wraps(original)
    def refusing(*args, **kwargs):
        for filename in label_of(*args, **kwargs):
            if filename and str(filename).lower().endswith(".safetensors") and os.path.isfile(filename) \
                    and core.is_tlora_file(_file_keys(filename)):
                raise core.TLoRAError(f"{core.METHOD} file {os.path.basename(filename)}: {why_of()}. "
                                      f"Nothing of it was applied.")
        return original(*args, **kwargs)

    refusing._tlora_guard = True
    return refusing


def install() -> None:
    """Append our module type and guard SD.Next's three LoRA loaders (native, diffusers, nunchaku)."""
    from modules import sd_models, shared
    from modules.lora import lora_common, lora_diffusers, lora_load, lora_nunchaku, network
    if not any(type(t).__name__ == "ModuleTypeTLoRA" for t in lora_common.module_types):
        lora_common.module_types.append(module_type_classes(network)[0]())
    if not getattr(lora_load.load_safetensors, "_tlora_guard", False):
        lora_load.load_safetensors = loader(lora_load.load_safetensors, lora_load, shared, sd_models)
    if not getattr(lora_diffusers.load_diffusers, "_tlora_guard", False):
        lora_diffusers.load_diffusers = _refusing(
            lora_diffusers.load_diffusers, lambda name, nod, *a, **k: [getattr(nod, "filename", None)],
            lambda: (f"SD.Next loads LoRAs for this {shared.sd_model_type} model through diffusers/PEFT "
                     f"(setting 'LoRA load using Diffusers method', or a model type without its native "
                     f"loader), which has no layer for it"))
    if not getattr(lora_nunchaku.load_nunchaku, "_tlora_guard", False):
        lora_nunchaku.load_nunchaku = _refusing(
            lora_nunchaku.load_nunchaku,
            lambda names, *a, **k: [getattr(n, "filename", None) for n in lora_load.gather_networks(names) if n],
            lambda: "SD.Next runs this model through nunchaku (SVDQuant), whose LoRA composer takes LoRA factors only")
