"""Tables of the DiT families trained most in late 2026: Flux.2, Chroma, Z-Image, Wan 2.2, ERNIE-Image.

Each config holds what ComfyUI's model_detection reads from a released checkpoint and
generates every Linear the host's model code builds for it (comfy/ldm/flux for Flux.2,
comfy/ldm/chroma, comfy/ldm/lumina for Z-Image, comfy/ldm/wan, comfy/ldm/ernie), with its
weight shape, in the host's registration order. Groups are the roles of `tlora.arch.role_of`
(tests/host/test_dit.py checks rows, shapes, order and roles against the host's own model built
on the meta device). Nothing is imported from ComfyUI. These tables are refinements (planner
counts, kohya/musubi names, modelspec ids): training and loading work from the live model.
"""
from __future__ import annotations

from dataclasses import dataclass

P = "diffusion_model."
Row = tuple[str, tuple[int, ...], str]


@dataclass(frozen=True)
class Flux2Config:
    """Flux.2 (comfy/ldm/flux with image_model flux2): global modulations, SwiGLU MLPs, no biases."""

    hidden: int = 6144  # 48 heads x 128
    depth: int = 8
    depth_single: int = 48
    context: int = 15360  # Mistral Small 3.x: three layers of 5120 stacked
    guidance: bool = True  # dev has guidance_in; Klein does not
    in_channels: int = 128  # 32 VAE channels x 2x2, patch 1
    mlp_ratio: float = 3.0

    def modules(self) -> list[Row]:
        """Every adaptable linear as (name, weight shape, group), in ComfyUI's order."""
        h, mlp = self.hidden, int(self.hidden * self.mlp_ratio)
        rows: list[Row] = [(f"{P}img_in", (h, self.in_channels), "embed"),
                           (f"{P}time_in.in_layer", (h, 256), "embed"), (f"{P}time_in.out_layer", (h, h), "embed")]
        if self.guidance:
            rows += [(f"{P}guidance_in.in_layer", (h, 256), "embed"), (f"{P}guidance_in.out_layer", (h, h), "embed")]
        rows.append((f"{P}txt_in", (h, self.context), "embed"))
        for i in range(self.depth):
            b = f"{P}double_blocks.{i}"
            for stream in ("img", "txt"):
                rows += [(f"{b}.{stream}_attn.qkv", (3 * h, h), "attn"), (f"{b}.{stream}_attn.proj", (h, h), "attn"),
                         (f"{b}.{stream}_mlp.0", (2 * mlp, h), "ff"), (f"{b}.{stream}_mlp.2", (h, mlp), "ff")]
        for i in range(self.depth_single):
            b = f"{P}single_blocks.{i}"
            rows += [(f"{b}.linear1", (3 * h + 2 * mlp, h), "attn"), (f"{b}.linear2", (h, h + mlp), "attn")]
        rows += [(f"{P}final_layer.linear", (self.in_channels, h), "embed"),
                 (f"{P}final_layer.adaLN_modulation.1", (2 * h, h), "mod"),
                 (f"{P}double_stream_modulation_img.lin", (6 * h, h), "mod"),
                 (f"{P}double_stream_modulation_txt.lin", (6 * h, h), "mod"),
                 (f"{P}single_stream_modulation.lin", (3 * h, h), "mod")]
        return rows


@dataclass(frozen=True)
class ChromaConfig:
    """Chroma (comfy/ldm/chroma): Flux.1's blocks without modulation linears, a distilled guidance MLP."""

    hidden: int = 3072
    depth: int = 19
    depth_single: int = 38
    context: int = 4096  # T5-XXL
    in_channels: int = 64  # 16 x 2x2
    approx_in: int = 64
    approx_hidden: int = 5120
    approx_layers: int = 5

    def modules(self) -> list[Row]:
        """Every adaptable linear as (name, weight shape, group), in ComfyUI's order."""
        h, mlp, a = self.hidden, 4 * self.hidden, self.approx_hidden
        rows: list[Row] = [(f"{P}img_in", (h, self.in_channels), "embed"), (f"{P}txt_in", (h, self.context), "embed"),
                           (f"{P}distilled_guidance_layer.in_proj", (a, self.approx_in), "embed")]
        for i in range(self.approx_layers):
            rows += [(f"{P}distilled_guidance_layer.layers.{i}.in_layer", (a, a), "embed"),
                     (f"{P}distilled_guidance_layer.layers.{i}.out_layer", (a, a), "embed")]
        rows.append((f"{P}distilled_guidance_layer.out_proj", (h, a), "embed"))
        for i in range(self.depth):
            b = f"{P}double_blocks.{i}"
            for stream in ("img", "txt"):
                rows += [(f"{b}.{stream}_attn.qkv", (3 * h, h), "attn"), (f"{b}.{stream}_attn.proj", (h, h), "attn"),
                         (f"{b}.{stream}_mlp.0", (mlp, h), "ff"), (f"{b}.{stream}_mlp.2", (h, mlp), "ff")]
        for i in range(self.depth_single):
            b = f"{P}single_blocks.{i}"
            rows += [(f"{b}.linear1", (3 * h + mlp, h), "attn"), (f"{b}.linear2", (h, h + mlp), "attn")]
        rows.append((f"{P}final_layer.linear", (self.in_channels, h), "embed"))
        return rows


