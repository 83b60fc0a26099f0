"""TLoRA as a ComfyUI weight adapter, inference and training side by side (as ComfyUI's
comfy/weight_adapter/lora.py keeps LoraDiff beside LoRAAdapter), over the core's functions.

* `TLoRAWeightAdapter`: the stock LoRA loaders, hook LoRAs and our own merged loaders patch
  weights through it. Contract followed (0.3.75 and newer): constructor (loaded_keys, weights)
  with every tensor inside `weights`; `load` claims keys through the core (`tlora.claim`);
  `calculate_weight` updates `weight` in place from a float32 merge, rounding once into the
  weight's dtype (fp8 stochastically, as the host rounds its own LoRAs); `bypass_forward` runs
  the core's run-time layer around the host's forward (`comfy_bypass`).
* `TLoRATrainDiff`: the trainable weight-side form that ComfyUI's built-in TrainLoraNode
  uses when its `algorithm` is TLoRA (`adapter_maps["TLoRA"]`), and its bypass mode.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from ..tlora.adapter import R_DOWN, R_IN, R_OUT, R_UP, SCALE, T_CORE, T_DIAG, ModuleAdapter
from ..tlora.claim import claim
from ..tlora.errors import TLoRAError
from ..tlora.functional import weight as wside
from ..tlora.spec import DEFAULT_TRANSFORM
from . import comfy_bypass

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
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def write_back(weight: Tensor, merged: Tensor, key: str) -> None:
    """weight <- merged (float32), rounded once into weight's dtype as the host rounds a LoRA (fp8: stochastically)."""
    if weight.dtype in FP8_DTYPES:
        import comfy.float  # noqa: PLC0415
        import comfy.utils  # noqa: PLC0415
        merged = comfy.float.stochastic_rounding(merged, weight.dtype, seed=comfy.utils.string_to_seed(key))
    weight.copy_(merged.to(weight.dtype))


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
        """Claim the keys `x.tlora_*` of a file (the registry's entry point); None if absent.

        A broken module fails the stock loader's prompt with the reason, as our loaders do: skipping
        it (the registry's habit) would apply the rest of the file and say so only in the server log.
        (A module that does not fit its weight shows only at patch time: see calculate_weight.)
        """
        found = claim(x, lora)
        if found is None:
            return None
        adapter, keys = found
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

    def float_adapter(self, device: torch.device) -> ModuleAdapter:
        """The adapter in the dtypes the file was validated with, on `device`.

        The host's copy in `weights` where it kept those dtypes (0.33 moves patches to the device
        itself); the file's own tensors where a host cast them to a layer's storage dtype (0.12.1's
        bypass: fp8 cores on an fp8 checkpoint; 0.33's: fp16/bf16), moved once and kept.
        """
        names, tensors = self.weights[0], self.weights[1:]
        source = getattr(names, "source", None)
        if source is None or all(getattr(t, "dtype", None) == source.tensors[n].dtype for n, t in zip(names, tensors)):
            return self.module_adapter()
        kept = self.__dict__.get("_float_copy")
        if kept is None or kept[0] != device:
            self._float_copy = kept = (device, source.to(device))
        return kept[1]

    def calculate_shape(self, key):
        """The patched weight's shape: TLoRA never changes it (None, as the host's base class answers)."""
        return None

    # ----- training (ComfyUI's built-in TrainLoraNode) ----------------------------------
    @classmethod
    def create_train(cls, weight, rank=8, alpha=1.0):
        """A fresh trainable TLoRA for TrainLoraNode: the default transform + tr:<rank> residual, weight-side."""
        return TLoRATrainDiff.create(weight, rank=rank, alpha=alpha)

    def to_train(self):
        """This adapter as a trainable module (TrainLoraNode's `existing_lora`)."""
        return TLoRATrainDiff(self.module_adapter().tensors)

    # ----- patching -----------------------------------------------------------------
    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        """weight += function(strength * (W T + s Delta - W)): merged in float32 (factored), rounded once.

        A module that does not fit its weight (possible only through the stock loaders, which
        do not check shapes) is logged and skipped, as ComfyUI's own adapters do, so that
        sampling goes on; our loader nodes refuse such files before anything is patched.
        """
        if strength == 0:
            return weight
        adapter = self.float_adapter(weight.device)
        try:
            diff = adapter.weight_diff(weight, strength)  # strength folded into the merge: no extra pass
        except TLoRAError as err:
            log.error("TLoRA: not applied to %s: %s", key, err)
            return weight
        if weight.dtype in (torch.float32, torch.float64):
            weight += function(diff.to(weight.dtype))
        else:  # fp16/bf16/fp8: one rounding of the float32 sum, not one of the difference and one of the sum
            write_back(weight, weight.to(diff.dtype) + function(diff), key)
        return weight

    def bypass_forward(self, org_forward, x, *args, **kwargs):
        """Activation-side form for the host's bypass mode (Load LoRA (Bypass)): the run-time layer, float32 cores."""
        return comfy_bypass.run(self, self.float_adapter(x.device), org_forward, x, *args, **kwargs)


