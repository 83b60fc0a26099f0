"""Bad adapter files in real ComfyUI: clear node errors, nothing half-applied, the host keeps serving."""
from __future__ import annotations

import json
import logging
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file as st_save

from harness import comfy_host as ch
from harness import graphs
from tests.host import tlora_refs as R
from tests.host.tlora_refs import assert_all_base, stock_model_only, tlora_model_only, unet_shapes


@pytest.fixture(scope="module")
def sd15(tm):
    """(TinyModel, {weight key: base weight})."""
    m = tm.tiny_sd15(seed=0)
    return m, tm.state_fingerprint(m.model)


def tlora_errors():
    """The pack's TLoRAError class (the pack is imported under a mangled name) and the core's."""
    from tlora.errors import TLoRAError
    return (R.pack("tlora.errors").TLoRAError, TLoRAError)


def raw_tlora(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """A safetensors file written without the core's checks (to make it bad on purpose)."""
    st_save({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def good_state(shapes: dict, seed: int = 0) -> dict:
    """{`<prefix>.<suffix>`: tensor} of valid adapters for these weights."""
    return {f"{p}.{s}": t for p, a in R.random_adapters(shapes, seed=seed).items() for s, t in a.tensors.items()}


class Marker:
    """Pickled, it would create a file when unpickled (it must never be)."""

    def __init__(self, path: str) -> None:
        """Remember where the marker would go."""
        self.path = path

    def __reduce__(self) -> tuple:
        """Unpickling calls open(path, "w")."""
        return (open, (self.path, "w"))


# --------------------------------------------------------------------------- file builders

def make_truncated(d: Path, shapes: dict) -> str:
    """A valid file cut in the middle of its tensor data."""
    p = d / "bad_truncated.safetensors"
    R.write_tlora(p, R.random_adapters(shapes))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    return p.name


def make_empty(d: Path, shapes: dict) -> str:
    """A zero-byte file."""
    (d / "bad_empty.safetensors").write_bytes(b"")
    return "bad_empty.safetensors"


def make_garbage_header(d: Path, shapes: dict) -> str:
    """A plausible header length followed by bytes that are not JSON."""
    (d / "bad_header.safetensors").write_bytes(struct.pack("<Q", 16) + b"\xff{not json!!}\x00\x01" + b"\0" * 64)
    return "bad_header.safetensors"


def make_wrong_shapes(d: Path, shapes: dict) -> str:
    """Valid adapters for weights 16 wider than the model's."""
    wide = {p: (s[0] + 16, s[1] + 16, *s[2:]) for p, s in shapes.items()}
    R.write_tlora(d / "bad_shapes.safetensors", R.random_adapters(wide))
    return "bad_shapes.safetensors"


def make_nan(d: Path, shapes: dict) -> str:
    """One NaN in one transform core."""
    sd = good_state(shapes)
    key = next(k for k in sd if k.endswith(".tlora_t.0"))
    sd[key] = sd[key].clone()
    sd[key].view(-1)[3] = float("nan")
    raw_tlora(d / "bad_nan.safetensors", sd)
    return "bad_nan.safetensors"


def make_int_dtype(d: Path, shapes: dict) -> str:
    """Integer tensors where cores belong."""
    sd = good_state(shapes)
    key = next(k for k in sd if k.endswith(".tlora_r.up"))
    sd[key] = sd[key].to(torch.int32)
    raw_tlora(d / "bad_int.safetensors", sd)
    return "bad_int.safetensors"


def make_pickle(d: Path, shapes: dict) -> str:
    """A classic pickle that would create a marker file if anything unpickled it."""
    (d / "bad_pickle.ckpt").write_bytes(pickle.dumps({"x.tlora_scale": Marker(str(d / "UNPICKLED"))}, protocol=4))
    return "bad_pickle.ckpt"


def make_torch_zip(d: Path, shapes: dict) -> str:
    """A torch.save checkpoint (zip) named like an adapter."""
    torch.save({k: v for k, v in good_state(shapes).items()}, str(d / "bad_torch.pt"))
    return "bad_torch.pt"


def make_plain_lora(d: Path, shapes: dict) -> str:
    """A plain LoRA file (not a TLoRA) given to the TLoRA loader."""
    R.write_lora(d / "bad_is_lora.safetensors", {R.kohya_unet(p): v for p, v in R.random_lora(shapes).items()})
    return "bad_is_lora.safetensors"


def make_future_version(d: Path, shapes: dict) -> str:
    """A file from a newer format version."""
    raw_tlora(d / "bad_future.safetensors", good_state(shapes), {"tlora.version": "7", "tlora.config": "{}"})
    return "bad_future.safetensors"


def make_misnumbered(d: Path, shapes: dict) -> str:
    """Transform cores numbered 0, 2 (core 1 missing)."""
    sd = good_state(shapes)
    prefix = next(k for k in sd if k.endswith(".tlora_t.1")).rsplit(".tlora_t.", 1)[0]
    sd[f"{prefix}.tlora_t.2"] = sd.pop(f"{prefix}.tlora_t.1")
    raw_tlora(d / "bad_numbering.safetensors", sd)
    return "bad_numbering.safetensors"


# (builder, regex the node error must match)
BAD_FILES = {
    "truncated": (make_truncated, r"truncated or corrupted"),
    "empty": (make_empty, r"truncated or empty file"),
    "garbage_header": (make_garbage_header, r"corrupted safetensors header"),
    "wrong_shapes": (make_wrong_shapes, r"does not fit this model: (\d+) of \1 modules did not match .*"
                                        r"transform is 48-wide but the weight has 32 inputs.*Nothing was applied"),
    "nan": (make_nan, r"tensor 'tlora_t\.0' has NaN or infinite values"),
    "int_dtype": (make_int_dtype, r"tensor 'tlora_r\.up' has dtype I32"),
    "pickle": (make_pickle, r"not a safetensors file but a Python pickle; .*never unpickled"),
    "torch_zip": (make_torch_zip, r"not a safetensors file but a zip archive"),
    "plain_lora": (make_plain_lora, r"no TLoRA tensors in this file.*is it a LoRA"),
    "future_version": (make_future_version, r"format version 7.*update ComfyUI-TLoRA"),
    "misnumbered": (make_misnumbered, r"core numbering of tlora_t\.<d> is not 0\.\.D-1"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_gives_a_clear_error_and_changes_nothing(sd15, loras_dir, case):
    m, base = sd15
    builder, pattern = BAD_FILES[case]
    name = builder(loras_dir, unet_shapes(m.model))
    with pytest.raises(tlora_errors(), match=pattern) as err:
        tlora_model_only(m.patcher, name, 1.0)
    msg = str(err.value)
    assert "\n" not in msg, "node errors are one line"
    assert msg.startswith(f"TLoRA {name!r}") and str(loras_dir) not in msg, msg
    assert not m.patcher.patches, "the input model must not be modified"
    assert_all_base(R.patched_weights(m.patcher), base, case)
    assert not (loras_dir / "UNPICKLED").exists(), "a pickle was unpickled"


def _sdxl_file(d: Path) -> str:
    """A real-SDXL-shaped adapter (arch sdxl in its config) for a few SDXL attention modules."""
    from tlora import targets
    sdxl = targets("sdxl")
    pick = [p for p in sdxl if p.startswith("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.")]
    pick += [p for p in sdxl if p.startswith("diffusion_model.middle_block.1.transformer_blocks.0.attn2.")]
    adapters = R.random_adapters({p: sdxl[p] for p in pick}, kinds=(("trm:1", "lora:1"),))
    R.write_tlora(d / "sdxl_adapter.safetensors", adapters, config={"arch": "sdxl"})
    return "sdxl_adapter.safetensors"


def test_sdxl_adapter_on_an_sd15_model(sd15, loras_dir):
    m, base = sd15
    name = _sdxl_file(loras_dir)
    with pytest.raises(tlora_errors()) as err:
        tlora_model_only(m.patcher, name, 1.0)
    msg = str(err.value)
    assert "8 of 8 modules did not match (4 not in this model, e.g. diffusion_model.input_blocks.4." in msg, msg
    assert "4 with other shapes, e.g. diffusion_model.middle_block.1." in msg
    assert "-wide but the weight has 64 inputs" in msg
    assert "made for stable-diffusion-xl-v1-base/transformed-lora" in msg and "Nothing was applied" in msg
    assert not m.patcher.patches
    assert_all_base(R.patched_weights(m.patcher), base, "sdxl on sd15")


def test_partly_matching_file_is_never_half_applied(sd15, loras_dir):
    m, base = sd15
    shapes = unet_shapes(m.model)
    adapters = R.random_adapters(shapes)
    adapters["diffusion_model.input_blocks.9.1.transformer_blocks.0.attn1.to_q"] = R.random_adapter((32, 32))
    adapters["diffusion_model.output_blocks.7.1.proj_in"] = R.random_adapter((32, 32, 1, 1))
    adapters["diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q"] = R.random_adapter((48, 48))
    R.write_tlora(loras_dir / "partly.safetensors", adapters)
    total = len(adapters)
    with pytest.raises(tlora_errors()) as err:
        tlora_model_only(m.patcher, "partly.safetensors", 1.0)
    msg = str(err.value)
    assert f"3 of {total} modules did not match" in msg, msg
    assert "2 not in this model, e.g. diffusion_model.input_blocks.9.1.transformer_blocks.0.attn1.to_q;" in msg
    assert "1 with other shapes, e.g. diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q: " in msg
    assert "transform is 48-wide but the weight has 64 inputs" in msg
    assert not m.patcher.patches
    assert_all_base(R.patched_weights(m.patcher), base, "partly matching")
    # Refused even at strength 0 (a wrong file is wrong at any strength) and by the full loader.
    with pytest.raises(tlora_errors(), match="3 of"):
        tlora_model_only(m.patcher, "partly.safetensors", 0.0)


# --------------------------------------------------------------------------- stock loaders (registry)

def _break_one(d: Path, shapes: dict, case: str) -> str:
    """A file whose one module is broken as `case` says (the rest valid), written without checks."""
    sd = good_state(shapes, seed=4)
    if case in ("nan", "inf"):
        key = next(k for k in sd if k.endswith(".tlora_t.0"))
        sd[key] = sd[key].clone()
        sd[key].view(-1)[1] = float(case)
    elif case in ("int8", "bool"):
        key = next(k for k in sd if k.endswith(".tlora_r.up"))
        sd[key] = sd[key].to(torch.int8 if case == "int8" else torch.bool)
    elif case == "missing_scale":
        sd.pop(next(k for k in sd if k.endswith(".tlora_scale")))
    elif case == "core_gap":
        prefix = next(k for k in sd if k.endswith(".tlora_t.1")).rsplit(".tlora_t.", 1)[0]
        sd[f"{prefix}.tlora_t.2"] = sd.pop(f"{prefix}.tlora_t.1")
    elif case == "ring_mismatch":
        key = next(k for k in sd if k.endswith(".tlora_r.out.1"))
        sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 1, sd[key].shape[2] + 1)
    elif case == "zero_size":
        key = next(k for k in sd if k.endswith(".tlora_r.down"))
        prefix = key.rsplit(".tlora_r.", 1)[0]
        sd[key], sd[f"{prefix}.tlora_r.up"] = torch.zeros(0, sd[key].shape[1]), torch.zeros(sd[f"{prefix}.tlora_r.up"].shape[0], 0)
    name = f"bad_stock_{case}.safetensors"
    raw_tlora(d / name, sd)
    return name


# The reason each case must name (ModuleAdapter's validation, reached through the registry).
STOCK_LOUD_CASES = {"nan": "NaN or infinite", "inf": "NaN or infinite", "int8": "floating point",
                    "bool": "floating point", "missing_scale": "tlora_scale", "core_gap": "numbering",
                    "ring_mismatch": "same R", "zero_size": "is empty"}
# A module whose core products do not fit its weight is valid on its own: only the weight (at
# patch time) shows the misfit, and there it is logged and skipped so the base stays intact:
# test_stock_loader_with_misfit_shapes_never_corrupts_the_base.


@pytest.mark.parametrize("case", list(STOCK_LOUD_CASES))
def test_stock_loader_refuses_a_broken_file_loudly(sd15, loras_dir, case):
    """The stock LoraLoader used to skip a broken module (server log only) and apply the rest."""
    from tlora.errors import TLoRAError
    m, base = sd15
    shapes = unet_shapes(m.model, convs=False)
    message = STOCK_LOUD_CASES[case]
    name = _break_one(loras_dir, shapes, case)
    with pytest.raises(Exception, match="broken TLoRA file") as err:
        stock_model_only(m.patcher, name, 1.0)
    assert isinstance(err.value, (TLoRAError, R.pack("tlora.errors").TLoRAError))
    assert message in str(err.value), (message, str(err.value))
    assert not m.patcher.patches
    assert_all_base(R.patched_weights(m.patcher), base, "after the stock loader refused")


def test_stock_loader_with_misfit_shapes_never_corrupts_the_base(tm, sd15, loras_dir, caplog):
    """A misfit module reaches calculate_weight through the stock loader: logged, skipped, base intact."""
    m, base = sd15
    shapes = unet_shapes(m.model, convs=False)
    adapters = R.random_adapters(shapes)
    bad_key = "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_v"
    adapters[bad_key] = R.random_adapter((48, 48))
    R.write_tlora(loras_dir / "misfit_stock.safetensors", adapters)
    patched = stock_model_only(m.patcher, "misfit_stock.safetensors", 1.0)
    with caplog.at_level(logging.ERROR):
        try:
            latent = tm.sample(patched, seed=1, positive=m.cond(seed=1), negative=m.cond(seed=2), steps=1, cfg=1.0)
        finally:
            ch.free_models()
    assert torch.isfinite(latent).all()
    assert any(bad_key in r.getMessage() and "does not fit" in r.getMessage() for r in caplog.records), caplog.text
    got = R.patched_weights(patched)
    assert torch.equal(got[bad_key + ".weight"], base[bad_key + ".weight"])
    for p in shapes:
        if p != bad_key:
            R.assert_close64(got[p + ".weight"], R.ref_patched(base[p + ".weight"], adapters[p].tensors, 1.0), p)
    assert_all_base(tm.state_fingerprint(m.model), base, "after sampling with a misfit stock patch")


# --------------------------------------------------------------------------- executor: next prompt still runs

def checkpoint_attention_shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    """{`diffusion_model.<path>`: shape} of the attention linears stored in a checkpoint file."""
    from safetensors import safe_open
    out = {}
    with safe_open(str(ckpt), framework="pt") as f:
        for k in f.keys():
            if k.startswith("model.diffusion_model.") and k.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight",
                                                                     ".to_out.0.weight")):
                out[k[len("model."):-len(".weight")]] = tuple(f.get_slice(k).get_shape())
    return out


def with_tlora(graph: dict, name: str, strength: float = 1.0) -> dict:
    """The harness txt2img graph with TLoRALoaderModelOnly between checkpoint and sampler."""
    g = json.loads(json.dumps(graph))
    g["tlora"] = {"class_type": "TLoRALoaderModelOnly",
                  "inputs": {"model": ["ckpt", 0], "adapter_name": name, "strength_model": strength}}
    g["sampler"]["inputs"]["model"] = ["tlora", 0]
    return g


def test_executor_reports_the_error_and_runs_the_next_prompt(comfy_host, host_checkpoint, harness_checkpoint, loras_dir):
    comfy_host.require_pack()
    shapes = checkpoint_attention_shapes(harness_checkpoint)
    assert len(shapes) >= 16
    good = R.random_adapters(shapes, seed=3, kinds=(("trm:2", "tr:4"),))
    R.write_tlora(loras_dir / "ckpt_good.safetensors", good)
    partly = dict(good)
    partly["diffusion_model.input_blocks.7.1.transformer_blocks.0.attn1.to_q"] = R.random_adapter((320, 320))
    R.write_tlora(loras_dir / "ckpt_partly.safetensors", partly)
    make_truncated(loras_dir, shapes)
    base = graphs.txt2img(host_checkpoint, negative=None, steps=1, cfg=1.0)
    executor = ch.new_executor()  # one executor, as the server keeps: cached checkpoint across prompts

    first = ch.run_prompt(base, executor=executor)
    assert first.ok, first.describe()
    for name, pattern in (("ckpt_partly.safetensors", f"1 of {len(partly)} modules did not match"),
                          ("bad_truncated.safetensors", "truncated or corrupted")):
        res = ch.run_prompt(with_tlora(base, name), executor=executor)
        assert not res.ok and res.error is not None, f"{name} must fail"
        assert res.error["node_type"] == "TLoRALoaderModelOnly" and res.error["node_id"] == "tlora"
        assert pattern in res.error["exception_message"], res.error["exception_message"]
        again = ch.run_prompt(base, executor=executor)
        assert again.ok, again.describe()
        assert torch.equal(again.outputs["sampler"][0]["samples"], first.outputs["sampler"][0]["samples"]), \
            "a refused adapter must leave the cached base model untouched"
    res = ch.run_prompt(with_tlora(base, "ckpt_good.safetensors"), executor=executor)
    assert res.ok, res.describe()
    assert not torch.equal(res.outputs["sampler"][0]["samples"], first.outputs["sampler"][0]["samples"])
    ch.free_models()


def test_one_module_given_twice_is_refused_by_both_loaders(sd15, loras_dir):
    """kohya `lora_unet_...` and generic `diffusion_model....` names of one weight: our loader applied one
    copy and the stock loader the other (different images)."""
    m, base = sd15
    shapes = unet_shapes(m.model, convs=False)
    sd = good_state(shapes, seed=6)
    generic = next(iter(shapes))
    kohya = "lora_unet_" + generic[len("diffusion_model."):].replace(".", "_")
    sd.update({f"{kohya}.{k.rsplit('.tlora_', 1)[1] and 'tlora_' + k.rsplit('.tlora_', 1)[1]}": v.clone()
               for k, v in sd.items() if k.startswith(generic + ".")})
    raw_tlora(loras_dir / "twice.safetensors", sd)
    for load in (stock_model_only, tlora_model_only):
        with pytest.raises(Exception, match=f"{generic} is given twice"):
            load(m.patcher, "twice.safetensors", 1.0)
    assert_all_base(R.patched_weights(m.patcher), base, "after refusing a module given twice")


@pytest.mark.parametrize("lora_name", ["generic", "kohya"])
def test_a_lora_and_a_tlora_for_one_weight_are_refused_by_both_loaders(sd15, loras_dir, lora_name):
    """The stock loader asked every registered adapter and kept the last to claim: the TLoRA half was applied,
    the LoRA half dropped, no log line (issue 28 item 3)."""
    m, base = sd15
    shapes = unet_shapes(m.model, convs=False)
    sd = good_state(shapes, seed=8)
    generic = next(iter(shapes))
    name = generic if lora_name == "generic" else "lora_unet_" + generic[len("diffusion_model."):].replace(".", "_")
    out_f, in_f = shapes[generic][:2]
    g = torch.Generator().manual_seed(3)
    sd.update({f"{name}.lora_up.weight": torch.randn(out_f, 2, generator=g),
               f"{name}.lora_down.weight": torch.randn(2, in_f, generator=g), f"{name}.alpha": torch.tensor(2.0)})
    raw_tlora(loras_dir / "mixed.safetensors", sd)
    for load in (stock_model_only, tlora_model_only):
        with pytest.raises(Exception, match=f"also has {name}.lora_up.weight|unknown key '{name}\\."):
            load(m.patcher, "mixed.safetensors", 1.0)
    assert_all_base(R.patched_weights(m.patcher), base, "after refusing a LoRA beside a TLoRA")
