"""Shared pieces of the webui tests: TLoRA files for a tiny Linear + Conv2d model and an independent
dense float64 reference written from docs/FORMAT.md section 3 (no code of `tlora/` is used for it)."""
from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOSTS = os.path.join(ROOT, ".host", "webui")
for path in (ROOT, os.path.join(ROOT, "webui")):
    if path not in sys.path:
        sys.path.insert(0, path)

import tlora  # noqa: E402

STRENGTHS = (0.0, 1.0, 0.5, -1.0)
# model state-dict key -> module: a linear layer (TRM transform + TR residual) and a conv
# (TRM transform + LoRA residual); `plain` takes an ordinary LoRA beside them.
LIN, CONV, PLAIN = "diffusion_model.lin", "diffusion_model.conv", "diffusion_model.plain"


def host_dir(name: str) -> str | None:
    """The extracted snapshot of one webui (bootstrap), or None when it was not extracted."""
    path = os.path.join(HOSTS, name)
    return path if os.path.isfile(os.path.join(path, ".tlora-snapshot")) else None


def snapshot_id(name: str) -> str:
    """Which snapshot was extracted (for messages)."""
    with open(os.path.join(HOSTS, name, ".tlora-snapshot")) as handle:
        return handle.read().strip()


def tiny_layers(seed: int = 0) -> dict[str, torch.nn.Module]:
    """Fresh layers, keyed by module path: Linear(16 -> 8), Conv2d(8 -> 4, 3x3), Linear(8 -> 6)."""
    torch.manual_seed(seed)
    return {LIN: torch.nn.Linear(16, 8), CONV: torch.nn.Conv2d(8, 4, 3, padding=1), PLAIN: torch.nn.Linear(8, 6)}


def trained_module(shape, transform: str, residual: str, seed: int) -> dict[str, torch.Tensor]:
    """A module's tensors far from its identity start (random cores), by suffix."""
    gen = torch.Generator().manual_seed(seed)
    start = tlora.ModuleAdapter.create(tuple(shape), transform, residual, "auto").tensors
    out = {}
    for key, value in start.items():
        noise = 0.3 * torch.randn(value.shape, generator=gen)
        out[key] = value if key == "tlora_scale" else value + noise
    out["tlora_scale"] = torch.tensor(0.7)
    return out


def write_tlora(path: str, modules: dict[str, dict[str, torch.Tensor]], kohya: bool = False) -> str:
    """A TLoRA file (safetensors, our metadata) holding these modules; kohya=True names them lora_unet_*."""
    from safetensors.torch import save_file
    from tlora import format as tformat
    tensors = {}
    for prefix, part in modules.items():
        name = "lora_unet_" + prefix[len("diffusion_model."):].replace(".", "_") if kohya else prefix
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in part.items()})
    adapters = {p: tlora.ModuleAdapter(m, name=p) for p, m in modules.items()}
    metadata = tformat.build_metadata(adapters, config={"arch": "sd15"}, title="tiny")
    save_file(tensors, path, metadata=metadata)
    return path


def standard_file(tmp_path) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """The file every host test applies: LIN (trm:2 + tr:3) and CONV (trm:2 + lora:2)."""
    layers = tiny_layers()
    modules = {LIN: trained_module(layers[LIN].weight.shape, "trm:2", "tr:3", 1),
               CONV: trained_module(layers[CONV].weight.shape, "trm:2", "lora:2", 2)}
    return write_tlora(str(tmp_path / "tiny_tlora.safetensors"), modules), modules


def write_plain_lora(path: str, seed: int = 3) -> tuple[str, torch.Tensor]:
    """An ordinary kohya LoRA (rank 2, alpha 1) for PLAIN; returns (path, its dense update at strength 1)."""
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(seed)
    up, down = torch.randn(6, 2, generator=gen), torch.randn(2, 8, generator=gen)
    save_file({"lora_unet_plain.lora_up.weight": up, "lora_unet_plain.lora_down.weight": down,
               "lora_unet_plain.alpha": torch.tensor(1.0)}, path,
              metadata={"ss_network_module": "networks.lora", "ss_network_dim": "2"})
    return path, (up.double() @ down.double()) * (1.0 / 2)


def _ring(cores) -> torch.Tensor:
    """cores (n_d, ..., R, R) -> the traced product over the flattened row-major index (FORMAT section 3)."""
    acc = cores[0].double()
    for core in cores[1:]:
        c = core.double()
        if acc.dim() == 4:  # TRM: (I, J, R, R) x (n, n, R, R)
            acc = torch.einsum("ijab,klbc->ikjlac", acc, c).reshape(
                acc.shape[0] * c.shape[0], acc.shape[1] * c.shape[1], *acc.shape[-2:])
        else:  # TR: (N, R, R) x (n, R, R)
            acc = torch.einsum("iab,jbc->ijac", acc, c).reshape(acc.shape[0] * c.shape[0], *acc.shape[-2:])
    return acc.diagonal(dim1=-2, dim2=-1).sum(-1)


