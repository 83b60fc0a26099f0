"""The command-line trainer on real diffusers pipelines, one process and two (accelerate launch, gloo).

Tiny SD1.5/SDXL pipelines are built from configs (harness/tiny_diffusers.py) and saved as folders;
every run is the real command in a subprocess, as a user starts it. References are independent:
the file's tensors of a one-process run against a two-process run, the base model's weights, the
node's metadata keys (TrainSettings), and the module names tlora.arch tables for this UNet.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from comfyui_tlora.tlora import arch as tarch
from comfyui_tlora.tlora import format as tformat
from comfyui_tlora.trainer.diffusers.inference import unet_config
from comfyui_tlora.trainer.settings import TrainSettings

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from harness import tiny_diffusers as td  # noqa: E402

BIN = Path(sys.executable).parent
COMMON = ["--resolution", "64", "--loss", "mse", "--quiet", "--transform", "trm:2", "--residual", "lora:2"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("dtrain")
    td.save_sd15(base / "sd15", seed=0)
    td.write_images(base / "images", count=3)
    return base


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TLORA_AUTOTUNE="0",
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def cli(work: Path, *args: str, processes: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """The trainer as a user runs it: `python -m ...`, or under `accelerate launch` with N processes."""
    module = ["-m", "comfyui_tlora.trainer.diffusers"]
    if processes == 1:
        cmd = [sys.executable, *module]
    else:  # --multi_gpu picks accelerate's torchrun launcher; without a GPU the binding runs them on gloo
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(29500 + os.getpid() % 1000), *module]
    return subprocess.run([*cmd, "--model", str(work / "sd15"), "--data", str(work / "images"), *args],
                          cwd=str(work), env=_env(), capture_output=True, text=True, timeout=timeout)


def _ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr[-3000:]


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


@pytest.fixture(scope="module")
def full_run(work: Path) -> Path:
    """Four steps on one process at batch 2: the reference the two-process and resumed runs must reproduce."""
    out = work / "out_full"
    _ok(cli(work, "--output-dir", str(out), "--output-name", "r", "--steps", "4", "--batch-size", "2", *COMMON))
    return out / "r.safetensors"


def test_the_file_has_the_nodes_names_metadata_and_a_trained_adapter(work: Path, full_run: Path) -> None:
    loaded = tformat.load(str(full_run))
    # Names: exactly the generic names tlora.arch tables for this UNet's layout, attention preset.
    cfg = unet_config(td.sd15().unet)
    expected = {name for name, _, group in tarch.unet_modules(cfg) if group == "attn"}
    assert set(loaded.adapters) == expected and len(expected) == 32
    # Metadata: every key the node's settings write, the run's facts, and the host.
    meta = _meta(full_run)
    assert set(TrainSettings().replace(loss="mse").metadata()) <= set(meta)
    assert meta["tlora.train.steps"] == "4" and meta["tlora.train.partial"] == "false"
    assert meta["tlora.train.host"] == "diffusers" and meta["tlora.train.processes"] == "1"
    # Trained: the LoRA residual's zero half moved away from zero.
    tensors = load_file(str(full_run))
    assert any(k.endswith("tlora_r.up") and tensors[k].abs().max() > 1e-4 for k in tensors)
    assert full_run.with_suffix(".tlora-state").is_file()


def test_two_processes_at_batch_1_train_what_one_process_at_batch_2_does(work: Path, full_run: Path) -> None:
    two = work / "out_2p"
    _ok(cli(work, "--output-dir", str(two), "--output-name", "r", "--steps", "4", "--batch-size", "1", *COMMON,
            processes=2))
    a, b = load_file(str(full_run)), load_file(str(two / "r.safetensors"))
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    assert _meta(two / "r.safetensors")["tlora.train.processes"] == "2"
    assert sorted(os.listdir(two)) == ["r.safetensors", "r.tlora-state"]  # rank 1 wrote nothing of its own


def test_resume_with_another_process_count_continues_exactly(work: Path, full_run: Path) -> None:
    split = work / "out_split"
    # Two steps on two processes (batch 1 each), then resumed to four on one process at batch 2.
    _ok(cli(work, "--output-dir", str(split), "--output-name", "r", "--steps", "2", "--batch-size", "1", *COMMON,
            processes=2))
    _ok(cli(work, "--output-dir", str(split), "--output-name", "r", "--steps", "4", "--batch-size", "2",
            "--resume", str(split / "r.safetensors"), *COMMON))
    a, b = load_file(str(full_run)), load_file(str(split / "r.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    assert _meta(split / "r.safetensors")["tlora.train.steps"] == "4"


def test_a_file_trained_here_patches_comfyuis_model_as_diffusers_does(tmp_path: Path) -> None:
    """A ComfyUI-format SD1.5 checkpoint (saved by ComfyUI's classes) trained on here as a single file with a local
    config (diffusers' own from_single_file reads it offline); the file then patches both hosts' models alike."""
    from diffusers import StableDiffusionPipeline
    from tests.diffusers import diffusers_refs as D
    from comfyui_tlora.tlora import diffusers_names as N
    from comfyui_tlora.trainer.diffusers import apply as A
    D.run_comfy_sd15_patch(tmp_path / "comfy")
    ckpt, config = tmp_path / "comfy" / "ckpt_sd15.safetensors", D.sd15_config_folder(tmp_path / "config")
    td.write_images(tmp_path / "images", count=2)
    done = subprocess.run(
        [sys.executable, "-m", "comfyui_tlora.trainer.diffusers", "--model", str(ckpt), "--config", str(config),
         "--data", str(tmp_path / "images"), "--output-dir", str(tmp_path / "out"), "--output-name", "x", "--steps",
         "3", "--learning-rate", "0.01", "--targets", "all-linear", *COMMON],
        cwd=str(tmp_path), env=_env(), capture_output=True, text=True, timeout=300)
    _ok(done)
    trained = tmp_path / "out" / "x.safetensors"
    D.run_comfy_sd15_patch(tmp_path / "comfy", str(trained))
    comfy = load_file(str(tmp_path / "comfy" / "patched.safetensors"))
    base = load_file(str(ckpt))
    keys = set(tformat.load(str(trained)).adapters)
    assert len(keys) == len(comfy) > 32  # all-linear: attention, feed-forward and proj_in/out
    pipe = StableDiffusionPipeline.from_single_file(str(ckpt), config=str(config), local_files_only=True)
    handle = A.load_tlora(pipe, str(trained), strength=D.STRENGTH)
    A.fuse(pipe)
    _, live = A.arch_of({"unet": pipe.unet})
    for generic in keys:
        (path, pieces), = N.diffusers_rows(live)[generic]
        assert pieces is None
        got = pipe.unet.get_submodule(path.removeprefix("unet.")).weight
        want = comfy[generic + ".weight"]
        assert not torch.equal(want, base["model." + generic + ".weight"]), generic  # the file changed it
        torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-5, atol=1e-6)
    A.unfuse(pipe)
    handle.remove()


# Per transformer family: the file names ComfyUI's `attn` preset gives (written out by hand from ComfyUI's
# fused layout), as diffusers slices and whole generic modules, and the diffusers weights those whole modules are.
DIT_CASES = {
    "flux": dict(
        slices={f"transformer.{b}.{m}" for b in ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn")
                for m in ("to_q", "to_k", "to_v")}
        | {f"transformer.transformer_blocks.0.attn.add_{m}_proj" for m in "qkv"}
        | {"transformer.single_transformer_blocks.0.proj_mlp"},
        whole={"diffusion_model.double_blocks.0.img_attn.proj": "transformer_blocks.0.attn.to_out.0",
               "diffusion_model.double_blocks.0.txt_attn.proj": "transformer_blocks.0.attn.to_add_out",
               "diffusion_model.single_blocks.0.linear2": "single_transformer_blocks.0.proj_out"},
        extra=["--loss", "dco"]),
    "sd3": dict(  # SD3.5-medium-like: attn2 in block 0; the last context block is pre-only (no projection)
        slices={f"transformer.transformer_blocks.{b}.attn.{m}" for b in (0, 1)
                for m in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")}
        | {f"transformer.transformer_blocks.0.attn2.{m}" for m in ("to_q", "to_k", "to_v")},
        whole={"diffusion_model.joint_blocks.0.x_block.attn.proj": "transformer_blocks.0.attn.to_out.0",
               "diffusion_model.joint_blocks.0.x_block.attn2.proj": "transformer_blocks.0.attn2.to_out.0",
               "diffusion_model.joint_blocks.0.context_block.attn.proj": "transformer_blocks.0.attn.to_add_out",
               "diffusion_model.joint_blocks.1.x_block.attn.proj": "transformer_blocks.1.attn.to_out.0"},
        extra=[]),
}


@pytest.mark.parametrize("family", sorted(DIT_CASES))
def test_a_transformer_file_trained_here_patches_comfyuis_model_as_diffusers_does(tmp_path: Path, family: str) -> None:
    """Flux / SD3.5-medium-like: q/k/v (and Flux's proj_mlp) keep their diffusers names (slices of ComfyUI's fused
    weights), whole modules get generic names; ComfyUI's twin, given the same weights through ComfyUI's own
    diffusers key map, is patched by our loader exactly as diffusers' fuse patches the pipeline."""
    from diffusers import DiffusionPipeline
    from tests.diffusers import diffusers_refs as D
    from comfyui_tlora.trainer.diffusers import apply as A
    case = DIT_CASES[family]
    if family == "flux":
        td.save_flux(tmp_path / "pipe", transformer=D.FLUX)
    else:
        td.save_sd3(tmp_path / "pipe")
    td.write_images(tmp_path / "images", count=2)
    done = subprocess.run(
        [sys.executable, "-m", "comfyui_tlora.trainer.diffusers", "--model", str(tmp_path / "pipe"), "--data",
         str(tmp_path / "images"), "--output-dir", str(tmp_path / "out"), "--output-name", "t", "--steps", "2",
         "--learning-rate", "0.01", *COMMON, *case["extra"]],
        cwd=str(tmp_path), env=_env(), capture_output=True, text=True, timeout=300)
    _ok(done)
    trained = tmp_path / "out" / "t.safetensors"
    assert set(tformat.load(str(trained)).adapters) == case["slices"] | set(case["whole"])
    D.run_in_comfy(f"comfy_dit_patch({str(tmp_path / 'comfy')!r}, {family!r}, "
                   f"{str(tmp_path / 'pipe' / 'transformer' / 'diffusion_pytorch_model.safetensors')!r}, "
                   f"{str(trained)!r})")
    comfy, base = (load_file(str(tmp_path / "comfy" / f"{n}_diffusers.safetensors")) for n in ("patched", "base"))
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    handle = A.load_tlora(pipe, str(trained), strength=D.STRENGTH)
    A.fuse(pipe)
    fused = pipe.transformer.state_dict()
    changed = {k for k in comfy if not torch.equal(comfy[k], base[k])}
    assert changed == ({k.removeprefix("transformer.") + ".weight" for k in case["slices"]}
                       | {m + ".weight" for m in case["whole"].values()})  # every adapted weight, nothing else
    for key in comfy:
        torch.testing.assert_close(fused[key], comfy[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    A.unfuse(pipe)
    handle.remove()


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before writing {path.name}: "
                                 f"{proc.stderr.read()[-3000:] if proc.stderr else ''}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"no {path.name} after {seconds} s")
        time.sleep(0.5)


def _popen(work: Path, args: list[str], processes: int = 1, mixed_precision: str = "no") -> subprocess.Popen:
    module = ["-m", "comfyui_tlora.trainer.diffusers"]
    if processes == 1:
        cmd = [sys.executable, *module]
    else:
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines",
               "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no", "--main_process_port",
               str(30500 + os.getpid() % 1000), *module]
    return subprocess.Popen([*cmd, "--model", str(work / "sd15"), "--data", str(work / "images"), *args],
                            cwd=str(work), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """Ctrl-C as in a terminal: a run started in the background of a non-interactive shell (CI, nohup, `&`)
    inherits SIGINT ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_saves_a_partial_file(work: Path) -> None:
    out = work / "out_int"
    proc = _popen(work, ["--output-dir", str(out), "--output-name", "c", "--steps", "100000", "--save-every", "2",
                         *COMMON])
    try:
        _wait_for(out / "c.safetensors", proc)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err
    meta = _meta(out / "c.safetensors")
    assert meta["tlora.train.partial"] == "true" and meta["tlora.train.stopped"] == "cancelled"
    assert int(meta["tlora.train.steps"]) >= 2
    tformat.load(str(out / "c.safetensors"))  # whole and valid


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _rank_pid(root: int, rank: int) -> int | None:
    """The pid of the worker below the launcher whose environment says RANK=rank (torchrun sets it per worker)."""
    todo, seen = [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if pid != root and env.get(b"RANK") == str(rank).encode():
            return pid
        todo.extend(_children(pid))
    return None


def test_killing_one_rank_leaves_the_last_saved_file_whole(work: Path) -> None:
    """Also: the run takes its mixed precision from accelerate's configuration (bf16 autocast here)."""
    out = work / "out_kill"
    path = out / "k.safetensors"
    proc = _popen(work, ["--output-dir", str(out), "--output-name", "k", "--steps", "100000", "--save-every", "2",
                         *COMMON], processes=2, mixed_precision="bf16")
    try:
        _wait_for(path, proc)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None, "rank 1's process was not found"
        os.kill(victim, signal.SIGKILL)
        proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0
    loaded = tformat.load(str(path))  # the last saved file: whole, valid, its own steps
    meta = _meta(path)
    assert meta["tlora.train.partial"] == "true" and int(meta["tlora.train.steps"]) >= 2
    assert meta["tlora.train.precision"] == "bf16" and meta["tlora.train.processes"] == "2"
    assert len(loaded.adapters) == 32
    # A write cut short by the launcher's SIGTERM leaves only its temp file (cleared by the next write into the
    # folder) and at most a newer sidecar, which resume detects by step and run token (tests/unit/test_engine.py).


def test_sdxl_with_text_encoders_prior_and_buckets(tmp_path: Path) -> None:
    """SDXL: both CLIPs adapted under their generic names, class images given and generated, DCO, a preview."""
    td.save_sdxl(tmp_path / "sdxl", seed=0)
    td.write_images(tmp_path / "images", count=2)
    td.write_images(tmp_path / "class", count=2, captions=False, seed=5)
    done = subprocess.run(
        [sys.executable, "-m", "comfyui_tlora.trainer.diffusers", "--model", str(tmp_path / "sdxl"),
         "--data", str(tmp_path / "images"), "--class-data", str(tmp_path / "class"), "--class-prompt",
         "a photo of a square", "--num-class-images", "3", "--output-dir", str(tmp_path / "out"), "--output-name",
         "xl", "--steps", "2",
         "--train-text-encoder", "--aspect-buckets", "--resolution", "64", "--quiet", "--loss", "dco",
         "--sample-every", "2", "--sample-steps", "2"],
        cwd=str(tmp_path), env=_env(), capture_output=True, text=True, timeout=300)
    _ok(done)
    loaded = tformat.load(str(tmp_path / "out" / "xl.safetensors"))
    keys = set(loaded.adapters)
    for prefix in ("clip_l", "clip_g"):  # ComfyUI's CLIP names (with `text_model.`), tabled by tlora.arch
        table = tarch.text_encoder_modules(tarch.TextEncoderConfig(prefix, 2, 16, 32, ""))
        names = {name for name, _, group in table if group == "te_attn"}
        assert len(names) == 8 and names <= keys
    assert any(k.startswith(tarch.UNET_PREFIX) for k in keys)
    meta = _meta(tmp_path / "out" / "xl.safetensors")
    assert meta["tlora.train.class_prompt"] == "a photo of a square" and meta["tlora.train.loss"] == "dco"
    assert meta["tlora.train.num_class_images"] == "3"  # two given, one generated by the base model
    from PIL import Image
    with Image.open(tmp_path / "out" / "xl.step000002.png") as preview:  # the preview at step 2, decoded by the VAE
        assert preview.size == (64, 64)


@pytest.mark.parametrize("case", ["no images", "single file without config", "bad setting"])
def test_bad_input_is_one_line_and_writes_nothing(work: Path, tmp_path: Path, case: str,
                                                  capsys: pytest.CaptureFixture) -> None:
    from comfyui_tlora.trainer.diffusers.cli import main
    empty = tmp_path / "empty"
    empty.mkdir()
    args = {"no images": ["--data", str(empty)],
            "single file without config": ["--model", str(work / "sd15" / "unet" / "diffusion_pytorch_model.safetensors")],
            "bad setting": ["--warmup-steps", "10", "--steps", "3"]}[case]
    status = main(["--model", str(work / "sd15"), "--data", str(work / "images"), "--output-dir",
                   str(tmp_path / "out"), "--quiet", *args])
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("tlora-train: ") and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
