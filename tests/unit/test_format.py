"""The TLoRA file: round trips, metadata, and rejection of every kind of bad file."""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file as st_save_file

import tlora
from tlora import ModuleAdapter, cli
from tlora.errors import TLoRAFormatError
from tlora.fileio import atomic_write
from tlora.format import (build_metadata, is_tlora_state_dict, load, load_file, read_metadata,
                          save_file, split_key)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MARKER_NAME = "pickle-was-executed"
PREFIX = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k"

TRANSFORMS = ("trm:2", "diag", "none")
RESIDUALS = ("tr:3", "lora:4", "none")
KINDS = [(t, r) for t in TRANSFORMS for r in RESIDUALS if (t, r) != ("none", "none")]


def trained(adapter: ModuleAdapter, seed: int) -> ModuleAdapter:
    """The adapter with every tensor moved off its initial value (like after training)."""
    gen = torch.Generator().manual_seed(seed)
    return ModuleAdapter({k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in adapter.tensors.items()},
                         name=adapter.name)


def small_adapters(transform: str = "trm:2", residual: str = "tr:3") -> dict[str, ModuleAdapter]:
    shapes = {"diffusion_model.a.to_q": (24, 40), "diffusion_model.b.proj_in": (16, 12, 3, 3)}
    return {name: trained(ModuleAdapter.create(s, transform, residual, shapes="auto", name=name), i)
            for i, (name, s) in enumerate(shapes.items())}


# ----- keys ---------------------------------------------------------------------------------
def test_split_key_and_detection() -> None:
    assert split_key(f"{PREFIX}.tlora_t.0") == (PREFIX, "tlora_t.0")
    assert split_key("lora_unet_input_blocks_1_1_proj_in.tlora_r.out.2") == (
        "lora_unet_input_blocks_1_1_proj_in", "tlora_r.out.2")
    assert split_key("a.b.tlora_scale") == ("a.b", "tlora_scale")
    for bad in ("tlora_scale", "a.lora_up.weight", ".tlora_scale"):
        with pytest.raises(TLoRAFormatError):
            split_key(bad)
    assert is_tlora_state_dict(["x.tlora_t.diag", "x.tlora_scale"])
    assert not is_tlora_state_dict(["x.lora_up.weight", "x.alpha", "x.tlora_bogus"])


# ----- round trips --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transform,residual", KINDS)
def test_round_trip_is_bit_exact(tmp_path, transform: str, residual: str, dtype: torch.dtype) -> None:
    adapters = small_adapters(transform, residual)
    path = tmp_path / "a.safetensors"
    save_file(adapters, path, dtype=dtype)
    loaded = load_file(path)
    assert list(loaded) == list(adapters)
    for name, adapter in adapters.items():
        got = loaded[name]
        assert got.name == name
        assert set(got.tensors) == set(adapter.tensors)
        for key, value in adapter.tensors.items():
            assert got.tensors[key].dtype == dtype
            assert torch.equal(got.tensors[key], value.to(dtype)), (name, key)
        assert (got.transform, got.residual) == (adapter.transform, adapter.residual)
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left behind


def test_round_trip_keeps_patched_weight_and_identity(tmp_path) -> None:
    fresh = {"m": ModuleAdapter.create((24, 40), "trm:3", "tr:3", shapes="auto", name="m")}
    save_file(fresh, tmp_path / "f.safetensors")
    back = load_file(tmp_path / "f.safetensors")["m"]
    assert back.transform_is_identity  # eye/3 survives bit-exactly, so T = I stays exact
    w0 = torch.randn(24, 40)
    assert torch.equal(back.patched_weight(w0), w0)
    adapters = small_adapters()
    save_file(adapters, tmp_path / "t.safetensors")
    loaded = load_file(tmp_path / "t.safetensors")
    for name, adapter in adapters.items():
        w = torch.randn(16, 12, 3, 3) if "proj_in" in name else torch.randn(24, 40)
        assert torch.equal(loaded[name].patched_weight(w, 0.7), adapter.patched_weight(w, 0.7))


