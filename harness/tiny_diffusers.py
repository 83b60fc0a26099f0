"""Tiny diffusers pipelines built from configs in Python (nothing downloaded), seeded, saved as folders.

    from harness import tiny_diffusers as td
    folder = td.save_sd15(tmp_path / "sd15", seed=0)     # a StableDiffusionPipeline folder
    pipe = td.sd15(seed=0)                                # the same pipeline in memory

The tokenizer is CLIP's real vocabulary as ComfyUI ships it (`.host/ComfyUI/comfy/sd1_tokenizer`,
installed by the bootstrap); every model is random, seeded per component. Needs diffusers and
transformers (the `.venv-diffusers` environment).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / ".host" / "ComfyUI" / "comfy" / "sd1_tokenizer"
T5_TOKENIZER_DIR = ROOT / ".host" / "ComfyUI" / "comfy" / "text_encoders" / "t5_tokenizer"

# Small but real: two UNet levels (one with cross-attention), a 4-level (8x) VAE, a 2-layer CLIP.
UNET_TINY = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=4, norm_num_groups=8)
# SD1.5's widths at one level: the shape the step benchmark compares with ComfyUI's binding.
UNET_WIDE = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320,),
                 down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
VAE_TINY = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                norm_num_groups=8, sample_size=64)
CLIP_TINY = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, projection_dim=32)


def _seeded(seed: int, build: Any) -> Any:
    torch.manual_seed(seed)
    return build()


def tokenizer() -> Any:
    """CLIP's tokenizer from the vocabulary files ComfyUI ships."""
    from transformers import CLIPTokenizer
    if not TOKENIZER_DIR.is_dir():
        raise FileNotFoundError(f"{TOKENIZER_DIR} is missing: run `make bootstrap` (it installs ComfyUI)")
    # ComfyUI's copy says model_max_length 8192 (it chunks prompts itself); CLIP takes 77 tokens.
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True, model_max_length=77)


def t5_tokenizer() -> Any:
    """T5's tokenizer from the files ComfyUI ships for Flux/SD3."""
    from transformers import T5TokenizerFast
    if not T5_TOKENIZER_DIR.is_dir():
        raise FileNotFoundError(f"{T5_TOKENIZER_DIR} is missing: run `make bootstrap` (it installs ComfyUI)")
    return T5TokenizerFast.from_pretrained(str(T5_TOKENIZER_DIR), local_files_only=True)


# Flux.1-dev's layout at toy widths: one double and one single block, 2 heads of 16, guidance embedding.
FLUX_TINY = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))


def flux(seed: int = 0, transformer: dict[str, Any] | None = None) -> Any:
    """A tiny FluxPipeline (16-channel VAE, CLIP-L- and T5-shaped encoders sized to the transformer, flow-matching
    schedule with Flux.1-dev's dynamic shift)."""
    cfg = dict(transformer or FLUX_TINY)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    t5 = T5Config(vocab_size=32128, d_model=cfg["joint_attention_dim"], d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                  feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
        vae=_seeded(seed + 1, lambda: AutoencoderKL(**dict(VAE_TINY, latent_channels=16), shift_factor=0.1159,
                                                    scaling_factor=0.3611, use_quant_conv=False,
                                                    use_post_quant_conv=False)),
        text_encoder=_seeded(seed + 2, lambda: CLIPTextModel(CLIPTextConfig(
            **dict(CLIP_TINY, hidden_size=cfg["pooled_projection_dim"], intermediate_size=2 * cfg["pooled_projection_dim"])))),
        tokenizer=tokenizer(),
        text_encoder_2=_seeded(seed + 3, lambda: T5EncoderModel(t5)),
        tokenizer_2=t5_tokenizer(),
        transformer=_seeded(seed, lambda: FluxTransformer2DModel(**cfg)))


def save_flux(folder: str | os.PathLike, seed: int = 0, transformer: dict[str, Any] | None = None) -> str:
    """A tiny Flux pipeline folder."""
    return save(flux(seed, transformer), folder)


