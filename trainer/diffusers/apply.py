"""The diffusers inference binding's former name: `from comfyui_tlora.trainer.diffusers.apply import load_tlora`
keeps working. The code is in `trainer/diffusers/inference/`."""
from .inference import *  # noqa: F401,F403
from .inference import __all__  # noqa: F401
