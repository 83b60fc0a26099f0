"""Quantized twins of the tiny models, built with the hosts' own classes (no downloads).

    from harness import quantized as q
    twin = q.twin("sd15", "fp8_scaled", seed=0)   # Twin: .patcher (quantized), .reference (float64), ...

Formats (what users load in 2026):

* ``fp8``: weights stored as float8_e4m3fn with manual casting, what *Load Diffusion Model* with
  weight_dtype fp8_e4m3fn gives (ComfyUI's `manual_cast` ops).
* ``fp8_scaled``, ``int8``, ``nvfp4``: ComfyUI's mixed-precision ops over per-layer `comfy_quant`
  state dicts (its `QuantizedTensor` layouts: scaled fp8, tensor-wise int8, NVFP4 blocks), as a
  quantized checkpoint loads; on a CPU the host emulates what has no kernel (`disabled` formats).
* ``gguf_q8_0``, ``gguf_q6_k``: a .gguf file written with the `gguf` package and read back by
  ComfyUI-GGUF's own loader into its `GGMLOps` layers and `GGUFModelPatcher`. `gguf` quantizes
  Q8_0 itself but no K-quant, so Q6_K blocks are encoded here (`q6_k_blocks`) and checked against
  gguf's own dequantizer; a weight whose rows are not a multiple of 256 stays Q8_0 in that twin (as
  real conversions keep such tensors in another type). Convs and 1-D tensors stay float32.

`Twin.reference` is a float64 copy of the same model class holding every weight as the format
dequantizes it (GGUF: by the gguf package, not by ComfyUI-GGUF's torch code), the dense reference
the tests compare against.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
import tempfile
from typing import Any

from . import comfy_host, tiny_models

FORMATS = ("fp8", "fp8_scaled", "int8", "nvfp4", "gguf_q8_0", "gguf_q6_k")
MIXED = {"fp8_scaled": "float8_e4m3fn", "int8": "int8_tensorwise", "nvfp4": "nvfp4"}
GGUF_ARCH = {"sd15": "sd1", "flux": "flux"}
# The SD1.5-like twin is 64 channels wide so its feed-forward output layers (256 / 512 inputs) can be K-quants.
SD15_CHANNELS = 64


def _torch() -> Any:
    comfy_host.ensure_importable()
    import torch
    return torch


@dataclasses.dataclass
class Twin:
    """A quantized tiny model and its references."""

    family: str
    fmt: str
    patcher: Any            # ModelPatcher (GGUFModelPatcher for GGUF) over the quantized model
    reference: Any          # float64 BaseModel: every weight as the format dequantizes it
    original: Any           # float64 copy of the float32 model the twin was quantized from
    quantized_keys: list    # state-dict keys (under diffusion_model.) whose weights are quantized
    cond: Any               # TinyModel.cond of the family
    independent: dict       # GGUF: {key: float64 weight as the gguf package decodes the file's blocks}

    def conditioning(self, x: Any, seed: int = 1) -> dict:
        """apply_model's keyword arguments for latents x (the model's own extra_conds)."""
        torch = _torch()
        c = self.cond(seed=seed)[0]
        extra = self.patcher.model.extra_conds(noise=x, cross_attn=c[0], device=torch.device("cpu"),
                                               pooled_output=c[1].get("pooled_output"))
        return {k: v.process_cond(batch_size=x.shape[0], device=x.device).cond for k, v in extra.items()}

    def reference_output(self, x: Any, t: Any, conds: dict, model: Any = None) -> Any:
        """The float64 reference model's (or `model`'s) apply_model on x.

        Flux's RoPE runs through comfy_kitchen kernels that take no float64 outside training: the
        host's own torch path (its `in_training` flag) is used for the reference.
        """
        torch = _torch()
        import comfy.model_management as mm
        model = model if model is not None else self.reference
        flag = getattr(mm, "in_training", None)
        if flag is not None:
            mm.in_training = True
        try:
            with torch.no_grad():
                return model.apply_model(x.double(), t, **{k: (v.double() if v.is_floating_point() else v)
                                                           for k, v in conds.items()})
        finally:
            if flag is not None:
                mm.in_training = flag

    def timestep(self) -> Any:
        """A mid-schedule timestep in the model's own units (sigma for flow models)."""
        torch = _torch()
        return torch.tensor([0.5 if self.family == "flux" else 500.0])

    def latent(self, seed: int = 11) -> Any:
        torch = _torch()
        channels = 16 if self.family == "flux" else 4
        return torch.randn(1, channels, 16, 16, generator=torch.Generator().manual_seed(seed))


def _family(family: str, seed: int) -> tuple[Any, Any, str, dict]:
    """(float TinyModel, supported_models class name, config maker) of a family."""
    if family == "sd15":
        m = tiny_models.tiny_sd15(seed, model_channels=SD15_CHANNELS)
        return m, "SD15", lambda: tiny_models.sd15_unet_config(SD15_CHANNELS)
    if family == "flux":
        name, make = tiny_models.DIT_TINY["flux"]
        return tiny_models.tiny_dit("flux", seed), name, make
    raise ValueError(f"unknown family {family!r}")