def test_metadata_and_config(tmp_path) -> None:
    adapters = small_adapters()
    path = tmp_path / "my adapter.safetensors"
    config = {"arch": "sd15", "transform": "trm:2", "residual": "tr:3", "shapes": "auto",
              "targets": "custom", "alpha": 1.0}
    save_file(adapters, path, metadata={"tlora.train.steps": 500, "ss_output_name": "sks dog",
                                        "tlora.train.tags": ["a", "b"]}, config=config)
    meta = read_metadata(path)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["tlora.version"] == "1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/transformed-lora"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.title"] == "my adapter"
    assert meta["tlora.train.steps"] == "500" and meta["ss_output_name"] == "sks dog"
    assert json.loads(meta["tlora.train.tags"]) == ["a", "b"]
    cfg = json.loads(meta["tlora.config"])
    params = sum(a.num_params() for a in adapters.values())
    assert cfg["modules"] == 2 and cfg["params"] == params and cfg["arch"] == "sd15"
    assert cfg["transform"] == "trm:2" and cfg["residual"] == "tr:3" and cfg["alpha"] == 1.0
    loaded = tlora.load(path)
    assert loaded.config == cfg and loaded.metadata == meta and loaded.num_params() == params
    with pytest.raises(ValueError):
        build_metadata(adapters, metadata={"tlora.version": "9"})


def test_save_is_atomic_on_failure(tmp_path) -> None:
    path = tmp_path / "a.safetensors"
    save_file(small_adapters(), path)
    before = path.read_bytes()
    huge = {"m": ModuleAdapter({"tlora_t.diag": torch.full((4,), 1e6), "tlora_scale": torch.tensor(1.0)})}
    with pytest.raises(TLoRAFormatError, match="overflows"):
        save_file(huge, path, dtype=torch.float16)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_atomic_write_keeps_mode_and_cleans_up(tmp_path) -> None:
    """A new file is rw-r--r--, a rewrite keeps the old mode, and a failed write leaves no temp file."""
    path = str(tmp_path / "w.bin")
    atomic_write(path, b"one")
    assert os.stat(path).st_mode & 0o777 == 0o644
    os.chmod(path, 0o600)
    atomic_write(path, b"two")
    assert open(path, "rb").read() == b"two" and os.stat(path).st_mode & 0o777 == 0o600
    with pytest.raises(TypeError):
        atomic_write(path, "not bytes")  # type: ignore[arg-type]
    assert open(path, "rb").read() == b"two" and os.listdir(tmp_path) == ["w.bin"]


def test_kohya_prefixes_load_as_given(tmp_path) -> None:
    adapter = ModuleAdapter.create((320, 768), "trm:1", "lora:2")
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    save_file({name: adapter}, tmp_path / "k.safetensors", config={"arch": "sd15"})
    assert list(load_file(tmp_path / "k.safetensors")) == [name]


