"""TLoRA as a ComfyUI weight adapter, inference and training side by side (as ComfyUI's
comfy/weight_adapter/lora.py keeps LoraDiff beside LoRAAdapter), over the core's functions.

* `TLoRAWeightAdapter`: the stock LoRA loaders, hook LoRAs and our own loader all patch
  weights through it. Contract followed (0.3.75 and newer): constructor (loaded_keys,
  weights) with every tensor inside `weights`; `load` claims only keys ending in our own
  suffixes; `calculate_weight` updates `weight` in place, upcasting internally;
  `bypass_forward` computes the activation-side form org_forward(x + m (T x - x)) + m s Delta x.
* `TLoRATrainDiff`: the trainable weight-side form that ComfyUI's built-in TrainLoraNode
  uses when its `algorithm` is TLoRA (`adapter_maps["TLoRA"]`).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from ..tlora import format as tformat
from ..tlora.adapter import SUFFIX_PATTERN, ModuleAdapter
from ..tlora.errors import TLoRAError
from ..tlora.functional import weight as wside

try:  # The host's registry; absent on hosts without comfy.weight_adapter.
    import comfy.weight_adapter as _registry
    from comfy.weight_adapter import WeightAdapterBase, WeightAdapterTrainBase
except ImportError:  # pragma: no cover - very old hosts
    _registry = None
    WeightAdapterBase = object  # type: ignore[misc,assignment]
    WeightAdapterTrainBase = nn.Module  # type: ignore[misc,assignment]

log = logging.getLogger("ComfyUI-TLoRA")
# TrainLoraNode's algorithm list shows this (a name of its own, not T-LoRA's "tlora").
TRAIN_ALGORITHM = "TLoRA (transformed)"
# Suffixes at least one of which every TLoRA module has (its scale, or the first core of a part).
_PROBES = ("tlora_scale", "tlora_t.0", "tlora_t.diag", "tlora_r.out.0", "tlora_r.in.0", "tlora_r.up", "tlora_r.down")


class TLoRAWeightAdapter(WeightAdapterBase):
    """One weight's TLoRA patch for ComfyUI: weights = (suffix names, *tensors)."""

    # Not "tlora": that is T-LoRA (timestep-dependent LoRA) in LyCORIS and a ComfyUI pack.
    name = "transformed_lora"
    TLORA_PACK_ADAPTER = "ComfyUI-TLoRA/transformed-lora/1"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights
        self._adapter: ModuleAdapter | None = None

    # ----- construction -------------------------------------------------------------
    @classmethod
    def from_module_adapter(cls, adapter: ModuleAdapter, loaded_keys=None) -> "TLoRAWeightAdapter":
        """Wrap a validated core adapter."""
        names = _Suffixes(tuple(adapter.tensors), adapter)
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
        try:  # the host keeps one patch per weight: another name or adapter kind for it would lose a half
            tformat.check_one_adapter_per_weight(x, lora)
        except TLoRAError as err:
            raise TLoRAError(f"broken TLoRA file: {err}; nothing of it was applied") from None
        try:
            adapter = ModuleAdapter(mine, name=x)
        except TLoRAError as err:
            # A broken module fails the stock loader's prompt with the reason, as our loaders do:
            # skipping it (the registry's habit) applied the rest of the file and said so only in
            # the server log. (A module that does not fit its weight shows only at patch time:
            # see calculate_weight.)
            raise TLoRAError(f"broken TLoRA file: {err}; nothing of it was applied") from None
        keys = {prefix + s for s in mine}
        if loaded_keys is not None:
            loaded_keys.update(keys)
        return cls.from_module_adapter(adapter, keys)

    def module_adapter(self) -> ModuleAdapter:
        """The core adapter for the tensors in `weights` (rebuilt if weights were replaced)."""
        names, tensors = self.weights[0], self.weights[1:]
        cached = self._adapter
        if cached is None or any(cached.tensors.get(n) is not t for n, t in zip(names, tensors)):
            source = getattr(names, "source", None)
            if source is not None:  # a host's copy of validated tensors (see _Suffixes)
                cached = ModuleAdapter.like(source, dict(zip(names, tensors)))
            else:
                cached = ModuleAdapter(dict(zip(names, tensors)), name=self.name)
            self._adapter = cached
        return cached

    def calculate_shape(self, key):
        """The patched weight's shape: TLoRA never changes it (None, as the host's base class answers)."""
        return None

    # ----- training (ComfyUI's built-in TrainLoraNode) ----------------------------------
    @classmethod
    def create_train(cls, weight, rank=8, alpha=1.0):
        """A fresh trainable TLoRA for TrainLoraNode: trm:2 transform + tr:<rank> residual, weight-side."""
        return TLoRATrainDiff.create(weight, rank=rank, alpha=alpha)

    def to_train(self):
        """This adapter as a trainable module (TrainLoraNode's `existing_lora`)."""
        return TLoRATrainDiff(self.module_adapter().tensors)

    # ----- patching -----------------------------------------------------------------
    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        """weight += function(strength * (W T + s Delta - W)), computed in float32 in factored form.

        A module that does not fit its weight (possible only through the stock loaders, which
        do not check shapes) is logged and skipped, as ComfyUI's own adapters do, so that
        sampling goes on; our loader nodes refuse such files before anything is patched.
        """
        if strength == 0:
            return weight
        adapter = self.module_adapter()
        try:
            diff = adapter.weight_diff(weight, strength)  # strength folded into the merge: no extra pass
        except TLoRAError as err:
            log.error("TLoRA: not applied to %s: %s", key, err)
            return weight
        weight += function(diff.to(weight.dtype))
        return weight

    def bypass_forward(self, org_forward, x, *args, **kwargs):
        """Activation-side form for hosts that run adapters in bypass mode (0.12's LoraLoaderBypass)."""
        adapter = self.module_adapter()
        key = (x.device, _layer_geometry(self, adapter, x))
        cached = self.__dict__.get("_bypass")
        if cached is None or cached[0] != key or cached[1].adapter_source is not adapter:
            module = _bypass_module(adapter.to(x.device), key[1], trainable=False)
            module.adapter_source = adapter
            self._bypass = cached = (key, module)
        return _run_bypass(cached[1], float(getattr(self, "multiplier", 1.0)), org_forward, x, *args, **kwargs)


