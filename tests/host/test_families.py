"""Every model family the host samples, one parametrised test module: roles, loading, training, checkpointing.

Twins come from the host's own classes (harness/tiny_families.py). What each check compares with:

* roles: the attention / MLP / modulation weights of each family as its host model code defines
  them, written out here per family (everything else is an embedder);
* loading: ComfyUI's stock LoraLoaderModelOnly and our loader against the float64 dense reference
  of tests/host/tlora_refs.py, whole weights by generic name and row slices of fused weights by
  the names the host's own key map gives them (diffusers names), at strengths 1, 0, 0.5, -1, and
  the base weights bit-exact after unpatching;
* training: 20 steps of the Train TLoRA node lower the host's own denoising error on the subject
  (its apply_model with its own sampling object, at fixed noise and noise levels); the trained
  file applies through both loaders as the dense reference says;
* checkpointing: the structurally found blocks recomputed in backward train the same adapter.

The full matrix runs on ComfyUI 0.33; older hosts run a smoke subset (skips name the version).
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from harness import comfy_host as ch
from harness import tiny_families as tf
from tests.host import tlora_refs as R
from tests.host.test_train import images, train

STRENGTHS = (1.0, 0.0, 0.5, -1.0)
FULL_MATRIX = ch.host_version() >= (0, 33)
SMOKE = ("flux2", "z-image", "wan22")  # what older hosts run

# Per family, the weights of each role as the host's model code defines them (regexes on the path
# under diffusion_model); every other linear is an embedder.
ROLES = {
    "flux": {"attn": r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)|single_blocks\.\d+\.linear[12]",
             "ff": r"double_blocks\.\d+\.(img|txt)_mlp\.[02]",
             "mod": r".*(_mod|modulation)\.lin|final_layer\.adaLN_modulation\.1"},
    "sd3": {"attn": r"joint_blocks\.\d+\.(x|context)_block\.attn2?\.(qkv|proj)",
            "ff": r"joint_blocks\.\d+\.(x|context)_block\.mlp\.fc[12]",
            "mod": r".*adaLN_modulation\.1"},
    "qwen-image": {"attn": r"transformer_blocks\.\d+\.attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)",
                   "ff": r"transformer_blocks\.\d+\.(img|txt)_mlp\.net\.(0\.proj|2)",
                   "mod": r"transformer_blocks\.\d+\.(img|txt)_mod\.1|norm_out\.linear"},
    "flux2": {"attn": r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)|single_blocks\.\d+\.linear[12]",
              "ff": r"double_blocks\.\d+\.(img|txt)_mlp\.[02]",
              "mod": r"(double|single)_stream_modulation(_img|_txt)?\.lin|final_layer\.adaLN_modulation\.1"},
    "chroma": {"attn": r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)|single_blocks\.\d+\.linear[12]",
               "ff": r"double_blocks\.\d+\.(img|txt)_mlp\.[02]", "mod": r"(?!)"},
    "z-image": {"attn": r"(noise_refiner|context_refiner|layers)\.\d+\.attention\.(qkv|out)",
                "ff": r"(noise_refiner|context_refiner|layers)\.\d+\.feed_forward\.w[123]",
                "mod": r"(noise_refiner|layers)\.\d+\.adaLN_modulation\.[01]|final_layer\.adaLN_modulation\.1"},
    "lumina2": {"attn": r"(noise_refiner|context_refiner|layers)\.\d+\.attention\.(qkv|out)",
                "ff": r"(noise_refiner|context_refiner|layers)\.\d+\.feed_forward\.w[123]",
                "mod": r"(noise_refiner|layers)\.\d+\.adaLN_modulation\.[01]|final_layer\.adaLN_modulation\.1"},
    "wan21": {"attn": r"blocks\.\d+\.(self|cross)_attn\.[qkvo]", "ff": r"blocks\.\d+\.ffn\.[02]",
              "mod": r"time_projection\.1"},
    "wan22": {"attn": r"blocks\.\d+\.(self|cross)_attn\.[qkvo]", "ff": r"blocks\.\d+\.ffn\.[02]",
              "mod": r"time_projection\.1"},
    "hidream": {"attn": r"(double|single)_stream_blocks\.\d+\.block\.attn1\.to_(q|k|v|out)(_t)?",
                "ff": r"(double|single)_stream_blocks\.\d+\.block\.ff_[it]\.((shared_)?experts(\.\d+)?\.)?w[123]",
                "mod": r"(double|single)_stream_blocks\.\d+\.block\.adaLN_modulation\.1|final_layer\.adaLN_modulation\.1"},
    "hunyuan-image-2.1": {
        "attn": r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)|single_blocks\.\d+\.linear[12]"
                r"|txt_in\.individual_token_refiner\.blocks\.\d+\.self_attn\.(qkv|proj)",
        "ff": r"double_blocks\.\d+\.(img|txt)_mlp\.[02]|txt_in\.individual_token_refiner\.blocks\.\d+\.mlp\.[02]",
        "mod": r".*(_mod|modulation)\.lin|.*adaLN_modulation\.1"},
    "krea2": {"attn": r"(blocks|txtfusion\.(layerwise|refiner)_blocks)\.\d+\.attn\.(wq|wk|wv|wo|gate)",
              "ff": r"(blocks|txtfusion\.(layerwise|refiner)_blocks)\.\d+\.mlp\.(gate|up|down)",
              "mod": r"tproj\.1"},
    "ernie-image": {"attn": r"layers\.\d+\.self_attention\.(to_[qkv]|to_out\.0)",
                    "ff": r"layers\.\d+\.mlp\.(gate_proj|up_proj|linear_fc2)",
                    "mod": r"adaLN_modulation\.1|final_norm\.linear"},
    "anima": {"attn": r"(llm_adapter\.)?blocks\.\d+\.(self|cross)_attn\.(q|k|v|o|output)_proj",
              "ff": r"blocks\.\d+\.mlp\.(layer[12])|llm_adapter\.blocks\.\d+\.mlp\.[02]",
              "mod": r"blocks\.\d+\.adaln_modulation_(self_attn|cross_attn|mlp)\.[12]|final_layer\.adaln_modulation\.[12]"},
}


def _params():
    out = []
    for name in tf.all_names():
        marks = []
        if not FULL_MATRIX and name not in SMOKE:
            marks.append(pytest.mark.skip(reason=f"{ch.host_label()}: the full family matrix runs on ComfyUI 0.33; "
                                                 f"this host runs the smoke subset {SMOKE}"))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.fixture(scope="module", params=_params())
def family(request, tm):
    """(name, tiny twin, its text encoder, a VAE with the family's latent channels)."""
    name = request.param
    reason = tf.missing_reason(name)
    if reason:
        pytest.skip(reason)
    twin = tf.tiny_family(name, seed=0)
    clip = tm.tiny_clip(seed=0, kind="sd3") if name == "sd3" else tf.text_clip(seed=0)
    vae = tf.family_vae(twin.model, seed=0)
    return name, twin, clip, vae


def _linears(twin) -> dict[str, tuple[int, ...]]:
    return {n: tuple(m.weight.shape) for n, m in twin.model.diffusion_model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def test_roles_on_the_twin(family):
    """tlora.arch.role_of gives every linear the role the family's model code gives it."""
    name, twin, _, _ = family
    role_of = R.pack("tlora.arch").role_of
    rules = ROLES[name]
    wrong = []
    for path in _linears(twin):
        want = next((role for role in ("attn", "ff", "mod") if re.fullmatch(rules[role], path)), "embed")
        if role_of(path) != want:
            wrong.append((path, role_of(path), want))
    assert not wrong, f"{name}: (path, got, want) {wrong[:6]}"


def _pick(shapes: dict[str, tuple[int, ...]], roles=("attn", "ff", "mod", "embed"), per_role: int = 4) -> dict:
    """A few weights of each role (keeps the dense references small on big twins)."""
    role_of = R.pack("tlora.arch").role_of
    out: dict[str, tuple[int, ...]] = {}
    for role in roles:
        paths = [p for p in shapes if role_of(p) == role]
        small = [p for p in paths if max(shapes[p]) <= 512]  # Anima's fixed 1024-wide LLM adapter: not needed
        paths = small or paths
        step = max(1, len(paths) // per_role)
        out.update({p: shapes[p] for p in paths[::step][:per_role]})
    return out


def _sliced_keys(twin) -> list[tuple[str, str, int, int]]:
    """(file key, weight key, first row, rows): the row slices of fused weights the host's key map names."""
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_unet(twin.model, {})
    out = []
    for file_key, target in key_map.items():
        if (isinstance(target, tuple) and target[1] is not None and target[1][0] == 0
                and file_key.startswith("transformer.")):
            out.append((file_key, target[0], target[1][1], target[1][2]))
    return out[:3]


def test_file_loads_exactly_through_both_loaders(family, loras_dir):
    """Whole weights (generic and kohya names) and fused-weight slices (the host key map's diffusers names)."""
    name, twin, _, _ = family
    picked = _pick(_linears(twin))
    # Every other weight by its kohya / musubi-tuner name (`lora_unet_` + the path with underscores).
    names = {p: (f"diffusion_model.{p}" if i % 2 == 0 else "lora_unet_" + p.replace(".", "_"))
             for i, p in enumerate(picked)}
    adapters = {names[p]: R.random_adapter(s, *R.KIND_CYCLE[i % 3], seed=10 + i)
                for i, (p, s) in enumerate(picked.items())}
    sliced = _sliced_keys(twin)
    sd = twin.model.state_dict()
    whole_keys = {f"diffusion_model.{p}.weight" for p in picked}
    sliced = [s for s in sliced if s[1] not in whole_keys][:2]  # one weight is never patched twice in a file
    for i, (file_key, weight, first, rows) in enumerate(sliced):
        adapters[file_key] = R.random_adapter((rows, sd[weight].shape[1]), *R.KIND_CYCLE[i % 3], seed=50 + i)
    R.write_tlora(loras_dir / f"fam_{name}.safetensors", adapters)
    keys = sorted(whole_keys | {w for _, w, _, _ in sliced})
    base = R.base_weights(twin.patcher, keys)
    for strength in STRENGTHS:
        expected = {k: base[k].double().clone() for k in keys}
        for p in picked:
            key = f"diffusion_model.{p}.weight"
            expected[key] = R.ref_patched(base[key], adapters[names[p]].tensors, strength)
        for file_key, weight, first, rows in sliced:
            expected[weight][first:first + rows] = R.ref_patched(base[weight][first:first + rows],
                                                                 adapters[file_key].tensors, strength)
        for label, patched in (("stock", R.stock_model_only(twin.patcher, f"fam_{name}.safetensors", strength)),
                               ("ours", R.tlora_model_only(twin.patcher, f"fam_{name}.safetensors", strength))):
            got = R.patched_weights(patched, keys)
            for key in keys:
                if strength == 0:
                    assert torch.equal(got[key], base[key]), f"{name} {label} {key} at 0"
                else:
                    R.assert_close64(got[key], expected[key], f"{name} {label} {key} at {strength}")
    R.assert_all_base(R.base_weights(twin.patcher, keys), base, f"{name} after unpatch")


def host_latents(base, vae, imgs, clip_frames=None):
    """The model's latents of stills (each one frame on video models) or of one clip, as VAE Encode makes them."""
    with torch.no_grad():
        if clip_frames is not None:
            raw = vae.encode(clip_frames[..., :3]).float()
            if raw.dim() == 4:  # an image VAE: frames stacked on the time axis
                raw = raw.movedim(0, 1)[None]
        elif getattr(vae, "latent_dim", 2) == 3:  # a video VAE reads a batch as one clip: stills one by one
            raw = torch.cat([vae.encode(img[None, ..., :3]).float() for img in imgs])
        else:
            raw = vae.encode(imgs[..., :3]).float()
            if getattr(base.latent_format, "latent_dimensions", 2) == 3:
                raw = raw.unsqueeze(2)  # an image as a video model's one frame
        return base.process_latent_in(raw)


def host_denoising_error(patcher, vae, clip, imgs, caption: str, clip_frames=None) -> float:
    """x0 error of the host's own apply_model with its own sampling object, fixed noise, three noise levels."""
    from harness import tiny_models as tm
    ch.free_models()
    patcher.patch_model(device_to=torch.device("cpu"))
    try:
        base = patcher.model
        ms = patcher.get_model_object("model_sampling")
        lat = host_latents(base, vae, imgs, clip_frames)
        with torch.no_grad():
            text = tm.encode_text(clip, caption)
            noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(0))
            total = 0.0
            for frac in (0.3, 0.5, 0.7):
                sigma = ms.sigmas[int(frac * (len(ms.sigmas) - 1))].expand(lat.shape[0]).float()
                x = ms.noise_scaling(sigma, noise, lat)
                extras = {k: v for k, v in text[0][1].items() if isinstance(v, torch.Tensor)}
                extras = {k: v.expand(lat.shape[0], *v.shape[1:]) for k, v in extras.items()}
                conds = base.extra_conds(noise=x, cross_attn=text[0][0].expand(lat.shape[0], -1, -1),
                                         device=x.device, **extras)
                kwargs = {k: v.process_cond(batch_size=x.shape[0], device=x.device).cond for k, v in conds.items()}
                denoised = base.apply_model(x, sigma, **kwargs)
                total += float(((denoised.float() - lat) ** 2).mean())
        return total / 3
    finally:
        patcher.unpatch_model(device_to=torch.device("cpu"))


def _node_conditioned(name: str) -> None:
    """Skip where this host cannot make the family's conditioning through a CLIP (its text encoder's files)."""
    if name == "hidream":
        tokenizer = ch.comfy_dir() / "comfy" / "text_encoders" / "llama_tokenizer" / "tokenizer.json"
        if not tokenizer.is_file():
            pytest.skip(f"HiDream's text encoder (its conditioning_llama3 input) needs the Llama-3 tokenizer "
                        f"{ch.host_label()}'s snapshot lacks ({tokenizer.name} in comfy/text_encoders/llama_tokenizer)")


def test_training_lowers_the_hosts_denoising_error(family, loras_dir):
    """20 steps of the node on two images: the host's own denoising error falls; both loaders apply the file."""
    name, twin, clip, vae = family
    _node_conditioned(name)
    imgs, caption = images(n=2, size=64, seed=4), "a photo of sks dog"
    out = train(twin, clip, vae, imgs, instance_prompt=caption, steps=20, learning_rate=1e-2, loss="mse",
                output_name=f"fam_train_{name}", batch_size=2, targets="attn-ff")
    payload = out[2]
    assert payload["steps"] == 20 and all(math.isfinite(h["loss"]) for h in payload["history"])
    assert payload["metadata"]["tlora.train.prediction"] == "flow"
    file_name = payload["file_name"]
    before = host_denoising_error(twin.patcher, vae, clip, imgs, caption)
    after = host_denoising_error(R.tlora_model_only(twin.patcher, file_name, 1.0), vae, clip, imgs, caption)
    assert after < 0.95 * before, f"{name}: the host's denoising error {before:.4f} -> {after:.4f}"
    adapters = R.pack("tlora.format").load_file(str(loras_dir / file_name))
    role_of = R.pack("tlora.arch").role_of
    assert sorted(adapters) == sorted(f"diffusion_model.{p}" for p in _linears(twin) if role_of(p) in ("attn", "ff"))
    keys = [f"{p}.weight" for p in list(adapters)[:8]]
    base = R.base_weights(twin.patcher, keys)
    for patched in (R.stock_model_only(twin.patcher, file_name, 1.0), R.tlora_model_only(twin.patcher, file_name, 1.0)):
        got = R.patched_weights(patched, keys)
        for key in keys:
            R.assert_close64(got[key], R.ref_patched(base[key], adapters[key[:-7]].tensors, 1.0), f"{name} {key}")


def test_checkpointed_training_equals_plain(family):
    """The repeated blocks found by structure, recomputed in backward, train the same adapter."""
    name, twin, clip, vae = family
    _node_conditioned(name)
    blocks = R.pack("trainer.comfy.model").checkpoint_blocks(twin.model.diffusion_model)
    assert blocks, f"{name}: no repeated blocks found"
    calls = []
    handles = [m.register_forward_hook(lambda *a: calls.append(1)) for b in blocks for m in b.modules()
               if isinstance(m, torch.nn.Linear)]
    runs, counts = [], []
    try:
        for flag in (False, True):
            calls.clear()
            runs.append(train(twin, clip, vae, images(n=2, size=64, seed=4), steps=3, learning_rate=5e-3, loss="mse",
                              output_name=f"fam_gc_{name}", gradient_checkpointing=flag)[2]["adapters"])
            counts.append(len(calls))
    finally:
        for handle in handles:
            handle.remove()
    assert counts[1] > counts[0], f"{name}: the block was not recomputed in backward ({counts})"
    assert runs[0].keys() == runs[1].keys()
    for prefix in runs[0]:
        for tensor_name, t in runs[0][prefix].tensors.items():
            torch.testing.assert_close(runs[1][prefix].tensors[tensor_name], t, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name} {prefix}.{tensor_name}: {m}")


@pytest.mark.parametrize("name", ["wan21", "wan22"])
def test_video_family_trains_on_stills_and_clips(tm, loras_dir, name):
    """Stills as one frame and a clip through the node's `clips` input; the host's error on the clip falls.

    Wan 2.1 with the host's own (tiny) Wan video VAE: a 5-frame clip is 2 latent frames; Wan 2.2's
    48-channel twin with a TAESD encoding frame by frame.
    """
    if not FULL_MATRIX and name not in SMOKE:
        pytest.skip(f"{ch.host_label()}: the full family matrix runs on ComfyUI 0.33")
    reason = tf.missing_reason(name)
    if reason:
        pytest.skip(reason)
    twin = tf.tiny_family(name, seed=1)
    vae = tf.tiny_wan_vae(seed=0) if name == "wan21" else tf.family_vae(twin.model, seed=0)
    clip = tf.text_clip(seed=0)
    stills = images(n=2, size=64, seed=4)
    frames = torch.stack([images(n=1, size=64, seed=4)[0].roll(2 * i, dims=1) for i in range(5)])  # a slow pan
    caption = "a photo of sks dog"
    out = train(twin, clip, vae, stills, instance_prompt=caption, steps=20, learning_rate=1e-2, loss="mse",
                output_name=f"video_{name}", batch_size=1, targets="attn-ff", clips=[frames])
    payload = out[2]
    assert payload["steps"] == 20 and all(math.isfinite(h["loss"]) for h in payload["history"])
    if name == "wan21":
        assert tuple(host_latents(twin.model, vae, stills, frames).shape[2:3]) == (2,)  # 5 frames -> 2 latent frames
    before = host_denoising_error(twin.patcher, vae, clip, stills, caption, clip_frames=frames)
    after = host_denoising_error(R.tlora_model_only(twin.patcher, payload["file_name"], 1.0), vae, clip, stills,
                                 caption, clip_frames=frames)
    assert after < 0.95 * before, f"{name}: the host's denoising error on the clip {before:.4f} -> {after:.4f}"


def test_clips_on_an_image_model_are_refused(tm):
    """A clip given to an image model is refused in one line before training."""
    twin = tf.tiny_family("flux2", seed=0)
    with pytest.raises(Exception, match=r"^video clips need a video model; Flux2 takes image latents"):
        train(twin, tf.text_clip(seed=0), tf.family_vae(twin.model), images(n=1, size=64), steps=1,
              output_name="clip_on_image", clips=[images(n=3, size=64)])


def test_musubi_z_image_names_load_through_our_loader(tm, loras_dir):
    """musubi-tuner's Z-Image names (`lora_unet_layers_0_attention_to_q`: the kohya form of the diffusers slice) are
    read by our loader as the q rows of the fused attention.qkv (dense reference); ComfyUI's stock map lacks them."""
    if tf.missing_reason("z-image"):
        pytest.skip(tf.missing_reason("z-image"))
    twin = tf.tiny_family("z-image", seed=2)
    import comfy.lora
    if "layers.0.attention.to_q" not in comfy.lora.model_lora_keys_unet(twin.model, {}):
        pytest.skip(f"{ch.host_label()}'s key map has no diffusers names for Z-Image (their kohya forms follow them)")
    key = "diffusion_model.layers.0.attention.qkv.weight"
    base = R.base_weights(twin.patcher, [key])[key]
    d = base.shape[1]
    adapters = {"lora_unet_layers_0_attention_to_q": R.random_adapter((d, d), seed=3),
                "lora_unet_layers_0_attention_to_v": R.random_adapter((d, d), "trm:1", "lora:4", seed=4)}
    R.write_tlora(loras_dir / "musubi_zimage.safetensors", adapters)
    for strength in (1.0, 0.5, -1.0):
        got = R.patched_weights(R.tlora_model_only(twin.patcher, "musubi_zimage.safetensors", strength), [key])[key]
        expected = base.double().clone()
        expected[:d] = R.ref_patched(base[:d], adapters["lora_unet_layers_0_attention_to_q"].tensors, strength)
        expected[2 * d:] = R.ref_patched(base[2 * d:], adapters["lora_unet_layers_0_attention_to_v"].tensors, strength)
        R.assert_close64(got, expected, f"musubi names at {strength}")
    R.assert_all_base(R.base_weights(twin.patcher, [key]), {key: base}, "after unpatch")


def test_wan_diffusers_names_load_through_our_loader(tm, loras_dir):
    """Wan files named as diffusers and its trainers write them (`transformer.blocks.0.attn1.to_q`) apply through our
    loader to the host's `self_attn.q` (dense reference); ComfyUI's own key map has no diffusers names for Wan."""
    if tf.missing_reason("wan21"):
        pytest.skip(tf.missing_reason("wan21"))
    twin = tf.tiny_family("wan21", seed=2)
    keys = {"transformer.blocks.0.attn1.to_q": "diffusion_model.blocks.0.self_attn.q.weight",
            "transformer.blocks.0.attn2.to_out.0": "diffusion_model.blocks.0.cross_attn.o.weight",
            "transformer.blocks.0.ffn.net.0.proj": "diffusion_model.blocks.0.ffn.0.weight"}
    base = R.base_weights(twin.patcher, list(keys.values()))
    adapters = {name: R.random_adapter(tuple(base[w].shape), *R.KIND_CYCLE[i], seed=10 + i)
                for i, (name, w) in enumerate(keys.items())}
    R.write_tlora(loras_dir / "wan_diffusers.safetensors", adapters)
    for strength in (1.0, 0.0, 0.5, -1.0):
        got = R.patched_weights(R.tlora_model_only(twin.patcher, "wan_diffusers.safetensors", strength),
                                list(keys.values()))
        for name, w in keys.items():
            R.assert_close64(got[w], R.ref_patched(base[w], adapters[name].tensors, strength), f"{name} at {strength}")
    R.assert_all_base(R.base_weights(twin.patcher, list(keys.values())), base, "after unpatch")