def _build(cls_name: str, make, dtype: Any, manual: Any = None, quant: bool = False, ops: Any = None) -> Any:
    import comfy.supported_models as sm
    torch = _torch()
    cfg = getattr(sm, cls_name)(make())
    if quant:
        cfg.quant_config = {"mixed_ops": True}
    if ops is not None:
        cfg.custom_operations = ops
    cfg.set_inference_dtype(dtype, manual)
    model = cfg.get_model({}, "", device=torch.device("cpu"))
    model.eval()
    return model


def _patcher(model: Any, cls: Any = None) -> Any:
    import comfy.model_management as mm
    import comfy.model_patcher
    cls = cls or comfy.model_patcher.ModelPatcher
    return cls(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def _linear_layers(model: Any) -> list[str]:
    torch = _torch()
    return [n for n, m in model.diffusion_model.named_modules() if isinstance(m, torch.nn.Linear)
            or type(m).__name__ == "Linear"]


# --------------------------------------------------------------------------- GGUF

def q6_k_blocks(values: Any) -> Any:
    """Q6_K blocks (uint8, 210 bytes per 256 values) of a float32 array whose rows are multiples of 256.

    Per block: 16 groups of 16 values with an int8 scale each, one fp16 super-scale d; a value is
    d * scale * q with q in [-32, 31], stored as 4 low bits (ql) and 2 high bits (qh) in the order
    gguf's dequantizer reads them (q6_k's layout, checked against it in tests/host/test_quantized.py).
    """
    import numpy as np
    rows = values.reshape(-1, 256).astype(np.float32)
    groups = rows.reshape(-1, 16, 16)
    amax = np.abs(groups).max(axis=-1)
    group_scale = amax / 31.0
    d = (group_scale.max(axis=-1) / 127.0).astype(np.float16).astype(np.float32)
    safe_d = np.where(d == 0, 1.0, d)
    scales = np.clip(np.round(group_scale / safe_d[:, None]), -128, 127).astype(np.int8)
    step = d[:, None] * scales.astype(np.float32)
    q = np.where(step[..., None] == 0, 0, np.round(groups / np.where(step == 0, 1, step)[..., None]))
    q = (np.clip(q, -32, 31).astype(np.int16) + 32).astype(np.uint8).reshape(-1, 256)
    low, high = q & 0x0F, q >> 4
    halves = low.reshape(-1, 2, 2, 64)                    # (block, half, which nibble, 64)
    ql = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(-1, 128)
    quarters = high.reshape(-1, 2, 4, 32)                 # (block, half, shift 0/2/4/6, 32)
    qh = (quarters[:, :, 0] | (quarters[:, :, 1] << 2) | (quarters[:, :, 2] << 4) | (quarters[:, :, 3] << 6))
    return np.concatenate([ql, qh.reshape(-1, 64), scales.view(np.uint8),
                           d.astype(np.float16).view(np.uint8).reshape(-1, 2)], axis=1)


def _gguf_type(fmt: str, shape: tuple) -> Any:
    """The GGUF type a weight gets in a twin (None: kept float32)."""
    from gguf import GGMLQuantizationType as Q
    if len(shape) != 2 or shape[-1] % 32:
        return None
    if fmt == "gguf_q6_k" and shape[-1] % 256 == 0:
        return Q.Q6_K
    return Q.Q8_0


def write_gguf(path: str, state_dict: dict, fmt: str, arch: str) -> dict:
    """Write a float state dict as a .gguf file; returns {key: float64 weight as gguf dequantizes it}."""
    import gguf
    import numpy as np
    import torch  # no host needed: the diffusers tests write their twins with this too
    writer = gguf.GGUFWriter(path, arch)
    dequantized = {}
    for key, value in state_dict.items():
        array = value.detach().float().cpu().numpy()
        qtype = _gguf_type(fmt, tuple(array.shape))
        if qtype is None:
            writer.add_tensor(key, array)
            dequantized[key] = torch.from_numpy(array).double()
            continue
        raw = q6_k_blocks(array) if qtype == gguf.GGMLQuantizationType.Q6_K else gguf.quants.quantize(array, qtype)
        raw = np.ascontiguousarray(raw).reshape(array.shape[0], -1)
        writer.add_tensor(key, raw, raw_shape=raw.shape, raw_dtype=qtype)
        dequantized[key] = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(array.shape)).double()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dequantized