# SD3.5-medium's layout at toy widths: 2 joint blocks (hidden 2 x 64 = 64 x depth, as ComfyUI's names assume),
# the first with a second self-attention, the last context block pre-only; rms q/k norms.
SD3_TINY = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
                joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=32, out_channels=16,
                pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")


def sd3(seed: int = 0) -> Any:
    """A tiny StableDiffusion3Pipeline (16-channel VAE, CLIP-L/G with projections, T5, flow matching at shift 3)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    clip = dict(CLIP_TINY, hidden_size=16, intermediate_size=32, projection_dim=16)  # pooled: 16 + 16 = 32
    t5 = T5Config(vocab_size=32128, d_model=SD3_TINY["joint_attention_dim"], d_ff=64, d_kv=8, num_layers=2,
                  num_heads=4, feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    return StableDiffusion3Pipeline(
        transformer=_seeded(seed, lambda: SD3Transformer2DModel(**SD3_TINY)),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_seeded(seed + 1, lambda: AutoencoderKL(**dict(VAE_TINY, latent_channels=16), shift_factor=0.0609,
                                                    scaling_factor=1.5305)),
        text_encoder=_seeded(seed + 2, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**clip))),
        tokenizer=tokenizer(),
        text_encoder_2=_seeded(seed + 3, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**clip))),
        tokenizer_2=tokenizer(),
        text_encoder_3=_seeded(seed + 4, lambda: T5EncoderModel(t5)),
        tokenizer_3=t5_tokenizer())


def save_sd3(folder: str | os.PathLike, seed: int = 0) -> str:
    """A tiny SD3 pipeline folder."""
    return save(sd3(seed), folder)


def sd15(seed: int = 0, unet: dict[str, Any] | None = None, prediction_type: str = "epsilon") -> Any:
    """A tiny StableDiffusionPipeline (UNet, VAE, CLIP-L-shaped text encoder, DDPM schedule)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    unet_cfg = dict(unet or UNET_TINY)
    clip_cfg = dict(CLIP_TINY, hidden_size=unet_cfg["cross_attention_dim"],
                    intermediate_size=2 * unet_cfg["cross_attention_dim"])
    return StableDiffusionPipeline(
        vae=_seeded(seed + 1, lambda: AutoencoderKL(**VAE_TINY)),
        text_encoder=_seeded(seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**clip_cfg))),
        tokenizer=tokenizer(),
        unet=_seeded(seed, lambda: UNet2DConditionModel(**unet_cfg)),
        scheduler=DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                num_train_timesteps=1000, prediction_type=prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sdxl(seed: int = 0) -> Any:
    """A tiny StableDiffusionXLPipeline (two CLIP encoders, text_time conditioning)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    clip_1 = dict(CLIP_TINY, hidden_size=16, intermediate_size=32)
    clip_2 = dict(CLIP_TINY, hidden_size=16, intermediate_size=32, projection_dim=16)
    unet_cfg = dict(UNET_TINY, cross_attention_dim=32, use_linear_projection=True,
                    addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=16 + 6 * 8, transformer_layers_per_block=(1, 1))
    return StableDiffusionXLPipeline(
        vae=_seeded(seed + 1, lambda: AutoencoderKL(**VAE_TINY)),
        text_encoder=_seeded(seed + 2, lambda: CLIPTextModel(CLIPTextConfig(**clip_1))),
        text_encoder_2=_seeded(seed + 3, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**clip_2))),
        tokenizer=tokenizer(), tokenizer_2=tokenizer(),
        unet=_seeded(seed, lambda: UNet2DConditionModel(**unet_cfg)),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         num_train_timesteps=1000, prediction_type="epsilon"),
        force_zeros_for_empty_prompt=True)


def save(pipe: Any, folder: str | os.PathLike) -> str:
    """Save a pipeline as a diffusers folder (safetensors); returns the folder."""
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


def save_sd15(folder: str | os.PathLike, seed: int = 0, **kw: Any) -> str:
    """A tiny SD1.5 pipeline folder."""
    return save(sd15(seed, **kw), folder)


def save_sdxl(folder: str | os.PathLike, seed: int = 0) -> str:
    """A tiny SDXL pipeline folder."""
    return save(sdxl(seed), folder)


def write_images(folder: str | os.PathLike, count: int = 3, size: int = 64, captions: bool = True,
                 seed: int = 0) -> str:
    """`count` seeded RGB PNGs (a coloured square on a gradient) with `.txt` captions beside them."""
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for i in range(count):
        base = torch.linspace(0, 1, size)[None, :, None].expand(size, size, 3).clone()
        colour = torch.rand(3, generator=gen)
        lo, hi = size // 4 + i, 3 * size // 4
        base[lo:hi, lo:hi] = colour
        Image.fromarray((base * 255).round().to(torch.uint8).numpy()).save(os.path.join(folder, f"img{i}.png"))
        if captions:
            with open(os.path.join(folder, f"img{i}.txt"), "w", encoding="utf-8") as f:
                f.write(f"a photo of sks square number {i}")
    return str(folder)


# --------------------------------------------------------------------------- newer flow families
QWEN_TOKENIZER_DIR = ROOT / ".host" / "ComfyUI" / "comfy" / "text_encoders" / "qwen25_tokenizer"


def qwen_tokenizer() -> Any:
    """Qwen2.5's tokenizer (vocabulary, merges, chat template) from the files ComfyUI ships (Qwen3's is the same BPE)."""
    from transformers import Qwen2TokenizerFast
    if not QWEN_TOKENIZER_DIR.is_dir():
        raise FileNotFoundError(f"{QWEN_TOKENIZER_DIR} is missing: run `make bootstrap` (it installs ComfyUI)")
    return Qwen2TokenizerFast.from_pretrained(str(QWEN_TOKENIZER_DIR), local_files_only=True)


def _qwen3(hidden: int, seed: int) -> Any:
    from transformers import Qwen3Config, Qwen3Model
    return _seeded(seed, lambda: Qwen3Model(Qwen3Config(
        vocab_size=151936, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024)))


# Z-Image's layout at toy widths (one layer, one noise and one context refiner), a Qwen3-shaped encoder.
ZIMAGE_TINY = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=1,
                   n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12],
                   axes_lens=[64, 64, 64])


def zimage(seed: int = 0) -> Any:
    """A tiny ZImagePipeline (Flux-style 16-channel VAE, Qwen3-shaped text encoder, flow matching at shift 3)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_seeded(seed + 1, lambda: AutoencoderKL(**dict(VAE_TINY, latent_channels=16), shift_factor=0.1159,
                                                    scaling_factor=0.3611, use_quant_conv=False,
                                                    use_post_quant_conv=False)),
        text_encoder=_qwen3(ZIMAGE_TINY["cap_feat_dim"], seed + 2), tokenizer=qwen_tokenizer(),
        transformer=_seeded(seed, lambda: ZImageTransformer2DModel(**ZIMAGE_TINY)))


