"""ComfyUI nodes of the pack (thin: the work is in ../tlora and ../trainer)."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .convert_node import NODES as CONVERT_NODES
from .loader_nodes import NODES as LOADER_NODES
from .train_node import NODES as TRAIN_NODES


class TLoRAExtension(ComfyExtension):
    """The pack's node list for ComfyUI's V3 loader."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(LOADER_NODES) + list(TRAIN_NODES) + list(CONVERT_NODES)


async def comfy_entrypoint() -> TLoRAExtension:
    """ComfyUI's V3 entry point."""
    return TLoRAExtension()
