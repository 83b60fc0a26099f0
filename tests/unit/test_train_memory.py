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
    assert all(not m._forward_pre_hooks for m in net.modules())


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


# ----- the estimate --------------------------------------------------------------------------------------
EST = pack_module("trainer.estimate")


def measured_saved_bytes(net, latent, cond, t, checkpointing=False):
    """Bytes autograd saves in one real forward at the run's size (own count: unique storages, weights out)."""
    ckpt = pack_module("trainer.checkpointing")
    skip = {p.untyped_storage().data_ptr() for p in [*net.parameters(), *net.buffers()]}
    seen = {}

    def pack(t_):
        storage = t_.untyped_storage()
        if storage.data_ptr() not in skip and storage.data_ptr() != latent.untyped_storage().data_ptr():
            seen[storage.data_ptr()] = storage.nbytes()
        return t_
    undo = ckpt.enable_checkpointing(list(net.blocks)) if checkpointing else []
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t_: t_):
            out = net(latent, t, cond)
    finally:
        ckpt.restore_checkpointing(undo)
    del out
    return sum(seen.values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_estimate_of_saved_activations_matches_a_real_pass_at_the_runs_size(checkpointing):
    net = TinyNet(dim=48)
    data = make_data(n=1, size=40)  # the probes run at 8, 16 and 24: 40 is an extrapolation
    binding = E.Binding(groups_for(net), lambda x, t, c: net(x, t, c["c_crossattn"]), schedule(), data,
                        checkpoint_modules=list(net.blocks), progress_bar=False, estimate_memory=True)
    # One form of T throughout: `auto` picks per shape by timing, and the forms save different tensors.
    trainer = E.Trainer(binding, settings(steps=1, gradient_checkpointing=checkpointing, batch_size=2,
                                          form="factored"))
    trainer.open()
    try:
        memory = trainer.memory
        ex = data.instance[0]
        t = trainer.schedule.timesteps[500].reshape(1)
        real = measured_saved_bytes(net, ex.latent[None].clone(), ex.cond["c_crossattn"], t, checkpointing)
    finally:
        trainer.close()
    assert memory.activations == pytest.approx(2 * real, rel=0.02)  # batch 2: twice one sample's
    n_params = sum(p.numel() for p in trainer._params)
    assert memory.adapter == n_params * (4 + 4 + 8 + 4 * 6)  # value, grad, AdamW's moments, the guard's six copies
    frozen = sum(p.numel() * p.element_size() for p in net.parameters())  # adapters detached by close()
    assert memory.weights == frozen + 4 * len(trainer.modules)  # and each adapted layer's float32 scale
    assert trainer.metadata["tlora.train.memory_estimate"].endswith("GiB")


def test_a_run_over_its_memory_budget_is_refused_naming_a_setting_that_fits():
    net = TinyNet(dim=48)
    data = make_data(n=1, size=40)

    def trainer_with(**cfg):
        binding = E.Binding(groups_for(net), lambda x, t, c: net(x, t, c["c_crossattn"]), schedule(), data,
                            checkpoint_modules=list(net.blocks), progress_bar=False, estimate_memory=True)
        return E.Trainer(binding, settings(steps=1, **cfg))
    free = trainer_with()
    free.open()
    total, activations = free.memory.total, free.memory.activations
    free.close()
    budget = (total - activations * 0.3) / EST.GIB  # over by 30% of the activations
    with pytest.raises(E.TrainingError, match=r"^memory_budget: this run needs about .*, over the budget of .* GiB: "
                                              r"(\S+ \S+) brings it to about") as info:
        trainer_with(memory_budget=round(budget, 9) + 1e-9).open()
    setting = str(info.value).split(": ")[-1].split(" brings")[0]
    name, value = setting.split(" ")[:2]
    fixed = trainer_with(**{name: True if value == "on" else int(value)}, memory_budget=budget + 1e-9)
    fixed.open()  # the setting named does bring it under (or open() would refuse again)
    fixed.close()
