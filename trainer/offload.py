"""Block swap: frozen blocks kept on the CPU and brought to the device just before they run, the next prefetched.

The blocks are the model's repeated blocks, found by structure (the binding's `checkpoint_modules`).
The last `offload_blocks` of them keep their frozen weights in (pinned) CPU memory; a block's weights
are copied in when any of its modules is called (forward, the no-grad passes, a checkpointed block's recompute)
while the next block's copy is already on its way (a side CUDA stream), and at most RESIDENT offloaded
blocks are on the device at once (least recently used leaves first). Autograd would keep every block's
weights alive until backward: a weight saved for backward is saved as a reference to its block
(torch's saved-tensor hooks) and copied in again when backward needs it, the block before it prefetched.
Adapters and anything trained stay on the device. An evicted weight is an empty tensor: a block that
ran without its weights would fail loudly, never silently use stale ones.
"""
from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

RESIDENT = 2  # offloaded blocks on the device at once: the running one and the one prefetched


class BlockOffload:
    """Swaps the frozen weights of the last `count` blocks between CPU and the device; undo with close()."""

    def __init__(self, blocks: Sequence[nn.Module], count: int, device: torch.device | str,
                 keep: Callable[[nn.Parameter], bool] = lambda p: p.requires_grad):
        self.device = torch.device(device)
        self.blocks = list(blocks)[len(blocks) - min(count, len(blocks)):] if count > 0 else []
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.masters: list[list[tuple[nn.Parameter, Tensor]]] = []
        self.loaded: collections.OrderedDict[int, Any] = collections.OrderedDict()  # block -> its copy event
        self.by_storage: dict[int, tuple[int, nn.Parameter]] = {}
        self.last, self.direction = -1, 1
        self.packed = self.loads = 0  # references saved for backward; copies made (for tests and benchmarks)
        self._hooks: list[Any] = []
        for index, block in enumerate(self.blocks):
            pairs = []
            for param in block.parameters():
                if keep(param) or param.numel() == 0:
                    continue
                master = param.data.detach().to("cpu", copy=self.cuda)
                if self.cuda:
                    master = master.pin_memory()
                pairs.append((param, master))
                param.data = self._empty(param)
            self.masters.append(pairs)
            # Every module of the block asks for its weights when called: hosts call a block's layers
            # directly as often as the block itself (ComfyUI's UNet walks a TimestepEmbedSequential's
            # layers), and a checkpointed block's recompute calls them again.
            for sub in block.modules():
                self._hooks.append(sub.register_forward_pre_hook(self._pre_hook(index)))
        if self.cuda:
            torch.cuda.empty_cache()

    def _empty(self, param: nn.Parameter) -> Tensor:
        return torch.empty(0, dtype=param.dtype, device=self.device)

    def _pre_hook(self, index: int) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            self.ensure(index)
        return hook

    # ----- moving weights ---------------------------------------------------------------------
    def _copy_in(self, index: int) -> Any:
        """Start copying a block's weights to the device; the event to wait on (None on a CPU)."""
        self.loads += 1
        if not self.cuda:
            for param, master in self.masters[index]:
                param.data = master
                self.by_storage[master.untyped_storage().data_ptr()] = (index, param)
            return None
        with torch.cuda.stream(self.stream):
            for param, master in self.masters[index]:
                param.data = master.to(self.device, non_blocking=True)
                self.by_storage[param.data.untyped_storage().data_ptr()] = (index, param)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def _evict(self, index: int) -> None:
        for param, _ in self.masters[index]:
            self.by_storage.pop(param.data.untyped_storage().data_ptr(), None)
            param.data = self._empty(param)

    def _load(self, index: int) -> None:
        if index in self.loaded:
            self.loaded.move_to_end(index)
            return
        self.loaded[index] = self._copy_in(index)
        while len(self.loaded) > RESIDENT:
            oldest = next(iter(self.loaded))
            self.loaded.pop(oldest)
            self._evict(oldest)

    def ensure(self, index: int) -> None:
        """Block `index`'s weights on the device, ready for the compute stream; the next one in this direction started."""
        self._load(index)
        event = self.loaded.get(index)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for param, _ in self.masters[index]:
                param.data.record_stream(current)  # made on the copy stream, used on this one
            self.loaded[index] = None
        if index != self.last:  # forward runs the blocks up, backward down: prefetch the way it goes
            self.direction = -1 if index < self.last else 1
            self.last = index
        nxt = index + self.direction
        if 0 <= nxt < len(self.blocks) and nxt not in self.loaded:
            self._load(nxt)
            self.loaded.move_to_end(index)  # the running block is the most recent, not the prefetched one

    # ----- autograd ------------------------------------------------------------------------------
    def _pack(self, tensor: Tensor) -> Any:
        try:
            hit = self.by_storage.get(tensor.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # tensors without storage (fake, sparse...)
            hit = None
        if hit is None or tensor.device != self.device:
            # Detached (same storage and version counter): an output kept by the node that made it would
            # otherwise hold that node from inside it, a cycle that leaks the step's graph.
            return tensor.detach()
        self.packed += 1
        index, param = hit
        return (index, param, tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())

    def _unpack(self, saved: Any) -> Tensor:
        if isinstance(saved, Tensor):
            return saved
        index, param, shape, stride, offset = saved
        self.ensure(index)
        return param.data.as_strided(shape, stride, offset)

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Weights of offloaded blocks saved for backward as references while the block runs."""
        if not self.blocks:
            yield
            return
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    def wrap(self, denoiser: Callable) -> Callable:
        """A denoiser whose graph saves offloaded weights by reference."""
        if not self.blocks:
            return denoiser

        def call(*args: Any, **kwargs: Any) -> Any:
            with self.saving():
                return denoiser(*args, **kwargs)
        return call

    def release(self) -> None:
        """Every offloaded block off the device (between steps: nothing needs them until the next forward)."""
        for index in list(self.loaded):
            self._evict(index)
        self.loaded.clear()
        self.last, self.direction = -1, 1

    @contextlib.contextmanager
    def parked(self) -> Iterator[None]:
        """Every offloaded weight as its CPU copy while a host looks at the model (its loaders see real tensors)."""
        self.release()
        for pairs in self.masters:
            for param, master in pairs:
                param.data = master
        try:
            yield
        finally:
            for pairs in self.masters:
                for param, _ in pairs:
                    param.data = self._empty(param)
            self.last, self.direction = -1, 1

    def weight_bytes(self) -> int:
        """Bytes of the offloaded weights (what stays on the CPU)."""
        return sum(m.numel() * m.element_size() for pairs in self.masters for _, m in pairs)

    def close(self) -> None:
        """Every weight back on the device as a plain tensor, the blocks' forwards as they were."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for index, pairs in enumerate(self.masters):
            for param, master in pairs:
                param.data = master.to(self.device) if self.cuda else master
        for handle in self._hooks:
            handle.remove()
        self.masters, self.loaded, self.by_storage, self._hooks, self.blocks = [], collections.OrderedDict(), {}, [], []