class TLoRATrainDiff(WeightAdapterTrainBase):
    """Trainable weight-side TLoRA for TrainLoraNode: __call__(W0) = W0 T + s Delta.

    Parameter names are the file's suffixes (`tlora_t.0`, `tlora_r.out.0`, `tlora_scale`...),
    so TrainLoraNode's `{module}.{param}` state dict is a valid TLoRA file as it stands.
    """

    def __init__(self, tensors: Mapping[str, Tensor]):
        super().__init__()
        adapter = ModuleAdapter(dict(tensors))
        self.transform_kind, self.residual_kind = adapter.transform.kind, adapter.residual.kind
        self.__dict__["_facts"] = _Facts(adapter.name, adapter.out_features, adapter.in_channels, adapter.fan_in)
        self.tlora_t = nn.ParameterDict()
        self.tlora_r = nn.Module()
        for key, value in adapter.tensors.items():
            param = nn.Parameter(value.detach().float().clone(), requires_grad=key != "tlora_scale")
            parts = key.split(".")
            if parts[0] == "tlora_t":
                self.tlora_t[parts[1]] = param
            elif parts[0] == "tlora_r" and parts[1] in ("out", "in"):
                if not hasattr(self.tlora_r, parts[1]):
                    self.tlora_r.add_module(parts[1], nn.ParameterDict())
                getattr(self.tlora_r, parts[1])[parts[2]] = param
            elif parts[0] == "tlora_r":
                self.tlora_r.register_parameter(parts[1], param)
            else:
                self.tlora_scale = param  # kept as a (frozen) parameter so TrainLoraNode saves it

    @classmethod
    def create(cls, weight: Tensor, rank: int = 8, alpha: float = 1.0, transform: str = "trm:2") -> "TLoRATrainDiff":
        """Fresh adapter for a weight: TRM transform + tensor-ring residual of TrainLoraNode's rank."""
        adapter = ModuleAdapter.create(tuple(weight.shape), transform, f"tr:{int(rank)}", "paper", alpha=float(alpha))
        return cls({k: v.to(weight.device) for k, v in adapter.tensors.items()})

    def _cores(self, group: nn.ParameterDict) -> list[Tensor]:
        return [group[str(d)].float() for d in range(len(group))]

    def __call__(self, w: Tensor) -> Tensor:
        w32 = w.float()
        out = w32
        if self.transform_kind == "diag":
            out = wside.transformed(w32, diag=self.tlora_t["diag"].float())
        elif self.transform_kind != "none":
            out = wside.transformed(w32, self._cores(self.tlora_t))
        if self.residual_kind == "tr":
            parts = (self._cores(self.tlora_r.out), self._cores(getattr(self.tlora_r, "in")))
        else:
            parts = (self.tlora_r.up.float(), self.tlora_r.down.float()) if self.residual_kind == "lora" else ()
        delta = wside.residual(self.residual_kind, w32.shape, parts)
        if delta is not None:
            out = out + self.tlora_scale.float() * delta
        return out.to(w.dtype)

    def tensors(self) -> dict[str, Tensor]:
        """The adapter's tensors by file suffix (live parameters, not copies)."""
        return dict(self.named_parameters())

    def bypass_forward(self, org_forward, x, *args, **kwargs):
        """Bypass-mode training (TrainLoraNode with bypass_mode): the activation-side form on these parameters.

        The host's default g(f(x) + h(x)) cannot express a transform of the input, so the whole
        forward is ours: org_forward(x + m (T x - x)) + m s Delta x, gradients into this module.
        """
        key = (x.device, _layer_geometry(self, self.__dict__["_facts"], x))
        cached = self.__dict__.get("_bypass")
        if cached is None or cached[0] != key:
            module = _bypass_module(ModuleAdapter({k: v.detach() for k, v in self.tensors().items()}), key[1],
                                    trainable=True)
            for suffix, param in self.tensors().items():  # share, never copy: the optimizer steps these
                if suffix != "tlora_scale":
                    module.adapter_params[suffix.replace(".", "__")] = param
            module.scale = self.tlora_scale.detach().float().to(x.device)
            module._identity_versions = None  # the shared tensors' version counters are not the copies'
            # Not a submodule: TrainLoraNode saves this module's state dict as the file.
            self.__dict__["_bypass"] = cached = (key, module)
        return _run_bypass(cached[1], float(getattr(self, "multiplier", 1.0)), org_forward, x, *args, **kwargs)

    def passive_memory_usage(self) -> int:
        """Bytes held by the adapter's tensors."""
        return sum(p.numel() * p.element_size() for p in self.parameters())


