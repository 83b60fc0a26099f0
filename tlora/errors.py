"""Errors raised by the core, each with a message a user can act on."""


class TLoRAError(ValueError):
    """Base class: an adapter, file or request that cannot be used as given."""


class TLoRAFormatError(TLoRAError):
    """A file or tensor set that is not a valid TLoRA adapter (names the module and the problem)."""


class TLoRAShapeError(TLoRAError):
    """An adapter that does not fit the weight it is applied to."""
