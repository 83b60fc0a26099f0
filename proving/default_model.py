"""Build the embedded default model: an SD1.5-format checkpoint pretrained on the procedural world.

    from proving.default_model import make_default_model
    path = make_default_model()          # .cache/default_model/tlora-proving-sd15.safetensors

Stock ComfyUI's CheckpointLoaderSimple detects the file as SD1.5: a full-width (320 channels,
context 768) but shallow UNet (one level, one res block, transformers with to_q/to_k/to_v/to_out.0),
a TAESD-format VAE (first_stage_model.taesd_*) and a full CLIP-L text encoder. The text encoder
is a fixed seeded random network (ComfyUI's real SD1 tokenizer); the VAE and the UNet are trained
here on `proving.procedural` images, as narrow twins that are embedded exactly at full width
(`proving.narrow`).

Stages (each cached in the work folder, the two training stages resumable from periodic
checkpoints): text (captions -> conditionings through ComfyUI's checkpoint loader and CLIP code),
vae, latents, unet, export. A finished build is recognised by its manifest and returned at once.

What the weights depend on (measured: each of these changes them in the last bits, and training
amplifies that into a different model): the config (seed, steps...), torch's intra-op thread count
(reductions split by thread), the CPU kernel level (AVX-512 and AVX2 kernels round differently),
MKL's code path, and which convolution library runs: oneDNN and NNPACK are both in a default
torch's CPU path and choose kernels by the machine (oneDNN by cache sizes and cores under its ISA
cap, NNPACK by its own CPU detection), with no switch that pins their arithmetic. So the build
pins what it can: one intra-op thread unless `threads` says otherwise (part of the cache key;
TLORA_TORCH_THREADS is not read here); AVX2 kernels for ATen and MKL in its strict reproducible
mode (`PINNED_NUMERICS`, set by tools/build_default_model.py before torch loads); and no oneDNN
or NNPACK (`pin_libraries`): every convolution is ATen's own (im2col + MKL's GEMM). What is left:
the torch build (its bundled MKL), an x86-64 CPU with AVX2, and the C library's sin/cos in the
procedural renders. The manifest and the checkpoint's metadata record the numerics, library
versions and a digest of every stage (data, text, VAE, latents, UNet), so two builds can be
compared stage by stage.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from . import procedural as proc

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = ROOT / ".cache" / "default_model"
DEFAULT_NAME = "tlora-proving-sd15.safetensors"
TINY_NAME = "tlora-proving-sd15-tiny.safetensors"
FORMAT_VERSION = 3  # 2: AVX2-pinned kernels and the thread count in the config; 3: no oneDNN/NNPACK
LATENT_SCALE = 0.18215  # SD1.5 latent format's scale factor (comfy.latent_formats.SD15)
THUMB_GAIN = 3.0        # latent channels 0-2 ~ (8x8 mean colour - 0.5) * gain (unit-ish spread)
SAVE_EVERY_S = 60.0     # a training stage writes its resume checkpoint at least this often
# Kernel paths every x86-64 CPU since 2013 has (ATen's vectorised kernels, MKL's BLAS, oneDNN's
# convolutions): an AVX-512 machine then computes what an AVX2 one does. Read once, at torch's import.
PINNED_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}


# --------------------------------------------------------------------------- configuration

@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Everything that decides the built model (the cache key is a hash of it)."""

    seed: int = 0
    minutes: float = 20.0
    tiny: bool = False
    unet_width: int = 64
    vae_width: int = 32
    captions: int = 192
    per_caption: int = 12
    vae_images: int = 3072
    vae_steps: int = 640
    vae_batch: int = 16
    vae_crop: int = 32
    vae_lr: float = 3e-3
    vae_anchor: float = 0.5
    vae_edges: float = 1.0
    vae_blocks: tuple = ((0, 1, 1, 2), (2, 1, 1, 0))
    vae_latent_noise: float = 0.02
    unet_steps: int = 1800
    unet_batch: int = 16
    unet_lr: float = 2e-3
    cond_dropout: float = 0.1
    offset_noise: float = 0.1
    ema_decay: float = 0.995
    threads: int = 1

    @classmethod
    def make(cls, minutes: Optional[float] = None, tiny: bool = False, seed: int = 0,
             threads: int = 1) -> "BuildConfig":
        """The default build, scaled to `minutes` on the reference machine (2 shared CPU cores), or the tiny one.

        Minutes set step counts, not a clock: the same arguments always give the same model.
        """
        if int(threads) < 1:
            raise ValueError(f"--threads must be at least 1 (got {threads})")
        if tiny:
            return cls(seed=seed, minutes=0.0, tiny=True, unet_width=32, vae_width=16, captions=12,
                       per_caption=2, vae_images=64, vae_steps=6, vae_batch=4, unet_steps=8, unet_batch=4,
                       threads=int(threads))
        m = cls.minutes if minutes is None else float(minutes)
        if m <= 0:
            raise ValueError(f"--minutes must be positive (got {m})")
        scale = m / cls.minutes
        return cls(seed=seed, minutes=m, vae_steps=max(20, round(cls.vae_steps * scale)),
                   unet_steps=max(40, round(cls.unet_steps * scale)), threads=int(threads))

    def key(self) -> str:
        """Short hash of the config and the format version (names the work folder)."""
        text = json.dumps({"v": FORMAT_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- host and small helpers

def ensure_host() -> None:
    """Make ComfyUI importable (the project's harness path) unless this process already imported it."""
    if "comfy.model_management" in sys.modules:
        return
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from harness import comfy_host  # the harness pins ComfyUI first on sys.path and sets --cpu
    comfy_host.ensure_importable()


def _torch() -> Any:
    ensure_host()
    import torch
    return torch


def _atomic_save_tensors(tensors: dict, path: Path, metadata: Optional[dict] = None) -> None:
    """safetensors file written to a temporary name and renamed (readers never see half a file)."""
    from safetensors.torch import save_file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary name and rename (resume checkpoints: tensors and plain values only)."""
    torch = _torch()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _progress(total: int, desc: str, enabled: bool, initial: int = 0) -> Any:
    """A tqdm bar (a no-op object when disabled)."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, initial=initial, disable=not enabled, dynamic_ncols=True,
                smoothing=0.1, unit="step" if "caption" not in desc else "caption")


def _step_generator(seed: int, stage: int, step: int) -> Any:
    """A generator for one training step: resume needs no RNG state, only the step number."""
    torch = _torch()
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + stage * 7_919 + step) % (2 ** 62))


