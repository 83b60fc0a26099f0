"""The Forge family's per-file loader (`networks.load_lora_for_models` of extensions-builtin/sd_forge_lora).

Forge, ersatzForge and Forge Neo apply a file there: key maps, `load_lora`, `add_patches` on clones of
the model and text-encoder patchers. Each tolerates unmatched keys (Forge up to 12, Neo up to half the
file) and says so in a print or an info line while applying the rest, and each skips a whole file
past its threshold with a warning. So, around it, for TLoRA files: the file-level checks first
(format version, one adapter per weight), the host's own refusals of a loading path (`refuse`), then
the host runs, and the file is refused whole, in the core's words, unless every TLoRA module it has
(under the names the host left after its own renaming) became a patch of ours. The clones the host
made are dropped with the exception, so nothing of a refused file is applied.
"""
from __future__ import annotations

import functools
import os
import types
from collections.abc import Callable, Iterable

from . import core


def adapter_names(value: object) -> set[str]:
    """Module names of our adapters in one patch value (Forge's (type, args) tuple or a registry adapter)."""
    if isinstance(value, tuple) and len(value) == 2 and value[0] == core.PATCH_TYPE:
        return {value[1][0].name}
    if getattr(value, "name", None) == core.PATCH_TYPE:
        adapter = getattr(value, "adapter", None)
        return {adapter.name} if adapter is not None else {s[3].name for s in getattr(value, "slices", ())}
    return set()


def applied_modules(patchers: Iterable[object], filename: str) -> set[str]:
    """Our modules among the patches the patchers hold for this file (its `lora_patches` entries)."""
    names: set[str] = set()
    for patcher in patchers:
        patcher = getattr(patcher, "patcher", patcher)  # a CLIP holds its ModelPatcher
        per_file = [p for i, p in (getattr(patcher, "lora_patches", None) or {}).items() if i and i[0] == filename]
        # A ComfyUI-style patcher (some Neo builds) keeps every file's patches in one `patches` dict.
        for patches in per_file or [getattr(patcher, "patches", None) or {}]:
            for entries in patches.values():
                for entry in entries:
                    names |= adapter_names(entry[1])
    return names


def guard(networks: types.ModuleType, refuse: Callable[[], str | None] | None = None) -> None:
    """Wrap networks.load_lora_for_models (looked up by name at each call) for TLoRA files, once."""
    original = networks.load_lora_for_models
    if getattr(original, "_tlora_guard", False):
        return

    @functools.wraps(original)
    def load_lora_for_models(model, clip, lora, *args, **kwargs):
        if not core.is_tlora_file(lora):
            return original(model, clip, lora, *args, **kwargs)
        filename = str(kwargs.get("filename", args[2] if len(args) > 2 else ""))
        label = os.path.basename(filename) or "<unnamed>"
        core.check_file(filename, lora.keys())
        why = refuse() if refuse is not None else None
        if why is not None:
            raise core.TLoRAError(f"{core.METHOD} file {label}: {why}. Nothing of it was applied.")
        model_out, clip_out = original(model, clip, lora, *args, **kwargs)
        core.check_all_matched(label, lora.keys(), applied_modules((model_out, clip_out), filename))
        return model_out, clip_out

    load_lora_for_models._tlora_guard = True
    networks.load_lora_for_models = load_lora_for_models
