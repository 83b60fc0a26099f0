"""A fit check before Forge/reForge add a file's patches: a module that does not fit fails the file.

Their loaders match keys by name only and merge at sampling time, where a misfit would be
skipped per weight (half a file applied). Checking when patches are added raises through the
host's usual path (the generation stops with our message) before any weight is touched.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

from .core import check_fits


def guard_add_patches(patcher_cls: type, adapter_of: Callable[[object], object | None]) -> None:
    """Wrap patcher_cls.add_patches so every TLoRA patch (adapter_of(value) not None) is fit-checked first."""
    original = patcher_cls.add_patches
    if getattr(original, "_tlora_guard", False):
        return  # idempotent: a webui may reload extension scripts

    @functools.wraps(original)
    def add_patches(self, *args, **kwargs):
        patches = kwargs["patches"] if "patches" in kwargs else args[0]
        ours = {k: a for k, a in ((k, adapter_of(v)) for k, v in patches.items()) if a is not None}
        if ours:
            shapes = _parameter_shapes(self.model)
            for key, adapter in ours.items():
                if key in shapes:  # absent keys are the host's to skip and report
                    check_fits(adapter, shapes[key])
        return original(self, *args, **kwargs)

    add_patches._tlora_guard = True
    patcher_cls.add_patches = add_patches


def _parameter_shapes(model) -> Mapping[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
