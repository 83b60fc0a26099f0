"""TLoRA core: transform + residual adapters, host-free (torch, safetensors, einops only)."""
__version__ = "0.1.0"

from . import errors
from .adapter import ModuleAdapter
from .arch import targets
from .format import TLoRAFile, load, load_file, read_metadata, save_file
from .module import TLoRAModule, attach, detach
from .planner import plan
from .shapes import factorize
from .spec import parse_residual, parse_transform

__all__ = [
    "ModuleAdapter", "TLoRAFile", "TLoRAModule", "__version__", "attach", "detach", "errors",
    "factorize", "load", "load_file", "parse_residual", "parse_transform", "plan", "read_metadata",
    "save_file", "targets",
]
