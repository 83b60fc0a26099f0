"""Activation-side TLoRA around a live nn.Linear / nn.Conv2d, for training and on-the-fly use.

    y = base(x + sigma (T x - x)) + sigma s Delta x

The base layer (and its weight) is never modified or copied; only adapter tensors are
parameters. For convs T mixes input channels at every pixel (a 1x1 map) and Delta is a
conv with the base's stride/padding followed by a 1x1 up-projection. For a plain linear
base the frozen GEMM, T and Delta run in one autograd node (`trm.linear`). The transform's
form (factored / merged / dense) is the module's `form`, or with "auto" the one
`tlora.forms.select_form` measured fastest for this shape, token bucket, device, dtype and
grad mode (TLORA_FORM forces one); `last_form` records the form used.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapter import SCALE, ModuleAdapter
from .forms import select_form
from .functional import tr, trm


def _param_name(suffix: str) -> str:
    return suffix.replace(".", "__")


class TLoRAModule(nn.Module):
    """Wraps a base Linear/Conv2d and applies its adapter activation-side; `strength` is settable."""

    def __init__(self, base: nn.Module, adapter: ModuleAdapter, strength: float = 1.0,
                 form: str = "auto", trainable: bool = True):
        super().__init__()
        weight = base.weight
        adapter.check_fits(weight.shape)
        if weight.dim() == 4 and getattr(base, "groups", 1) != 1:
            raise ValueError(f"{adapter.name}: grouped convolutions are not supported")
        self.base = base
        self.name = adapter.name
        self.is_conv = weight.dim() == 4
        self.strength = float(strength)
        self.form = form
        self.adapter_params = nn.ParameterDict({
            _param_name(k): nn.Parameter(v.detach().to(torch.float32).clone(), requires_grad=trainable)
            for k, v in adapter.tensors.items() if k != SCALE})
        self.register_buffer("scale", torch.tensor(adapter.scale, dtype=torch.float32), persistent=False)
        self.transform_kind = adapter.transform.kind
        self.residual_kind = adapter.residual.kind
        self.transform_factors = adapter.transform_factors
        self.transform_rank = adapter.transform.rank
        self._n_t = len(adapter.transform_cores)
        self._n_out, self._n_in = len(adapter.out_cores), len(adapter.in_cores)
        self.last_form: str | None = None
        # Version counters of an identity start: while they are unchanged T == I exactly, and
        # transformed_input keeps x bit for bit (the factored form's ring sums would round it).
        self._identity_versions = (self._t_versions() if self._n_t and adapter.transform_is_identity
                                   else None)

    def _p(self, suffix: str) -> Tensor:
        return self.adapter_params[_param_name(suffix)]

    def _t_versions(self) -> tuple[int, ...]:
        return tuple(self._p(f"tlora_t.{d}")._version for d in range(self._n_t))

    def _untouched_identity(self) -> bool:
        """True while the transform is an identity start not yet modified in place."""
        if self._identity_versions is not None and self._identity_versions != self._t_versions():
            self._identity_versions = None
        return self._identity_versions is not None

    # ----- pieces -------------------------------------------------------------------
    def _cores(self, dtype: torch.dtype) -> list[Tensor]:
        return [self._p(f"tlora_t.{d}").to(dtype) for d in range(self._n_t)]

    def _needs_grad(self, x: Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def resolve_form(self, x: Tensor, layout: str, weight: Tensor | None = None) -> str:
        """The transform form for this input: the module's own, or measured/cached for "auto"."""
        form = self.form
        if form == "auto":
            tokens = x.numel() // x.shape[-1] if layout == "linear" else x.numel() // x.shape[1]
            form = select_form(self.transform_factors, self.transform_rank, tokens, device=x.device,
                               dtype=x.dtype, requires_grad=self._needs_grad(x), layout=layout, weight=weight)
        self.last_form = form
        return form

    def residual_factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(U, V) with Delta = U V^T: U (O, k), V (fan_in, k)."""
        if self.residual_kind == "tr":
            out_cores = [self._p(f"tlora_r.out.{d}").to(dtype) for d in range(self._n_out)]
            in_cores = [self._p(f"tlora_r.in.{d}").to(dtype) for d in range(self._n_in)]
            return tr.factor_matrices(out_cores, in_cores)
        return self._p("tlora_r.up").to(dtype), self._p("tlora_r.down").to(dtype).transpose(0, 1)

    def _raw_residual(self, dtype: torch.dtype) -> tuple | None:
        """The residual's raw tensors for `trm.linear` (which builds U, V inside its node)."""
        if self.residual_kind == "tr":
            return ("tr", [self._p(f"tlora_r.out.{d}").to(dtype) for d in range(self._n_out)],
                    [self._p(f"tlora_r.in.{d}").to(dtype) for d in range(self._n_in)], self.scale)
        if self.residual_kind == "lora":
            return ("lora", self._p("tlora_r.up").to(dtype), self._p("tlora_r.down").to(dtype).transpose(0, 1),
                    self.scale)
        return None

    def residual_output(self, x: Tensor) -> Tensor:
        """s Delta x (unweighted by strength)."""
        up, down = self.residual_factors(x.dtype)
        if not self.is_conv:
            return (x @ down) @ (up * self.scale.to(x.dtype)).transpose(0, 1)
        base = self.base
        kernel = down.transpose(0, 1).reshape(down.shape[1], *base.weight.shape[1:])
        hidden = F.conv2d(x, kernel, None, base.stride, base.padding, base.dilation)
        return F.conv2d(hidden, (up * self.scale.to(x.dtype))[:, :, None, None])

    def transformed_input(self, x: Tensor) -> Tensor:
        """x + sigma (T x - x) (just T x at strength 1)."""
        if self.transform_kind == "none" or self.strength == 0:
            return x
        untouched = self._untouched_identity()
        if untouched and not self._needs_grad(x):
            return x
        if self.transform_kind == "diag":
            rows = x.movedim(1, -1) if self.is_conv else x
            moved = rows * self._p("tlora_t.diag").to(rows.dtype)
            if self.strength != 1:
                moved = rows + self.strength * (moved - rows)
            moved = moved.movedim(-1, 1) if self.is_conv else moved
        elif self.is_conv:
            moved = trm.apply_channels(x, self._cores(x.dtype), self.resolve_form(x, "channels"), self.strength)
        else:
            moved = trm.apply(x, self._cores(x.dtype), self.resolve_form(x, "linear"), self.strength)
        if untouched:  # value exactly x (x - moved is exact here), gradients those of the transform
            moved = moved + (x - moved).detach()
        return moved

    def _fusable(self, x: Tensor) -> bool:
        """Whether the frozen linear can run inside the transform's autograd node.

        Only for a plain linear computation: a torch Linear, or a subclass that declares no
        weight casting/patching hooks (ComfyUI's ops do so via these attributes).
        """
        base = self.base
        if self.is_conv or self.transform_kind != "trm" or self.strength == 0 or not isinstance(base, nn.Linear):
            return False
        if type(base).forward is not nn.Linear.forward:
            if not hasattr(base, "comfy_cast_weights") or base.comfy_cast_weights \
                    or getattr(base, "weight_function", None) or getattr(base, "bias_function", None):
                return False
        weight = base.weight
        return weight.dtype == x.dtype and weight.device == x.device and not self._untouched_identity()

    def forward(self, x: Tensor) -> Tensor:
        """base(x + sigma (T x - x)) + sigma s Delta x."""
        if self._fusable(x):
            weight = self.base.weight
            form = self.resolve_form(x, "linear", weight)
            return trm.linear(x, weight, self.base.bias, self._cores(x.dtype), form, self.strength,
                              residual=self._raw_residual(x.dtype))
        out = self.base(self.transformed_input(x))
        if self.residual_kind != "none" and self.strength != 0:
            out = out + self.strength * self.residual_output(x).to(out.dtype)
        return out

    # ----- export -------------------------------------------------------------------
    def to_adapter(self) -> ModuleAdapter:
        """The current adapter tensors as a ModuleAdapter (float32, detached, on CPU)."""
        tensors = {k.replace("__", "."): v.detach().float().cpu().clone() for k, v in self.adapter_params.items()}
        tensors[SCALE] = self.scale.detach().float().cpu().clone()
        return ModuleAdapter(tensors, name=self.name)


def attach(model: nn.Module, adapters: Mapping[str, ModuleAdapter], strength: float = 1.0,
           form: str = "auto", trainable: bool = True) -> dict[str, TLoRAModule]:
    """Replace each named submodule (dotted path in `model`) by a TLoRAModule around it."""
    wrapped = {}
    for path, adapter in adapters.items():
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        base = getattr(parent, child)
        if isinstance(base, TLoRAModule):
            raise ValueError(f"{path} already carries a TLoRA adapter")
        module = TLoRAModule(base, adapter, strength, form, trainable)
        setattr(parent, child, module)
        wrapped[path] = module
    return wrapped


def detach(model: nn.Module, paths: Iterable[str]) -> None:
    """Undo `attach`: put each base layer back in place of its TLoRAModule."""
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        module = getattr(parent, child)
        if isinstance(module, TLoRAModule):
            setattr(parent, child, module.base)
