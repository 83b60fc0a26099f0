"""TLoRA training: a host-free engine, and one small binding per host (`trainer.comfy` for ComfyUI).

The engine's public face is here; importing this package never imports a host.

    binding = Binding(groups, denoiser, schedule, data)      # what a host plugs in
    result = Trainer(binding, TrainSettings(steps=200)).run()
"""
from .binding import AdapterGroup, Binding, adapter_group, create_adapters, host_view, select_targets  # noqa: F401
from .data import (Cond, Denoiser, Example, TrainData, bucket_sizes, choose_size, collate_conds,  # noqa: F401
                   draw_batch, fit_image, prepare_images)
from .loop import Trainer, TrainingDiverged  # noqa: F401
from .runs import RUNS, RunRegistry, StepReport, TrainResult  # noqa: F401
from .sampling import ddim_sample  # noqa: F401
from .schedule import PREDICTIONS, Schedule  # noqa: F401
from .settings import (LOSSES, LR_SCHEDULES, PRECISIONS, SETTINGS, TARGET_PRESETS, TrainingError,  # noqa: F401
                       TrainSettings, from_values, pick_precision, specs)
from .state import STATE_SUFFIX, TrainState, load_resume, state_path_for  # noqa: F401
