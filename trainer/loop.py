"""The training loop: one run over live modules, from a host's Binding and the run's TrainSettings.

Losses: denoising MSE on the model's own target, or DCO
(-log sigmoid(-beta (L_model - L_ref)), the reference being the same model with every
adapter at strength 0, computed under no_grad, so no second model is held in memory),
plus optional prior preservation. AdamW, torch lr schedulers, grad clipping, gradient
accumulation, gradient checkpointing, autocast, seed-determinism, atomic checkpoints
with a safetensors training-state sidecar (never pickle) for exact resume.

Adapters are attached activation-side with tlora.module.attach, so base weights are never
modified, copied or trained.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

try:  # a console bar is nice to have, never required
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

from ..tlora.module import TLoRAModule, attach, detach
from .binding import Binding
from .checkpointing import enable_checkpointing, restore_checkpointing
from .distributed import AdapterParams, Distributed
from .guard import LastGood, outputs_finite
from . import estimate
from .losses import Losses
from .offload import BlockOffload
from .ema import AdapterEMA
from .optim import clip_gradients, fast_forward, load_canonical, lr_scale, lr_scheduler, make_optimizer
from .previewing import Previews
from .runs import RUNS, RunRegistry, StepReport, TrainResult
from .sampling import PRECISION_DTYPES
from .saving import Saving
from .settings import TrainingError, TrainSettings, derived_seed, pick_precision
from .state import TrainState, load_resume
from .timesteps import training_schedule
from . import validation


log = logging.getLogger("ComfyUI-TLoRA")


class TrainingDiverged(TrainingError):
    """The loss, the gradient or the final adapter's output became NaN/inf; the last good adapter was kept."""


