"""TLoRA files on diffusers models: activation-side at a run-time strength, several at once, fused and unfused.

    from comfyui_tlora.trainer.diffusers.apply import load_tlora, fuse, unfuse
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
any layer; their tensors are non-persistent buffers without "lora_" in their names, so neither
`state_dict()` nor `get_peft_model_state_dict` sees them.

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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...tlora import arch as arch_mod
from ...tlora import diffusers_names as names
from ...tlora.adapter import ModuleAdapter
from ...tlora.errors import TLoRAError, TLoRAShapeError
from ...tlora.format import TLoRAFile, is_tlora_key, load as load_file, split_key
from ...tlora.forms import select_form
from ...tlora.functional import tr, trm
from ...tlora.functional.weight import merge_diff

__all__ = ["TLoRAApplyError", "TLoRAConv2d", "TLoRAHandle", "TLoRALinear", "adapters", "arch_of", "fuse",
           "is_fused", "load_tlora", "register_peft", "remove", "resolve_path", "set_strength", "unfuse"]

STATE_ATTR = "_tlora_state"
TRANSFORMER_CLASSES = ("FluxTransformer2DModel", "SD3Transformer2DModel", "QwenImageTransformer2DModel")
CLIP_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
MISSING = "no such module in this model"


class TLoRAApplyError(TLoRAError):
    """A TLoRA file that cannot be applied to this diffusers model (nothing was applied)."""


# ----- the wrapped layer ---------------------------------------------------------------------
class _TLoRALayer:
    """Mixin of one adapter on one layer: buffers, activation-side forward, merge."""

    def _setup(self, base: nn.Module, adapter: ModuleAdapter, rows: Tensor | None, name: str,
               strength: float, form: str) -> None:
        self.base = base
        self.adapter_name = name
        self.module_name = adapter.name
        self.strength = float(strength)
        self.form = form
        self.fused = False
        self.last_form: str | None = None
        weight = base.weight
        dev = weight.device
        self.transform_kind = adapter.transform.kind
        self.transform_factors = adapter.transform_factors
        self.transform_rank = adapter.transform.rank
        self.transform_identity = adapter.transform_is_identity
        self._n_t = len(adapter.transform_cores)
        for d, core in enumerate(adapter.transform_cores):
            self.register_buffer(f"t_{d}", core.detach().to(dev, torch.float32).clone(), persistent=False)
        self.register_buffer("t_diag", None if adapter.diag is None else
                             adapter.diag.detach().to(dev, torch.float32).clone(), persistent=False)
        up = down = None
        if adapter.out_cores:
            up, down = tr.factor_matrices_detached([c.float() for c in adapter.out_cores],
                                                   [c.float() for c in adapter.in_cores])
        elif adapter.up is not None:
            up, down = adapter.up.float(), adapter.down.float().t()
        if up is not None and rows is not None:
            up = up[rows]
        # Delta[rows] = res_up res_down^T: res_up (rows, k), res_down (fan_in, k).
        self.register_buffer("res_up", None if up is None else up.to(dev).contiguous(), persistent=False)
        self.register_buffer("res_down", None if down is None else down.to(dev).contiguous(), persistent=False)
        self.res_scale = float(adapter.scale)
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

    def _cores(self, dtype: torch.dtype) -> list[Tensor]:
        return [getattr(self, f"t_{d}").to(dtype) for d in range(self._n_t)]

    def _form(self, x: Tensor, layout: str) -> str:
        form = self.form
        if form == "auto":
            tokens = x.numel() // (x.shape[-1] if layout == "linear" else x.shape[1])
            form = select_form(self.transform_factors, self.transform_rank, tokens, device=x.device, dtype=x.dtype,
                               requires_grad=torch.is_grad_enabled() and x.requires_grad, layout=layout)
        self.last_form = form
        return form

    def transformed_input(self, x: Tensor) -> Tensor:
        """x + sigma (T x - x)."""
        if self.transform_kind == "none" or self.transform_identity or self.strength == 0:
            return x
        conv = isinstance(self, nn.Conv2d)
        if self.transform_kind == "diag":
            rows = x.movedim(1, -1) if conv else x
            moved = rows + self.strength * (rows * self.t_diag.to(rows.dtype) - rows)
            return moved.movedim(-1, 1) if conv else moved
        if conv:
            return trm.apply_channels(x, self._cores(x.dtype), self._form(x, "channels"), self.strength)
        return trm.apply(x, self._cores(x.dtype), self._form(x, "linear"), self.strength)

    def residual_output(self, x: Tensor) -> Tensor:
        """s (Delta x)[rows], unweighted by strength."""
        up = (self.res_up * self.res_scale).to(x.dtype)
        down = self.res_down.to(x.dtype)
        if not isinstance(self, nn.Conv2d):
            return (x @ down) @ up.transpose(0, 1)
        w = self.base.weight
        kernel = down.transpose(0, 1).reshape(down.shape[1], *w.shape[1:])
        hidden = F.conv2d(x, kernel, None, self.stride, self.padding, self.dilation)
        return F.conv2d(hidden, up[:, :, None, None])

    def forward(self, x: Tensor) -> Tensor:
        """base(x + sigma (T x - x)) + sigma s (Delta x)[rows]; just base(x) when fused or at strength 0."""
        if self.fused or self.strength == 0:
            return self.base(x)
        out = self.base(self.transformed_input(x))
        if self.res_up is not None:
            out = out + self.strength * self.residual_output(x).to(out.dtype)
        return out

    def weight_diff(self, weight: Tensor) -> Tensor:
        """sigma (W T + s Delta[rows] - W) for this layer's current weight (float32, `merge_diff`)."""
        cores = self._cores(torch.float32) if self._n_t and not self.transform_identity else None
        diag = self.t_diag if self.t_diag is not None and not self.transform_identity else None
        residual = None if self.res_up is None else ("lora", self.res_up, self.res_down.t(), self.res_scale)
        return merge_diff(weight, self.strength, cores=cores, diag=diag, residual=residual)

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
        self.in_features, self.out_features = int(base.weight.shape[1]), int(base.weight.shape[0])
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


