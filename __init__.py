"""ComfyUI-TLoRA: transformed-LoRA adapters for ComfyUI (load, apply, train)."""
import importlib.util
import logging

WEB_DIRECTORY = "./web"
__all__ = ["WEB_DIRECTORY"]

# Outside ComfyUI (pytest collecting this folder as a package, pip, linters) there is no
# host to register with: import nothing then. Inside ComfyUI `comfy_api` always exists.
if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint
    from .nodes.comfy_adapter import register as _register_adapter

    __all__.append("comfy_entrypoint")
    try:  # Stock LoRA loaders read TLoRA files too; our own loaders never depend on this.
        _register_adapter()
    except Exception as _err:  # registration must never break the pack's import
        logging.getLogger("ComfyUI-TLoRA").warning("TLoRA: adapter registration failed: %s", _err)
    try:  # The web UI's /tlora routes; without them the nodes still work, only the cards stay empty.
        from .nodes.routes import register as _register_routes

        _register_routes()
    except Exception as _err:
        logging.getLogger("ComfyUI-TLoRA").warning("TLoRA: web routes not registered: %s", _err)
