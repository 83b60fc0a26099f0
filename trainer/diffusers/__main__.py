"""`python -m comfyui_tlora.trainer.diffusers` (and `accelerate launch -m ...`): see cli.py."""
from .cli import main

raise SystemExit(main())
