"""What the host's inference code needs to carry gradients, found on the live host (no family named).

Two things stop autograd in ComfyUI's model code, whatever the family:

* kernels without a backward: comfy_kitchen's fused rotary/RMS-norm/AdaLN ops are torch custom
  ops with no autograd formula ("no autograd formula was registered"). comfy_kitchen ships the
  same maths as plain torch in its eager backend; while training, the package's public functions
  (and any alias a model module bound at import, as 0.12's flux/math.py did) point there instead.
  ComfyUI 0.33's own `in_training` flag (trainer/comfy/model.py `host_training_mode`) switches the
  families that read it to differentiable paths; this covers those that do not (Ernie, Anima, Wan,
  Lumina's RMS-rope, HunyuanImage...).
* residuals added in place onto what a norm saved for backward (`x += attn(norm(x))`, Flux and its
  descendants): every norm layer of the root gets a copy of its input, so the in-place add touches a
  tensor nothing saved.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any

from torch import Tensor, nn

# comfy_kitchen's eager modules whose functions are elementwise maths with a differentiable torch form
# (quantized matmuls are left alone: they belong to the quantized-weight path).
_EAGER_MODULES = ("comfy_kitchen.backends.eager.rope", "comfy_kitchen.backends.eager.adaln")


class Restore:
    """Puts a module attribute back (the `.remove()` handle a run keeps with its hooks)."""

    def __init__(self, module: Any, name: str, value: Any) -> None:
        self.module, self.name, self.value = module, name, value

    def remove(self) -> None:
        setattr(self.module, self.name, self.value)


def _eager_replacements() -> dict[str, Any]:
    """{public comfy_kitchen function name: its plain-torch eager implementation} where both exist."""
    try:
        kitchen = importlib.import_module("comfy_kitchen")
    except ImportError:
        return {}
    out = {}
    for module_name in _EAGER_MODULES:
        try:
            eager = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, fn in vars(eager).items():
            if (callable(fn) and not name.startswith("_") and not name.endswith("_")
                    and getattr(fn, "__module__", "") == module_name and callable(getattr(kitchen, name, None))):
                out[name] = fn
    return out


def differentiable_kernels() -> list[Restore]:
    """While training, comfy_kitchen's backward-less fused ops run as their eager torch maths.

    Swaps the package's public functions and every alias of them that a loaded `comfy.*` module
    holds (bound at import time); the returned handles restore them all.
    """
    replacements = _eager_replacements()
    if not replacements:
        return []
    kitchen = importlib.import_module("comfy_kitchen")
    originals = {id(getattr(kitchen, name)): name for name in replacements}
    handles = []
    for name, fn in replacements.items():
        handles.append(Restore(kitchen, name, getattr(kitchen, name)))
        setattr(kitchen, name, fn)
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name == "comfy" or module_name.startswith("comfy.")):
            continue
        for attr, value in list(vars(module).items()):
            name = originals.get(id(value))
            if name is not None and value is not kitchen and callable(value):
                handles.append(Restore(module, attr, value))
                setattr(module, attr, replacements[name])
    return handles


def _is_norm(module: nn.Module) -> bool:
    """A normalisation layer (LayerNorm, RMSNorm, GroupNorm and the hosts' own norm classes)."""
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) \
        or "norm" in type(module).__name__.lower()


def autograd_safe_norms(root: nn.Module) -> list[Any]:
    """Feed every norm layer a copy of its input; returns the hook handles to remove afterwards.

    ComfyUI's DiT blocks and CLIP layers add their residuals in place (`x += attn(norm(x))`),
    which overwrites the tensor the norm saved for backward. With a copy, the norm keeps its
    own input and the in-place add touches a tensor nothing saved: gradients flow.
    """
    def clone_input(module: nn.Module, args: tuple) -> tuple:
        return (args[0].clone(), *args[1:]) if args and isinstance(args[0], Tensor) else args
    return [m.register_forward_pre_hook(clone_input) for m in root.modules() if _is_norm(m)]


def base_weights_visible(layer_class: type) -> list[Restore]:
    """While training, an adapted layer shows its base layer's `weight` and `bias` (read-only).

    Host model code reads a layer's weight beside calling it (Wan's MLP checks `linear.weight` for
    an INT8 layout before its own training branch; Flux's concat_cond reads `img_in.weight`'s
    shape). The run-time layer wrapping it during training answers with its base's tensors, live.
    Nothing is set when the class already has them.
    """
    handles = []
    for name in ("weight", "bias"):
        if name not in vars(layer_class) and not any(name in vars(c) for c in layer_class.__mro__[1:-1]
                                                     if c is not nn.Module):
            setattr(layer_class, name, property(lambda self, _n=name: getattr(self.base, _n, None)))
            handles.append(_Unset(layer_class, name))
    return handles


class _Unset:
    """Removes a class attribute again (the `.remove()` handle)."""

    def __init__(self, owner: type, name: str) -> None:
        self.owner, self.name = owner, name

    def remove(self) -> None:
        if self.name in vars(self.owner):
            delattr(self.owner, self.name)