class TLoRATrainDiff(WeightAdapterTrainBase):
    """Trainable weight-side TLoRA for TrainLoraNode: __call__(W0) = W0 T + s Delta.

    Parameters are registered under the file's suffixes (`tlora_t.0`, `tlora_r.out.0`,
    `tlora_scale`...), so TrainLoraNode's `{module}.{param}` state dict is a valid TLoRA file.
    """

    def __init__(self, tensors: Mapping[str, Tensor]):
        super().__init__()
        adapter = ModuleAdapter(dict(tensors))
        self.transform_kind, self.residual_kind = adapter.transform.kind, adapter.residual.kind
        self.__dict__["_facts"] = adapter  # shapes and kinds for bypass mode (never re-validated per forward)
        self._counts = (len(adapter.transform_cores), len(adapter.out_cores), len(adapter.in_cores))
        for key, value in adapter.tensors.items():
            param = nn.Parameter(value.detach().float().clone(), requires_grad=key != SCALE)
            *path, leaf = key.split(".")
            holder = self
            for part in path:  # nested modules make the state dict's keys the file's suffixes
                if part not in holder._modules:
                    holder.add_module(part, nn.Module())
                holder = holder._modules[part]
            holder.register_parameter(leaf, param)

    @classmethod
    def create(cls, weight: Tensor, rank: int = 8, alpha: float = 1.0,
               transform: str = DEFAULT_TRANSFORM) -> "TLoRATrainDiff":
        """Fresh adapter for a weight: TRM transform + tensor-ring residual of TrainLoraNode's rank."""
        adapter = ModuleAdapter.create(tuple(weight.shape), transform, f"tr:{int(rank)}", "paper", alpha=float(alpha))
        return cls({k: v.to(weight.device) for k, v in adapter.tensors.items()})

    def _get(self, suffix: str) -> Tensor:
        return self.get_parameter(suffix).float()

    def __call__(self, w: Tensor) -> Tensor:
        n_t, n_out, n_in = self._counts
        w32 = w.float()
        out = w32
        if self.transform_kind == "diag":
            out = wside.transformed(w32, diag=self._get(T_DIAG))
        elif self.transform_kind != "none":
            out = wside.transformed(w32, [self._get(T_CORE.format(d)) for d in range(n_t)])
        if self.residual_kind == "tr":
            parts = ([self._get(R_OUT.format(d)) for d in range(n_out)], [self._get(R_IN.format(d)) for d in range(n_in)])
        else:
            parts = (self._get(R_UP), self._get(R_DOWN)) if self.residual_kind == "lora" else ()
        delta = wside.residual(self.residual_kind, w32.shape, parts)
        if delta is not None:
            out = out + self._get(SCALE) * delta
        return out.to(w.dtype)

    def tensors(self) -> dict[str, Tensor]:
        """The adapter's tensors by file suffix (live parameters, not copies)."""
        return dict(self.named_parameters())

    def bypass_forward(self, org_forward, x, *args, **kwargs):
        """Bypass-mode training (TrainLoraNode with bypass_mode): the run-time layer on these very parameters.

        The host's default g(f(x) + h(x)) cannot express a transform of the input, so the whole
        forward is ours: org_forward(x + m (T x - x)) + m s Delta x, gradients into this module.
        """
        return comfy_bypass.run(self, self.__dict__["_facts"], org_forward, x, *args, trainable=True,
                                share=self.tensors(), **kwargs)

    def passive_memory_usage(self) -> int:
        """Bytes held by the adapter's tensors."""
        return sum(p.numel() * p.element_size() for p in self.parameters())


class _Suffixes(Sequence):
    """`weights[0]` of a patch: the tensors' suffix names, with the validated adapter they belong to.

    Deliberately not a tuple: ComfyUI rebuilds a patch as `type(p)(p.loaded_keys, w)` each time it
    moves the weights (0.33) and casts a bypass adapter's tensors to the layer's dtype (0.12.1: fp8),
    copying tuples item by item but passing other objects through, so the rebuilt patch still finds
    the adapter its tensors came from: it skips re-validating them (`ModuleAdapter.like`) and merges
    and bypasses with the file's own float32 tensors.
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
    try:  # 0.12+: the host's bypass loader would drop sliced keys of our files without a word
        import comfy.lora  # noqa: PLC0415
        import comfy.sd  # noqa: PLC0415
        comfy_bypass.guard_bypass_loader(comfy.sd, comfy.lora)
    except Exception as err:  # never break registration over the guard
        log.warning("TLoRA: could not guard the bypass LoRA loader (%s)", err)
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