def ref_patched(w0: torch.Tensor, tensors: dict[str, torch.Tensor], sigma: float) -> torch.Tensor:
    """W0 + sigma (W0 T + s Delta - W0) in float64, from the definitions alone."""
    w = w0.double()
    t_cores = [tensors[f"tlora_t.{d}"] for d in range(8) if f"tlora_t.{d}" in tensors]
    t = _ring(t_cores) if t_cores else torch.eye(w.shape[1], dtype=torch.float64)
    wt = w @ t if w.dim() == 2 else torch.einsum("oiuv,ij->ojuv", w, t)
    if "tlora_r.up" in tensors:
        delta = tensors["tlora_r.up"].double() @ tensors["tlora_r.down"].double()
    else:
        outs = [tensors[f"tlora_r.out.{d}"] for d in range(8) if f"tlora_r.out.{d}" in tensors]
        ins = [tensors[f"tlora_r.in.{d}"] for d in range(8) if f"tlora_r.in.{d}" in tensors]
        delta = _ring(outs + ins).reshape(w.shape[0], -1)
    patched = wt + float(tensors["tlora_scale"]) * delta.reshape(w.shape)
    return w + sigma * (patched - w)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Float32-merge accuracy against the float64 reference (a few roundings of the weight's size)."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=1e-5 * max(scale, 1.0), msg=what)


def tiny_model() -> torch.nn.Module:
    """A model whose diffusion_model holds the tiny layers (what Forge's and reForge's patchers take)."""
    model = torch.nn.Module()
    model.diffusion_model = torch.nn.Module()
    for path, layer in tiny_layers().items():
        setattr(model.diffusion_model, path.split(".")[-1], layer)
    return model


def generic_key_map(model: torch.nn.Module) -> dict[str, str]:
    """The host's generic UNet key map: `diffusion_model.<path>` and `lora_unet_<path>` -> the weight key."""
    out = {}
    for key in model.state_dict():
        if key.endswith(".weight"):
            out[key[:-len(".weight")]] = key
            out["lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")] = key
    return out


def assert_file_and_plain_lora_applied(got: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                                       modules: dict[str, dict[str, torch.Tensor]], plain_update: torch.Tensor,
                                       strength: float) -> None:
    """Each TLoRA module equals the dense reference (the base bit for bit at 0); the plain LoRA its update."""
    for prefix, tensors in modules.items():
        w0 = base[prefix + ".weight"]
        if strength == 0:
            assert torch.equal(got[prefix + ".weight"], w0), f"{prefix}: strength 0 is not the base weight"
        else:
            assert_matches(got[prefix + ".weight"], ref_patched(w0, tensors, strength), prefix)
    assert_matches(got[PLAIN + ".weight"], base[PLAIN + ".weight"].double() + strength * plain_update, "plain LoRA")


# ----- files that give one weight twice (what every host must refuse, issue 28 items 3 and 4) ------------
def kohya(prefix: str) -> str:
    """The kohya name of a UNet module path (`diffusion_model.lin` -> `lora_unet_lin`)."""
    return "lora_unet_" + prefix[len("diffusion_model."):].replace(".", "_")


def write_mixed(path: str, lora_name: str) -> str:
    """The standard file plus an ordinary LoRA for LIN's weight, named `lora_name` (LIN's own name or its kohya one)."""
    from safetensors.torch import load_file, save_file
    import pathlib
    standard, _ = standard_file(pathlib.Path(os.path.dirname(path)))
    gen = torch.Generator().manual_seed(9)
    tensors = dict(load_file(standard))
    tensors.update({f"{lora_name}.lora_up.weight": torch.randn(8, 2, generator=gen),
                    f"{lora_name}.lora_down.weight": torch.randn(2, 16, generator=gen),
                    f"{lora_name}.alpha": torch.tensor(2.0)})
    save_file(tensors, path, metadata={"tlora.version": "1"})
    return path


def write_twice(path: str) -> str:
    """LIN under its generic and its kohya name, with different values (the hosts applied one or the other)."""
    layers = tiny_layers()
    first = trained_module(layers[LIN].weight.shape, "trm:2", "tr:3", 1)
    second = trained_module(layers[LIN].weight.shape, "trm:2", "tr:3", 7)
    from safetensors.torch import save_file
    tensors = {f"{LIN}.{k}": v for k, v in first.items()}
    tensors.update({f"{kohya(LIN)}.{k}": v for k, v in second.items()})
    save_file(tensors, path, metadata={"tlora.version": "1"})
    return path