# ----- bad files ---------------------------------------------------------------------------
class Exploit:
    """Unpickling this would create the marker file: it must never happen."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def good_tensors() -> dict[str, torch.Tensor]:
    adapter = trained(ModuleAdapter.create((320, 768), "trm:2", "tr:2", shapes="paper"), 0)
    return {f"{PREFIX}.{k}": v for k, v in adapter.tensors.items()}


def write(path, tensors, metadata=None) -> str:
    st_save_file(tensors, str(path), metadata=metadata)
    return str(path)


def bad_files(tmp_path) -> dict[str, tuple[str, str]]:
    """name -> (path, a word the error message must contain)."""
    files = {}
    marker = str(tmp_path / MARKER_NAME)
    good = write(tmp_path / "good.safetensors", good_tensors())
    data = open(good, "rb").read()

    p = tmp_path / "pickle_zip.pt"
    torch.save({"state": Exploit(marker)}, p)
    files["torch.save pickle"] = (str(p), "not a safetensors")
    p = tmp_path / "pickle_legacy.pt"
    torch.save({"state": Exploit(marker)}, p, _use_new_zipfile_serialization=False)
    files["legacy torch pickle"] = (str(p), "not a safetensors")
    p = tmp_path / "raw.pkl"
    p.write_bytes(pickle.dumps(Exploit(marker), protocol=4))
    files["raw pickle"] = (str(p), "not a safetensors")
    p = tmp_path / "named.safetensors"
    p.write_bytes(pickle.dumps(Exploit(marker), protocol=0))  # protocol 0: no magic byte
    files["pickle named .safetensors"] = (str(p), "safetensors")

    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    files["empty"] = (str(p), "truncated")
    p = tmp_path / "trunc_header.safetensors"
    p.write_bytes(data[:40])
    files["truncated header"] = (str(p), "truncated")
    p = tmp_path / "trunc_data.safetensors"
    p.write_bytes(data[:-100])
    files["truncated data"] = (str(p), "truncated")
    (length,) = struct.unpack("<Q", data[:8])
    p = tmp_path / "bad_json.safetensors"
    p.write_bytes(data[:8] + b"#" + data[9:])
    files["corrupted header json"] = (str(p), "corrupted")
    p = tmp_path / "bad_len.safetensors"
    p.write_bytes(struct.pack("<Q", length + 10**6) + data[8:])
    files["corrupted header length"] = (str(p), "header length")
    p = tmp_path / "bad_offsets.safetensors"
    header = json.loads(data[8:8 + length])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 4
    raw = json.dumps(header).encode()
    raw += b" " * ((-len(raw)) % 8)
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length:])
    files["offsets beyond data"] = (str(p), "does not fit")

    t = good_tensors()
    t[f"{PREFIX}.tlora_t.1"] = torch.zeros(8, 9, 2, 2)
    files["non-square transform core"] = (write(tmp_path / "shape1.safetensors", t), "transform core 1")
    t = good_tensors()
    t[f"{PREFIX}.tlora_r.in.0"] = torch.zeros(8, 3, 3)
    files["residual rank mismatch"] = (write(tmp_path / "shape2.safetensors", t), "residual in core 0")
    t = {f"{PREFIX}.tlora_r.up": torch.zeros(320, 4), f"{PREFIX}.tlora_r.down": torch.zeros(3, 768),
         f"{PREFIX}.tlora_scale": torch.tensor(0.5)}
    files["lora not chaining"] = (write(tmp_path / "shape3.safetensors", t), "do not chain")
    t = {f"{PREFIX}.tlora_r.up": torch.zeros(320, 4), f"{PREFIX}.tlora_r.down": torch.zeros(4, 320),
         f"{PREFIX}.tlora_scale": torch.tensor(0.5)}
    files["wrong shape for the architecture"] = (
        write(tmp_path / "shape4.safetensors", t, {"tlora.config": json.dumps({"arch": "sd15"})}), "768")
    t = good_tensors()
    t[f"{PREFIX}.tlora_r.out.1"] = t[f"{PREFIX}.tlora_r.out.1"].clone()
    t[f"{PREFIX}.tlora_r.out.1"][0, 0, 0] = float("nan")
    files["NaN"] = (write(tmp_path / "nan.safetensors", t), "NaN")
    t = good_tensors()
    t[f"{PREFIX}.tlora_t.0"] = t[f"{PREFIX}.tlora_t.0"].clone()
    t[f"{PREFIX}.tlora_t.0"][1, 1, 0, 0] = float("inf")
    files["inf"] = (write(tmp_path / "inf.safetensors", t), "infinite")
    t = good_tensors()
    t[f"{PREFIX}.tlora_t.0"] = torch.ones(8, 8, 2, 2, dtype=torch.int32)
    files["non-float"] = (write(tmp_path / "int.safetensors", t), "I32")
    t = good_tensors()
    del t[f"{PREFIX}.tlora_t.1"]
    files["missing transform core"] = (write(tmp_path / "miss1.safetensors", t), "numbering")
    t = good_tensors()
    for k in [k for k in t if ".tlora_r.in." in k]:
        del t[k]
    files["missing residual input cores"] = (write(tmp_path / "miss2.safetensors", t), "tlora_r.in")
    t = good_tensors()
    del t[f"{PREFIX}.tlora_scale"]
    files["missing scale"] = (write(tmp_path / "miss3.safetensors", t), "tlora_scale")
    t = good_tensors()
    t[f"{PREFIX}.tlora_bogus"] = torch.zeros(2)
    files["unknown suffix"] = (write(tmp_path / "unk1.safetensors", t), "tlora_bogus")
    t = good_tensors()
    t[f"{PREFIX}.lora_up.weight"] = torch.zeros(2, 2)
    files["foreign key"] = (write(tmp_path / "unk2.safetensors", t), "lora_up.weight")
    files["no TLoRA keys"] = (write(tmp_path / "lora.safetensors", {f"{PREFIX}.lora_up.weight": torch.zeros(2, 2)}),
                              "no TLoRA tensors")
    files["newer version"] = (write(tmp_path / "v2.safetensors", good_tensors(), {"tlora.version": "2"}),
                              "version 2")
    files["config not JSON"] = (write(tmp_path / "cfg.safetensors", good_tensors(), {"tlora.config": "{oops"}),
                                "tlora.config")
    return files


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict[str, tuple[str, str]]:
    return bad_files(tmp_path_factory.mktemp("bad"))


def test_good_file_loads(bad) -> None:
    path = os.path.join(os.path.dirname(next(iter(bad.values()))[0]), "good.safetensors")
    assert list(load_file(path)) == [PREFIX]


@pytest.mark.parametrize("case", [
    "torch.save pickle", "legacy torch pickle", "raw pickle", "pickle named .safetensors", "empty",
    "truncated header", "truncated data", "corrupted header json", "corrupted header length",
    "offsets beyond data", "non-square transform core", "residual rank mismatch", "lora not chaining",
    "wrong shape for the architecture", "NaN", "inf", "non-float", "missing transform core",
    "missing residual input cores", "missing scale", "unknown suffix", "foreign key", "no TLoRA keys",
    "newer version", "config not JSON"])
def test_bad_file_is_rejected_with_one_line(bad, case: str, capsys) -> None:
    path, word = bad[case]
    with pytest.raises(TLoRAFormatError) as info:
        load_file(path)
    message = str(info.value)
    assert "\n" not in message and word in message, message
    if case.startswith(("non-square", "residual rank", "lora not", "NaN", "inf", "missing", "unknown suffix")):
        assert PREFIX in message  # names the module
    assert cli.main(["inspect", path]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err and word in err
    assert not os.path.exists(os.path.join(os.path.dirname(path), MARKER_NAME))


def test_all_bad_cases_are_covered(bad) -> None:
    assert len(bad) == 25


def test_inspect_subprocess_exits_2_without_traceback(bad) -> None:
    path, _ = bad["torch.save pickle"]
    proc = subprocess.run([sys.executable, "-m", "tlora", "inspect", path], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == "" and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(os.path.dirname(path), MARKER_NAME))


def test_inspect_good_file(tmp_path, capsys) -> None:
    adapters = small_adapters()
    path = str(tmp_path / "a.safetensors")
    save_file(adapters, path, config={"arch": "sd15"})
    assert cli.main(["inspect", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["modules"] == 2 and info["params"] == sum(a.num_params() for a in adapters.values())
    assert info["file_bytes"] == os.path.getsize(path) and info["version"] == "1"
    assert info["params_by_kind"]["trm:2"] + info["params_by_kind"]["tr:3"] == info["params"]
    assert cli.main(["inspect", path]) == 0
    text = capsys.readouterr().out
    assert "modules: 2" in text and "stable-diffusion-v1/transformed-lora" in text


def test_format_doc_worked_example(tmp_path) -> None:
    """docs/FORMAT.md section 9, through a file."""
    t = {"tlora_t.0": torch.tensor([[1.0, 2], [0, 1]]).reshape(2, 2, 1, 1),
         "tlora_t.1": torch.tensor([[1.0, 0], [3, 1]]).reshape(2, 2, 1, 1),
         "tlora_r.out.0": torch.tensor([1.0, -1]).reshape(2, 1, 1),
         "tlora_r.in.0": torch.tensor([1.0, 2]).reshape(2, 1, 1),
         "tlora_r.in.1": torch.tensor([1.0, 0.5]).reshape(2, 1, 1),
         "tlora_scale": torch.tensor(0.5)}
    save_file({"layer": ModuleAdapter(t, name="layer")}, tmp_path / "ex.safetensors")
    adapter = load_file(tmp_path / "ex.safetensors")["layer"]
    w0 = torch.tensor([[1.0, 2, 0, 0], [0, 0, 1, 1]])
    assert torch.equal(adapter.transform_matrix(), torch.tensor(
        [[1.0, 0, 2, 0], [3, 1, 6, 2], [0, 0, 1, 0], [0, 0, 3, 1]], dtype=torch.float64))
    assert torch.equal(adapter.residual_matrix(), torch.tensor([[1.0, 0.5, 2, 1], [-1, -0.5, -2, -1]]))
    assert torch.equal(adapter.patched_weight(w0), torch.tensor([[7.5, 2.25, 15, 4.5], [-0.5, -0.25, 3, 0.5]]))
    assert torch.equal(adapter.patched_weight(w0, 0.5),
                       torch.tensor([[4.25, 2.125, 7.5, 2.25], [-0.25, -0.125, 2, 0.75]]))


def _deep(n: int = 200_000) -> str:
    return "[" * n + "]" * n


def test_deeply_nested_json_is_a_clear_error_naming_the_file(tmp_path):
    """Nesting past Python's recursion limit in the header or in tlora.config: the usual one-line error."""
    import struct
    header = ('{"__metadata__":{},"x":' + _deep() + "}").encode()
    bad = tmp_path / "deep_header.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(TLoRAFormatError, match="deep_header.safetensors.*nested too deeply"):
        tlora.format.read_header(bad)
    adapters = {"m": ModuleAdapter.create((8, 8), "trm:1", "lora:2")}
    path = tmp_path / "deep_config.safetensors"
    save_file(adapters, path)
    from safetensors.torch import load_file as st_load
    meta = read_metadata(path)
    meta["tlora.config"] = _deep()
    st_save_file(st_load(str(path)), str(path), metadata=meta)
    with pytest.raises(TLoRAFormatError, match="deep_config.safetensors.*nested too deeply"):
        load(path)


