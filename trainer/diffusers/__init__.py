"""The diffusers binding: TLoRA files on diffusers models (apply.py) and the command-line trainer (cli.py, run.py).

Imports diffusers, transformers and accelerate; the ComfyUI pack never imports it. Install with
`pip install ".[diffusers]"` in an environment of its own (diffusers needs a huggingface-hub that
ComfyUI's transformers<5 refuses).
"""
