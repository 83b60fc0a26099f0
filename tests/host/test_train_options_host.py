"""Issue-25 options through the Train TLoRA node on the real host (tiny SD1.5 twin, CPU)."""
from __future__ import annotations

import pytest
import torch

from tests.host.test_train import images, pack, train


@pytest.fixture(scope="module")
def sd15(tm):
    return tm.tiny_sd15(seed=0), tm.tiny_clip(seed=0), tm.tiny_vae(seed=0)


def test_block_swap_through_the_node_trains_what_the_resident_model_does(sd15, loras_dir):
    model, clip, vae = sd15
    blocks = pack("trainer.comfy.model").checkpoint_blocks(model.model.diffusion_model)
    assert len(blocks) >= 2
    resident = train(model, clip, vae, output_name="resident", steps=3, loss="dco")[2]["adapters"]
    swapped = train(model, clip, vae, output_name="swapped", steps=3, loss="dco", offload_blocks=len(blocks),
                    gradient_checkpointing=True)[2]
    assert swapped["metadata"]["tlora.train.offload_blocks"] == str(len(blocks))
    for key, adapter in resident.items():
        for name, tensor in adapter.tensors.items():
            assert torch.allclose(swapped["adapters"][key].tensors[name], tensor, atol=1e-6), (key, name)
    assert all(p.numel() for b in blocks for p in b.parameters())  # every weight back in place


def test_the_node_reports_its_memory_estimate_and_refuses_a_run_over_its_budget(sd15, loras_dir):
    model, clip, vae = sd15
    meta = train(model, clip, vae, output_name="budget_ok", steps=1, memory_budget=64.0)[2]["metadata"]
    assert meta["tlora.train.memory_estimate"].endswith(" GiB")
    errors = pack("tlora.errors")
    with pytest.raises(errors.TLoRAError, match="^memory_budget: this run needs about .* over the budget of 0.0001 GiB"):
        train(model, clip, vae, output_name="budget_low", steps=1, memory_budget=0.0001)
    assert not (loras_dir / "budget_low.safetensors").exists()


def test_previews_of_every_prompt_and_the_held_out_loss_reach_the_events(sd15, loras_dir, comfy_host):
    model, clip, vae = sd15
    start = len(comfy_host.server.events)
    out = train(model, clip, vae, images(n=3), output_name="events", steps=2, sample_every=2,
                sample_prompt="a photo of sks dog\nsks dog on grass --w 128 --s 2", validation_split=0.34,
                validate_every=1)
    events = [d for e, d, _ in comfy_host.server.events[start:] if e == "tlora.train" and "status" not in d]
    assert [e.get("val_loss") is not None for e in events] == [True, True]
    last = events[-1]
    assert len(last["samples"]) == 2 and last["samples"][0] == last["sample"]
    assert last["samples"][1]["filename"].endswith("_000002.png") and "-p2_" in last["samples"][1]["filename"]
    assert out[2]["metadata"]["tlora.train.validation_images"] == "1"
