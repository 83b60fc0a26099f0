"""One TLoRA around a live layer by module replacement (training, and hosts that swap modules).

    y = base(x + sigma (T x - x)) + sigma s Delta x

`TLoRAModule` is the run-time layer (`tlora.runtime.AdapterLayer`) with one entry and the
layer registered as `base`: the base layer (and its weight, whatever stores it) is never
modified or copied; only the adapter's tensors are parameters. For convs T mixes input
channels at every pixel and Delta is a conv with the base's stride/padding followed by a 1x1
up-projection. For a plain linear base the frozen GEMM, T and Delta run in one autograd node
(`trm.linear`). The transform's form (factored / merged / dense) is the module's `form`, or
with "auto" the one `tlora.forms.select_form` measured fastest (TLORA_FORM forces one);
`last_form` records the form used.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor, nn

from .adapter import ModuleAdapter
from .errors import TLoRAShapeError
from .runtime import AdapterLayer, Entry, geometry_of


class TLoRAModule(AdapterLayer):
    """Wraps a base Linear/Conv2d (or a host's op over one) and applies its adapter activation-side."""

    def __init__(self, base: nn.Module, adapter: ModuleAdapter, strength: float = 1.0,
                 form: str = "auto", trainable: bool = True):
        try:
            geometry = geometry_of(base)
        except TLoRAShapeError as err:
            raise TLoRAShapeError(f"{adapter.name}: {err}") from None
        entry = Entry(adapter, geometry, strength=strength, form=form, trainable=trainable)
        super().__init__(base, [entry], geometry=geometry)
        self.name = adapter.name

    @property
    def entry(self) -> Entry:
        return self.entries[0]

    # The single entry's state, as the trainer and tests address it.
    strength = property(lambda self: self.entry.strength, lambda self, v: setattr(self.entry, "strength", float(v)))
    form = property(lambda self: self.entry.form, lambda self, v: setattr(self.entry, "form", v))
    scale = property(lambda self: self.entry.scale, lambda self, v: setattr(self.entry, "scale", v))
    last_form = property(lambda self: self.entry.last_form)
    adapter_params = property(lambda self: self.entry.adapter_params)

    @property
    def is_conv(self) -> bool:
        return self.geometry.is_conv

    def _untouched_identity(self) -> bool:
        return self.entry.untouched_identity()

    def transformed_input(self, x: Tensor) -> Tensor:
        """x + sigma (T x - x) (just T x at strength 1)."""
        return self.entry.transform(x, self.geometry.is_conv)

    def residual_output(self, x: Tensor) -> Tensor | None:
        """s Delta x (unweighted by strength)."""
        return self.entry.residual(x, self.geometry)

    def to_adapter(self) -> ModuleAdapter:
        """The current adapter tensors as a ModuleAdapter (float32, detached, on CPU)."""
        return self.entry.to_adapter()


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
