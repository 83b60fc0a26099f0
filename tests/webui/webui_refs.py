"""Shared pieces of the webui tests: TLoRA files for a tiny Linear + Conv2d model and an independent
dense float64 reference written from docs/FORMAT.md section 3 (no code of `tlora/` is used for it)."""
from __future__ import annotations

import os
import sys
import types

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


# ----- one webui's modules at a time (Forge, ersatzForge and Neo all have `backend`, `modules`, ...) ----------
OURS = {"tlora", "tlora_webui", "webui_refs", "tests", "conftest", "torch", "safetensors"}


def _top_names(paths) -> set[str]:
    """The top-level module names a webui's folders provide (what must not leak between host suites)."""
    names = set()
    for path in paths:
        for entry in os.listdir(path):
            name = entry[:-3] if entry.endswith(".py") else entry
            if name.isidentifier() and (entry.endswith(".py") or os.path.isdir(os.path.join(path, entry))):
                names.add(name)
    return names - OURS


class isolated:
    """Context: `paths` first on sys.path with only this webui's modules importable under its names, and
    the process put back afterwards (other suites' modules, torch's deterministic mode the hosts switch on)."""

    def __init__(self, paths, extra_names=()):
        self.paths = list(paths)
        self.names = _top_names(self.paths) | set(extra_names)

    def _ours(self, key: str) -> bool:
        return key.split(".")[0] in self.names

    def __enter__(self):
        self.deterministic = (torch.are_deterministic_algorithms_enabled(),
                              torch.is_deterministic_algorithms_warn_only_enabled())
        self.argv = list(sys.argv)
        self.saved = {k: sys.modules.pop(k) for k in list(sys.modules) if self._ours(k)}
        sys.path[:0] = self.paths
        return self

    def __exit__(self, *exc):
        for key in [k for k in sys.modules if self._ours(k)]:
            del sys.modules[key]
        sys.modules.update(self.saved)
        for path in self.paths:
            sys.path.remove(path)
        sys.argv[:] = self.argv
        torch.use_deterministic_algorithms(self.deterministic[0], warn_only=self.deterministic[1])
        return False


def stand_in(name: str, **attrs) -> types.ModuleType:
    """An infrastructure module stood in (webui state, UI, logging), registered in sys.modules and on its parent."""
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, mod)
    return mod


def run_startup_script(times: int = 2) -> None:
    """scripts/tlora_webui.py as a webui runs it at start-up (twice: a reload must not register twice)."""
    import runpy
    for _ in range(times):
        runpy.run_path(os.path.join(ROOT, "scripts", "tlora_webui.py"), run_name="tlora_webui_script")


# ----- model families through a Forge-family host's own key map (model_lora_keys_unet) ------------------------
# name -> (huggingface_repo, the diffusion model's config, its layers {ldm path: (out, in)},
#          the file's modules {name in the file: (ldm path, (first row, rows) or None)}).
# Each case names modules three ways: diffusers (row slices of a fused weight), ComfyUI (diffusion_model.) and kohya.
FAMILIES = {
    "flux": ("black-forest-labs/FLUX.1-dev", {"depth": 1, "depth_single_blocks": 0, "hidden_size": 8},
             {"double_blocks.0.img_attn.qkv": (24, 8), "double_blocks.0.img_attn.proj": (8, 8),
              "double_blocks.0.img_mlp.0": (16, 8)},
             {"transformer.transformer_blocks.0.attn.to_q": ("double_blocks.0.img_attn.qkv", (0, 8)),
              "transformer.transformer_blocks.0.attn.to_v": ("double_blocks.0.img_attn.qkv", (16, 8)),
              "diffusion_model.double_blocks.0.img_attn.proj": ("double_blocks.0.img_attn.proj", None),
              "lora_unet_double_blocks_0_img_mlp_0": ("double_blocks.0.img_mlp.0", None)}),
    "flux2-klein": ("black-forest-labs/FLUX.2-klein-4B", {"depth": 1, "depth_single_blocks": 0, "hidden_size": 8},
                    {"double_blocks.0.img_attn.qkv": (24, 8), "double_blocks.0.img_attn.proj": (8, 8)},
                    {"transformer.transformer_blocks.0.attn.to_k": ("double_blocks.0.img_attn.qkv", (8, 8)),
                     "diffusion_model.double_blocks.0.img_attn.proj": ("double_blocks.0.img_attn.proj", None)}),
    "z-image": ("Tongyi-MAI/Z-Image-Turbo", {"n_layers": 1, "dim": 8, "n_refiner_layers": 0},
                {"layers.0.attention.qkv": (24, 8), "layers.0.attention.out": (8, 8)},
                {"transformer.layers.0.attention.to_k": ("layers.0.attention.qkv", (8, 8)),
                 "diffusion_model.layers.0.attention.out": ("layers.0.attention.out", None)}),
    "krea2": ("krea/Krea2", {"layers": 1}, {"blocks.0.attn.wq": (8, 8), "blocks.0.attn.wo": (8, 8)},
              {"transformer.transformer_blocks.0.attn.to_q": ("blocks.0.attn.wq", None),
               "diffusion_model.blocks.0.attn.wo": ("blocks.0.attn.wo", None)}),
    "ernie-image": ("baidu/ERNIEImage", {}, {"layers.0.self_attention.to_q": (8, 8), "layers.0.mlp.fc1": (16, 8)},
                    {"transformer.layers.0.self_attention.to_q": ("layers.0.self_attention.to_q", None),
                     "lora_unet_layers_0_mlp_fc1": ("layers.0.mlp.fc1", None)}),
    "qwen-image": ("Qwen/Qwen-Image", {}, {"transformer_blocks.0.attn.to_q": (8, 8), "transformer_blocks.0.img_mlp.net.2": (8, 16)},
                   {"transformer.transformer_blocks.0.attn.to_q": ("transformer_blocks.0.attn.to_q", None),
                    "diffusion_model.transformer_blocks.0.img_mlp.net.2": ("transformer_blocks.0.img_mlp.net.2", None)}),
}


