"""Inference: TLoRA files on diffusers models: activation-side at a run-time strength, several at once, fused and unfused.

    from comfyui_tlora.trainer.diffusers.inference import load_tlora, fuse, unfuse
    style = load_tlora(pipe, "style.safetensors", name="style", strength=0.8)   # pipeline or bare model
    style.strength = 0.5            # any time while not fused
    fuse(pipe); unfuse(pipe)        # weights W0 T + s Delta, then W0 back bit for bit
    style.remove()

Targets: a pipeline (its `unet` / `transformer` and CLIP `text_encoder` / `text_encoder_2`) or a
bare `UNet2DConditionModel`, `FluxTransformer2DModel`, `SD3Transformer2DModel`,
`QwenImageTransformer2DModel` or CLIP text model (`component=` names a bare CLIP's slot). File
keys: ComfyUI's generic names (`diffusion_model.*`, `text_encoders.*`, what our trainer and
ComfyUI-trained files hold), their kohya forms (`lora_unet_*`, `lora_te*_`), or component-
prefixed diffusers paths (`unet.*`, `transformer.*`, `text_encoder.*`). Names are mapped by
`tlora.diffusers_names` on tables built from the live model's own config, so tiny and
non-standard models map as the released ones do.

Each adapted module is replaced by a `TLoRALinear` / `TLoRAConv2d` around what was there
(`y = base(x + sigma (T x - x)) + sigma s (Delta x)[rows]`). A generic fused weight (Flux
`img_attn.qkv`, `single_blocks.N.linear1`, SD3 `attn.qkv`) covers several diffusers modules:
T acts on the input side, so each slice module computes `W_slice (T x) + s (Delta x)[rows]`,
exactly the rows of the generic patched weight. The wrappers subclass `nn.Linear`/`nn.Conv2d`
(their `weight`/`bias` are the base's), so PEFT (diffusers' `load_lora_weights`) wraps them like
any layer; the adapter's tensors are kept outside torch's view of the model (neither a
parameter nor a buffer), so neither `state_dict()`, `parameters()` nor PEFT sees them. The maths
is the core's run-time layer (`tlora.runtime`); this package maps names and manages wrappers.

`trainer/diffusers/apply.py` is this package's former name, kept importable.

Stacking. Several TLoRAs: each acts on the weight left by those applied before it, in order, as
ComfyUI patches (A then B: `W = W_A + sigma_B (W_A T_B + s_B Delta_B - W_A)`, `W_A` the weight A
gives). Diffusers/PEFT LoRAs (`pipe.load_lora_weights`, either order) always go beside:
`W = [TLoRAs on W0] + sum of B A`; a TLoRA loaded after a LoRA is put under the PEFT layer, so
PEFT's own module structure, key names and `get_peft_model_state_dict` are those without TLoRA.
To fuse both: `fuse()` first, then `pipe.fuse_lora()`; unfuse in the reverse order.

Errors are one line naming the file and a module; a file that does not fit is applied nowhere.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ....tlora.errors import TLoRAError
from .layers import WRAPPERS, TLoRAConv2d, TLoRALinear, _chain, _innermost, _is_peft_layer, resolve_path
from .mapping import TLoRAApplyError, _label, _plan, _read, _roots, arch_of, unet_config

__all__ = ["TLoRAApplyError", "TLoRAConv2d", "TLoRAError", "TLoRAHandle", "TLoRALinear", "WRAPPERS", "adapters", "arch_of", "fuse",
           "is_fused", "load_tlora", "register_peft", "remove", "resolve_path", "set_strength", "unet_config",
           "unfuse"]

STATE_ATTR = "_tlora_state"


@dataclass
class _State:
    """What one root model carries: applied adapters (in order) and the fused weights' backups."""

    order: list[str] = field(default_factory=list)
    layers: dict[str, list[tuple[str, nn.Module]]] = field(default_factory=dict)  # name -> [(path, wrapper)]
    backups: dict[int, tuple[nn.Parameter, Tensor, Tensor]] = field(default_factory=dict)  # id -> (param, W, sample)


def _state(root: nn.Module) -> _State:
    state = root.__dict__.get(STATE_ATTR)
    if state is None:
        state = _State()
        root.__dict__[STATE_ATTR] = state
    return state



# ----- the public API ------------------------------------------------------------------------
class TLoRAHandle:
    """One applied TLoRA file: its name, strength (settable) and removal."""

    def __init__(self, target: Any, name: str, roots: Mapping[str, nn.Module], modules: int, skipped: list[str]):
        self.target, self.name, self._roots = target, name, dict(roots)
        self.modules, self.skipped = modules, skipped

    def _layers(self) -> list[nn.Module]:
        return [w for root in self._roots.values() for _, w in _state(root).layers.get(self.name, [])]

    @property
    def strength(self) -> float:
        layers = self._layers()
        return layers[0].strength if layers else 0.0

    @strength.setter
    def strength(self, value: float) -> None:
        set_strength(self.target, self.name, value)

    def remove(self) -> None:
        remove(self.target, self.name)

    def __repr__(self) -> str:
        return f"TLoRAHandle({self.name!r}, modules={self.modules}, strength={self.strength})"