class _Suffixes(Sequence):
    """`weights[0]` of a patch: the tensors' suffix names, with the validated adapter they belong to.

    Deliberately not a tuple: ComfyUI (0.33) rebuilds a patch as `type(p)(p.loaded_keys, w)`
    each time it moves the weights, copying tuples item by item but passing other objects
    through, so the rebuilt patch still finds the adapter its tensors were copied from and
    skips re-validating them (`ModuleAdapter.like`).
    """

    __slots__ = ("names", "source")

    def __init__(self, names: tuple[str, ...], source: ModuleAdapter) -> None:
        self.names, self.source = names, source

    def __getitem__(self, index):
        return self.names[index]

    def __len__(self) -> int:
        return len(self.names)

    def __deepcopy__(self, memo: dict) -> "_Suffixes":
        return self  # immutable; a deep copy of the source's tensors would only waste memory

    def __repr__(self) -> str:
        return f"_Suffixes{self.names!r}"


@dataclass(frozen=True)
class _Facts:
    """The shape facts of an adapter that bypass mode needs (kept to avoid re-validating every forward)."""

    name: str
    out_features: int
    in_channels: int
    fan_in: int


class _ShapeOnlyLayer(torch.nn.Module):
    """Stands in for the host layer so TLoRAModule can run in bypass mode: its shape and conv settings only."""

    def __init__(self, out_features: int, in_channels: int, kernel: tuple[int, ...], conv: Mapping):
        super().__init__()
        self.weight = torch.empty(out_features, in_channels, *kernel, device="meta")
        self.stride, self.padding = conv.get("stride", 1), conv.get("padding", 0)
        self.dilation, self.groups = conv.get("dilation", 1), conv.get("groups", 1)


