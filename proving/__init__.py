"""The proving ground: a procedural image world, an embedded SD1.5-format default model, quality measures.

`procedural` and `measure` are host-free (torch, numpy, PIL). `narrow` and `default_model`
build and train the default checkpoint with ComfyUI's own model classes (imported lazily).
"""