def _check_strength(value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise TLoRAError(f"strength is {value}: strengths must be finite numbers")
    return value


def load_tlora(target: Any, file: Any, name: str | None = None, strength: float = 1.0, *,
               component: str | None = None, form: str = "auto") -> TLoRAHandle:
    """Apply a TLoRA file (path, TLoRAFile or {module: ModuleAdapter}) activation-side; returns its handle.

    `name` (default: the file's stem) must be new on this target. Text-encoder modules are applied
    when the target has its CLIP encoders (a pipeline) and skipped on a bare denoiser (reported
    in `handle.skipped`); a module that matches nothing else refuses the whole file.
    """
    label = _label(file)
    name = name or os.path.splitext(label)[0]
    strength = _check_strength(strength)
    roots = _roots(target, component)
    if not roots:
        raise TLoRAApplyError(f"TLoRA {label!r}: {type(target).__name__} has no UNet, transformer or CLIP to adapt")
    for root in roots.values():
        if name in _state(root).layers:
            raise TLoRAApplyError(f"TLoRA {label!r}: an adapter named {name!r} is already applied (remove it or "
                                  f"pass another name=)")
        if _state(root).backups:
            raise TLoRAApplyError(f"TLoRA {label!r}: the model's TLoRAs are fused; unfuse() before adding one")
    adapters, config = _read(file, label)
    plans, skipped = _plan(adapters, roots, label, config)
    wrappers = []
    for plan in plans:  # build every wrapper first: nothing is installed unless all are made
        parent, _, child = plan.path.rpartition(".")
        holder, attr = (roots[plan.root].get_submodule(parent) if parent else roots[plan.root]), child
        module = getattr(holder, attr)
        while _is_peft_layer(module):  # PEFT LoRAs stay outermost: they go beside every TLoRA (W0 T + s Delta + B A)
            holder, attr, module = module, "base_layer", module.base_layer
        cls = TLoRAConv2d if isinstance(_innermost(module), nn.Conv2d) else TLoRALinear
        wrappers.append((plan, (holder, attr), cls(module, plan.adapter, plan.rows, name, strength, form)))
    for _, (holder, attr), wrapper in wrappers:
        setattr(holder, attr, wrapper)
    for root_name, root in roots.items():
        state = _state(root)
        state.layers[name] = [(p.path, w) for p, _, w in wrappers if p.root == root_name]
        state.order.append(name)
    return TLoRAHandle(target, name, roots, len(adapters) - len(skipped), skipped)


def adapters(target: Any, component: str | None = None) -> dict[str, float]:
    """{name: strength} of the TLoRAs applied to a target, in the order they were applied."""
    out: dict[str, float] = {}
    for root in _roots(target, component).values():
        state = _state(root)
        for name in state.order:
            if state.layers[name]:
                out.setdefault(name, state.layers[name][0][1].strength)
    return out


def _named(target: Any, name: str, component: str | None) -> list[tuple[nn.Module, _State]]:
    found = [(root, _state(root)) for root in _roots(target, component).values() if name in _state(root).layers]
    if not found:
        raise TLoRAError(f"no TLoRA named {name!r} is applied (applied: {', '.join(adapters(target, component)) or 'none'})")
    return found


def set_strength(target: Any, name: str, strength: float, component: str | None = None) -> None:
    """Change one adapter's strength (activation-side: takes effect on the next forward)."""
    strength = _check_strength(strength)
    found = _named(target, name, component)
    if any(state.backups for _, state in found):
        raise TLoRAError(f"TLoRA {name!r} is fused into the weights: unfuse() before changing its strength")
    for _, state in found:
        for _, wrapper in state.layers[name]:
            wrapper.strength = strength


def remove(target: Any, name: str | None = None, component: str | None = None) -> None:
    """Take one adapter (or all, name=None) out of the model, wherever it sits in a wrapping chain."""
    roots = _roots(target, component)
    if any(_state(r).backups for r in roots.values()):
        raise TLoRAError("the model's TLoRAs are fused into the weights: unfuse() before removing one")
    todo = [name] if name is not None else list(adapters(target, component))
    if name is not None:
        _named(target, name, component)
    for root in roots.values():
        state = _state(root)
        for n in todo:
            for path, wrapper in state.layers.pop(n, []):
                _splice_out(root, path, wrapper)
            if n in state.order:
                state.order.remove(n)


def _splice_out(root: nn.Module, path: str, wrapper: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    holder, attr = (root.get_submodule(parent_path) if parent_path else root), child
    module = getattr(holder, attr)
    while module is not wrapper:
        if isinstance(module, WRAPPERS):
            holder, attr = module, "base"
        elif _is_peft_layer(module):
            holder, attr = module, "base_layer"
        else:
            raise TLoRAError(f"{path}: the TLoRA layer is no longer in the model (was the module replaced?)")
        module = getattr(holder, attr)
    if isinstance(holder, WRAPPERS) and attr == "base":
        holder.base = wrapper.base
    else:
        setattr(holder, attr, wrapper.base)


def _sample(weight: Tensor) -> Tensor:
    flat = weight.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // 1024)].clone()


def fuse(target: Any, component: str | None = None) -> None:
    """Merge every applied TLoRA into its weights, in the order applied (W0 is kept for `unfuse`).

    Refused (nothing changed) when an unmerged PEFT LoRA sits *under* a TLoRA on some module (its
    weight is not yet in the weight the transform would act on: fuse_lora() it first).
    """
    roots = _roots(target, component)
    work = []
    for root in roots.values():
        state = _state(root)
        if state.backups:
            raise TLoRAError("the model's TLoRAs are already fused")
        for name in state.order:
            for path, wrapper in state.layers[name]:
                for inner in _chain(wrapper)[1:]:
                    if _is_peft_layer(inner) and not inner.merged and not getattr(inner, "disable_adapters", False) \
                            and inner.active_adapters:
                        raise TLoRAError(f"{path}: TLoRA {name!r} sits on an unmerged PEFT LoRA "
                                         f"({', '.join(inner.active_adapters)}): fuse_lora() it first")
                work.append((state, path, wrapper))
    with torch.no_grad():
        for state, path, wrapper in work:
            weight = _innermost(wrapper).weight
            if id(weight) not in state.backups:
                state.backups[id(weight)] = (weight, weight.detach().clone(), None)
            if wrapper.strength != 0:
                diff = wrapper.weight_diff(weight)
                merged = (weight.to(diff.dtype) + diff).to(weight.dtype)
                if not bool(torch.isfinite(merged).all()):
                    # Refused before this weight is written; the ones fused so far are put back.
                    for s in {id(s): s for s, _, _ in work}.values():
                        for param, backup, _ in s.backups.values():
                            param.copy_(backup)
                        s.backups.clear()
                    for _, _, w in work:
                        w.fused = False
                    raise TLoRAError(f"{path}: fusing TLoRA {wrapper.adapter_name!r} would write NaN or inf into this "
                                     f"weight (its values are too large for {weight.dtype}); nothing was fused")
                weight.copy_(merged)
            wrapper.fused = True
        for state in {id(s): s for s, _, _ in work}.values():
            for key, (param, backup, _) in list(state.backups.items()):
                state.backups[key] = (param, backup, _sample(param))


def unfuse(target: Any, component: str | None = None) -> None:
    """Put back the weights saved by `fuse`, bit for bit; the TLoRAs run activation-side again.

    Refused (nothing changed) when a weight changed since `fuse` (a LoRA fused after it: unfuse that first).
    """
    roots = _roots(target, component)
    states = [_state(r) for r in roots.values()]
    if not any(s.backups for s in states):
        raise TLoRAError("no TLoRA is fused")
    for state in states:
        for param, _, sample in state.backups.values():
            now = _sample(param)
            eps = torch.finfo(param.dtype).eps if param.is_floating_point() else 0.0
            finite = sample[torch.isfinite(sample)] if sample.is_floating_point() else sample
            # A weight that holds NaN/inf still compares (equal_nan; the tolerance from its finite part):
            # the backups must always be able to come back.
            tol = 8 * eps * float(finite.abs().max()) if finite.numel() else 0.0
            if not torch.allclose(now.float(), sample.float(), rtol=0, atol=tol, equal_nan=True):
                raise TLoRAError(f"a weight of shape {tuple(param.shape)} changed after fuse() (a LoRA fused after "
                                 f"the TLoRA?): unfuse that first; nothing was restored")
    with torch.no_grad():
        for state in states:
            for param, backup, _ in state.backups.values():
                param.copy_(backup)
            state.backups.clear()
            for name in state.order:
                for _, wrapper in state.layers[name]:
                    wrapper.fused = False


def is_fused(target: Any, component: str | None = None) -> bool:
    """Whether the target's TLoRAs are fused into its weights."""
    return any(_state(r).backups for r in _roots(target, component).values())


def register_peft(config: Any) -> Any:
    """Register our wrapper classes with a PEFT LoraConfig (`_register_custom_module`); returns the config.

    PEFT already treats the wrappers as the Linear/Conv2d they subclass, so this is only needed
    where a PEFT version dispatches on exact types; a LoRA put on a wrapper goes beside it (W0 T +
    s Delta + B A), and `get_peft_model_state_dict` holds only the LoRA's tensors.
    """
    from peft.tuners import lora  # noqa: PLC0415

    config._register_custom_module({TLoRALinear: lora.Linear, TLoRAConv2d: lora.Conv2d})
    return config
