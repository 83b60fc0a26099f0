"""ComfyUI's own bypass path (0.12+: Load LoRA (Bypass), TrainLoraNode's bypass_mode) over the run-time layer.

The host replaces a layer's forward by a hook that calls our adapter's `bypass_forward(org_forward,
x)`; the hook tells the adapter the layer's kind and conv settings (`is_conv`, `kernel_size`,
`kw_dict`). Here those facts become a `tlora.runtime.Geometry` and the call runs through the one
run-time layer with `org_forward` as the frozen callable. Two host habits are undone: 0.12.1 casts
an adapter's tensors to the layer's storage dtype (fp8 cores on an fp8 checkpoint) and 0.33 to its
fp16/bf16 one, so the float32 tensors the file was validated with are used; and the host's bypass
loader drops keys that name row slices of fused weights with a log line only, so such a file is
refused before anything is applied, pointing at our loader.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping

from torch import Tensor

from ..tlora.adapter import ModuleAdapter
from ..tlora.claim import module_prefixes
from ..tlora.errors import TLoRAError
from ..tlora.runtime import AdapterLayer, Entry, Geometry

CACHE_ATTR = "_tlora_bypass"


def _pair(value, name: str, where: str) -> tuple[int, int]:
    if isinstance(value, str):
        raise TLoRAError(f"{where}: bypass mode on a conv with padding {value!r} is not supported")
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value), int(value))


def hook_geometry(owner: object, adapter: ModuleAdapter, x: Tensor) -> Geometry:
    """The bypassed layer's Geometry from what the host's hook set on the adapter object.

    0.12's BypassForwardHook sets is_conv, kernel_size and kw_dict (stride, padding, dilation,
    groups); without them (older hosts) a square kernel with stride 1 and no padding is assumed.
    """
    info = owner.__dict__
    is_conv = bool(info.get("is_conv", x.dim() == 4))
    in_channels = int(x.shape[1] if is_conv else x.shape[-1])
    if adapter.in_channels and adapter.in_channels != in_channels:
        raise TLoRAError(f"{adapter.name}: the adapter transforms {adapter.in_channels} input channels, the "
                         f"layer gets {in_channels}")
    out_features = int(adapter.out_features or info.get("out_channels") or in_channels)
    if not is_conv:
        return Geometry(out_features, in_channels)
    # A transform-only adapter does not know the kernel (fan_in): the host's word is taken then.
    taps = adapter.fan_in // in_channels if adapter.fan_in else None
    kernel = tuple(int(k) for k in (info.get("kernel_size") or ()))
    if not kernel:
        side = int(round(math.sqrt(taps or 1)))
        kernel = (side, side)
    if len(kernel) != 2 or (taps is not None and kernel[0] * kernel[1] != taps):
        raise TLoRAError(f"{adapter.name}: bypass mode on a {len(kernel)}-D conv with kernel {kernel} does not "
                         f"fit an adapter made for {taps} kernel taps")
    conv = dict(info.get("kw_dict") or {})
    if int(conv.get("groups", 1)) != 1:
        raise TLoRAError(f"{adapter.name}: grouped convolutions are not supported in bypass mode")
    return Geometry(out_features, in_channels, kernel, _pair(conv.get("stride", 1), "stride", adapter.name),
                    _pair(conv.get("padding", 0), "padding", adapter.name),
                    _pair(conv.get("dilation", 1), "dilation", adapter.name))


def run(owner: object, adapter: ModuleAdapter, org_forward, x: Tensor, *args, trainable: bool = False,
        share: Mapping[str, Tensor] | None = None, **kwargs) -> Tensor:
    """org_forward(x + m (T x - x)) + m s Delta x, m the multiplier the host set; the layer cached on `owner`."""
    geometry = hook_geometry(owner, adapter, x)
    key = (x.device, geometry, id(adapter))
    cached = owner.__dict__.get(CACHE_ATTR)
    if cached is None or cached[0] != key:
        entry = Entry(adapter, geometry, trainable=trainable, share=dict(share) if share is not None else None)
        if share is None:
            entry = entry.to(x.device)  # a float32 copy on the layer's device, made once
        layer = AdapterLayer(org_forward, [entry], geometry=geometry, own_base=False)
        # Not an attribute torch sees: TrainLoraNode saves the adapter module's state dict as the file.
        owner.__dict__[CACHE_ATTR] = cached = (key, layer, adapter)
    layer = cached[1]
    layer.__dict__["base"] = org_forward  # the host's forward of this call (the hook's, never a stale one)
    layer.entries[0].strength = float(owner.__dict__.get("multiplier", 1.0))
    return layer(x, *args, **kwargs)


def sliced_modules(key_map: Mapping[str, object], keys) -> list[str]:
    """The file's TLoRA modules whose key-map entry is a row slice of a fused weight (a tuple, not a key)."""
    return [p for p in module_prefixes(keys) if isinstance(key_map.get(p), tuple)]


def guard_bypass_loader(sd_module, lora_module) -> bool:
    """Make the host's bypass loader refuse, in one line, a TLoRA file it would apply in part.

    `load_bypass_lora_for_models` keeps only keys that are whole weights and logs the others
    ("Adapter key not in model state_dict"): a file with diffusers-named q/k/v of fused Flux/SD3
    weights would sample as the base model in those layers. False when the host has no such loader.
    """
    original = getattr(sd_module, "load_bypass_lora_for_models", None)
    if original is None or getattr(original, "_tlora_guard", False):
        return False

    @functools.wraps(original)
    def load_bypass_lora_for_models(model, clip, lora, strength_model, strength_clip, *args, **kwargs):
        key_map: dict = {}
        if model is not None:
            lora_module.model_lora_keys_unet(model.model, key_map)
        if clip is not None:
            lora_module.model_lora_keys_clip(clip.cond_stage_model, key_map)
        sliced = sliced_modules(key_map, lora.keys())
        if sliced:
            raise TLoRAError(f"Load LoRA (Bypass) would drop {len(sliced)} TLoRA modules that patch row slices of "
                             f"fused weights (e.g. {sliced[0]}): load this file with Load TLoRA (mode activation or "
                             f"auto) instead; nothing was applied")
        return original(model, clip, lora, strength_model, strength_clip, *args, **kwargs)

    load_bypass_lora_for_models._tlora_guard = True
    sd_module.load_bypass_lora_for_models = load_bypass_lora_for_models
    return True
