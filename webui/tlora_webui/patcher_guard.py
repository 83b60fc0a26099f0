"""A fit check before Forge-family patchers add a file's patches: a module that does not fit fails the file.

Their loaders match keys by name only and merge at sampling time, where a misfit would be
skipped per weight (half a file applied). Checking when patches are added raises through the
host's usual path (the generation stops with our message) before any weight is touched. A patch
key is a weight's name or (name, (dim, start, length)), a row slice of a fused weight.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import torch

from .core import TLoRAError, check_fits

# (patches, {key: adapter} of ours) -> (patches handed to the host, {key given: key it replaced})
Regroup = Callable[[Mapping, Mapping], tuple[dict, dict]]


def guard_add_patches(patcher_cls: type, adapter_of: Callable[[object], object | None],
                      regroup: Regroup | None = None) -> None:
    """Wrap patcher_cls.add_patches so every TLoRA patch (adapter_of(value) not None) is fit-checked first.

    `regroup` may then hand the host other patches for ours (several row slices of one weight as one
    patch); the keys the host reports as loaded are mapped back to the caller's keys.
    """
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
                name, span = (key, None) if isinstance(key, str) else (key[0], key[1])
                if name not in shapes:  # the host would skip it with a count at info level
                    raise TLoRAError(f"TLoRA file does not fit this model: {getattr(adapter, 'name', name)} names "
                                     f"{name}, which this model lacks; nothing of it was applied")
                shape = list(shapes[name])
                if span is not None:
                    shape[span[0]] = span[2]
                check_fits(adapter, shape)
            if regroup is not None:
                patches, replaced = regroup(patches, ours)
                if "patches" in kwargs:
                    kwargs["patches"] = patches
                else:
                    args = (patches, *args[1:])
                loaded = original(self, *args, **kwargs)
                if isinstance(loaded, (list, set, tuple)):  # Neo reports what it loaded; its loader counts skips
                    loaded = [k for k in loaded if k not in replaced.values()] + \
                             [k for k, new in replaced.items() if new in loaded]
                return loaded
        return original(self, *args, **kwargs)

    add_patches._tlora_guard = True
    patcher_cls.add_patches = add_patches


def _logical_shape(value: torch.Tensor) -> tuple[int, ...]:
    """A weight's shape as its layer uses it (bitsandbytes 4-bit parameters store packed bytes)."""
    state = getattr(value, "quant_state", None)
    shape = getattr(state, "shape", None)
    return tuple(int(s) for s in (shape if shape is not None else value.shape))


def _parameter_shapes(model) -> Mapping[str, tuple]:
    return {k: _logical_shape(v) for k, v in model.state_dict(keep_vars=True).items()}
