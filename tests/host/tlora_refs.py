"""Helpers for the pack's real-host tests: adapter/LoRA files, dense float64 references, patching.

The references here are written from docs/FORMAT.md and ComfyUI's LoRA rule only: they
never call the pack or the `tlora` core, so a test comparing against them can catch a
wrong index order, scale or strength rule in either.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from harness import comfy_host as ch

# (transform, residual) kinds cycled over modules so every code path of the format is used.
KIND_CYCLE: tuple[tuple[str, str], ...] = (
    ("trm:2", "tr:3"), ("trm:1", "lora:4"), ("diag", "tr:2"), ("none", "lora:2"), ("trm:3", "none"),
)


def pack(sub: str) -> Any:
    """A pack submodule as ComfyUI imported it (the pack lives under a mangled module name)."""
    return importlib.import_module(f"{ch.pack_module_name()}.{sub}")


# --------------------------------------------------------------------------- models

def tiny_sd15_dtype(dtype: torch.dtype, seed: int = 0) -> Any:
    """A tiny SD1.5 ModelPatcher whose weights are stored (and computed) in `dtype`."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    from harness import tiny_models as tm
    cfg = sm.SD15(tm.sd15_unet_config())
    cfg.set_inference_dtype(dtype, None)
    model = cfg.get_model({}, "", device=torch.device("cpu"))
    tm.init_module_(model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def base_weights(patcher: Any, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Copies of the current (unpatched) weights of `keys` in the patcher's model."""
    sd = patcher.model.state_dict()
    return {k: sd[k].detach().clone() for k in keys}


def patched_weights(patcher: Any, keys: Iterable[str] | None = None, **patch_kwargs: Any) -> dict[str, torch.Tensor]:
    """Weights after ModelPatcher.patch_model (then unpatched again); all weights when keys is None.

    Everything ComfyUI keeps loaded is unloaded first: a model loaded through another patcher
    (CLIP loads itself on creation) has its modules marked as patched, and patch_model would
    then silently skip them.
    """
    ch.free_models()
    patcher.patch_model(device_to=torch.device("cpu"), **patch_kwargs)
    try:
        sd = patcher.model.state_dict()
        return {k: sd[k].detach().clone() for k in (sd if keys is None else keys)}
    finally:
        patcher.unpatch_model(device_to=torch.device("cpu"))


def clip_patched_weights(clip: Any, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Text-encoder weights of a CLIP with its patches applied (then unpatched)."""
    return patched_weights(clip.patcher, keys)


# --------------------------------------------------------------------------- nodes

def unet_shapes(model: Any, convs: bool = True) -> dict[str, tuple[int, ...]]:
    """{`diffusion_model.<path>`: weight shape} of every attention linear, plus a 3x3 padded, a 1x1 and a strided conv."""
    sd = model.state_dict()
    paths = [n for n, _ in model.diffusion_model.named_modules() if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    if convs:
        paths += ["input_blocks.1.0.in_layers.2", "output_blocks.3.1.proj_in", "input_blocks.2.0.op"]
    return {f"diffusion_model.{p}": tuple(sd[f"diffusion_model.{p}.weight"].shape) for p in paths}


def loader(name: str) -> Any:
    """A registered node class by id."""
    return ch.node_class(name)


def tlora_model_only(model: Any, name: str, strength: float) -> Any:
    """TLoRALoaderModelOnly as the executor calls it."""
    return loader("TLoRALoaderModelOnly").execute(model=model, adapter_name=name, strength_model=strength).result[0]


def tlora_full(model: Any, clip: Any, name: str, sm: float, sc: float) -> tuple[Any, Any]:
    """TLoRALoader as the executor calls it -> (model, clip)."""
    out = loader("TLoRALoader").execute(model=model, clip=clip, adapter_name=name, strength_model=sm,
                                        strength_clip=sc).result
    return out[0], out[1]


def stock_model_only(model: Any, name: str, strength: float) -> Any:
    """ComfyUI's LoraLoaderModelOnly."""
    return loader("LoraLoaderModelOnly")().load_lora_model_only(model, name, strength)[0]


def stock_full(model: Any, clip: Any, name: str, sm: float, sc: float) -> tuple[Any, Any]:
    """ComfyUI's LoraLoader -> (model, clip)."""
    return loader("LoraLoader")().load_lora(model, clip, name, sm, sc)


def assert_all_base(weights: dict, base: dict, what: str) -> None:
    """Every weight bit-identical to the base."""
    changed = [k for k in base if not torch.equal(weights[k], base[k])]
    assert not changed, f"{what}: {len(changed)} weights differ from the base, e.g. {changed[:3]}"


# --------------------------------------------------------------------------- adapter files

def random_adapter(shape: Sequence[int], transform: str = "trm:2", residual: str = "tr:3",
                   seed: int = 0, t_noise: float = 0.08, r_noise: float = 0.3) -> Any:
    """A ModuleAdapter for a weight of `shape` moved well away from its identity/zero start."""
    from tlora import ModuleAdapter
    g = torch.Generator().manual_seed(seed)
    start = ModuleAdapter.create(shape, transform, residual, shapes="auto", generator=g)
    tensors = {}
    for name, t in start.tensors.items():
        if name == "tlora_scale":
            tensors[name] = torch.tensor(0.75)
        elif name.startswith("tlora_t."):
            tensors[name] = t + t_noise * torch.randn(t.shape, generator=g)
        else:  # residual: the zero-start part gets values too
            tensors[name] = r_noise * torch.randn(t.shape, generator=g)
    return ModuleAdapter(tensors, name="test", weight_shape=shape)


def random_adapters(shapes: Mapping[str, Sequence[int]], seed: int = 0,
                    kinds: Sequence[tuple[str, str]] = KIND_CYCLE) -> dict[str, Any]:
    """{prefix: random_adapter} cycling the transform/residual kinds over the modules."""
    return {p: random_adapter(s, *kinds[i % len(kinds)], seed=seed * 1000 + i)
            for i, (p, s) in enumerate(shapes.items())}


def write_tlora(path: os.PathLike, adapters: Mapping[str, Any], config: Mapping[str, Any] | None = None,
                metadata: Mapping[str, Any] | None = None) -> str:
    """Save adapters as a TLoRA file with the core's writer; returns the path."""
    from tlora import save_file
    save_file(adapters, path, config=config, metadata=metadata)
    return str(path)


def write_lora(path: os.PathLike, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
               style: str = "kohya") -> str:
    """A plain LoRA safetensors file: {prefix: (up, down, alpha)}, kohya `lora_up/lora_down/alpha` keys."""
    from safetensors.torch import save_file
    sd: dict[str, torch.Tensor] = {}
    for prefix, (up, down, alpha) in weights.items():
        if style == "kohya":
            sd[f"{prefix}.lora_up.weight"] = up.contiguous()
            sd[f"{prefix}.lora_down.weight"] = down.contiguous()
            sd[f"{prefix}.alpha"] = torch.tensor(float(alpha))
        elif style == "peft":
            sd[f"{prefix}.lora_B.weight"] = up.contiguous()
            sd[f"{prefix}.lora_A.weight"] = down.contiguous()
            sd[f"{prefix}.alpha"] = torch.tensor(float(alpha))
        else:
            raise ValueError(style)
    save_file(sd, str(path), metadata={"ss_network_module": "networks.lora"})
    return str(path)


def random_lora(shapes: Mapping[str, Sequence[int]], rank: int = 4, alpha: float = 2.0,
                seed: int = 0, scale: float = 0.3) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{prefix: (up, down, alpha)} with non-zero up and down (conv weights get conv-shaped factors)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, shape in shapes.items():
        up = scale * torch.randn((shape[0], rank) + (1, 1) * (len(shape) == 4), generator=g)
        down = scale * torch.randn((rank,) + tuple(shape[1:]), generator=g)
        out[prefix] = (up, down, alpha)
    return out


def kohya_unet(prefix: str) -> str:
    """`diffusion_model.a.b.c` -> `lora_unet_a_b_c` (what kohya trainers write)."""
    return "lora_unet_" + prefix.removeprefix("diffusion_model.").replace(".", "_")


# --------------------------------------------------------------------------- dense references

def ref_transform(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """Dense T (float64) from the file's tensors: trace(A_1[i1,j1] ... A_D[iD,jD]), row-major."""
    if "tlora_t.diag" in tensors:
        return torch.diag(tensors["tlora_t.diag"].double())
    cores = [tensors[f"tlora_t.{d}"].double() for d in range(64) if f"tlora_t.{d}" in tensors]
    if not cores:
        return None
    m = cores[0]                                   # (i, j, a, b)
    for core in cores[1:]:                         # (k, l, b, c)
        p, q = m.shape[0], core.shape[0]
        m = torch.einsum("ijab,klbc->ikjlac", m, core).reshape(p * q, p * q, m.shape[2], core.shape[3])
    return torch.einsum("ijaa->ij", m)


def ref_residual(tensors: Mapping[str, torch.Tensor], out_features: int) -> torch.Tensor | None:
    """Dense unscaled Delta (float64, O x fan_in): tensor ring trace or up @ down."""
    if "tlora_r.up" in tensors:
        return tensors["tlora_r.up"].double() @ tensors["tlora_r.down"].double()
    outs = [tensors[f"tlora_r.out.{d}"].double() for d in range(64) if f"tlora_r.out.{d}" in tensors]
    ins = [tensors[f"tlora_r.in.{d}"].double() for d in range(64) if f"tlora_r.in.{d}" in tensors]
    if not outs:
        return None
    chain = outs[0]                                # (n, a, b)
    for core in outs[1:] + ins:
        chain = torch.einsum("nab,mbc->nmac", chain, core).reshape(-1, chain.shape[1], core.shape[2])
    full = torch.einsum("naa->n", chain)
    return full.reshape(out_features, -1)


def ref_target(w0: torch.Tensor, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """W' = W0 T + s Delta in float64 (T on the input-channel axis at every kernel tap)."""
    w = w0.double()
    t = ref_transform(tensors)
    wt = w if t is None else (torch.einsum("oi,ij->oj", w, t) if w.dim() == 2
                              else torch.einsum("oiuv,ij->ojuv", w, t))
    delta = ref_residual(tensors, w.shape[0])
    if delta is not None:
        wt = wt + float(tensors["tlora_scale"]) * delta.reshape(w.shape)
    return wt


def ref_patched(w0: torch.Tensor, tensors: Mapping[str, torch.Tensor], strength: float) -> torch.Tensor:
    """W(sigma) = W0 + sigma (W0 T + s Delta - W0) in float64."""
    w = w0.double()
    return w + strength * (ref_target(w0, tensors) - w)


def ref_lora_diff(up: torch.Tensor, down: torch.Tensor, alpha: float, shape: Sequence[int]) -> torch.Tensor:
    """ComfyUI's LoRA difference (alpha / rank) up @ down in float64, shaped like the weight."""
    rank = down.shape[0]
    return (alpha / rank) * (up.double().flatten(1) @ down.double().flatten(1)).reshape(shape)


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for comparing weights stored in `dtype` with a float64 reference."""
    return {torch.float32: (1e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}[dtype]


def assert_close64(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float | None = None,
                   atol: float | None = None) -> None:
    """Compare a weight with a float64 reference at its dtype's precision, naming it on failure."""
    if rtol is None or atol is None:
        rtol, atol = tolerance(actual.dtype)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")