# Wan 2.1/2.2's layout at toy widths: one block, 2 heads of 32, a umT5-shaped encoder, a 16-channel video VAE.
WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
                text_dim=32, freq_dim=256, ffn_dim=128, num_layers=1)


def wan(seed: int = 0) -> Any:
    """A tiny WanPipeline (AutoencoderKLWan, umT5-shaped encoder with T5's tokenizer, flow matching at shift 3)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel
    te = UMT5Config(vocab_size=32128, d_model=WAN_TINY["text_dim"], d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                    feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    return WanPipeline(
        tokenizer=t5_tokenizer(), text_encoder=_seeded(seed + 2, lambda: UMT5EncoderModel(te)),
        transformer=_seeded(seed, lambda: WanTransformer3DModel(**WAN_TINY)),
        vae=_seeded(seed + 1, lambda: AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                                       temperal_downsample=[False, True, True])),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def save_zimage(folder: str | os.PathLike, seed: int = 0) -> str:
    """A tiny Z-Image pipeline folder."""
    return save(zimage(seed), folder)


def save_wan(folder: str | os.PathLike, seed: int = 0) -> str:
    """A tiny Wan pipeline folder."""
    return save(wan(seed), folder)


# Qwen-Image's layout at toy widths: one block, 2 heads of 32, a Qwen2.5-VL-shaped encoder (a one-block vision tower).
QWENIMAGE_TINY = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=32,
                      num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 12, 12))


def qwenimage(seed: int = 0) -> Any:
    """A tiny QwenImagePipeline (AutoencoderKLQwenImage, Qwen2.5-VL-shaped encoder, Qwen-Image's dynamic shift)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    te = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=QWENIMAGE_TINY["joint_attention_dim"], intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0]))
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                  base_image_seq_len=256, max_image_seq_len=8192),
        vae=_seeded(seed + 1, lambda: AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1],
                                                             num_res_blocks=1)),
        text_encoder=_seeded(seed + 2, lambda: Qwen2_5_VLForConditionalGeneration(te)), tokenizer=qwen_tokenizer(),
        transformer=_seeded(seed, lambda: QwenImageTransformer2DModel(**QWENIMAGE_TINY)))