class Trainer(Losses, Previews, Saving):
    """One training run over live modules; call run() once (its micro-batch, previews and saving are its bases)."""

    def __init__(self, binding: Binding, settings: TrainSettings, *, output_path: str | None = None,
                 run_id: str | None = None, registry: RunRegistry = RUNS, run_info: Mapping[str, Any] | None = None):
        settings.validate()
        data = binding.data
        if not data.instance:
            raise TrainingError("no training images: connect at least one image")
        if not any(g.adapters for g in binding.groups) and not binding.extra_params:
            raise TrainingError("no modules to adapt: the targets preset matched nothing in this model")
        if settings.class_prompt.strip() and not data.prior and not data.generate_prior:
            # The metadata would record a class prompt that trained nothing.
            raise TrainingError("class_prompt is set but prior preservation has no class images: set "
                                "num_class_images (the base model generates them) or give class images, or "
                                "clear class_prompt")
        if (settings.shuffle_tags or settings.caption_dropout > 0) and binding.encode is None \
                and binding.text_cond is None:
            raise TrainingError("shuffle_tags and caption_dropout need captions encoded again, which this host does "
                                "not offer (no text_cond in its binding): turn them off")
        self.binding = binding
        self.groups = list(binding.groups)
        train_part, held_out = validation.split(data.instance, settings)
        # The held-out images never train: the engine's data is the rest (the host's TrainData is left as it is).
        self.data = dataclasses.replace(data, instance=train_part)
        self.denoiser, self.schedule = binding.denoiser, training_schedule(binding.schedule, settings)
        self.dist = binding.distributed or Distributed()
        self.device = torch.device(binding.device) if binding.device is not None else data.instance[0].latent.device
        # "auto" precision is resolved once, here: the file says what the run used.
        self.settings = settings.replace(precision=pick_precision(settings.precision, self.device))
        self.output_path, self.resume_path = output_path, settings.resume or None
        self.metadata = dict(binding.metadata)
        self.interrupt_types = tuple(binding.interrupt_types) + (KeyboardInterrupt,)
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.registry = registry
        self.run_info = dict(run_info or {})  # extra registry fields from the host (node id, prompt id...)
        self.saved_path: str | None = None  # set once this run has written its file
        # A new run's name is claimed when its first file is written (another run may take it
        # first); resuming into the file continues that name.
        self._claimed = bool(output_path and self.resume_path
                             and os.path.realpath(self.resume_path) == os.path.realpath(output_path))
        self.run_token = uuid.uuid4().hex
        self.modules: dict[str, TLoRAModule] = {}
        self.history: list[dict[str, float]] = []
        self.step = 0
        self.last_sample: Tensor | None = None
        self._gen_state: Tensor | None = None
        self._start_step = 0
        self._ema: AdapterEMA | None = None
        self._offload: BlockOffload | None = None
        self.memory: estimate.MemoryEstimate | None = None
        self._raw_weights = False  # a diverged run keeps trained weights, never the EMA that took in its last steps
        self.validation_examples: list = held_out
        self._validation: list[dict[str, float]] = []  # held-out loss by step (trainer/validation.py)
        self._validator: validation.Validation | None = None
        self._previews: list[dict[str, Any]] = []
        self.last_samples: list[Tensor] = []
        self.preview_index = 0

    # ----- setup ------------------------------------------------------------------------
    def _ordered_params(self) -> list[tuple[str, nn.Parameter]]:
        named = []
        for key in sorted(self.modules):
            for name, param in sorted(self.modules[key].adapter_params.items()):
                named.append((f"{key}.{name}", param))
        named += [(f"extra.{i}", p) for i, p in enumerate(self.binding.extra_params)]
        return named

    # ----- the loop ---------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train; save; return the result. Interrupts save a partial file and re-raise."""
        # ComfyUI (and others) run nodes under inference_mode: training needs autograd back.
        with torch.inference_mode(False), torch.enable_grad():
            try:
                self.open()
            except BaseException as err:
                # Nothing trained yet (bad resume file, class images failed...): the registry
                # still learns that this run ended, and how.
                self.close()
                status = "cancelled" if isinstance(err, self.interrupt_types) else "failed"
                if self.registry.get(self.run_id) is None:
                    self._register()
                self.registry.finish(self.run_id, status, **self._summary(status, err))
                raise
            try:
                return self._loop()
            finally:
                self.close()

    def _register(self) -> None:
        cfg = self.settings
        self.registry.start(self.run_id, **{**self.run_info, "steps": cfg.steps, "path": self.output_path,
                                            "loss_kind": cfg.loss, "start_step": self.step})

    def _summary(self, status: str, error: BaseException | None = None) -> dict[str, Any]:
        """The registry's summary of a run that ended with `status`."""
        summary: dict[str, Any] = {
            "steps_done": self.step, "final_loss": self.history[-1]["loss"] if self.history else None,
            "path": self.output_path, "partial": status != "done",
            "file_name": os.path.basename(self.saved_path) if self.saved_path else None}
        if error is not None and status in ("diverged", "failed"):
            summary["message"] = (str(error) or type(error).__name__)[:500]
        return summary

    def _attach(self) -> None:
        """Freeze the base (requires_grad off, restored by close) and put the adapters around its layers."""
        trained = {id(p) for p in self.binding.extra_params}
        for group in self.groups:
            for param in group.root.parameters():
                if param.requires_grad and id(param) not in trained:
                    self._frozen.append(param)
                    param.requires_grad_(False)
        for group in self.groups:
            wrapped = attach(group.root, group.adapters, strength=1.0, form=self.settings.form, trainable=True)
            for path, module in wrapped.items():
                module.adapter_params.to(self.device)
                module.scale = module.scale.to(self.device)
                self.modules[group.file_key(path)] = module

    def estimate_memory(self) -> "estimate.MemoryEstimate":
        """What the run would need on the device (trainer/estimate.py), without training: nothing is kept."""
        self._frozen, self._undo_ckpt = [], []
        with torch.inference_mode(False), torch.enable_grad():
            try:
                self._attach()
                return estimate.for_trainer(self)
            finally:
                self.close()
                self.modules = {}

    def open(self) -> None:
        """Attach the adapters, build optimizer and schedule (restoring a resume state), make class images.

        run() = open(), train_step() until done, close(); the pieces are public for callers
        that drive steps themselves (benchmarks, step-wise UIs). Call close() even if this raises.
        """
        cfg = self.settings
        self._warm_start_step = 0
        self._frozen: list[nn.Parameter] = []
        self._undo_ckpt: list = []
        state = None
        if self.resume_path:
            state, self._warm_start_step, note = load_resume(self.resume_path, self.groups)
            if note:
                self._note(note)
        self._attach()
        # What the run will need, measured on the live model before the blocks are swapped or checkpointed.
        try:
            if self.binding.estimate_memory or cfg.memory_budget:
                self.memory = estimate.for_trainer(self)
        except (RuntimeError, ValueError, TypeError, IndexError) as err:  # a model that takes no small probe
            self.memory = None
            if cfg.memory_budget:
                raise TrainingError(f"memory_budget: the memory estimate failed on this model ({err}); set "
                                    f"memory_budget to 0 to train without it") from None
            log.info("TLoRA: no memory estimate for this model (%s)", err)
        if self.memory is not None:
            self.metadata["tlora.train.memory_estimate"] = f"{self.memory.total / estimate.GIB:.2f} GiB"
            self.run_info["memory"] = self.memory.describe()
            log.info("TLoRA training needs %s", self.memory.describe())
        if self.memory is not None and cfg.memory_budget and self.memory.total > cfg.memory_budget * estimate.GIB:
            raise TrainingError(f"memory_budget: this run needs {self.memory.describe()}, over the budget of "
                                f"{cfg.memory_budget:g} GiB: {self.memory.suggestion}")
        blocks = list(self.binding.checkpoint_modules)
        if cfg.offload_blocks:
            if not blocks:
                raise TrainingError("offload_blocks: no repeated blocks were found in this model to swap; set it to 0")
            # Before checkpointing wraps the blocks: a recompute then brings its block's weights in too.
            self._offload = BlockOffload(blocks, cfg.offload_blocks, self.device)
            self.denoiser = self._offload.wrap(self.binding.denoiser)
        if cfg.gradient_checkpointing:
            self._undo_ckpt = enable_checkpointing(blocks[:cfg.checkpoint_blocks] if cfg.checkpoint_blocks else blocks)
        named = self._ordered_params()
        self._params = [p for _, p in named]
        self._wrapped = self.dist.wrap(AdapterParams(self._params))
        optimizer = make_optimizer(named, cfg, self.device)
        self._amp_dtype = PRECISION_DTYPES[cfg.precision]
        scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        generator = torch.Generator().manual_seed(int(cfg.seed))
        self._ema = AdapterEMA(self._params, cfg.ema_decay) if cfg.ema_decay > 0 else None
        if state is not None:
            names = [n for n, _ in named]
            if state.param_names != names:
                raise TrainingError("training state does not match this run's adapters (different targets "
                                    "or kinds); delete the .tlora-state file to continue from weights only")
            scheduler = self._restore(state, optimizer, scaler, generator)
            self.step = state.step
            self.run_token = state.run_token
            self.history = [h for h in state.extra.get("history", []) if h.get("step", 0) <= state.step]
            self._validation = [v for v in state.extra.get("validation", []) if v.get("step", 0) <= state.step]
        else:
            scheduler = lr_scheduler(optimizer, cfg)
            if self._warm_start_step:
                # Weights only: keep counting from the file's steps so names/metadata stay honest.
                self.step = min(self._warm_start_step, cfg.steps)
                generator.manual_seed(derived_seed(cfg.seed, self.step))
                fast_forward(scheduler, self.step)
        if self.resume_path and self.step >= cfg.steps:
            # Nothing to train: saying so beats a "successful" run that changed nothing.
            raise TrainingError(f"{os.path.basename(self.resume_path)} has already been trained for {self.step} of "
                                f"{cfg.steps} steps: set steps higher to train it further")
        self._start_step = self.step
        # Recent adapters whose training losses were finite: what a diverged run may keep.
        self._good = LastGood(self._params, self.step, cfg.steps)
        self._generator = generator
        self._gen_state = generator.get_state()
        self._optimizer, self._scheduler, self._scaler = optimizer, scheduler, scaler
        self._times: list[float] = []
        self._register()
        self._prior = self._prior_examples(self._amp_dtype)
        self._prepare_captions()
        self._previews = self._preview_list()
        if self.validation_examples:
            self._validator = validation.Validation(self.validation_examples, self.schedule, cfg.seed)

    def _restore(self, state: TrainState, optimizer: torch.optim.Optimizer, scaler: Any,
                 generator: torch.Generator) -> torch.optim.lr_scheduler.LRScheduler:
        """Optimizer, rates, schedule, EMA, scaler and noise generator from the sidecar; the schedule to go on with."""
        cfg = self.settings
        saved_optimizer = state.extra.get("optimizer", "adamw")
        same_groups = False
        # The schedule first: making one sets the groups' rates, which the saved state then replaces.
        scheduler = lr_scheduler(optimizer, cfg)
        if saved_optimizer == cfg.optimizer:
            same_groups = load_canonical(optimizer, self._params, state.optimizer)
        else:
            self._note(f"resumed with optimizer {cfg.optimizer} instead of {saved_optimizer}: its state starts fresh")
        rates = [cfg.transform_lr_scale, cfg.residual_lr_scale]
        saved_rates = state.extra.get("lr_scales", [1.0, 1.0])
        saved_total = state.extra.get("total_steps", cfg.steps)
        same_schedule = saved_total == cfg.steps and state.extra.get("lr_schedule", cfg.lr_schedule) == cfg.lr_schedule
        if same_groups and same_schedule and saved_rates == rates:
            scheduler.load_state_dict(state.scheduler)
        else:
            # Another length, schedule, grouping or part rates: the new schedule, taken to the current step.
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] = cfg.learning_rate * lr_scale(cfg, group.get("name", "other"))
            scheduler = lr_scheduler(optimizer, cfg)
            fast_forward(scheduler, state.step)
            if not same_schedule:
                self._note(f"resumed at step {state.step} with {cfg.steps} total steps ({cfg.lr_schedule}) instead "
                           f"of {saved_total} ({state.extra.get('lr_schedule')}): the new schedule continues from there")
            if saved_rates != rates:
                self._note(f"resumed at step {state.step} with transform/residual rates x{rates[0]:g}/x{rates[1]:g} "
                           f"instead of x{saved_rates[0]:g}/x{saved_rates[1]:g}")
        if self._ema is not None and not self._ema.load(state.tensors, state.extra.get("ema_updates", 0)):
            self._note("the training state holds no moving average: the EMA starts again from the adapter's weights")
        if scaler is not None and state.scaler:
            scaler.load_state_dict(state.scaler)
        generator.set_state(state.generator)
        saved_seed = state.extra.get("seed")
        if isinstance(saved_seed, int) and saved_seed != cfg.seed:
            # The noise continues from the saved generator: the file says which seed drew it.
            self._note(f"resumed exactly: the noise continues from seed {saved_seed}; seed {cfg.seed} was not used")
            self.settings = cfg.replace(seed=saved_seed)
        return scheduler

    def _note(self, text: str) -> None:
        """Add a sentence to the file's resume note (several things can be worth saying about one resume)."""
        earlier = self.metadata.get("tlora.train.resume_note")
        self.metadata["tlora.train.resume_note"] = f"{earlier}; {text}" if earlier else text

    def close(self) -> None:
        """Undo open(): checkpointing off, adapters detached, base parameters' requires_grad restored."""
        restore_checkpointing(getattr(self, "_undo_ckpt", []))
        if getattr(self, "_offload", None) is not None:
            self._offload.close()
            self._offload = None
            self.denoiser = self.binding.denoiser
        for group in self.groups:
            detach(group.root, list(group.adapters))
        for param in getattr(self, "_frozen", []):
            if not param.is_inference():  # torch refuses requires_grad on those here
                param.requires_grad_(True)
        self._frozen, self._undo_ckpt = [], []

    def train_step(self) -> StepReport:
        """One optimizer step (over grad_accum micro-batches), then history, saves, previews, observer."""
        cfg = self.settings
        optimizer, scheduler, scaler = self._optimizer, self._scheduler, self._scaler
        started = time.perf_counter()
        with torch.inference_mode(False), torch.enable_grad():
            optimizer.zero_grad(set_to_none=True)
            loss_sum = mse_sum = 0.0
            for micro in range(cfg.grad_accum):
                last = micro == cfg.grad_accum - 1
                with contextlib.nullcontext() if last else self.dist.no_sync(self._wrapped):
                    loss, mse = self._micro_step(self._generator, self._prior, self._amp_dtype)
                    # Averaged over processes before the check: they all stop, or none does.
                    shown = self.dist.mean(torch.stack([loss.detach().float(), mse.float()]))
                    if not math.isfinite(shown[0].item()):
                        self._diverged("loss", shown[0].item())
                    scaled = loss / cfg.grad_accum
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_sum += shown[0].item() / cfg.grad_accum
                mse_sum += shown[1].item() / cfg.grad_accum
            # Every micro-batch's loss was finite: keep these parameters before this step changes them.
            self._good.push(self.step)
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = float(clip_gradients(self._params, cfg.max_grad_norm))
            if not math.isfinite(grad_norm) and scaler is None:
                self._diverged("gradient norm", grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if cfg.optimizer != "adamw":
                # prodigyopt and bitsandbytes write through `.data`, which leaves the version counters the
                # run-time layer reads (has the transform left its identity start?) where they were.
                with torch.no_grad():
                    torch._foreach_add_(self._params, 0.0)
            scheduler.step()
            if self._offload is not None:
                self._offload.release()
            if self._ema is not None:
                self._ema.update()
        self.step += 1
        self._gen_state = self._generator.get_state()
        elapsed = time.perf_counter() - started
        self._times.append(elapsed)
        point = {"step": self.step, "loss": loss_sum, "mse": mse_sum, "lr": lr}
        self.history.append(point)
        recent = self._times[-20:]
        eta = max(cfg.steps - self.step, 0) * (sum(recent) / len(recent))
        # The step is done: the registry knows it before previews or saves can fail.
        self.registry.update(self.run_id, {**point, "step_time": elapsed, "eta": eta,
                                           "grad_norm": grad_norm, "steps": cfg.steps})
        val_loss = self._maybe_validate()
        if val_loss is not None:
            self.registry.set_validation(self.run_id, self.step, val_loss)
        sample, sample_latent = self._maybe_sample(self._amp_dtype)
        if self.output_path and cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
            self.save(self.output_path, partial=True)
        report = StepReport(self.run_id, self.step, cfg.steps, loss_sum, mse_sum, lr, elapsed, eta,
                            grad_norm, sample, sample_latent, list(self.last_samples), val_loss)
        if self.binding.observer is not None:
            self.binding.observer(report)
        return report

    def _loop(self) -> TrainResult:
        cfg = self.settings
        bar = None
        if self.binding.progress_bar and self.dist.is_main and tqdm is not None:
            bar = tqdm(total=cfg.steps, initial=self.step, desc="Training TLoRA", smoothing=0.05)
        status = "failed"
        error: BaseException | None = None
        try:
            while self.step < cfg.steps:
                report = self.train_step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{report.loss:.4f}", lr=f"{report.lr:.2e}")
            result = self._finish(partial=False)
            status = "done"
            return result
        except self.interrupt_types:
            status = "cancelled"
            self._save_partial("cancelled")
            raise
        except TrainingDiverged as err:
            status, error = "diverged", err
            raise
        except BaseException as err:
            error = err
            raise
        finally:
            if bar is not None:
                bar.close()
            if status == "failed" and self.step > self._start_step and self.output_path:
                # Any other crash: the steps done so far are still worth keeping.
                self._save_partial("failed")
            self.registry.finish(self.run_id, status, **self._summary(status, error))

    def _outputs_finite(self) -> bool:
        """Whether the adapter as it is now gives finite outputs (guard.outputs_finite), alike on every process."""
        uncond = self.data.uncond
        if uncond is not None and self.binding.encode is not None:  # a trained text encoder: its own empty prompt
            with torch.no_grad():
                uncond = self.binding.encode([""])
        finite = outputs_finite(self._params, self.denoiser, self.schedule, self.data.instance, self._conds,
                                uncond, self.settings.sample_cfg, self.device, self._amp_dtype,
                                derived_seed(self.settings.seed, 7919))
        return float(self.dist.mean(torch.tensor([0.0 if finite else 1.0], device=self.device))[0]) == 0

    def _diverged(self, what: str, value: float, at_step: int | None = None) -> None:
        """Keep the newest recent adapter whose outputs are finite (saved without a state sidecar); raise TrainingDiverged.

        A NaN loss at step n+1 is the output of the adapter after step n: never that one.
        """
        at_step = self.step + 1 if at_step is None else at_step
        tried = [step for step in self._good.steps() if step > self._start_step]
        kept_step = next((step for step in self._good.candidates(after=self._start_step) if self._outputs_finite()),
                         None)
        self._raw_weights = True
        if kept_step is not None:
            self.step = kept_step
            self.history = [h for h in self.history if h["step"] <= self.step]
            kept = f" The adapter from step {self.step} is the last whose outputs were finite"
            if self.output_path:
                self._save_partial("diverged", state=False)
                kept += f"; it was saved to {os.path.basename(self.output_path)}, marked partial."
            else:
                kept += " (no file was asked for)."
        else:
            kept = " Nothing was saved: " + (f"none of the adapters kept from steps {', '.join(map(str, tried))} "
                                             f"gave finite outputs" if tried else "no step of this run had finished")
            kept += f" ({os.path.basename(self.resume_path)} is unchanged)." if self.resume_path else "."
        raise TrainingDiverged(f"training stopped: the {what} became {value} at step {at_step}.{kept} "
                               f"Lower the learning rate or use fp32/bf16 precision.")

    def _save_partial(self, reason: str, state: bool = True) -> None:
        if not self.output_path or self.step == 0:
            return  # nothing trained yet: an untouched adapter is not worth a file
        try:
            self.save(self.output_path, partial=True, reason=reason, state=state)
        except Exception as err:  # never mask the original error
            self.metadata["tlora.train.save_error"] = str(err)
