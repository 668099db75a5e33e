"""Offload: an offloaded unit call's saved tensors go to host memory when it returns and come back
for its backward.

Tensors the unit saves for backward, other than parameters, its inputs and its outputs, are
packed by saved-tensor hooks; when the call returns, each storage they live in is copied to host
memory (pinned, on a side stream, on CUDA; NumPy arrays kept for reuse, on a CPU) and let go.
Backward reaching the next unit call's outputs brings them back (prefetch), or their first use does.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from planner.tracking import storage_key, tensors_in


class Offloader:
    """Moves saved tensors of offloaded unit calls to host memory and back."""

    def __init__(self) -> None:
        self.waiting: _Offloaded | None = None  # the last offloaded call, until the next unit call returns
        self.stream = None
        self.host_arrays: dict[int, list[np.ndarray]] = {}  # CPU only: arrays free for reuse, by size

    def start(self) -> None:
        self.waiting = None

    def run(self, forward: Callable, args: tuple, kwargs: dict, module: nn.Module):
        keep = {storage_key(t) for t in tensors_in((args, kwargs))}
        keep |= {storage_key(t) for t in [*module.parameters(), *module.buffers()]}
        call = _Offloaded(self, keep)
        with torch.autograd.graph.saved_tensors_hooks(call.pack, call.unpack):
            output = forward(*args, **kwargs)
        call.finish(output)
        return output

    @staticmethod
    def prefetch_on_grad(waiting: _Offloaded | None, output: Any) -> None:
        """Backward reaching `output` (the next unit call's) brings the waiting offloaded call back."""
        if waiting is not None:
            for t in tensors_in(output):
                if t.grad_fn is not None:
                    t.grad_fn.register_prehook(lambda grads: waiting.fetch())
                    break

    def host_array(self, nbytes: int) -> np.ndarray:
        free = self.host_arrays.get(nbytes)
        return free.pop() if free else np.empty(nbytes, np.uint8)

    def side_stream(self, device: torch.device):
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        return self.stream


class _Stored:
    """One storage that offloaded tensors live in: on the device, on the host, or back on the device."""

    def __init__(self, storage: torch.UntypedStorage) -> None:
        self.device: torch.UntypedStorage | None = storage
        self.host: _HostCopy | None = None
        self.restored: torch.UntypedStorage | None = None
        self.ready: Any = None  # CUDA: the event of the copy back, waited for where first used


class _Slot:
    """One saved tensor, as a view into a `_Stored`; autograd holds it until backward is done with it."""

    __slots__ = ("stored", "dtype", "size", "stride", "offset", "__weakref__")

    def __init__(self, stored: _Stored, t: torch.Tensor) -> None:
        self.stored = stored
        self.dtype, self.size, self.stride, self.offset = t.dtype, t.size(), t.stride(), t.storage_offset()

    def tensor(self) -> torch.Tensor:
        if self.stored.ready is not None:
            torch.cuda.current_stream(self.stored.restored.device).wait_event(self.stored.ready)
            self.stored.ready = None
        storage = self.stored.restored if self.stored.restored is not None else self.stored.device
        return torch.empty(0, dtype=self.dtype, device=storage.device).set_(
            storage, self.offset, self.size, self.stride
        )


class _Offloaded:
    """The saved tensors of one offloaded call: on the device during its forward, on the host after.

    Tensors that share a storage (views, aliases) share one copy.
    """

    def __init__(self, owner: Offloader, keep: set[int]) -> None:
        self.owner = owner
        self.keep = keep
        self.stored: dict[int, _Stored] = {}  # storage key -> its copy, during the forward
        self.slots: list[weakref.ref[_Slot]] = []

    def pack(self, t: torch.Tensor):
        key = storage_key(t)
        if key in self.keep:
            return t
        stored = self.stored.setdefault(key, _Stored(t.untyped_storage()))
        slot = _Slot(stored, t)
        self.slots.append(weakref.ref(slot))
        return slot

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        if packed.stored.host is not None:
            self.fetch()
        return packed.tensor()

    def finish(self, output: Any) -> None:
        """The call returned: its outputs stay, every other saved storage goes to the host."""
        outputs = {storage_key(t) for t in tensors_in(output)}
        for key, stored in self.stored.items():
            if key not in outputs:
                stored.host, stored.device = to_host(stored.device, self.owner), None
        self.stored = {}
        self.owner.waiting = self

    def fetch(self) -> None:
        for ref in self.slots:
            slot = ref()
            if slot is not None and slot.stored.host is not None:
                stored = slot.stored
                stored.restored, stored.ready = to_device(stored.host, self.owner)
                stored.host = None


@dataclass
class _HostCopy:
    data: Any  # a pinned CPU tensor of bytes, or a NumPy array for storages that live on the CPU
    device: torch.device
    event: Any = None


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def to_host(storage: torch.UntypedStorage, owner: Offloader) -> _HostCopy:
    data = _bytes_of(storage)
    if storage.device.type == "cuda":
        stream = owner.side_stream(storage.device)
        stream.wait_stream(torch.cuda.current_stream(storage.device))
        with torch.cuda.stream(stream):
            host = torch.empty(data.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(data, non_blocking=True)
            data.record_stream(stream)
            event = torch.cuda.Event()
            event.record(stream)
        return _HostCopy(host, storage.device, event)
    # On the CPU "host memory" is memory outside the tensor allocator: NumPy arrays, kept for reuse
    # (the same sizes come back every step, and fresh pages cost more than the copy).
    host = owner.host_array(data.numel())
    np.copyto(host, data.numpy())
    return _HostCopy(host, storage.device)


def to_device(copy: _HostCopy, owner: Offloader) -> tuple[torch.UntypedStorage, Any]:
    """The storage back on its device, and on CUDA the event its users wait for. The copy runs on
    the side stream into memory of the current stream's pool, so that backward reuses it."""
    if copy.device.type == "cuda":
        current, stream = torch.cuda.current_stream(copy.device), owner.side_stream(copy.device)
        data = torch.empty(copy.data.shape, dtype=torch.uint8, device=copy.device)
        stream.wait_stream(current)  # the memory is free from the current stream's point on
        with torch.cuda.stream(stream):
            data.copy_(copy.data, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return data.untyped_storage(), event
    storage = torch.from_numpy(copy.data).clone().untyped_storage()
    owner.host_arrays.setdefault(copy.data.size, []).append(copy.data)
    return storage, None