def save_qwenimage(folder: str | os.PathLike, seed: int = 0) -> str:
    """A tiny Qwen-Image pipeline folder."""
    return save(qwenimage(seed), folder)


# Flux.2 Klein's layout at toy widths: one double and one single block, 2 heads of 32 (4 rope axes of 8), no
# guidance input; a 3-layer Qwen3-shaped encoder (its three layers stacked: 3 x 32 = 96 wide text states).
FLUX2_TINY = dict(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=32,
                  num_attention_heads=2, joint_attention_dim=96, axes_dims_rope=(8, 8, 8, 8), guidance_embeds=False)


def flux2_klein(seed: int = 0) -> Any:
    """A tiny Flux2KleinPipeline (the Flux.2 VAE with its batch-norm statistics, Qwen3-shaped encoder)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM
    te = Qwen3Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024)
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=_seeded(seed + 1, lambda: AutoencoderKLFlux2(block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                                                         norm_num_groups=8, latent_channels=32)),
        text_encoder=_seeded(seed + 2, lambda: Qwen3ForCausalLM(te)), tokenizer=qwen_tokenizer(),
        transformer=_seeded(seed, lambda: Flux2Transformer2DModel(**FLUX2_TINY)), is_distilled=False)


# Chroma's layout at toy widths: one double and one single block, a 2-layer guidance approximator, T5 text.
CHROMA_TINY = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
                   num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 12, 12),
                   approximator_num_channels=64, approximator_hidden_dim=64, approximator_layers=2)


def chroma(seed: int = 0) -> Any:
    """A tiny ChromaPipeline (Flux's 16-channel VAE, a T5-shaped encoder, Flux.1's dynamic shift)."""
    from diffusers import AutoencoderKL, ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel
    t5 = T5Config(vocab_size=32128, d_model=CHROMA_TINY["joint_attention_dim"], d_ff=64, d_kv=8, num_layers=2,
                  num_heads=4, feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    return ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
        vae=_seeded(seed + 1, lambda: AutoencoderKL(**dict(VAE_TINY, latent_channels=16), shift_factor=0.1159,
                                                    scaling_factor=0.3611, use_quant_conv=False,
                                                    use_post_quant_conv=False)),
        text_encoder=_seeded(seed + 2, lambda: T5EncoderModel(t5)), tokenizer=t5_tokenizer(),
        transformer=_seeded(seed, lambda: ChromaTransformer2DModel(**CHROMA_TINY)))


def save_flux2_klein(folder: str | os.PathLike, seed: int = 0) -> str:
    """A tiny Flux.2 Klein pipeline folder."""
    return save(flux2_klein(seed), folder)


def save_chroma(folder: str | os.PathLike, seed: int = 0) -> str:
    """A tiny Chroma pipeline folder."""
    return save(chroma(seed), folder)
