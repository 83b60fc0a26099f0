"""TLoRA as a ComfyUI weight adapter: the stock LoRA loaders, hook LoRAs and our own loader
all patch weights through this class.

Contract followed (0.3.75 and newer): constructor (loaded_keys, weights) with every tensor
inside `weights`; `load` claims only keys ending in our own suffixes; `calculate_weight`
updates `weight` in place, upcasting internally; `bypass_forward` computes the
activation-side form org_forward(x + m (T x - x)) + m s Delta x.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..tlora.adapter import SUFFIX_PATTERN, ModuleAdapter
from ..tlora.errors import TLoRAError

try:  # The host's registry; absent on hosts without comfy.weight_adapter.
    import comfy.weight_adapter as _registry
    from comfy.weight_adapter import WeightAdapterBase
except ImportError:  # pragma: no cover - very old hosts
    _registry = None
    WeightAdapterBase = object  # type: ignore[misc,assignment]

log = logging.getLogger("ComfyUI-TLoRA")
# Suffixes at least one of which every TLoRA module has (its scale, or the first core of a part).
_PROBES = ("tlora_scale", "tlora_t.0", "tlora_t.diag", "tlora_r.out.0", "tlora_r.in.0", "tlora_r.up", "tlora_r.down")


class TLoRAWeightAdapter(WeightAdapterBase):
    """One weight's TLoRA patch for ComfyUI: weights = (suffix names, *tensors)."""

    name = "tlora"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights
        self._adapter: ModuleAdapter | None = None

    # ----- construction -------------------------------------------------------------
    @classmethod
    def from_module_adapter(cls, adapter: ModuleAdapter, loaded_keys=None) -> "TLoRAWeightAdapter":
        """Wrap a validated core adapter."""
        names = tuple(adapter.tensors)
        patch = cls(set(loaded_keys or ()), (names, *(adapter.tensors[n] for n in names)))
        patch._adapter = adapter
        return patch

    @classmethod
    def load(cls, x: str, lora: dict, alpha=None, dora_scale=None, loaded_keys=None) -> Optional["TLoRAWeightAdapter"]:
        """Claim the keys `x.tlora_*` of a file (the registry's entry point); None if absent."""
        prefix = x + "."
        # ComfyUI offers every key-map entry (thousands) to every adapter class: answer the
        # common "not mine" with a few dict lookups instead of a scan of the whole file.
        if not any(prefix + probe in lora for probe in _PROBES):
            return None
        mine = {k[len(prefix):]: v for k, v in lora.items()
                if k.startswith(prefix) and SUFFIX_PATTERN.match(k[len(prefix):])}
        try:
            adapter = ModuleAdapter(mine, name=x)
        except TLoRAError as err:
            # The registry has no error channel: say why loudly; our own loader raises instead.
            log.error("TLoRA: %s (module not applied; the TLoRA loader nodes refuse such files)", err)
            return None
        keys = {prefix + s for s in mine}
        if loaded_keys is not None:
            loaded_keys.update(keys)
        return cls.from_module_adapter(adapter, keys)

    def module_adapter(self) -> ModuleAdapter:
        """The core adapter for the tensors in `weights` (rebuilt if weights were replaced)."""
        names, tensors = self.weights[0], self.weights[1:]
        cached = self._adapter
        if cached is None or any(cached.tensors.get(n) is not t for n, t in zip(names, tensors)):
            cached = self._adapter = ModuleAdapter(dict(zip(names, tensors)), name=self.name)
        return cached

    # ----- training (ComfyUI's built-in TrainLoraNode; see trainer/comfy_glue.py) -------
    @classmethod
    def create_train(cls, weight, rank=8, alpha=1.0):
        """A fresh trainable TLoRA for TrainLoraNode: trm:2 transform + tr:<rank> residual, weight-side."""
        from ..trainer.comfy_glue import TLoRATrainDiff  # noqa: PLC0415  (nodes -> trainer, lazily)

        return TLoRATrainDiff.create(weight, rank=rank, alpha=alpha)

    def to_train(self):
        """This adapter as a trainable module (TrainLoraNode's `existing_lora`)."""
        from ..trainer.comfy_glue import TLoRATrainDiff  # noqa: PLC0415

        return TLoRATrainDiff(self.module_adapter().tensors)

    # ----- patching -----------------------------------------------------------------
    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        """weight += function(strength * (W T + s Delta - W)), computed in float32.

        A module that does not fit its weight (possible only through the stock loaders, which
        do not check shapes) is logged and skipped, as ComfyUI's own adapters do, so that
        sampling goes on; our loader nodes refuse such files before anything is patched.
        """
        if strength == 0:
            return weight
        adapter = self.module_adapter()
        try:
            diff = adapter.weight_diff(weight)
        except TLoRAError as err:
            log.error("TLoRA: not applied to %s: %s", key, err)
            return weight
        weight += function((strength * diff).to(weight.dtype))
        return weight

    def bypass_forward(self, org_forward, x, *args, **kwargs):
        """Activation-side form for hosts that run adapters in bypass mode."""
        multiplier = float(getattr(self, "multiplier", 1.0))
        helper = _bypass_helper(self.module_adapter(), x)
        helper.strength = multiplier
        out = org_forward(helper.transformed_input(x), *args, **kwargs)
        if helper.residual_kind != "none" and multiplier != 0:
            out = out + multiplier * helper.residual_output(x).to(out.dtype)
        return out


class _ShapeOnlyLinear(torch.nn.Module):
    """Stands in for the host layer so TLoRAModule can be reused in bypass mode."""

    def __init__(self, out_features: int, in_features: int, kernel: tuple[int, ...] = ()):
        super().__init__()
        self.weight = torch.empty(out_features, in_features, *kernel, device="meta")
        self.stride, self.padding, self.dilation, self.groups = 1, 0, 1, 1


def _bypass_helper(adapter: ModuleAdapter, x: torch.Tensor):
    from ..tlora.module import TLoRAModule  # noqa: PLC0415

    out_features = adapter.out_features or adapter.in_channels
    in_channels = adapter.in_channels or adapter.fan_in
    kernel: tuple[int, ...] = ()
    if x.dim() == 4:
        taps = (adapter.fan_in or in_channels) // in_channels
        side = int(round(taps ** 0.5))
        kernel = (side, side)
    base = _ShapeOnlyLinear(out_features, in_channels, kernel)
    return TLoRAModule(base, adapter.to(x.device), trainable=False)


def register() -> bool:
    """Append TLoRA to ComfyUI's adapter registry once; False (and a log line) if impossible."""
    if _registry is None or not hasattr(_registry, "adapters"):
        log.warning("TLoRA: this ComfyUI has no weight-adapter registry; use the TLoRA loader nodes")
        return False
    adapters = _registry.adapters
    if any(getattr(a, "name", None) == TLoRAWeightAdapter.name for a in adapters):
        return True
    try:
        adapters.append(TLoRAWeightAdapter)
    except Exception as err:  # e.g. a registry that became immutable
        log.warning("TLoRA: could not register with ComfyUI's adapter registry (%s)", err)
        return False
    return True
