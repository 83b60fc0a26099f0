"""The one run-time layer: activation-side adapters around any frozen callable.

    y = f(x + sigma (T x - x)) + sigma s Delta x

`f` is the frozen layer exactly as its host built it: a torch Linear/Conv2d, a host's
quantized or offloaded op (ComfyUI's fp8 / int8 / nvfp4 mixed-precision ops, a GGUF layer),
anything that maps the layer's input to its output. Its weight is never read or written, so
the layer's cost does not depend on how that weight is stored, and a strength change costs
nothing. Every host wraps this layer; none writes the transformed input or the residual again.

* `Entry`: one adapter on one layer (a TLoRA module, or a plain LoRA as a residual-only
  adapter), its strength, the layer's output `rows` it patches (a row slice of a fused
  weight: ComfyUI's Flux qkv under diffusers q/k/v names) and the adapter's rows the layer
  gets (`pick`: a fused adapter on one of diffusers' split q/k/v layers). Tensors are float32
  parameters: trainable or frozen (inference), never in the layer's storage dtype.
* `AdapterLayer`: the frozen callable with its entries, applied in order as weight patches
  applied one after the other would be: entry k acts on the weight the earlier ones left,
  `W_k = W_{k-1} + sigma_k (W_{k-1} T_k + s_k Delta_k - W_{k-1})` on its rows, so activation-side
  the LAST entry's transform is applied to x first and each residual sees the input as the
  later entries transformed it. Rows covered by different entries are grouped; each group
  costs one call of `f` (one call in total when every entry covers the whole layer).
  A single TRM entry on a plain torch Linear runs fused (`trm.linear`: one autograd node).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapter import R_DOWN, R_IN, R_OUT, R_UP, SCALE, T_CORE, T_DIAG, ModuleAdapter
from .errors import TLoRAShapeError
from .forms import select_form
from .functional import lowrank, tr, trm
from .functional.weight import merge_diff

MAX_ENTRIES = 62  # row groups are told apart by a 64-bit mask


@dataclass(frozen=True)
class Geometry:
    """What the run-time layer needs of the frozen layer: its size and, for a conv, its settings."""

    out_features: int
    in_channels: int
    kernel: tuple[int, ...] = ()  # () for a linear layer, (kh, kw) for a 2-D conv
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)

    @property
    def is_conv(self) -> bool:
        return bool(self.kernel)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_channels, *self.kernel)

    @property
    def row_dim(self) -> int:
        """The output axis that holds the layer's rows (features last for a linear, channels for a conv)."""
        return 1 if self.is_conv else -1


def _pair(value) -> tuple[int, int]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value), int(value))


def geometry_of(module: nn.Module) -> Geometry:
    """The Geometry of a Linear/Conv2d-like layer, whatever stores its weight (quantized, GGUF, offloaded)."""
    name = type(module).__name__
    if isinstance(module, (nn.ConvTranspose2d, nn.Conv1d, nn.Conv3d)):
        raise TLoRAShapeError(f"a {name} cannot carry a TLoRA (Linear and Conv2d only)")
    weight = getattr(module, "weight", None)
    shape = tuple(int(s) for s in weight.shape) if weight is not None else ()  # GGUF/quantized: the logical shape
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise TLoRAShapeError("grouped convolutions are not supported")
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            raise TLoRAShapeError(f"a Conv2d with padding {module.padding!r} / {module.padding_mode} is not supported")
        out_ch, in_ch = shape[:2] if shape else (module.out_channels, module.in_channels)
        return Geometry(int(out_ch), int(in_ch), _pair(module.kernel_size), _pair(module.stride),
                        _pair(module.padding), _pair(module.dilation))
    if hasattr(module, "in_features") and hasattr(module, "out_features"):  # logical even where storage is packed
        return Geometry(int(module.out_features), int(module.in_features))
    if len(shape) == 2:
        return Geometry(*shape)
    raise TLoRAShapeError(f"cannot tell the shape of a {name} (weight shape {shape or 'unknown'})")


def _param_name(suffix: str) -> str:
    return suffix.replace(".", "__")