# --------------------------------------------------------------------------- text encoder

def clip_state_dict(seed: int) -> dict:
    """Checkpoint keys (cond_stage_model.*) of a seeded random CLIP-L text encoder, fp16.

    Token embeddings N(0, 1) and position embeddings N(0, 0.5^2) so that both survive the first
    LayerNorm; linear weights N(0, 1/fan_in) (softmax logits of order one, residual stream
    growing slowly); norms 1/0, biases 0. Values come from one generator walked in name order.
    """
    torch = _torch()
    import comfy.sd1_clip
    import comfy.supported_models as sm
    te = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    gen = torch.Generator().manual_seed(int(seed) * 31 + 7)
    with torch.no_grad():
        for name, p in sorted(te.named_parameters()):
            if "token_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "position_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            elif name.endswith("logit_scale"):
                p.fill_(math.log(100.0))
            elif name.endswith("weight") and "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()
    cfg = sm.SD15(dict(proc_unet_config()))
    sd = cfg.process_clip_state_dict_for_saving(dict(te.state_dict()))
    return {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}


def proc_unet_config() -> dict:
    """The shallow SD1.5 UNet config of the checkpoint."""
    from .narrow import SD15_SHALLOW_UNET
    return {k: v for k, v in SD15_SHALLOW_UNET.items() if k not in ("num_heads", "num_head_channels")}


def load_clip_as_comfy(checkpoint_sd: dict) -> Any:
    """The comfy.sd.CLIP that ComfyUI's checkpoint loader builds from these checkpoint tensors."""
    import comfy.sd
    out = comfy.sd.load_state_dict_guess_config(dict(checkpoint_sd), output_vae=False, output_clip=True,
                                                output_clipvision=False, output_model=False)
    if out is None or out[1] is None:
        raise RuntimeError("ComfyUI did not detect the default model's skeleton as an SD1.5 checkpoint")
    return out[1]