def gguf_pack() -> Any:
    """ComfyUI-GGUF's package as the host imported it (its custom_nodes folder)."""
    folder = comfy_host.comfy_dir() / "custom_nodes" / "ComfyUI-GGUF"
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) and os.path.realpath(module.__file__) == str((folder / "__init__.py").resolve()):
            return module
    if not folder.is_dir():
        raise RuntimeError(f"ComfyUI-GGUF is not installed at {folder} (make bootstrap)")
    spec = importlib.util.spec_from_file_location("comfyui_gguf", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_gguf"] = module
    spec.loader.exec_module(module)
    return module


def _gguf_model(cls_name: str, make, sd: dict, fmt: str, family: str) -> tuple[Any, dict]:
    pack = gguf_pack()
    ops_mod = importlib.import_module(pack.__name__ + ".ops")
    loader = importlib.import_module(pack.__name__ + ".loader")
    nodes_mod = importlib.import_module(pack.__name__ + ".nodes")
    folder = tempfile.mkdtemp(prefix="tlora-gguf-")
    path = os.path.join(folder, f"{family}-{fmt}.gguf")
    dequantized = write_gguf(path, sd, fmt, GGUF_ARCH[family])
    read = loader.gguf_sd_loader(path)  # ComfyUI-GGUF's reader: GGMLTensors over the file's blocks
    torch = _torch()
    model = _build(cls_name, make, torch.float32, torch.float32, ops=ops_mod.GGMLOps())
    missing, unexpected = model.diffusion_model.load_state_dict(read, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"GGUF twin: missing {missing[:3]}, unexpected {unexpected[:3]}")
    dequant = importlib.import_module(pack.__name__ + ".dequant")
    # The layers compute with ComfyUI-GGUF's torch dequantization (fp16 block scales): that is the
    # weight the reference holds; `independent` is the gguf package's own decoding of the same blocks.
    layer_weights = {}
    for name, module in model.diffusion_model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, ops_mod.GGMLLayer) and weight is not None and dequant.is_quantized(weight):
            layer_weights[f"{name}.weight"] = dequant.dequantize_tensor(weight, torch.float32).double()
    return (model, _patcher(model, nodes_mod.GGUFModelPatcher)), {**dequantized, **layer_weights}, \
        {k: dequantized[k] for k in layer_weights}


# --------------------------------------------------------------------------- twins

def twin(family: str, fmt: str, seed: int = 0) -> Twin:
    """The quantized twin of a tiny family model and its float64 reference."""
    torch = _torch()
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    float_model, cls_name, make = _family(family, seed)
    sd = {k: v.detach().clone() for k, v in float_model.model.diffusion_model.state_dict().items()}
    linears = set(_linear_layers(float_model.model))
    quantized: list[str] = []
    independent: dict = {}
    if fmt == "fp8":
        model = _build(cls_name, make, torch.float8_e4m3fn, torch.float32)
        model.diffusion_model.load_state_dict(sd)
        patcher = _patcher(model)
        deq = {k: v.double() for k, v in model.diffusion_model.state_dict().items()}
        quantized = [k for k in sd if k.endswith(".weight") and k.rpartition(".")[0] in linears]
    elif fmt in MIXED:
        from comfy.quant_ops import QUANT_ALGOS, QuantizedTensor
        model = _build(cls_name, make, torch.float32, torch.float32, quant=True)
        qsd, deq = {}, {}
        for key, value in sd.items():
            layer = key.rpartition(".")[0]
            if layer in linears and key.endswith(".weight"):
                q = QuantizedTensor.from_float(value.float(), QUANT_ALGOS[MIXED[fmt]]["comfy_tensor_layout"])
                qsd.update(q.state_dict(key))
                qsd[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": MIXED[fmt]}).encode()),
                                                           dtype=torch.uint8)
                deq[key] = q.dequantize().double()
                quantized.append(key)
            else:
                qsd[key] = value
                deq[key] = value.double()
        missing, unexpected = model.diffusion_model.load_state_dict(qsd, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"{fmt} twin: missing {missing[:3]}, unexpected {unexpected[:3]}")
        patcher = _patcher(model)
    else:
        (model, patcher), deq, independent = _gguf_model(cls_name, make, sd, fmt, family)
        quantized = sorted(independent)
    reference = _build(cls_name, make, torch.float64)
    reference.diffusion_model.load_state_dict({k: deq[k] for k in sd})
    original = _build(cls_name, make, torch.float64)  # the float weights before quantization
    original.diffusion_model.load_state_dict({k: v.double() for k, v in sd.items()})
    for p in list(reference.parameters()) + list(original.parameters()):
        p.requires_grad_(False)
    return Twin(family, fmt, patcher, reference, original, quantized, float_model.cond, independent)


def forward(patcher: Any, x: Any, t: Any, conds: dict) -> Any:
    """One apply_model with the patcher loaded as for sampling (object and weight patches in place), unloaded after."""
    torch = _torch()
    import comfy.model_management as mm
    mm.load_models_gpu([patcher], force_full_load=True)
    try:
        with torch.no_grad():
            return patcher.model.apply_model(x, t, **conds).float().clone()
    finally:
        comfy_host.free_models()


def stored(model: Any) -> dict:
    """The raw bytes of every stored tensor of a model (quantized ones included), for byte-identity checks."""
    torch = _torch()
    out = {}
    for module_name, module in model.named_modules():
        for name, value in list(module._parameters.items()) + list(module._buffers.items()):
            if value is None:
                continue
            key = f"{module_name}.{name}" if module_name else name
            parts = value.state_dict(key) if hasattr(value, "state_dict") and hasattr(value, "_layout_cls") \
                else {key: value}
            for k, t in parts.items():
                plain = t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) else torch.as_tensor(t)
                out[k] = plain.detach().contiguous().reshape(-1).view(torch.uint8).clone()
    return out