def _rows_tensor(rows: Tensor | Sequence[int] | None) -> Tensor | None:
    if rows is None:
        return None
    return torch.as_tensor(rows, dtype=torch.long).flatten().cpu()


class Entry(nn.Module):
    """One adapter on one layer: float32 tensors (shared with `share`, else copied), strength, rows."""

    def __init__(self, adapter: ModuleAdapter, geometry: Geometry, *, strength: float = 1.0,
                 rows: Tensor | Sequence[int] | None = None, pick: Tensor | Sequence[int] | None = None,
                 form: str = "auto", trainable: bool = False, share: dict[str, Tensor] | None = None):
        super().__init__()
        rows_t, pick_t = _rows_tensor(rows), _rows_tensor(pick)
        layer_rows = geometry.out_features if rows_t is None else len(rows_t)
        out = (adapter.out_features or layer_rows) if pick_t is not None else layer_rows
        adapter.check_fits((out, *geometry.weight_shape[1:]))
        if pick_t is not None and len(pick_t) != layer_rows:
            raise TLoRAShapeError(f"{adapter.name}: {len(pick_t)} adapter rows for {layer_rows} layer rows")
        self.name = adapter.name
        self.strength = float(strength)
        self.form = form
        self.last_form: str | None = None
        self.transform_kind, self.residual_kind = adapter.transform.kind, adapter.residual.kind
        self.transform_factors, self.transform_rank = adapter.transform_factors, adapter.transform.rank
        self._n_t, self._n_out, self._n_in = len(adapter.transform_cores), len(adapter.out_cores), len(adapter.in_cores)
        source = adapter.tensors if share is None else share
        self.adapter_params = nn.ParameterDict({
            _param_name(k): (v if isinstance(v, nn.Parameter) and share is not None else
                             nn.Parameter(v.detach().to(torch.float32).clone(), requires_grad=trainable))
            for k, v in source.items() if k != SCALE})
        scale = source[SCALE]
        self.register_buffer("scale", (scale.detach() if isinstance(scale, Tensor) else torch.tensor(scale))
                             .to(torch.float32).reshape(()).clone(), persistent=False)
        self.register_buffer("rows", rows_t, persistent=False)
        self.register_buffer("pick", pick_t, persistent=False)
        self._moved: dict[torch.device, Entry] = {}
        # While these version counters are unchanged the transform is its exact identity start:
        # the input is then kept bit for bit (the factored form's ring sums would round it).
        self._identity_versions = (self._t_versions() if self._n_t and adapter.transform_is_identity
                                   and share is None else None)

    # ----- tensors --------------------------------------------------------------------
    def p(self, suffix: str) -> Tensor:
        """The parameter stored under a file suffix (`tlora_t.0`, `tlora_r.up`...)."""
        return self.adapter_params[_param_name(suffix)]

    def _t_versions(self) -> tuple[int, ...]:
        return tuple(self.p(T_CORE.format(d))._version for d in range(self._n_t))

    def untouched_identity(self) -> bool:
        """True while the transform is an identity start not modified in place since."""
        if self._identity_versions is not None and self._identity_versions != self._t_versions():
            self._identity_versions = None
        return self._identity_versions is not None

    def cores(self, dtype: torch.dtype) -> list[Tensor]:
        """The TRM cores in `dtype` (the activations' compute dtype, never a weight's storage dtype)."""
        return [self.p(T_CORE.format(d)).to(dtype) for d in range(self._n_t)]

    def residual_factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        """(U, V) with Delta = U V^T for this layer's rows: U (rows, k), V (fan_in, k); None without a residual."""
        if self.residual_kind == "tr":
            up, down = tr.factor_matrices([self.p(R_OUT.format(d)).to(dtype) for d in range(self._n_out)],
                                          [self.p(R_IN.format(d)).to(dtype) for d in range(self._n_in)])
        elif self.residual_kind == "lora":
            up, down = self.p(R_UP).to(dtype), self.p(R_DOWN).to(dtype).transpose(0, 1)
        else:
            return None
        return (up if self.pick is None else up.index_select(0, self.pick.to(up.device))), down

    def raw_residual(self, dtype: torch.dtype) -> tuple | None:
        """The residual as `trm.linear` and `lowrank.apply` take it (they build U, V inside their nodes); all rows (`pick` is the caller's)."""
        if self.residual_kind == "tr":
            return ("tr", [self.p(R_OUT.format(d)).to(dtype) for d in range(self._n_out)],
                    [self.p(R_IN.format(d)).to(dtype) for d in range(self._n_in)], self.scale)
        if self.residual_kind == "lora":
            return ("lora", self.p(R_UP).to(dtype), self.p(R_DOWN).to(dtype).transpose(0, 1), self.scale)
        return None

    def to_adapter(self) -> ModuleAdapter:
        """The current tensors as a ModuleAdapter (float32, detached, on the CPU)."""
        tensors = {k.replace("__", "."): v.detach().float().cpu().clone() for k, v in self.adapter_params.items()}
        tensors[SCALE] = self.scale.detach().float().cpu().clone()
        return ModuleAdapter(tensors, name=self.name)

    def with_strength(self, strength: float) -> "Entry":
        """The same adapter (tensors shared, not copied) at another strength: what a host's strength change costs."""
        clone = copy.copy(self)  # shares the parameter dicts and the `_moved` cache below
        clone.strength = float(strength)
        return clone

    def on(self, device: torch.device) -> "Entry":
        """This entry with its tensors on `device`: moved once per device, shared by every strength of it."""
        if self.scale.device == device:
            return self
        moved = self._moved.get(device)
        if moved is None:
            alone = self.with_strength(self.strength)
            alone._moved = {}  # not the copies on other devices
            moved = copy.deepcopy(alone).to(device)
            moved._moved = self._moved
            self._moved[device] = moved
        return moved.with_strength(self.strength)

    # ----- maths ----------------------------------------------------------------------
    def _needs_grad(self, x: Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def resolve_form(self, x: Tensor, layout: str, weight: Tensor | None = None) -> str:
        """The transform's form for this input: the entry's own, or measured and cached for "auto"."""
        form = self.form
        if form == "auto":
            tokens = x.numel() // (x.shape[-1] if layout == "linear" else x.shape[1])
            form = select_form(self.transform_factors, self.transform_rank, tokens, device=x.device, dtype=x.dtype,
                               requires_grad=self._needs_grad(x), layout=layout, weight=weight)
        self.last_form = form
        return form

    def transform(self, x: Tensor, is_conv: bool) -> Tensor:
        """x + sigma (T x - x) on the input's channels (x itself without a transform or at strength 0)."""
        sigma = self.strength
        if self.transform_kind == "none" or sigma == 0:
            return x
        untouched = self.untouched_identity()
        if untouched and not self._needs_grad(x):
            return x
        if self.transform_kind == "diag":
            rows = x.movedim(1, -1) if is_conv else x
            moved = rows * self.p(T_DIAG).to(rows.dtype)
            if sigma != 1:
                moved = rows + sigma * (moved - rows)
            moved = moved.movedim(-1, 1) if is_conv else moved
        elif is_conv:
            moved = trm.apply_channels(x, self.cores(x.dtype), self.resolve_form(x, "channels"), sigma)
        else:
            moved = trm.apply(x, self.cores(x.dtype), self.resolve_form(x, "linear"), sigma)
        if untouched:  # the value exactly x (x - moved is exact here), the gradients those of the transform
            moved = moved + (x - moved).detach()
        return moved

    def residual(self, x: Tensor, geometry: Geometry) -> Tensor | None:
        """s Delta x for this entry's rows (unweighted by strength), in x's dtype; None without a residual."""
        if self.residual_kind not in ("tr", "lora"):
            return None
        if not geometry.is_conv:  # one node: keeps x and V^T x, rebuilds U, V in the backward
            pick = None if self.pick is None else self.pick.to(x.device)
            return lowrank.apply(x, self.raw_residual(x.dtype), pick)
        up, down = self.residual_factors(x.dtype)
        up = up * self.scale.to(device=x.device, dtype=x.dtype)
        kernel = down.transpose(0, 1).reshape(down.shape[1], geometry.in_channels, *geometry.kernel)
        hidden = F.conv2d(x, kernel, None, geometry.stride, geometry.padding, geometry.dilation)
        return F.conv2d(hidden, up[:, :, None, None])

    def weight_diff(self, weight: Tensor) -> Tensor:
        """sigma (W T + s Delta - W) for the layer's weight rows this entry patches (float32, `merge_diff`)."""
        rows = weight if self.rows is None else weight.index_select(0, self.rows.to(weight.device))
        cores = self.cores(torch.float32) if self._n_t and not self.untouched_identity() else None
        diag = self.p(T_DIAG) if self.transform_kind == "diag" else None
        factors = self.residual_factors(torch.float32)
        residual = None if factors is None else ("lora", factors[0], factors[1].t(), self.scale)
        return merge_diff(rows, self.strength, cores=cores, diag=diag, residual=residual)

    def extra_repr(self) -> str:
        slice_ = "" if self.rows is None else f", rows={len(self.rows)}"
        return f"{self.name!r}, strength={self.strength}, {self.transform_kind}+{self.residual_kind}{slice_}"


def _autocast_once(x: Tensor, active: Sequence[Entry]) -> Tensor:
    """x in the autocast dtype when autocast is on and an entry transforms x, else x.

    Each transform and residual would cast x itself (as autocast casts a GEMM's inputs), and each
    keeps its copy for the backward: cast once here, one copy is kept for all of them. The frozen
    layer then gets the transformed input in that dtype, as it did from the transform before.
    """
    kind = x.device.type
    if kind not in ("cpu", "cuda", "xpu", "mps") or not x.is_floating_point() or not torch.is_autocast_enabled(kind):
        return x
    dtype = torch.get_autocast_dtype(kind)
    if x.dtype == dtype or all(e.transform_kind == "none" for e in active):
        return x
    return x.to(dtype)


@dataclass
class _Group:
    """Output rows patched by the same entries: members (indices into the active entries, in order),
    the rows (None: all), and per member the positions of those rows in its own residual (None: all)."""

    members: tuple[int, ...]
    rows: Tensor | None
    picks: tuple[Tensor | None, ...]


class AdapterLayer(nn.Module):
    """A frozen callable with its adapters applied activation-side, in order (see the module docstring).

    `base` is an nn.Module (registered as `self.base` when `own_base`, as training and module
    replacement need) or any callable; `module` (default: `base`) is what geometry and the fused
    path read. Extra arguments of a call go to `base` unchanged.
    """

    def __init__(self, base: Callable, entries: Iterable[Entry] = (), *, geometry: Geometry | None = None,
                 module: nn.Module | None = None, own_base: bool = True):
        super().__init__()
        module = module if module is not None else (base if isinstance(base, nn.Module) else None)
        if geometry is None:
            if module is None:
                raise TypeError("AdapterLayer over a plain callable needs its geometry")
            geometry = geometry_of(module)
        if own_base and isinstance(base, nn.Module):
            self.base = base
        else:
            self.__dict__["base"] = base
        self.__dict__["module"] = module  # never registered: it belongs to the host's model
        self.geometry = geometry
        self.entries = nn.ModuleList(entries)
        if len(self.entries) > MAX_ENTRIES:
            raise ValueError(f"at most {MAX_ENTRIES} adapters on one layer")
        self._groups: dict[tuple, list[_Group]] = {}

    def add(self, entry: Entry) -> None:
        """Apply one more adapter after those already here."""
        if len(self.entries) >= MAX_ENTRIES:
            raise ValueError(f"at most {MAX_ENTRIES} adapters on one layer")
        self.entries.append(entry)
        self._groups.clear()

    # ----- row groups -------------------------------------------------------------------
    def _groups_for(self, active: Sequence[Entry], device: torch.device) -> list[_Group]:
        key = (tuple(id(e) for e in active), device)
        groups = self._groups.get(key)
        if groups is not None:
            return groups
        count = self.geometry.out_features
        if all(e.rows is None for e in active):
            groups = [_Group(tuple(range(len(active))), None, (None,) * len(active))]
        else:
            mask = torch.zeros(count, dtype=torch.long)
            for i, e in enumerate(active):
                if e.rows is None:
                    mask |= 1 << i
                else:
                    mask[e.rows] |= 1 << i
            groups = []
            for value in torch.unique(mask).tolist():
                rows = (mask == value).nonzero().flatten()
                members = tuple(i for i in range(len(active)) if value >> i & 1)
                picks = []
                for i in members:
                    own = active[i].rows
                    if own is None:
                        picks.append(None if len(rows) == count else rows.to(device))
                    else:
                        where = torch.full((count,), -1, dtype=torch.long)
                        where[own] = torch.arange(len(own))
                        picks.append(where[rows].to(device))
                groups.append(_Group(members, None if len(rows) == count else rows.to(device), tuple(picks)))
        self._groups[key] = groups
        return groups

    # ----- forward ----------------------------------------------------------------------
    def _fusable(self, entry: Entry, x: Tensor) -> bool:
        """Whether the frozen linear can run inside the transform's autograd node (a plain torch Linear only)."""
        base = self.module
        if (self.geometry.is_conv or entry.transform_kind != "trm" or entry.rows is not None
                or entry.pick is not None or not isinstance(base, nn.Linear) or base is not self.base):
            return False
        if type(base).forward is not nn.Linear.forward:  # a host op: only one that casts and patches nothing
            if not hasattr(base, "comfy_cast_weights") or base.comfy_cast_weights \
                    or getattr(base, "weight_function", None) or getattr(base, "bias_function", None):
                return False
        weight = base.weight
        return (type(weight) in (Tensor, nn.Parameter) and weight.dtype == x.dtype and weight.device == x.device
                and not entry.untouched_identity())

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """f(x) with every entry of non-zero strength applied; exactly f(x) when there is none."""
        active = [e for e in self.entries if e.strength != 0]
        if not active:
            return self.base(x, *args, **kwargs)
        if len(active) == 1 and not args and not kwargs and self._fusable(active[0], x):
            entry, module = active[0], self.module
            form = entry.resolve_form(x, "linear", module.weight)
            return trm.linear(x, module.weight, module.bias, entry.cores(x.dtype), form, entry.strength,
                              residual=entry.raw_residual(x.dtype))
        conv, dim = self.geometry.is_conv, self.geometry.row_dim
        x = _autocast_once(x, active)
        inputs: dict[tuple, Tensor] = {(): x}
        residuals: dict[tuple, Tensor | None] = {}
        outputs: dict[tuple, Tensor] = {}

        def input_after(applied: tuple) -> Tensor:
            if applied not in inputs:
                inputs[applied] = active[applied[-1]].transform(input_after(applied[:-1]), conv)
            return inputs[applied]

        pieces, order = [], []
        for group in self._groups_for(active, x.device):
            applied: tuple = ()
            extra = None
            for i, pick in zip(reversed(group.members), reversed(group.picks)):  # the last entry acts first
                key = (applied, i)
                if key not in residuals:
                    residuals[key] = active[i].residual(input_after(applied), self.geometry)
                res = residuals[key]
                if res is not None:
                    res = res if pick is None else res.index_select(dim, pick)
                    res = active[i].strength * res
                    extra = res if extra is None else extra + res
                applied = applied + (i,)
            if applied not in outputs:
                outputs[applied] = self.base(input_after(applied), *args, **kwargs)
            out = outputs[applied] if group.rows is None else outputs[applied].index_select(dim, group.rows)
            if extra is not None:
                out = out + extra.to(out.dtype)
            pieces.append(out)
            order.append(group.rows)
        if len(pieces) == 1:
            return pieces[0]
        joined = torch.cat(pieces, dim)
        return joined.index_select(dim, torch.argsort(torch.cat(order)))

    def extra_repr(self) -> str:
        g = self.geometry
        return f"{g.weight_shape}, {len(self.entries)} adapter(s)"
