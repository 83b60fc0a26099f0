"""The training schedule of a ComfyUI model, read from its sampling object as the sampler will use it.

Whatever parametrisation the model samples with (eps, v, v with zero terminal SNR, x0, LCM's
distilled steps, EDM, rectified flow with its shift and timestep multiplier, Cosmos' flow...), the
host's own `model_sampling` says it through four functions: `noise_scaling` (how noise meets the
latent at a noise level), `calculate_input` (what the network sees), `timestep` (what it is told)
and `calculate_denoised` (how its raw output becomes the clean latent). All four are linear in the
tensors, so their coefficients at each of the sampling object's own noise levels give the exact
schedule: the network's input a x0 + b noise and the raw output that denoises it perfectly,
c x0 + d noise. No family is named: a model patched by a ModelSampling* node in front of the
trainer is read as patched (the patcher's `model_sampling` object patch), as the sampler reads it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...tlora.errors import TLoRAError
from ..schedule import Schedule


def sampling_of(model: Any) -> tuple[Any, Any, str | None]:
    """(sampling object, BaseModel, the patch's node name or None) of a ModelPatcher or a BaseModel.

    A ModelSampling* node puts its object into the patcher's object patches; the sampler uses it.
    The node is named from the patched class's qualified name (`ModelSamplingDiscrete.patch.<locals>...`).
    """
    get = getattr(model, "get_model_object", None)
    if not callable(get):
        return model.model_sampling, model, None
    ms = get("model_sampling")
    patch = None
    if "model_sampling" in getattr(model, "object_patches", {}):
        qualname = type(ms).__qualname__
        patch = qualname.split(".")[0] if "<locals>" in qualname else type(ms).__name__
    return ms, model.model, patch


def describe(ms: Any) -> str:
    """The sampling's kind as the host composes it, e.g. `ModelSamplingDiscrete + V_PREDICTION`."""
    names = [c.__name__ for c in type(ms).__mro__[1:] if c.__module__ != "torch.nn.modules.module"
             and c.__name__ not in ("object", "Module")]
    return " + ".join(names[:3]) if "<locals>" in type(ms).__qualname__ else type(ms).__name__


def _kind(ms: Any) -> str:
    """The parametrisation's name: the first class of the sampling object that defines calculate_denoised."""
    for cls in type(ms).__mro__:
        if "calculate_denoised" in cls.__dict__:
            return cls.__name__.lower()
    return type(ms).__name__.lower()


def _refuse(ms: Any, patch: str | None, family: str, why: str) -> TLoRAError:
    if patch:
        return TLoRAError(f"Train TLoRA cannot follow the model's sampling as patched by {patch} ({describe(ms)}) "
                          f"in front of it: {why}; connect the model without that patch to train")
    return TLoRAError(f"Train TLoRA cannot train {family} models: their sampling ({describe(ms)}) {why}")


def _close(x: Tensor, y: Tensor | float) -> bool:
    return bool(torch.allclose(x, torch.as_tensor(y, dtype=x.dtype).expand_as(x), rtol=1e-6, atol=1e-9))


def coefficients(ms: Any) -> dict[str, Tensor]:
    """Per noise level (float64): sigma, input coefficients a, b, target c, d and the noise-scaling signal a0."""
    sigma = ms.sigmas.detach().double().cpu().reshape(-1)
    n = len(sigma)
    one, zero = torch.ones(n, 1, dtype=torch.float64), torch.zeros(n, 1, dtype=torch.float64)
    with torch.no_grad():
        a0 = ms.noise_scaling(sigma, zero.clone(), one.clone()).reshape(-1)  # latent's share in the noisy latent
        b0 = ms.noise_scaling(sigma, one.clone(), zero.clone()).reshape(-1)  # noise's share
        mix = ms.noise_scaling(sigma, 2 * one, 3 * one).reshape(-1)
        c_in = ms.calculate_input(sigma, one.clone()).reshape(-1)
        skip = ms.calculate_denoised(sigma, zero.clone(), one.clone()).reshape(-1)
        out = ms.calculate_denoised(sigma, one.clone(), zero.clone()).reshape(-1)
    linear = bool(torch.allclose(mix, 2 * b0 + 3 * a0, rtol=1e-6, atol=1e-9))
    return {"sigma": sigma, "a0": a0, "b0": b0, "a": c_in * a0, "b": c_in * b0, "skip": skip, "out": out,
            "linear": torch.tensor(linear)}


def schedule_from_sampling(ms: Any, patch: str | None = None, family: str = "this") -> Schedule:
    """The exact training schedule of a sampling object; refuses (one line) what is no denoising target.

    Timesteps are the sampling's own sigmas: the binding's denoiser hands them to the host, whose
    `timestep(sigma)` gives the network what sampling gives it (index, sigma x multiplier, 0.25 log sigma...).
    """
    if not isinstance(getattr(ms, "sigmas", None), Tensor) or ms.sigmas.numel() < 2:
        raise _refuse(ms, patch, family, "has no table of noise levels to train over")
    k = coefficients(ms)
    finite = all(bool(torch.isfinite(k[name]).all()) for name in ("a", "b", "skip", "out"))
    if not finite or not bool(k["linear"]):
        raise _refuse(ms, patch, family, "is not a linear noising of the latent TLoRA can invert")
    if bool((k["b0"].abs() < 1e-12).all()):
        raise _refuse(ms, patch, family, "adds no noise to the latent (an image-to-image sampling, no denoising "
                                         "target)")
    if bool((k["out"].abs() < 1e-12).any()):
        raise _refuse(ms, patch, family, "gives the network's output no weight at some noise levels")
    sigma, a, b, a0, b0 = k["sigma"], k["a"], k["b"], k["a0"], k["b0"]
    # The raw output that denoises exactly: (x0 - skip * x) / out, with x = a0 x0 + b0 noise.
    c = (1 - k["skip"] * a0) / k["out"]
    d = -k["skip"] * b0 / k["out"]
    flow_like = _close(a0, 1 - sigma) and bool((sigma <= 1 + 1e-6).all())
    timesteps = sigma.float()
    if flow_like and _close(b0, sigma) and _close(a + b, 1.0) and _close(c, -1.0) and _close(d, 1.0):
        schedule = Schedule.flow(sigma, 1.0)
        schedule.timesteps = timesteps
        return schedule
    if not flow_like and _close(a * a + b * b, 1.0) and _close(b, sigma * a):  # VP input (sigma_data 1)
        label = "eps" if _close(c, 0.0) and _close(d, 1.0) else "v" if _close(c, -b) and _close(d, a) else None
        if label is not None:
            schedule = Schedule.from_sigmas(sigma, label)
            schedule.timesteps = timesteps
            return schedule
    label = "x0" if _close(c, 1.0) and _close(d, 0.0) else _kind(ms)
    weights = Schedule.flow(sigma, 1.0).weights if flow_like else None
    return Schedule.general(label, a, b, c, d, timesteps, weights)


def schedule_for(model: Any) -> Schedule:
    """The training schedule of a ComfyUI model (patcher or BaseModel) as the sampler will use it."""
    ms, base, patch = sampling_of(model)
    family = type(getattr(base, "model_config", base)).__name__
    return schedule_from_sampling(ms, patch, family)
