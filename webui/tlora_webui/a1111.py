"""A1111: a module type in the built-in Lora extension's `networks.module_types`.

Its loader splits each key at the first dot (module name, then the network part) and offers a
module's keys to each module type; `calc_updown` returns the weight difference to add. Modules
named as in ComfyUI (`diffusion_model.x.y`) are renamed to kohya names first (see load_network).
"""
from __future__ import annotations

import functools
import json
import os

import safetensors
import torch

from . import core


def module_type_classes(network) -> tuple[type, type]:
    """(ModuleType, NetworkModule) subclasses for A1111's `network` module."""

    class NetworkModuleTLoRA(network.NetworkModule):
        """One weight's TLoRA: updown = sigma (W0 T + s Delta - W0), sigma the host's multiplier."""

        def __init__(self, net, weights):
            super().__init__(net, weights)
            name = weights.network_key.partition(".")[0]  # the module's name in the file (our messages use it)
            self.adapter = core.claim(name, {f"{name}.{k}": v for k, v in weights.w.items()})[0]
            if self.shape is not None:
                # At load time, so a misfit fails the whole file (the host then applies none of it).
                core.check_fits(self.adapter, self.shape)

        def calc_updown(self, orig_weight: torch.Tensor) -> tuple[torch.Tensor, None]:
            """(sigma (W0 T + s Delta - W0), no bias): the whole update, strength already folded in."""
            sigma = float(self.multiplier())
            if sigma == 0:
                return torch.zeros_like(orig_weight, dtype=torch.float32), None  # base bit for bit
            return self.adapter.weight_diff(orig_weight, sigma), None

    return core.module_type(network.ModuleType, NetworkModuleTLoRA), NetworkModuleTLoRA


def _arch_of(metadata: dict) -> str:
    config = metadata.get("tlora.config", {})  # A1111's metadata reader already parses JSON objects
    try:
        config = json.loads(config) if isinstance(config, str) else config
        return str(config.get("arch") or "sd15")
    except (ValueError, AttributeError):
        return "sd15"


def _all_matched(net, keys: set, name: str):
    """The loaded network, or TLoRAError when some of its TLoRA modules matched no layer of this model.

    A1111 drops keys it cannot place with a debug-level log only: such a file (made for another
    model) would be applied in part without a word. Our loaders refuse it whole; so does this one.
    """
    modules = {k[:k.rfind(".tlora_")] for k in keys if core.tformat.is_tlora_key(k)}
    claimed = {m.adapter.name for m in net.modules.values() if isinstance(getattr(m, "adapter", None), core.ModuleAdapter)}
    missing = sorted(modules - claimed)
    if missing:
        raise core.TLoRAError(f"TLoRA file {name}: {len(missing)} of {len(modules)} modules match no layer of this "
                              f"model (e.g. {missing[0]}); nothing of it was applied")
    return net


def _guard_metadata_reader(sd_models) -> None:
    """A header nested too deeply for json is named in one line before the webui's reader prints a RecursionError.

    The webui reads every listed file's header for its cards; its reader catches the RecursionError
    itself and prints it with a traceback. Checked first with the core's guarded parser, such a file
    is reported by the card code as one line ("reading lora <file>: ...") and left out.
    """
    original = sd_models.read_metadata_from_safetensors
    if getattr(original, "_tlora_guard", False):
        return

    @functools.wraps(original)
    def read_metadata_from_safetensors(filename):
        with open(filename, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            raw = handle.read(length) if 2 < length <= core.tformat.MAX_HEADER_BYTES else b"{}"
        try:
            core.tformat.parse_json(raw)
        except ValueError as err:
            if "nested too deeply" in str(err):
                raise ValueError(f"{os.path.basename(str(filename))}: its safetensors header is {err}; the file "
                                 f"was left out") from None
        return original(filename)

    read_metadata_from_safetensors._tlora_guard = True
    sd_models.read_metadata_from_safetensors = read_metadata_from_safetensors


def install(networks, network, sd_models) -> None:
    """Append our module type and wrap networks.load_network to give TLoRA files kohya names."""
    if any(type(t).__name__ == "ModuleTypeTLoRA" for t in networks.module_types):
        return
    module_type, _ = module_type_classes(network)
    networks.module_types.append(module_type())
    _guard_metadata_reader(sd_models)
    original = networks.load_network

    @functools.wraps(original)
    def load_network(name, network_on_disk):
        filename = str(network_on_disk.filename)
        if not filename.lower().endswith(".safetensors"):
            return original(name, network_on_disk)
        with safetensors.safe_open(filename, "pt") as handle:  # the header only
            keys = set(handle.keys())
        if not any(core.tformat.is_tlora_key(k) for k in keys):
            return original(name, network_on_disk)
        core.check_file(filename, keys)  # version, one adapter per weight: before the host groups keys
        dotted = any(".tlora_" in k and "." in k.rpartition(".tlora_")[0] for k in keys)
        if not dotted:
            return _all_matched(original(name, network_on_disk), keys, name)
        read = sd_models.read_state_dict
        renamed = core.kohya_renamed(read(filename), _arch_of(getattr(network_on_disk, "metadata", {}) or {}))
        # The host's loader reads the file itself; hand it the renamed tensors for this one call
        # (the webui loads networks one at a time, on its one generation thread).
        sd_models.read_state_dict = lambda *a, **k: renamed
        try:
            return _all_matched(original(name, network_on_disk), set(renamed), name)
        finally:
            sd_models.read_state_dict = read

    networks.load_network = load_network