def encode_captions(clip: Any, captions: list[str], batch: int = 16, progress: bool = True) -> Any:
    """(N, 77, 768) conditionings of captions, as CLIPTextEncode computes them (batched chunks)."""
    torch = _torch()
    out = []
    bar = _progress(len(captions), "text: captions", progress)
    for i in range(0, len(captions), batch):
        chunk = captions[i:i + batch]
        merged: dict[str, list] = {}
        for text in chunk:
            tokens = clip.tokenize(text)
            for k, v in tokens.items():
                if len(v) != 1:
                    raise ValueError(f"caption {text!r} does not fit one 77-token chunk")
                merged.setdefault(k, []).extend(v)
        # ComfyUI encodes the chunks of one prompt as a batch and concatenates them along tokens.
        cond = clip.encode_from_tokens(merged)
        out.append(cond.reshape(len(chunk), -1, cond.shape[-1]).float())
        bar.update(len(chunk))
    bar.close()
    return torch.cat(out, 0)


# --------------------------------------------------------------------------- training stages

def _schedule() -> Any:
    """alphas_cumprod of ComfyUI's SD1.5 sampling (what its samplers assume the UNet was trained on)."""
    torch = _torch()
    import comfy.model_base
    import comfy.supported_models as sm
    ms = comfy.model_base.model_sampling(sm.SD15(proc_unet_config()), comfy.model_base.ModelType.EPS)
    sigmas = ms.sigmas.double()
    return (1.0 / (1.0 + sigmas ** 2)).float()