def resolve_path(root: nn.Module, path: str) -> str:
    """A mapped module path as it is in this live model (transformers 5's CLIPTextModel has no `text_model.`)."""
    if path.startswith("text_model.") and "text_model" not in root._modules:
        return path[len("text_model."):]
    return path


def _chain(module: nn.Module) -> list[nn.Module]:
    out = [module]
    while (inner := _inner(out[-1])) is not None:
        out.append(inner)
    return out


# ----- the model's own tables ----------------------------------------------------------------
def _cfg(model: nn.Module, key: str, default: Any = None) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        return default
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


def unet_config(unet: nn.Module) -> arch_mod.UNetConfig:
    """The ComfyUI-style UNetConfig of a diffusers UNet2DConditionModel (what fixes the generic names)."""
    chans = list(_cfg(unet, "block_out_channels"))
    levels = len(chans)
    per = _cfg(unet, "layers_per_block")
    per = [per] * levels if isinstance(per, int) else list(per)
    depth = _cfg(unet, "transformer_layers_per_block", 1)
    depth = [depth] * levels if isinstance(depth, int) else list(depth)
    down = _cfg(unet, "down_block_types")
    up = _cfg(unet, "up_block_types")
    rdepth = _cfg(unet, "reverse_transformer_layers_per_block") or list(reversed(depth))
    depth_in: list[int] = []
    for level in range(levels):
        d = depth[level] if "CrossAttn" in down[level] else 0
        depth_in += [d if isinstance(d, int) else d[0]] * per[level]
    depth_out: list[int] = []  # ComfyUI consumes it from the END: deepest up block last
    for k, level in enumerate(reversed(range(levels))):
        d = rdepth[k] if "CrossAttn" in up[k] else 0
        depth_out = [d if isinstance(d, int) else d[0]] * (per[level] + 1) + depth_out
    mid = _cfg(unet, "transformer_layers_per_block", 1)
    mid = mid if isinstance(mid, int) else mid[-1]
    mid = mid if isinstance(mid, int) else mid[0]
    context = _cfg(unet, "cross_attention_dim")
    context = context if isinstance(context, int) else context[0]
    return arch_mod.UNetConfig(chans[0], tuple(c // chans[0] for c in chans), tuple(per), tuple(depth_in), int(mid),
                               tuple(depth_out), int(context), bool(_cfg(unet, "use_linear_projection", False)))


def _clip_config(name: str, model: nn.Module) -> arch_mod.TextEncoderConfig:
    return arch_mod.TextEncoderConfig(name, int(_cfg(model, "num_hidden_layers")), int(_cfg(model, "hidden_size")),
                                      int(_cfg(model, "intermediate_size")), "")


def _denoiser(roots: Mapping[str, nn.Module]) -> tuple[str, nn.Module] | None:
    for comp in ("unet", "transformer"):
        if comp in roots:
            return comp, roots[comp]
    return None


def arch_of(roots: Mapping[str, nn.Module]) -> tuple[str, arch_mod.Arch]:
    """(family, Arch built from the live models' configs) for the name mapping."""
    found = _denoiser(roots)
    cls = type(found[1]).__name__ if found else ""
    if found and found[0] == "unet":
        family = "sdxl" if _cfg(found[1], "addition_embed_type") == "text_time" else "sd15"
        denoiser: Any = unet_config(found[1])
    elif cls == "FluxTransformer2DModel":
        t = found[1]
        hidden = int(_cfg(t, "num_attention_heads")) * int(_cfg(t, "attention_head_dim"))
        family = "flux"
        denoiser = arch_mod.FluxConfig(hidden, int(_cfg(t, "num_layers")), int(_cfg(t, "num_single_layers")),
                                       4.0, int(_cfg(t, "in_channels")), int(_cfg(t, "joint_attention_dim")),
                                       int(_cfg(t, "pooled_projection_dim")), bool(_cfg(t, "guidance_embeds")))
    elif cls == "SD3Transformer2DModel":
        t = found[1]
        depth = int(_cfg(t, "num_layers"))
        hidden = int(_cfg(t, "num_attention_heads")) * int(_cfg(t, "attention_head_dim"))
        if hidden != 64 * depth:
            raise TLoRAApplyError(f"SD3 transformer with {hidden} channels at depth {depth}: ComfyUI's generic "
                                  f"names assume 64 x depth channels (as every released SD3/SD3.5)")
        family = "sd3"
        denoiser = arch_mod.MMDiTConfig(depth, tuple(_cfg(t, "dual_attention_layers", ()) or ()))
    elif cls == "QwenImageTransformer2DModel":
        family, denoiser = "qwen-image", arch_mod.QwenImageConfig()
    elif found:
        raise TLoRAApplyError(f"unsupported diffusers {found[0]} {cls} (supported: UNet2DConditionModel, "
                              f"{', '.join(TRANSFORMER_CLASSES)})")
    else:
        family, denoiser = "clip", arch_mod.QwenImageConfig(layers=0)
    tes = tuple(_clip_config(name, roots[comp]) for name, comp in names.TEXT_ENCODER_COMPONENT.items()
                if comp in roots and type(roots[comp]).__name__ in CLIP_CLASSES)
    return family, arch_mod.Arch(family, denoiser, tes, "", "", "")


def _kohya_names(arch: arch_mod.Arch, family: str, generics: Iterable[str]) -> dict[str, str]:
    """{kohya name: generic} (ComfyUI's prefixes for this family's CLIP encoders)."""
    te_prefix = {te.name: te.kohya_prefix for te in arch_mod.ARCHS.get(family, arch_mod.ARCHS["sdxl"]).text_encoders}
    out = {}
    for generic in generics:
        if generic.startswith(arch_mod.UNET_PREFIX):
            out["lora_unet_" + generic[len(arch_mod.UNET_PREFIX):].replace(".", "_")] = generic
        else:
            name, _, rest = generic[len(arch_mod.TE_PREFIX):].partition(".transformer.")
            if name in te_prefix:
                out[te_prefix[name] + rest.replace(".", "_")] = generic
    return out


# ----- targets -------------------------------------------------------------------------------
def _roots(target: Any, component: str | None = None) -> dict[str, nn.Module]:
    """{component: model} of a pipeline or of a bare model."""
    if isinstance(target, nn.Module):
        cls = type(target).__name__
        if component is None:
            if cls == "UNet2DConditionModel":
                component = "unet"
            elif cls in TRANSFORMER_CLASSES:
                component = "transformer"
            elif cls in CLIP_CLASSES:
                component = "text_encoder"
            else:
                raise TLoRAApplyError(f"cannot tell which pipeline component a bare {cls} is: pass component=")
        return {component: target}
    components = getattr(target, "components", None)
    if not isinstance(components, Mapping):
        raise TLoRAApplyError(f"{type(target).__name__} is neither a diffusers pipeline nor a torch module")
    out = {}
    for comp in ("unet", "transformer", *names.TEXT_ENCODER_COMPONENT.values()):
        model = components.get(comp)
        if isinstance(model, nn.Module) and (comp in ("unet", "transformer") or type(model).__name__ in CLIP_CLASSES):
            out[comp] = model
    return out


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


def _label(file: Any) -> str:
    if isinstance(file, TLoRAFile):
        return os.path.basename(file.path) if file.path else "<in memory>"
    if isinstance(file, Mapping):
        return "<in memory>"
    return os.path.basename(os.fspath(file))


def _read(file: Any, label: str) -> tuple[dict[str, ModuleAdapter], dict[str, Any]]:
    if isinstance(file, TLoRAFile):
        return dict(file.adapters), dict(file.config)
    if isinstance(file, Mapping):
        return _adapters_of(file, label), {}
    try:
        loaded = load_file(file)
    except TLoRAError as err:
        raise TLoRAApplyError(f"TLoRA {label!r}: {str(err).removeprefix(f'{os.fspath(file)}: ')}") from None
    return loaded.adapters, loaded.config


def _adapters_of(mapping: Mapping[Any, Any], label: str) -> dict[str, ModuleAdapter]:
    """{module: ModuleAdapter} from an in-memory file: adapters (or trained modules), or a state dict of tensors."""
    if mapping and all(isinstance(v, Tensor) for v in mapping.values()):
        grouped: dict[str, dict[str, Tensor]] = {}
        for key, value in mapping.items():
            if not isinstance(key, str) or not is_tlora_key(key):
                raise TLoRAApplyError(f"TLoRA {label!r}: key {key!r} is not a TLoRA tensor name "
                                      f"('<module>.tlora_t.0', '<module>.tlora_scale', ...). Nothing was applied.")
            prefix, suffix = split_key(key)
            grouped.setdefault(prefix, {})[suffix] = value
        try:
            return {prefix: ModuleAdapter(tensors, name=prefix) for prefix, tensors in grouped.items()}
        except TLoRAError as err:
            raise TLoRAApplyError(f"TLoRA {label!r}: {err}. Nothing was applied.") from None
    out = {}
    for key, value in mapping.items():
        if isinstance(value, ModuleAdapter):
            out[key] = value
        elif hasattr(value, "to_adapter"):
            out[key] = value.to_adapter()
        elif isinstance(getattr(value, "tensors", None), Mapping):  # an adapter of another import of the core
            try:
                out[key] = ModuleAdapter(dict(value.tensors), name=str(key))
            except TLoRAError as err:
                raise TLoRAApplyError(f"TLoRA {label!r}: {err}. Nothing was applied.") from None
        else:
            raise TLoRAApplyError(f"TLoRA {label!r}: {key!r} is a {type(value).__name__}; an in-memory file maps "
                                  f"module names to ModuleAdapters, or tensor names to tensors. Nothing was applied.")
    return out


def _inside_a_wrapper(root: nn.Module, path: str) -> str | None:
    """The path of a TLoRA or PEFT layer that `path` reaches into (its `.base`, `.base_layer`...), if any.

    A file naming a module inside another adapter's layer would wrap that layer's own base: its
    remove() could no longer find it, and the model's adapter records would break.
    """
    parts = path.split(".")
    for end in range(1, len(parts)):
        parent = ".".join(parts[:end])
        module = root.get_submodule(parent)
        if isinstance(module, WRAPPERS) or _is_peft_layer(module):
            return parent
    return None


def _rows_index(pieces: tuple[names.Piece, ...] | None) -> Tensor | None:
    if pieces is None:
        return None
    return torch.cat([torch.arange(off, off + count) for off, count in pieces])


@dataclass
class _Planned:
    root: str
    path: str
    prefix: str
    adapter: ModuleAdapter
    rows: Tensor | None


def _plan(adapters: Mapping[str, ModuleAdapter], roots: Mapping[str, nn.Module], label: str,
          config: Mapping[str, Any]) -> tuple[list[_Planned], list[str]]:
    """Where each file module goes ([_Planned]) and the modules skipped (text encoders on a bare denoiser)."""
    family, arch = arch_of(roots)
    table = names.diffusers_rows(arch)  # {generic: [(diffusers path, pieces)]} of the live model
    kohya = _kohya_names(arch, family, table)
    plans: list[_Planned] = []
    problems: dict[str, str] = {}
    skipped: list[str] = []
    taken: dict[tuple[str, str], str] = {}
    denoiser = _denoiser(roots)
    for prefix, adapter in adapters.items():
        comp = prefix.partition(".")[0]
        generic = kohya.get(prefix, prefix)
        if comp in names.DENOISER_COMPONENT.values() or comp in names.TEXT_ENCODER_COMPONENT.values():
            targets = [(prefix, None)]  # a diffusers path: one whole module
        elif generic in table:
            targets = table[generic]
        else:
            targets = None
        is_te = generic.startswith((arch_mod.TE_PREFIX, "lora_te")) or comp.startswith("text_encoder")
        if targets is None or targets[0][0].partition(".")[0] not in roots:
            if (is_te and not any(c.startswith("text_encoder") for c in roots)) or (not is_te and denoiser is None):
                skipped.append(prefix)  # model-only loading skips text-encoder modules, as ComfyUI's loaders do
                continue
            problems[prefix] = MISSING
            continue
        total = max((off + count for _, pieces in targets if pieces for off, count in pieces), default=None)
        for path, pieces in targets:
            root_name, _, sub = path.partition(".")
            sub = resolve_path(roots[root_name], sub)
            try:
                module = roots[root_name].get_submodule(sub)
            except AttributeError:
                problems[prefix] = f"{MISSING} ({path})"
                break
            inside = _inside_a_wrapper(roots[root_name], sub)
            if inside is not None:
                problems[prefix] = f"{path} is inside the adapter layer {root_name}.{inside}; name the layer itself"
                break
            plain = _innermost(module)
            if not isinstance(plain, (nn.Linear, nn.Conv2d)) or isinstance(plain, nn.ConvTranspose2d):
                problems[prefix] = f"{path} is a {type(plain).__name__}, not a Linear or Conv2d"
                break
            shape = tuple(plain.weight.shape)
            if pieces is not None:
                if sum(c for _, c in pieces) != shape[0]:
                    problems[prefix] = f"{path} has {shape[0]} rows, the mapping gives it {sum(c for _, c in pieces)}"
                    break
                shape = (total, *shape[1:])
            try:
                adapter.check_fits(shape)
            except TLoRAShapeError as err:
                problems[prefix] = str(err).split(": ", 1)[-1]
                break
            if (root_name, sub) in taken:
                problems[prefix] = f"patches {path} as {taken[(root_name, sub)]} does (give each weight once)"
                break
            taken[(root_name, sub)] = prefix
            plans.append(_Planned(root_name, sub, prefix, adapter, _rows_index(pieces)))
    if problems:
        first, why = next(iter(problems.items()))
        made_for = config.get("arch")
        hint = f" The file was made for {made_for}." if isinstance(made_for, str) else ""
        raise TLoRAApplyError(f"TLoRA {label!r} does not fit this {family} model: {len(problems)} of {len(adapters)} "
                              f"modules did not match, e.g. {first}: {why}.{hint} Nothing was applied.")
    if not plans:
        raise TLoRAApplyError(f"TLoRA {label!r} has no module for this model (skipped: {len(skipped)})")
    return plans, skipped


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