@dataclass(frozen=True)
class ZImageConfig:
    """Z-Image (comfy/ldm/lumina NextDiT with z_image_modulation): fused attention.qkv, SwiGLU w1/w2/w3."""

    dim: int = 3840  # 30 heads x 128
    layers: int = 30
    refiner_layers: int = 2
    context: int = 2560  # Qwen3-4B
    in_channels: int = 16
    patch: int = 2
    ffn_multiplier: float = 8.0 / 3.0
    multiple_of: int = 256
    t_hidden: int | None = None  # the timestep MLP's width: ComfyUI min(dim, 1024), diffusers 1024
    t_out: int = 256  # its output (the modulation's input): ComfyUI 256, diffusers min(dim, 256)

    def modules(self) -> list[Row]:
        """Every adaptable linear as (name, weight shape, group), in ComfyUI's order."""
        d, patch_in = self.dim, self.patch * self.patch * self.in_channels
        ffn = int(self.ffn_multiplier * d)
        ffn = self.multiple_of * ((ffn + self.multiple_of - 1) // self.multiple_of)
        adaln_in, t_hidden = min(d, 256), self.t_hidden or min(d, 1024)

        def block(b: str, modulation: bool) -> list[Row]:
            rows: list[Row] = [(f"{b}.attention.qkv", (3 * d, d), "attn"), (f"{b}.attention.out", (d, d), "attn"),
                               (f"{b}.feed_forward.w1", (ffn, d), "ff"), (f"{b}.feed_forward.w2", (d, ffn), "ff"),
                               (f"{b}.feed_forward.w3", (ffn, d), "ff")]
            if modulation:
                rows.append((f"{b}.adaLN_modulation.0", (4 * d, adaln_in), "mod"))
            return rows

        rows: list[Row] = [(f"{P}x_embedder", (d, patch_in), "embed")]
        for i in range(self.refiner_layers):
            rows += block(f"{P}noise_refiner.{i}", True)
        for i in range(self.refiner_layers):
            rows += block(f"{P}context_refiner.{i}", False)
        rows += [(f"{P}t_embedder.mlp.0", (t_hidden, 256), "embed"),
                 (f"{P}t_embedder.mlp.2", (self.t_out, t_hidden), "embed"),
                 (f"{P}cap_embedder.1", (d, self.context), "embed")]
        for i in range(self.layers):
            rows += block(f"{P}layers.{i}", True)
        rows += [(f"{P}final_layer.linear", (patch_in, d), "embed"),
                 (f"{P}final_layer.adaLN_modulation.1", (d, adaln_in), "mod")]
        return rows


@dataclass(frozen=True)
class WanConfig:
    """Wan 2.1/2.2 (comfy/ldm/wan WanModel, text-to-video): unfused q/k/v/o, GELU MLP, one time projection."""

    dim: int = 5120
    ffn: int = 13824
    layers: int = 40
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096  # umT5-XXL
    freq_dim: int = 256

    def modules(self) -> list[Row]:
        """Every adaptable linear as (name, weight shape, group), in ComfyUI's order."""
        d = self.dim
        rows: list[Row] = [(f"{P}text_embedding.0", (d, self.text_dim), "embed"), (f"{P}text_embedding.2", (d, d), "embed"),
                           (f"{P}time_embedding.0", (d, self.freq_dim), "embed"),
                           (f"{P}time_embedding.2", (d, d), "embed"), (f"{P}time_projection.1", (6 * d, d), "mod")]
        for i in range(self.layers):
            b = f"{P}blocks.{i}"
            for attn in ("self_attn", "cross_attn"):
                rows += [(f"{b}.{attn}.{p}", (d, d), "attn") for p in ("q", "k", "v", "o")]
            rows += [(f"{b}.ffn.0", (self.ffn, d), "ff"), (f"{b}.ffn.2", (d, self.ffn), "ff")]
        rows.append((f"{P}head.head", (4 * self.out_dim, d), "embed"))  # patch (1, 2, 2)
        return rows


@dataclass(frozen=True)
class ErnieImageConfig:
    """ERNIE-Image (comfy/ldm/ernie): one shared AdaLN, unfused attention, SwiGLU MLP (the detected defaults)."""

    hidden: int = 4096
    layers: int = 36
    ffn: int = 12288
    text_in: int = 3072  # Ministral 3B
    out_channels: int = 128
    patch: int = 1

    def modules(self) -> list[Row]:
        """Every adaptable linear as (name, weight shape, group), in ComfyUI's order."""
        h = self.hidden
        rows: list[Row] = []
        if self.text_in != h:
            rows.append((f"{P}text_proj", (h, self.text_in), "embed"))
        rows += [(f"{P}time_embedding.linear_1", (h, h), "embed"), (f"{P}time_embedding.linear_2", (h, h), "embed"),
                 (f"{P}adaLN_modulation.1", (6 * h, h), "mod")]
        for i in range(self.layers):
            b = f"{P}layers.{i}"
            rows += [(f"{b}.self_attention.{p}", (h, h), "attn") for p in ("to_q", "to_k", "to_v")]
            rows.append((f"{b}.self_attention.to_out.0", (h, h), "attn"))
            rows += [(f"{b}.mlp.gate_proj", (self.ffn, h), "ff"), (f"{b}.mlp.up_proj", (self.ffn, h), "ff"),
                     (f"{b}.mlp.linear_fc2", (h, self.ffn), "ff")]
        rows += [(f"{P}final_norm.linear", (2 * h, h), "mod"),
                 (f"{P}final_linear", (self.patch * self.patch * self.out_channels, h), "embed")]
        return rows


def from_diffusers(class_name: str, c: dict) -> tuple[str, object] | None:
    """(family, table config) of a diffusers transformer from its class name and config (any size), else None.

    The one reader of diffusers transformer configs (the diffusers binding and SD.Next's renaming both
    use it). Raises ValueError for an SD3 whose width is not 64 x depth (ComfyUI's names assume it).
    """
    from . import arch  # noqa: PLC0415 (arch imports this module's configs)
    heads = int(c.get("num_attention_heads", 0) or 0) * int(c.get("attention_head_dim", 0) or 0)
    if class_name == "FluxTransformer2DModel":
        return "flux", arch.FluxConfig(heads, int(c["num_layers"]), int(c["num_single_layers"]), 4.0,
                                       int(c["in_channels"]), int(c["joint_attention_dim"]),
                                       int(c["pooled_projection_dim"]), bool(c.get("guidance_embeds", False)))
    if class_name == "SD3Transformer2DModel":
        depth = int(c["num_layers"])
        if heads != 64 * depth:
            raise ValueError(f"SD3 transformer with {heads} channels at depth {depth}: ComfyUI's generic names "
                             f"assume 64 x depth channels (as every released SD3/SD3.5)")
        return "sd3", arch.MMDiTConfig(depth, tuple(c.get("dual_attention_layers", ()) or ()))
    if class_name == "QwenImageTransformer2DModel":
        return "qwen-image", arch.QwenImageConfig(int(c["num_layers"]), heads, int(c["in_channels"]),
                                                  int(c["joint_attention_dim"]))
    if class_name == "Flux2Transformer2DModel":
        return "flux2", Flux2Config(heads, c["num_layers"], c["num_single_layers"], c["joint_attention_dim"],
                                    bool(c.get("guidance_embeds", True)), c.get("in_channels", 128),
                                    float(c.get("mlp_ratio", 3.0)))
    if class_name == "ChromaTransformer2DModel":
        return "chroma", ChromaConfig(heads, c["num_layers"], c["num_single_layers"], c["joint_attention_dim"],
                                      c.get("in_channels", 64), c["approximator_num_channels"],
                                      c["approximator_hidden_dim"], c["approximator_layers"])
    if class_name == "ZImageTransformer2DModel":
        # diffusers sizes the SwiGLU as int(8 / 3 x dim), unrounded, and its timestep MLP 1024 wide: the same as
        # ComfyUI's at Z-Image's 3840 (the released table then compares equal); smaller twins differ.
        d = c["dim"]
        small = {} if d >= 1024 and int(8 / 3 * d) % 256 == 0 else \
            {"multiple_of": 1, "t_hidden": 1024, "t_out": min(d, 256)}
        return "z-image", ZImageConfig(d, c["n_layers"], c["n_refiner_layers"], c["cap_feat_dim"],
                                       c.get("in_channels", 16), tuple(c.get("all_patch_size", (2,)))[0], **small)
    if class_name == "WanTransformer3DModel":
        return "wan", WanConfig(heads, c["ffn_dim"], c["num_layers"], c["in_channels"], c["out_channels"],
                                c["text_dim"], c.get("freq_dim", 256))
    if class_name == "ErnieImageTransformer2DModel":
        return "ernie-image", ErnieImageConfig(c["hidden_size"], c["num_layers"], c["ffn_hidden_size"],
                                               c["text_in_dim"], c.get("out_channels", 128), c.get("patch_size", 1))
    return None
