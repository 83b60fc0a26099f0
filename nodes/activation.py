"""Our loaders' activation-side mode: the core's run-time layer installed by object patches on the ModelPatcher.

For each adapted layer the clone gets an object patch on `<layer path>.forward`: a `LayerForward`
that runs `tlora.runtime.AdapterLayer` around the layer's own forward (ComfyUI's cast/lowvram op,
its fp8 / int8 / nvfp4 mixed-precision op, a ComfyUI-GGUF layer that dequantizes per call). The
host applies and restores object patches itself when it loads and unloads the model; weights are
never read or written by us, so stored quantized weights stay byte-identical and a strength change
(a new clone with new object patches over the same tensors) recomputes nothing.

Stacking follows the chain of nodes: a layer that already carries a `LayerForward` gets a new one
with the earlier entries and the new ones after them. Host weight patches already on the layer
(a stock LoRA loader before ours, a merged TLoRA) act on the weight under the whole chain, which
is their place in the chain; later ones would be merged under it too, so plain LoRAs meant to go
after an activation-side TLoRA are loaded by our block-weights loader in activation mode, and a
weight that carries activation-side adapters takes later ones of our loaders activation-side too.
A clone over another model object (TrainLoraNode's deep clone, the dynamic-VRAM delegate, a
multi-GPU clone) gets its object patches re-made for that model's layers (an ON_CLONE callback).
"""
from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from ..tlora.adapter import R_DOWN, R_UP, SCALE, ModuleAdapter
from ..tlora.errors import TLoRAError
from ..tlora.runtime import AdapterLayer, Entry, Geometry, geometry_of

log = logging.getLogger("ComfyUI-TLoRA")
MODES = ("auto", "merged", "activation")
PLAIN_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CALLBACK_KEY = "tlora_activation"
_entries: "weakref.WeakKeyDictionary[ModuleAdapter, dict]" = weakref.WeakKeyDictionary()


def is_plain_float(weight: object) -> bool:
    """A weight the host merges cheaply: a torch tensor (not a subclass: QuantizedTensor, GGMLTensor) of a float dtype."""
    return type(weight) in (Tensor, nn.Parameter) and weight.dtype in PLAIN_FLOAT


class LayerForward:
    """The object patch on one layer's `forward`: the run-time layer around that layer's own forward.

    Not an nn.Module (the host would register it as a submodule of its layer); holds no tensors
    of the layer. `inner` is a forward someone else put there before us, kept as the frozen callable.
    """

    def __init__(self, path: str, module: nn.Module, geometry: Geometry, entries: tuple[Entry, ...],
                 inner: Callable | None = None):
        self.path, self.module, self.geometry, self.entries, self.inner = path, module, geometry, entries, inner
        self._layers: dict[torch.device, AdapterLayer] = {}

    def base(self) -> Callable:
        """The frozen callable: the layer's class forward (what was there before any object patch)."""
        return self.inner if self.inner is not None else type(self.module).forward.__get__(self.module)

    def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
        layer = self._layers.get(x.device)
        if layer is None:
            layer = AdapterLayer(self.base(), [e.on(x.device) for e in self.entries], geometry=self.geometry,
                                 module=self.module, own_base=False)
            self._layers[x.device] = layer
        return layer(x, *args, **kwargs)

    def extended(self, entries: tuple[Entry, ...]) -> "LayerForward":
        """This layer's chain with more entries after the present ones."""
        return LayerForward(self.path, self.module, self.geometry, self.entries + entries, self.inner)

    def rebound(self, module: nn.Module) -> "LayerForward":
        """The same chain on the same path of another model object."""
        return LayerForward(self.path, module, self.geometry, self.entries, None)

    def __deepcopy__(self, memo: dict) -> "LayerForward":
        return self  # entries are never changed in place; a clone over a new model is rebound instead

    def __repr__(self) -> str:
        return f"LayerForward({self.path!r}, {len(self.entries)} adapter(s))"


def _patch_name(path: str) -> str:
    return path + ".forward"


def _module_and_rows(model: nn.Module, key) -> tuple[str, nn.Module, range | None]:
    """(layer path, layer, output rows or None) of a patch key: a weight key or (weight key, (0, start, length))."""
    import comfy.utils  # noqa: PLC0415

    weight_key, span = (key, None) if isinstance(key, str) else (key[0], key[1])
    path = weight_key.rpartition(".")[0]
    module = comfy.utils.get_attr(model, path)
    if span is None:
        return path, module, None
    dim, start, length = span
    if dim != 0:
        raise TLoRAError(f"{weight_key}: a patch of columns ({span}) cannot run activation-side")
    return path, module, range(start, start + length)