def family_model(family: str, repo: str | None = None) -> torch.nn.Module:
    """What a Forge-family key map reads of a loaded model: `diffusion_model` (real Linear layers at the family's
    ldm paths, its `config` dict) and `config.huggingface_repo` (how the hosts tell families apart)."""
    default_repo, config, layers, _ = FAMILIES[family]
    torch.manual_seed(11)
    model = torch.nn.Module()
    model.diffusion_model = torch.nn.Module()
    for path, (out, inp) in layers.items():
        holder = model.diffusion_model
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(holder, part):
                holder.add_module(part, torch.nn.Module())
            holder = getattr(holder, part)
        holder.add_module(leaf, torch.nn.Linear(inp, out))
    model.diffusion_model.config = dict(config)
    model.config = types.SimpleNamespace(huggingface_repo=repo or default_repo)
    return model


def family_file(tmp_path, family: str) -> tuple[str, dict[str, tuple[str, tuple | None, dict]]]:
    """A TLoRA file for a family case: {file name: (ldm path, rows, tensors)} besides its path."""
    _, _, layers, modules = FAMILIES[family]
    from safetensors.torch import save_file
    made, tensors = {}, {}
    for seed, (name, (path, rows)) in enumerate(sorted(modules.items())):
        out, inp = layers[path]
        shape = (rows[1] if rows else out, inp)
        made[name] = (path, rows, trained_module(shape, "trm:2", "lora:2", 20 + seed))
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in made[name][2].items()})
    file = str(tmp_path / f"{family}.safetensors")
    save_file(tensors, file, metadata={"tlora.version": "1"})
    return file, made


def assert_family_applied(got: dict[str, torch.Tensor], base: dict[str, torch.Tensor], made: dict, strength: float) -> None:
    """Each module's rows equal the dense reference of those rows; rows no module names are the base bit for bit."""
    want = {k: v.double().clone() for k, v in base.items()}
    touched = {k: torch.zeros(v.shape[0], dtype=torch.bool) for k, v in base.items() if v.dim() == 2}
    for name, (path, rows, tensors) in made.items():
        key = f"diffusion_model.{path}.weight"
        sl = slice(None) if rows is None else slice(rows[0], rows[0] + rows[1])
        want[key][sl] = ref_patched(base[key][sl], tensors, strength)
        touched[key][sl] = True
    for key, rows in touched.items():
        assert torch.equal(got[key][~rows], base[key][~rows]), f"{key}: rows no module names changed"
        if strength == 0:
            assert torch.equal(got[key], base[key]), f"{key}: strength 0 is not the base weight"
        else:
            assert_matches(got[key], want[key], key)


def forge_networks(host_path: str, lora_dir: str) -> types.ModuleType:
    """The Forge family's real extensions-builtin/sd_forge_lora/networks.py (its per-file loader), its webui state
    stood in: modules.{errors, scripts, sd_models, shared, cache, hashes} (call inside `isolated`, the extension's
    folder on the path)."""
    import modules  # noqa: F401 - the webui's own package (a namespace package in these snapshots)
    stand_in("modules.errors", display=lambda *a, **k: None, report=lambda *a, **k: None)
    stand_in("modules.scripts", scripts_txt2img=types.SimpleNamespace(infotext_fields=[]))
    stand_in("modules.sd_models", read_metadata_from_safetensors=lambda f: {},
             model_data=types.SimpleNamespace(get_sd_model=lambda: None))
    stand_in("modules.cache", cached_data_for_file=lambda subsection, title, filename, func: func())
    stand_in("modules.hashes", sha256_from_cache=lambda *a, **k: None, sha256=lambda *a, **k: "")
    stand_in("modules.shared", cmd_opts=types.SimpleNamespace(lora_dir=lora_dir, lora_dirs=[]), sd_model=None,
             walk_files=lambda *a, **k: [])
    import networks
    assert os.path.dirname(networks.__file__) == os.path.join(host_path, "extensions-builtin", "sd_forge_lora")
    return networks


def as_loaded(model: torch.nn.Module, repo: str = "runwayml/stable-diffusion-v1-5") -> torch.nn.Module:
    """A tiny model as the Forge family's key maps read a loaded one (config.huggingface_repo, diffusion_model.config)."""
    if not isinstance(getattr(model.diffusion_model, "config", None), dict):
        model.diffusion_model.config = {}
    model.config = types.SimpleNamespace(huggingface_repo=repo)
    return model
