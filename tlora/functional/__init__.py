"""Plain functions for each part of an adapter (LyCORIS-style): make, densify, apply."""
from . import tr, trm

__all__ = ["tr", "trm"]