@pytest.mark.parametrize("suffix, shape", [("tlora_r.up", (8, 0)), ("tlora_r.down", (0, 8)), ("tlora_t.0", (0, 0, 1, 1))])
def test_zero_size_tensors_are_refused(tmp_path, suffix, shape):
    """A rank-0 LoRA residual or a 0-wide core would load as a no-op; `inspect` would exit 0."""
    tensors = dict(ModuleAdapter.create((8, 8), "trm:1", "lora:2").tensors)
    if suffix == "tlora_r.down":
        tensors["tlora_r.up"] = torch.zeros(8, 0)
    tensors[suffix] = torch.zeros(shape)
    with pytest.raises(TLoRAFormatError, match="is empty"):
        ModuleAdapter(tensors, name="m")
    path = tmp_path / "empty.safetensors"
    st_save_file({f"{PREFIX}.{k}": v.contiguous() for k, v in tensors.items()}, str(path))
    res = subprocess.run([sys.executable, "-m", "tlora", "inspect", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0 and "empty" in (res.stderr + res.stdout), (res.returncode, res.stdout, res.stderr)


def test_temp_files_left_by_a_killed_writer_are_cleared_by_the_next_write(tmp_path):
    import time as _time
    old, fresh, other = tmp_path / ".tlora-abc.tmp", tmp_path / ".tlora-new.tmp", tmp_path / ".other.tmp"
    for p in (old, fresh, other):
        p.write_bytes(b"half a file")
    past = _time.time() - 3600
    os.utime(old, (past, past))
    os.utime(other, (past, past))
    atomic_write(str(tmp_path / "a.safetensors"), b"data")
    assert not old.exists(), "a leftover of a killed write must go"
    assert fresh.exists(), "a temp file being written right now must stay"
    assert other.exists(), "files that are not ours are never touched"


@pytest.mark.parametrize("other", ["lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k",
                                   "lora_te_text_model_encoder_layers_0_self_attn_q_proj"])
def test_one_module_under_two_names_is_refused(tmp_path, other):
    """Generic and kohya-style names of one weight: loaders would apply one copy or the other."""
    generic = PREFIX if other.startswith("lora_unet_") else \
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    adapter = ModuleAdapter.create((320, 320), "trm:2", "lora:2")
    sd = {f"{p}.{k}": v.clone() for p in (generic, other) for k, v in adapter.tensors.items()}
    path = tmp_path / "twice.safetensors"
    st_save_file(sd, str(path))
    with pytest.raises(TLoRAFormatError, match=f"module {generic} is given twice.*{other}"):
        load(path)
    res = subprocess.run([sys.executable, "-m", "tlora", "inspect", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0 and "given twice" in (res.stdout + res.stderr)


@pytest.mark.parametrize("low_bytes", [b"\x80\x02", b"\x80\x03", b"\x80\x05"])
def test_a_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path, low_bytes):
    """A header 0x280 (or 0x380...) bytes long begins with a pickle's mark; the "{" after it says safetensors."""
    path = str(tmp_path / "a.safetensors")
    target = int.from_bytes(low_bytes, "little")
    for pad in range(4096):
        st_save_file({"m.tlora_scale": torch.tensor(0.5)}, path, metadata={"pad": "x" * pad})
        if struct.unpack("<Q", open(path, "rb").read(8))[0] == target:
            break
    else:
        pytest.fail(f"no padding gives a {target}-byte header")
    assert open(path, "rb").read(2) == low_bytes
    assert tlora.format.read_metadata(path)["pad"].startswith("x")
