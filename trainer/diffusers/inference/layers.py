"""The diffusers wrappers: a Linear/Conv2d to diffusers and PEFT, the core's run-time layer inside.

`TLoRALinear` / `TLoRAConv2d` replace a module and hold it as `base` (a plain layer, a PEFT LoRA
layer or another wrapper: several TLoRAs nest, the outermost applied last). Their `weight` and
`bias` are the innermost layer's, their state dict is the base's (the model's keys do not change),
and the adapter's float32 tensors live outside torch's view (no parameter or buffer of the model:
PEFT, which looks for "lora_" in names, and `state_dict()` never see them), moved to the input's
device once. The maths is `tlora.runtime`: this file writes no transform and no residual.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ....tlora.adapter import ModuleAdapter
from ....tlora.errors import TLoRAShapeError
from ....tlora.runtime import AdapterLayer, Entry, geometry_of


class _TLoRALayer:
    """Mixin of one adapter on one layer: the run-time layer over `base`, strength, fused flag, merge."""

    def _setup(self, base: nn.Module, adapter: ModuleAdapter, rows: Tensor | None, name: str,
               strength: float, form: str) -> None:
        self.base = base
        self.adapter_name = name
        self.module_name = adapter.name
        self.fused = False
        inner = _innermost(base)
        geometry = geometry_of(inner)
        self.__dict__["_geometry"] = geometry
        # `rows`: the adapter's rows this layer gets (a fused generic adapter on one of diffusers' split q/k/v).
        entry = Entry(adapter, geometry, strength=strength, pick=rows, form=form)
        self.__dict__["_entry"] = entry.on(inner.weight.device)
        self.__dict__["_layers"] = {}
        self.register_load_state_dict_pre_hook(_load_into_base)

    def state_dict(self, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The base's state under this module's own name: the model's keys are those it had unwrapped."""
        return self.base.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    # The wrapper is a Linear/Conv2d to callers (PEFT, diffusers): these are the base's.
    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:  # type: ignore[override]
        return self.base.bias

    @property
    def strength(self) -> float:
        return self.__dict__["_entry"].strength

    @strength.setter
    def strength(self, value: float) -> None:
        self.__dict__["_entry"].strength = float(value)

    @property
    def last_form(self) -> str | None:
        layers = self.__dict__["_layers"]
        return next((layer.entries[0].last_form for layer in layers.values()), None)

    def _layer(self, device: torch.device) -> AdapterLayer:
        layers = self.__dict__["_layers"]
        layer = layers.get(device)
        if layer is None:
            entry = self.__dict__["_entry"]
            layer = AdapterLayer(self.base, [entry.on(device)], geometry=self.__dict__["_geometry"],
                                 module=self.base, own_base=False)
            layers[device] = layer
        layer.__dict__["base"] = self.base  # the base as it is now (PEFT may have wrapped it since)
        layer.entries[0].strength = self.strength
        return layer

    def forward(self, x: Tensor) -> Tensor:
        """base(x + sigma (T x - x)) + sigma s (Delta x)[rows]; just base(x) when fused or at strength 0."""
        if self.fused or self.strength == 0:
            return self.base(x)
        return self._layer(x.device)(x)

    def weight_diff(self, weight: Tensor) -> Tensor:
        """sigma (W T + s Delta[rows] - W) for this layer's current weight (float32, the core's merge)."""
        return self.__dict__["_entry"].on(weight.device).weight_diff(weight)

    def extra_repr(self) -> str:
        return (f"adapter={self.adapter_name!r}, module={self.module_name!r}, strength={self.strength}, "
                f"fused={self.fused}")


def _load_into_base(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict with the unwrapped model's keys: `<prefix>weight` goes to `<prefix>base.weight`."""
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "base.")]:
        state_dict[prefix + "base." + key[len(prefix):]] = state_dict.pop(key)


class TLoRALinear(_TLoRALayer, nn.Linear):
    """One TLoRA adapter on a diffusers Linear (or on what wraps one: a PEFT LoRA layer, another TLoRA)."""

    def __init__(self, base: nn.Module, adapter: ModuleAdapter, rows: Tensor | None = None, name: str = "tlora",
                 strength: float = 1.0, form: str = "auto"):
        nn.Module.__init__(self)
        geometry = geometry_of(_innermost(base))
        self.in_features, self.out_features = geometry.in_channels, geometry.out_features
        self._setup(base, adapter, rows, name, strength, form)

    forward = _TLoRALayer.forward
    extra_repr = _TLoRALayer.extra_repr


class TLoRAConv2d(_TLoRALayer, nn.Conv2d):
    """One TLoRA adapter on a diffusers Conv2d (T mixes input channels at every pixel)."""

    def __init__(self, base: nn.Module, adapter: ModuleAdapter, rows: Tensor | None = None, name: str = "tlora",
                 strength: float = 1.0, form: str = "auto"):
        nn.Module.__init__(self)
        conv = _innermost(base)
        if conv.groups != 1:
            raise TLoRAShapeError(f"{adapter.name}: grouped convolutions are not supported")
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "transposed", "output_padding", "_reversed_padding_repeated_twice"):
            setattr(self, attr, getattr(conv, attr))
        self._setup(base, adapter, rows, name, strength, form)

    forward = _TLoRALayer.forward
    extra_repr = _TLoRALayer.extra_repr


WRAPPERS = (TLoRALinear, TLoRAConv2d)


def _is_peft_layer(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "merged_adapters")


def _inner(module: nn.Module) -> nn.Module | None:
    """The next layer down a wrapping chain (ours: .base, PEFT's: .base_layer), None at a plain layer."""
    if isinstance(module, WRAPPERS):
        return module.base
    if _is_peft_layer(module):
        return module.base_layer
    return None


def _innermost(module: nn.Module) -> nn.Module:
    """The plain Linear/Conv2d that holds the weight under any chain of TLoRA and PEFT wrappers."""
    while (inner := _inner(module)) is not None:
        module = inner
    return module


def _chain(module: nn.Module) -> list[nn.Module]:
    out = [module]
    while (inner := _inner(out[-1])) is not None:
        out.append(inner)
    return out


def resolve_path(root: nn.Module, path: str) -> str:
    """A mapped module path as it is in this live model (transformers 5's CLIPTextModel has no `text_model.`)."""
    if path.startswith("text_model.") and "text_model" not in root._modules:
        return path[len("text_model."):]
    return path