def _layer_geometry(owner, adapter: ModuleAdapter | _Facts, x: Tensor) -> tuple:
    """(out, in, kernel, conv settings) of the layer being bypassed, from what the host set on the adapter.

    0.12's BypassForwardHook sets is_conv, kernel_size and kw_dict (stride, padding, dilation,
    groups); without them (older hosts) a square kernel with stride 1 and no padding is assumed.
    """
    is_conv = bool(owner.__dict__.get("is_conv", x.dim() == 4))
    in_channels = int(x.shape[1] if is_conv else x.shape[-1])
    if adapter.in_channels and adapter.in_channels != in_channels:
        raise TLoRAError(f"{adapter.name}: the adapter transforms {adapter.in_channels} input channels, the "
                         f"layer gets {in_channels}")
    out_features = adapter.out_features or owner.__dict__.get("out_channels") or in_channels
    if not is_conv:
        return out_features, in_channels, (), ()
    # A transform-only adapter does not know the kernel (fan_in): the host's word is taken then.
    taps = adapter.fan_in // in_channels if adapter.fan_in else None
    kernel = tuple(int(k) for k in (owner.__dict__.get("kernel_size") or ()))
    if not kernel:
        side = int(round((taps or 1) ** 0.5))
        kernel = (side, side)
    if len(kernel) != 2 or (taps is not None and kernel[0] * kernel[1] != taps):
        raise TLoRAError(f"{adapter.name}: bypass mode on a {len(kernel)}-D conv with kernel {kernel} does not "
                         f"fit an adapter made for {taps} kernel taps")
    conv = dict(owner.__dict__.get("kw_dict") or {})
    if int(conv.get("groups", 1)) != 1:
        raise TLoRAError(f"{adapter.name}: grouped convolutions are not supported in bypass mode")
    settings = tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in sorted(conv.items()))
    return out_features, in_channels, kernel, settings


def _bypass_module(adapter: ModuleAdapter, geometry: tuple, trainable: bool):
    """A TLoRAModule over a stand-in of the bypassed layer (its own forward is never called)."""
    from ..tlora.module import TLoRAModule  # noqa: PLC0415

    out_features, in_channels, kernel, settings = geometry
    return TLoRAModule(_ShapeOnlyLayer(out_features, in_channels, kernel, dict(settings)), adapter,
                       trainable=trainable)


def _run_bypass(module, multiplier: float, org_forward, x: Tensor, *args, **kwargs) -> Tensor:
    """org_forward(x + m (T x - x)) + m s Delta x: the activation-side TLoRA around the host's own forward."""
    module.strength = multiplier
    out = org_forward(module.transformed_input(x), *args, **kwargs)
    if module.residual_kind != "none" and multiplier != 0:
        out = out + multiplier * module.residual_output(x).to(out.dtype)
    return out


def _is_ours(cls: type) -> bool:
    """This pack's adapter class, also from an earlier import of the pack (a reload makes a new class)."""
    return getattr(cls, "TLORA_PACK_ADAPTER", None) == TLoRAWeightAdapter.TLORA_PACK_ADAPTER


def register() -> bool:
    """Put our adapter class in ComfyUI's registry exactly once, by identity; False (and a log line) if impossible.

    Other adapters are never looked at by name: another method with a similar name (T-LoRA,
    timestep-dependent LoRA, is `tlora` in LyCORIS) can be registered beside ours; each claims
    only its own keys (ours: `tlora_t.*`, `tlora_r.*`, `tlora_scale`).
    """
    if _registry is None or not hasattr(_registry, "adapters"):
        log.warning("TLoRA: this ComfyUI has no weight-adapter registry; use the TLoRA loader nodes")
        return False
    adapters = _registry.adapters
    try:
        stale = [a for a in adapters if _is_ours(a) and a is not TLoRAWeightAdapter]
        for cls in stale:
            adapters.remove(cls)
        if not any(a is TLoRAWeightAdapter for a in adapters):
            adapters.append(TLoRAWeightAdapter)
    except Exception as err:  # e.g. a registry that became immutable
        log.warning("TLoRA: could not register with ComfyUI's adapter registry (%s)", err)
        return False
    return True


def register_train_adapter() -> bool:
    """Offer TLoRA in TrainLoraNode's `algorithm` list (adapter_maps[TRAIN_ALGORITHM]); False if impossible."""
    try:
        maps = getattr(_registry, "adapter_maps", None)
        if maps is None:
            return False
        current = maps.get(TRAIN_ALGORITHM)
        if current is not None and not _is_ours(current):
            log.warning("TLoRA: TrainLoraNode's algorithm %r is taken by %s; TLoRA is not offered there",
                        TRAIN_ALGORITHM, getattr(current, "__module__", current))
            return False
        maps[TRAIN_ALGORITHM] = TLoRAWeightAdapter
        return True
    except Exception as err:  # never break the pack's import over an optional registry
        log.warning("TLoRA: could not register with TrainLoraNode (%s)", err)
        return False