class _Stage:
    """A resumable training loop: model + AdamW + cosine lr + EMA, checkpointed to `path`."""

    def __init__(self, name: str, model: Any, steps: int, lr: float, path: Path, ema_decay: float = 0.0,
                 warmup: int = 50):
        torch = _torch()
        self.name, self.model, self.steps, self.path = name, model, steps, path
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
        warm = min(warmup, max(1, steps // 10))

        def lr_at(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            t = (step - warm) / max(1, steps - warm)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_at)
        self.ema_decay = ema_decay
        self.ema = [p.detach().clone() for p in self.params] if ema_decay else None
        self.step = 0
        self.history: list[float] = []
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["opt"])
            self.sched.load_state_dict(state["sched"])
            if self.ema is not None:
                for e, v in zip(self.ema, state["ema"]):
                    e.copy_(v)
            self.step = int(state["step"])
            self.history = list(state["history"])

    def save(self) -> None:
        """Write the resume checkpoint."""
        _atomic_torch_save({"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                            "sched": self.sched.state_dict(), "ema": self.ema or [], "step": self.step,
                            "history": self.history}, self.path)

    def update(self, loss: Any) -> float:
        """One optimiser step on a scalar loss; returns its value."""
        torch = _torch()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            # EMA warm-up: early averages would otherwise be dominated by the random start.
            d = min(self.ema_decay, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                for e, p in zip(self.ema, self.params):
                    e.lerp_(p.detach(), 1 - d)
        self.step += 1
        value = float(loss.detach())
        self.history.append(value)
        return value

    def run(self, step_fn: Callable[[int], Any], progress: bool) -> None:
        """Train until `steps`, saving at least every SAVE_EVERY_S seconds and at the end."""
        if self.step >= self.steps:
            return
        bar = _progress(self.steps, self.name, progress, initial=self.step)
        last_save = time.monotonic()
        self.model.train()
        try:
            while self.step < self.steps:
                value = self.update(step_fn(self.step))
                bar.update(1)
                if self.step % 10 == 0:
                    recent = self.history[-50:]
                    bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
                if time.monotonic() - last_save > SAVE_EVERY_S:
                    self.save()
                    last_save = time.monotonic()
                if not math.isfinite(value):
                    raise RuntimeError(f"{self.name}: loss became {value} at step {self.step}")
        finally:
            bar.close()
            self.model.eval()
            self.save()

    def averaged_state(self) -> dict:
        """The model's state dict with EMA weights in place of the trained ones."""
        sd = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            names = {id(p): n for n, p in self.model.named_parameters()}
            for e, p in zip(self.ema, self.params):
                sd[names[id(p)]] = e.detach().clone()
        return sd


def _images_tensor(images: np.ndarray) -> Any:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    torch = _torch()
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def train_vae(cfg: BuildConfig, work: Path, progress: bool) -> dict:
    """Train the narrow TAESD on varied procedural images; returns its state dict (cached in work)."""
    torch = _torch()
    from safetensors.torch import load_file
    from .narrow import NarrowTAESD
    final = work / "vae.safetensors"
    if final.is_file():
        return load_file(str(final))
    pool_path = work / "vae_images.npy"
    if pool_path.is_file():
        pool = np.load(pool_path)
    else:
        pool = proc.autoencoder_images(cfg.vae_images, cfg.seed)
        np.save(pool_path, pool)
    data = _images_tensor(pool)
    vae = _narrow_vae(cfg)
    stage = _Stage("vae", vae, cfg.vae_steps, cfg.vae_lr, work / "vae_state.pt")

    def step(i: int) -> Any:
        g = _step_generator(cfg.seed, 1, i)
        x = data[torch.randint(len(data), (cfg.vae_batch,), generator=g)]
        if cfg.vae_crop < x.shape[-1]:
            # Crops on the 8-px latent grid keep the stride-2 alignment of full images (4x cheaper).
            slots = (x.shape[-1] - cfg.vae_crop) // 8 + 1
            oy, ox = (torch.randint(slots, (2, len(x)), generator=g) * 8).tolist()
            x = torch.stack([im[:, a:a + cfg.vae_crop, b:b + cfg.vae_crop] for im, a, b in zip(x, oy, ox)])
        z = vae.encode(x)
        # Channels 0-2 are pulled towards the 8x8 colour thumbnail (centred, about unit spread):
        # a strong early signal for the encoder and a latent space the UNet finds easy. Channel 3
        # is free (edges, texture). Per-channel moments near N(0, 1) (the diffusion noise scale);
        # decoding must survive small latent errors, since sampled latents are never exact.
        thumb = (torch.nn.functional.avg_pool2d(x, 8) - 0.5) * THUMB_GAIN
        anchor = (z[:, :3] - thumb).pow(2).mean()
        mean, std = z.mean((0, 2, 3)), z.std((0, 2, 3))
        moments = mean.pow(2).mean() + (std - 1).pow(2).mean()
        y = vae.decode(z + cfg.vae_latent_noise * torch.randn(z.shape, generator=g))
        # The anchor fades out by mid-training: early it organises the latents, later it leaves
        # room for detail. Image-gradient errors keep edges (circle vs square corners) crisp.
        fade = max(0.0, 1.0 - 2.0 * i / max(1, cfg.vae_steps))
        edges = ((y.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (y.diff(dim=-2) - x.diff(dim=-2)).abs().mean())
        return ((y - x).abs().mean() + 2.0 * (y - x).pow(2).mean() + cfg.vae_edges * edges + 0.05 * moments
                + cfg.vae_anchor * fade * anchor)

    stage.run(step, progress)
    sd = stage.averaged_state()
    with torch.no_grad():
        g = torch.Generator().manual_seed(cfg.seed + 5)
        x = data[torch.randint(len(data), (32,), generator=g)]
        z = vae.encode(x)
        mse = float((vae.decode(z).clamp(0, 1) - x).pow(2).mean())
    meta = {"psnr": f"{10 * math.log10(1 / max(mse, 1e-10)):.2f}", "latent_std": f"{float(z.std()):.3f}",
            "latent_mean": f"{float(z.mean()):.3f}", "final_loss": f"{stage.history[-1]:.5f}"}
    _atomic_save_tensors(sd, final, meta)
    (work / "vae_report.json").write_text(json.dumps(meta))
    return sd


def encode_pool(cfg: BuildConfig, work: Path, vae_sd: dict, specs: list, progress: bool) -> tuple[Any, Any]:
    """Latents (N, 4, 8, 8) of the pretraining renders and each one's caption index (cached)."""
    torch = _torch()
    from safetensors.torch import load_file
    from .narrow import NarrowTAESD
    path = work / "latents.safetensors"
    if path.is_file():
        d = load_file(str(path))
        return d["latents"], d["index"]
    images, index = proc.pretraining_images(specs, cfg.per_caption, cfg.seed)
    vae = _narrow_vae(cfg)
    vae.load_state_dict(vae_sd)
    vae.eval()
    x = _images_tensor(images)
    out = []
    bar = _progress(len(x), "latents: images", progress)
    with torch.no_grad():
        for i in range(0, len(x), 64):
            out.append(vae.encode(x[i:i + 64]))
            bar.update(len(x[i:i + 64]))
    bar.close()
    latents = torch.cat(out)
    idx = torch.from_numpy(index)
    _atomic_save_tensors({"latents": latents, "index": idx}, path)
    return latents, idx


def train_unet(cfg: BuildConfig, work: Path, latents: Any, index: Any, conds: Any, empty: Any,
               progress: bool) -> dict:
    """Train the narrow UNet (eps prediction, min-SNR-5 weights, caption dropout); returns EMA weights."""
    torch = _torch()
    from safetensors.torch import load_file
    from .narrow import build_narrow_unet
    final = work / "unet.safetensors"
    if final.is_file():
        return load_file(str(final))
    net = build_narrow_unet(cfg.unet_width, seed=cfg.seed)
    stage = _Stage("unet", net, cfg.unet_steps, cfg.unet_lr, work / "unet_state.pt", ema_decay=cfg.ema_decay)
    alphas = _schedule()
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-gamma (gamma 5) for eps prediction

    def step(i: int) -> Any:
        g = _step_generator(cfg.seed, 2, i)
        pick = torch.randint(len(latents), (cfg.unet_batch,), generator=g)
        x0 = latents[pick]
        t = torch.randint(len(alphas), (cfg.unet_batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        # Offset noise: SD1.5's schedule leaves 7% of the signal at t=999, so without it the model
        # learns to keep the initial noise's per-channel means, i.e. a random background colour.
        noise = noise + cfg.offset_noise * torch.randn(x0.shape[:2] + (1, 1), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        c = conds[index[pick]]
        drop = torch.rand(cfg.unet_batch, generator=g) < cfg.cond_dropout
        c = torch.where(drop.view(-1, 1, 1), empty.expand_as(c), c)
        pred = net(xt, t.float(), context=c)
        return (weight[t].view(-1, 1, 1, 1) * (pred - noise).pow(2)).mean()

    stage.run(step, progress)
    sd = stage.averaged_state()
    _atomic_save_tensors(sd, final, {"final_loss": f"{sum(stage.history[-100:]) / min(100, len(stage.history)):.5f}"})
    return sd


# --------------------------------------------------------------------------- assembling the checkpoint

def assemble(cfg: BuildConfig, unet_sd: dict, vae_sd: dict, clip_sd: dict) -> dict:
    """Full checkpoint tensors: 320-wide UNet and 64-wide TAESD (fp32), CLIP (fp16), SD1.5 key names."""
    torch = _torch()
    import comfy.supported_models as sm
    from .narrow import UNetEmbedding, embed_taesd
    config = sm.SD15(proc_unet_config())
    wide = UNetEmbedding(cfg.unet_width, seed=cfg.seed).embed(unet_sd)
    out = dict(config.process_unet_state_dict_for_saving(wide))
    out.update(config.process_vae_state_dict_for_saving(embed_taesd(vae_sd, cfg.vae_width, LATENT_SCALE)))
    out.update(clip_sd)
    return {k: v.contiguous() if v.dtype == torch.float16 else v.float().contiguous() for k, v in out.items()}


def check_detection(sd: dict) -> str:
    """Name of the model config stock ComfyUI detects (raises unless SD15 with a TAESD VAE)."""
    import comfy.model_detection
    unet = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    found = comfy.model_detection.model_config_from_unet(unet, "model.diffusion_model.")
    name = type(found).__name__ if found is not None else None
    if name != "SD15" or "first_stage_model.taesd_decoder.1.weight" not in sd:
        raise RuntimeError(f"the default model would be detected as {name}, not SD15 with a TAESD VAE")
    return name


def default_path(tiny: bool = False, cache_dir: Optional[Path] = None) -> Path:
    """Where the default (or tiny) model is written unless --out says otherwise."""
    return Path(cache_dir or CACHE_DIR) / (TINY_NAME if tiny else DEFAULT_NAME)


def pin_libraries() -> None:
    """Convolutions by ATen itself (im2col + MKL GEMM): oneDNN and NNPACK pick kernels by the machine."""
    torch = _torch()
    torch.backends.mkldnn.enabled = False
    torch.backends.nnpack.set_flags(False)


def numerics() -> dict:
    """What this process computes with: torch build, CPU kernel level, threads, libraries, the pinning variables."""
    torch = _torch()
    from PIL import __version__ as pillow
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "machine": platform.machine(),
            "onednn": bool(torch.backends.mkldnn.enabled), "nnpack": bool(torch._C._get_nnpack_enabled()),
            "numpy": np.__version__, "pillow": pillow, "libc": "-".join(platform.libc_ver()),
            **{k: os.environ.get(k, "") for k in PINNED_NUMERICS}}


def tensor_digest(sd: dict) -> str:
    """sha256 over names, dtypes, shapes and bytes in name order (the file's header order is not fixed)."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(_torch().uint8).numpy().tobytes())
    return h.hexdigest()


def _data_digest(cfg: BuildConfig, specs: list, work: Path) -> str:
    """sha256 of what the procedural world made: the captions, the VAE's image pool, the pretraining renders."""
    h = hashlib.sha256(json.dumps([s.caption for s in specs]).encode())
    h.update(np.load(work / "vae_images.npy").tobytes())
    images, index = proc.pretraining_images(specs, cfg.per_caption, cfg.seed)  # re-rendered: a few seconds
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(index).tobytes())
    return h.hexdigest()


def manifest_path(out: Path) -> Path:
    """The JSON manifest beside a built model."""
    return out.with_suffix(".json")


def is_built(out: Path, cfg: BuildConfig) -> bool:
    """True when `out` exists and its manifest names this exact config."""
    m = manifest_path(out)
    if not (out.is_file() and m.is_file()):
        return False
    try:
        return json.loads(m.read_text()).get("key") == cfg.key()
    except (OSError, ValueError):
        return False


def make_default_model(out: Optional[os.PathLike] = None, *, tiny: bool = False, minutes: Optional[float] = None,
                       seed: int = 0, force: bool = False, progress: bool = True, threads: Optional[int] = None,
                       cache_dir: Optional[os.PathLike] = None, log: Callable[[str], None] = print,
                       config: Optional[BuildConfig] = None) -> Path:
    """Build (or find) the default model; returns the checkpoint path.

    Work files live in `<cache_dir>/work-<config hash>/`; an interrupted build resumes from them.
    `threads` sets torch's intra-op threads (default 1; another count builds another model, see above).
    `config` overrides the whole configuration (experiments; tiny/minutes/seed/threads are then ignored).
    """
    cfg = config or BuildConfig.make(minutes, tiny, seed, threads=threads or 1)
    cache = Path(cache_dir) if cache_dir is not None else CACHE_DIR
    dest = Path(out) if out is not None else default_path(tiny, cache)
    if not force and is_built(dest, cfg):
        return dest
    torch = _torch()
    torch.set_num_threads(cfg.threads)
    pin_libraries()
    used = numerics()
    if used["cpu_capability"] != "AVX2":
        log(f"default model: CPU kernels are {used['cpu_capability']}, not the pinned AVX2 (torch was imported "
            "before PINNED_NUMERICS was set; run tools/build_default_model.py): this build is only "
            "reproducible on this kind of CPU")
    work = cache / f"work-{cfg.key()}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    # Text: the CLIP tensors are seeded, so they are regenerated rather than cached (250 MB).
    t0 = time.perf_counter()
    specs = proc.caption_pool(cfg.captions, cfg.seed)
    captions = [s.caption for s in specs] + [""]
    clip_sd = clip_state_dict(cfg.seed)
    cond_path = work / "conds.safetensors"
    if cond_path.is_file():
        from safetensors.torch import load_file
        conds = load_file(str(cond_path))["conds"]
    else:
        skeleton = assemble(cfg, _fresh_unet_sd(cfg), _fresh_vae_sd(cfg), clip_sd)
        clip = load_clip_as_comfy(skeleton)
        del skeleton
        conds = encode_captions(clip, captions, progress=progress)
        del clip
        _atomic_save_tensors({"conds": conds}, cond_path, {"captions": json.dumps(captions)})
    timings["text"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    vae_sd = train_vae(cfg, work, progress)
    timings["vae"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    latents, index = encode_pool(cfg, work, vae_sd, specs, progress)
    timings["latents"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    unet_sd = train_unet(cfg, work, latents, index, conds[:-1], conds[-1:], progress)
    timings["unet"] = time.perf_counter() - t0

    # Stage by stage, so two builds can be compared where they first differ.
    stages = {"data": _data_digest(cfg, specs, work), "text": tensor_digest({"conds": conds}),
              "vae": tensor_digest(vae_sd), "latents": tensor_digest({"latents": latents, "index": index}),
              "unet": tensor_digest(unet_sd)}
    t0 = time.perf_counter()
    sd = assemble(cfg, unet_sd, vae_sd, clip_sd)
    check_detection(sd)
    vae_report = json.loads((work / "vae_report.json").read_text()) if (work / "vae_report.json").is_file() else {}
    digest = tensor_digest(sd)
    meta = {"tlora.proving.format_version": str(FORMAT_VERSION), "tlora.proving.key": cfg.key(),
            "tlora.proving.config": json.dumps(dataclasses.asdict(cfg)),
            "tlora.proving.numerics": json.dumps(used), "tlora.proving.tensor_sha256": digest,
            "tlora.proving.stage_sha256": json.dumps(stages),
            "modelspec.architecture": "stable-diffusion-v1", "modelspec.title": "TLoRA proving-ground SD1.5"}
    dest.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save_tensors(sd, dest, meta)
    timings["export"] = time.perf_counter() - t0
    timings["total_this_run"] = time.perf_counter() - t_all
    manifest = {"key": cfg.key(), "config": dataclasses.asdict(cfg), "file": dest.name,
                "bytes": dest.stat().st_size, "timings_s": {k: round(v, 1) for k, v in timings.items()},
                "numerics": used, "tensor_sha256": digest, "stage_sha256": stages, "vae": vae_report,
                "built": time.strftime("%Y-%m-%d %H:%M:%S")}
    manifest_path(dest).write_text(json.dumps(manifest, indent=1))
    log(f"default model: {dest} ({dest.stat().st_size / 2 ** 20:.0f} MiB) in "
        f"{timings['total_this_run'] / 60:.1f} min ({', '.join(f'{k} {v:.0f}s' for k, v in timings.items())})")
    return dest


def _fresh_unet_sd(cfg: BuildConfig) -> dict:
    """Untrained twin weights (only the skeleton checkpoint that the text stage loads needs them)."""
    from .narrow import build_narrow_unet
    return build_narrow_unet(cfg.unet_width, seed=cfg.seed).state_dict()


def _narrow_vae(cfg: BuildConfig) -> Any:
    """The (slim) narrow TAESD twin of a config, freshly initialised."""
    from .narrow import NarrowTAESD
    enc, dec = cfg.vae_blocks
    return NarrowTAESD(cfg.vae_width, seed=cfg.seed, blocks={"encoder": tuple(enc), "decoder": tuple(dec)})


def _fresh_vae_sd(cfg: BuildConfig) -> dict:
    """Untrained narrow TAESD weights (for the skeleton checkpoint)."""
    return _narrow_vae(cfg).state_dict()


# --------------------------------------------------------------------------- using the model

def load(path: os.PathLike) -> tuple[Any, Any, Any]:
    """(ModelPatcher, CLIP, VAE) exactly as CheckpointLoaderSimple loads the file."""
    ensure_host()
    import comfy.sd
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=True, output_clip=True, embedding_directory=None)
    return model, clip, vae


def encode(clip: Any, text: str) -> list:
    """Conditioning for text, as the CLIPTextEncode node builds it."""
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


def generate(model: Any, clip: Any, vae: Any, prompt: str, seed: int = 0, *, negative: str = "",
             steps: int = 20, cfg: float = 5.0, sampler: str = "euler", scheduler: str = "normal",
             size: int = 64, batch: int = 1, positive_cond: Optional[list] = None,
             negative_cond: Optional[list] = None) -> np.ndarray:
    """uint8 (batch, size, size, 3) images for a prompt: KSampler's sampling and VAEDecode's decoding."""
    torch = _torch()
    import comfy.sample
    pos = positive_cond if positive_cond is not None else encode(clip, prompt)
    neg = negative_cond if negative_cond is not None else encode(clip, negative)
    latent = torch.zeros([batch, 4, size // 8, size // 8])
    noise = comfy.sample.prepare_noise(latent, seed)
    samples = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, latent,
                                  denoise=1.0, disable_pbar=True, seed=seed)
    images = vae.decode(samples)  # (B, H, W, 3) in [0, 1]
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
