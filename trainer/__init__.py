"""TLoRA training: `engine` is host-agnostic; `comfy_glue` adapts ComfyUI models, data and progress.

Only the engine is imported here, so this package imports without ComfyUI.
"""
from .engine import (RUNS, AdapterGroup, Example, RunRegistry, Schedule, StepReport, TrainConfig,  # noqa: F401
                     TrainData, Trainer, TrainingDiverged, TrainingError, TrainResult)