def weight_of(model: nn.Module, key) -> object:
    """The stored weight a patch key names (quantized or not)."""
    import comfy.utils  # noqa: PLC0415

    return comfy.utils.get_attr(model, key if isinstance(key, str) else key[0])


def carries_chain(patcher, key) -> bool:
    """Whether the layer of a patch key already runs adapters activation-side on this clone."""
    weight_key = key if isinstance(key, str) else key[0]
    return isinstance(patcher.object_patches.get(_patch_name(weight_key.rpartition(".")[0])), LayerForward)


def wants_activation(patcher, key, mode: str) -> bool:
    """Whether a patch goes activation-side: `activation`; `auto` where the weight is not a plain float
    tensor; and always where the layer already runs a chain (so later adapters stay after it)."""
    if mode == "activation" or carries_chain(patcher, key):
        return True
    if mode == "merged":
        return False
    return not is_plain_float(weight_of(patcher.model, key))


def _entry(adapter: ModuleAdapter, geometry: Geometry, rows: range | None, strength: float) -> Entry:
    """The entry of this adapter on this layer, made once (float32 copy) and shared by every strength."""
    made = _entries.setdefault(adapter, {})
    key = (geometry, None if rows is None else (rows.start, rows.stop))
    entry = made.get(key)
    if entry is None:
        made[key] = entry = Entry(adapter, geometry, strength=1.0, rows=rows)
    return entry.with_strength(strength)


def _rebind(source, clone) -> None:
    """ON_CLONE: a clone over another model object gets our object patches re-made for its own layers."""
    if clone.model is source.model:
        return
    import comfy.utils  # noqa: PLC0415

    for name, value in list(clone.object_patches.items()):
        if isinstance(value, LayerForward):
            clone.object_patches[name] = value.rebound(comfy.utils.get_attr(clone.model, value.path))


def add(patcher, adapters: Mapping[object, ModuleAdapter], strength: float,
        multiplier: Callable[[str], float] | None = None):
    """A clone of `patcher` with each {patch key: adapter} running activation-side after the layer's present chain."""
    import comfy.patcher_extension as ext  # noqa: PLC0415

    clone = patcher.clone()
    new: dict[str, tuple] = {}
    for key, adapter in adapters.items():
        weight_key = key if isinstance(key, str) else key[0]
        sigma = strength * (multiplier(weight_key) if multiplier is not None else 1.0)
        if sigma == 0:
            continue
        path, module, rows = _module_and_rows(clone.model, key)
        geometry = geometry_of(module)
        present = clone.object_patches.get(_patch_name(path))
        chain = new.get(path)
        if chain is None:
            chain = new[path] = (module, geometry, present, [])
        chain[3].append(_entry(adapter, geometry, rows, sigma))
    for path, (module, geometry, present, entries) in new.items():
        if isinstance(present, LayerForward):
            forward = present.extended(tuple(entries))
        else:  # someone else's forward patch (or none): kept as the frozen callable
            forward = LayerForward(path, module, geometry, tuple(entries), inner=present)
        clone.add_object_patch(_patch_name(path), forward)
    if new and not clone.get_callbacks(ext.CallbacksMP.ON_CLONE, CALLBACK_KEY):
        clone.add_callback_with_key(ext.CallbacksMP.ON_CLONE, CALLBACK_KEY, _rebind)
    return clone


def lora_as_adapter(patch: object, name: str) -> ModuleAdapter | None:
    """A ComfyUI LoRA patch (LoRAAdapter, or the older ("lora", weights) tuple) as a residual-only adapter.

    W + s B A is exactly a TLoRA with no transform and residual up = B, down = A, s = alpha / rank.
    None for what that cannot express (LoCon mid weights, DoRA, padded reshapes, other adapter kinds).
    """
    weights = None
    if type(patch).__name__ == "LoRAAdapter":
        weights = patch.weights
    elif isinstance(patch, tuple) and len(patch) == 2 and patch[0] == "lora":
        weights = patch[1]
    if weights is None or len(weights) < 3 or any(w is not None for w in weights[3:6]):
        return None
    up, down, alpha = weights[0], weights[1], weights[2]
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        return None
    rank = int(down.shape[0])
    scale = 1.0 if alpha is None else float(alpha) / rank
    return ModuleAdapter({R_UP: up.reshape(up.shape[0], rank).float(), R_DOWN: down.reshape(rank, -1).float(),
                          SCALE: torch.tensor(scale)}, name=name)
