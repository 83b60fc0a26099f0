"""Memory options (issue 25, 1): block swap, partial checkpointing (the disk cache and the estimate have their own).

Offloaded training must equal resident training: same seed, same adapter to float tolerance, while
the swapped blocks' weights are verifiably off the device between their uses (an evicted weight is
an empty tensor, so a block that ran without its weights would fail, not compute quietly).
"""
from __future__ import annotations

import pytest
import torch

from harness.pack import pack_module
from tests.unit.test_engine import E, Stop, TinyNet, groups_for, make_data, schedule, settings, stop_at

OFF = pack_module("trainer.offload")


def train(net, tmp_path=None, name="a.safetensors", observer=None, **cfg):
    binding = E.Binding(groups_for(net), lambda x, t, c: net(x, t, c["c_crossattn"]), schedule(), make_data(),
                        checkpoint_modules=list(net.blocks), observer=observer, progress_bar=False,
                        interrupt_types=(Stop,))
    trainer = E.Trainer(binding, settings(**cfg), output_path=str(tmp_path / name) if tmp_path else None)
    return trainer, trainer.run()


def tensors(result):
    return {f"{k}.{n}": t for k, a in result.adapters.items() for n, t in a.tensors.items()}


@pytest.mark.parametrize("offload, checkpointing", [(1, False), (2, False), (2, True)])
def test_offloaded_training_equals_resident_training(offload, checkpointing):
    cfg = dict(steps=5, loss="dco", learning_rate=3e-3, gradient_checkpointing=checkpointing)
    _, resident = train(TinyNet(), **cfg)
    net = TinyNet()
    frozen_before = {n: p.detach().clone() for n, p in net.named_parameters()}
    sizes = []

    def watch(report):  # between steps: every swapped block's weights are off the device (empty)
        sizes.append([p.numel() for b in list(net.blocks)[-offload:] for p in b.parameters() if not p.requires_grad])
    trainer, offloaded = train(net, observer=watch, offload_blocks=offload, **cfg)
    assert sizes and all(n == 0 for step in sizes for n in step)
    a, b = tensors(resident), tensors(offloaded)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    # Put back as they were: same values, full tensors, the forward no longer wrapped.
    for name, param in net.named_parameters():
        assert torch.equal(param, frozen_before[name]), name
    assert all("forward" not in block.__dict__ for block in net.blocks)


def test_weights_saved_for_backward_are_references_to_their_block():
    """Autograd would keep every block's weights until backward; the swap saves references and copies back in."""
    def grad_of(offload):
        net = TinyNet()
        for p in net.parameters():
            p.requires_grad_(False)
        x = torch.linspace(-1, 1, 256).reshape(1, 4, 8, 8).clone().requires_grad_(True)
        context = torch.linspace(-1, 1, 80).reshape(1, 5, 16)
        off = OFF.BlockOffload(list(net.blocks), 2, "cpu") if offload else None
        try:
            with off.saving() if off else torch.enable_grad():
                out = net(x, torch.tensor([10.0]), context)
            if off:
                assert off.packed >= 10  # q, k, v, out and the feed-forward's weights of both blocks
                off.release()  # nothing of the blocks left on the device: backward must copy them back in
                assert all(p.numel() == 0 for b in net.blocks for p in b.parameters())
                loads = off.loads
            out.square().mean().backward()
            if off:
                assert off.loads > loads
        finally:
            if off:
                off.close()
        return x.grad
    assert torch.allclose(grad_of(True), grad_of(False), atol=1e-6, rtol=0)


def test_partial_checkpointing_equals_plain():
    cfg = dict(steps=4, learning_rate=3e-3)
    _, plain = train(TinyNet(), **cfg)
    _, partial = train(TinyNet(), gradient_checkpointing=True, checkpoint_blocks=1, **cfg)
    a, b = tensors(plain), tensors(partial)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
