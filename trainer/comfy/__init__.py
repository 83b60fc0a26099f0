"""The ComfyUI binding of the engine: MODEL/CLIP/VAE/IMAGE in, progress, events, cancel, files out.

`run.train` is the entry point (nodes/train_node.py calls it); `model` adapts ComfyUI's
model (schedule, denoiser, targets), `data` encodes images and prompts once, `progress`
reports to the UI. Importing this package needs ComfyUI.
"""
