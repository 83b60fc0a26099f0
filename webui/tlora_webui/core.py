"""What the webui glue takes from the core: claiming a module's keys and one-line errors.

The core (`tlora/`) sits at the root of the repository this folder belongs to; the folder is
linked or copied into a webui's extensions/, so the root is found from this file's real path.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Collection, Mapping

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
if not os.path.isfile(os.path.join(_ROOT, "tlora", "adapter.py")):
    raise ImportError(f"TLoRA: the core `tlora/` was not found at {_ROOT}: link this extension's folder "
                      f"(webui/ of ComfyUI-TLoRA) into extensions/ rather than copying it alone")
if _ROOT not in sys.path:
    sys.path.append(_ROOT)  # appended: never shadows a webui module

from tlora import arch as tarch  # noqa: E402
from tlora import format as tformat  # noqa: E402
from tlora.adapter import ModuleAdapter  # noqa: E402
from tlora.claim import MISSING, OVERLAP, broken, claim, module_prefixes, refusal  # noqa: E402
from tlora.errors import TLoRAError, TLoRAShapeError  # noqa: E402
from tlora.runtime import Entry, Geometry  # noqa: E402

__all__ = ["METHOD", "Entry", "Geometry", "ModuleAdapter", "PATCH_TYPE", "TLoRAError", "TLoRAShapeError", "check_file", "check_fits",
           "claim", "has_module", "module_type", "is_tlora_file", "kohya_renamed", "module_prefixes"]

# Forge's patch type and the registries' adapter name; not "tlora", which is T-LoRA (LyCORIS, SD.Next).
PATCH_TYPE = "transformed_lora"
# How a user-facing line names the method, so that it is not read as T-LoRA (timestep LoRA).
METHOD = tformat.METHOD
has_module = tformat.has_tlora_module  # whether a module has TLoRA keys: a few lookups, no scan


def is_tlora_file(keys: Collection[str]) -> bool:
    """Whether a file's keys hold any TLoRA tensor (the only test of "ours": metadata is never trusted)."""
    return any(tformat.is_tlora_key(k) for k in keys)


def check_file(path: str | None, keys: Collection[str]) -> None:
    """The file-level checks a webui's loader cannot make per module (one line, naming the file's problem).

    Its format version (when the file is at hand), and every TLoRA module's weight given once: hosts
    rename and group keys before any adapter sees them, so a second name or a LoRA half would be lost.
    """
    try:
        if path is not None and os.path.isfile(path):
            tformat.check_version(os.path.basename(path), tformat.read_metadata(path))
        keys = keys if isinstance(keys, (set, frozenset, dict)) else set(keys)
        for prefix in module_prefixes(keys):
            tformat.check_one_adapter_per_weight(prefix, keys)
    except TLoRAError as err:
        raise broken(err) from None


def check_fits(adapter: ModuleAdapter, shape) -> None:
    """Raise TLoRAShapeError (one line, naming the module) unless the adapter fits this weight shape."""
    try:
        adapter.check_fits(tuple(shape))
    except TLoRAShapeError as err:
        raise TLoRAShapeError(f"TLoRA file does not fit this model: {err}; nothing of it was applied") from None


def kohya_renamed(tensors: Mapping, arch: str = "sd15") -> dict:
    """The tensors with ComfyUI module paths (`diffusion_model.x.y`) renamed to kohya names (`lora_unet_x_y`).

    A1111 splits a key at its first dot (kohya names have none): ComfyUI-named modules would
    silently match nothing there. Kohya-named and unknown keys are kept as they are.
    """
    out = {}
    for key, value in tensors.items():
        prefix, sep, suffix = key.rpartition(".tlora_")
        if sep and "." in prefix:
            try:
                key = tarch.kohya_name(prefix, arch) + ".tlora_" + suffix
            except ValueError:
                pass  # not a UNet/text-encoder path: left for the host to report as unmatched
        out[key] = value
    return out


def check_all_matched(label: str, keys: Collection[str], known: Collection[str]) -> None:
    """Refuse the file, in the core's words, when some of its TLoRA modules name no weight of this model.

    Forge Neo and SD.Next apply a file whose unmatched keys stay under their thresholds and say so at
    info or debug level only: a file made for another model would be applied in part.
    """
    modules = module_prefixes(keys)
    missing = [m for m in modules if m not in known]
    if missing:
        raise TLoRAError(refusal(label, len(modules), {m: MISSING for m in missing}, "model"))


def module_type(base: type, make: Callable) -> type:
    """The host's ModuleType subclass that claims a layer whose keys are TLoRA's and makes `make(net, weights)`."""

    class ModuleTypeTLoRA(base):
        """Claims a layer whose keys are TLoRA suffixes (`tlora_t.*`, `tlora_r.*`, `tlora_scale`)."""

        def create_module(self, net, weights):
            """The host module for these weights, or None when they are not TLoRA's."""
            if not has_module("m", {"m." + k: None for k in weights.w}):
                return None
            return make(net, weights)

    return ModuleTypeTLoRA
