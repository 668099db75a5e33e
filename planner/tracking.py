"""Live tensor storages during a step, seen through a dispatch mode.

Every operator output whose storage is new is counted once, at its size in
bytes, and released when its storage dies (a weak reference tells). Views,
aliases and in-place results share a storage and are never counted twice.
Storages that existed before the mode started (parameters, optimizer state,
the batch) are not counted; callers account for them separately.

An operator's scratch, memory it takes and gives back within the call (a
oneDNN convolution reorders its inputs and gradients into blocked layouts,
a slow convolution unfolds its input), never passes the dispatcher as an
output. It counts at its operator's tick, on CUDA from the caching
allocator's peak statistics, on the CPU from the memory events of the
autograd profiler (its legacy, CPU-only form), which sees every block of
c10's CPU allocator made on the calling thread.

Two kinds of memory need more than watching operator outputs. A tensor
subclass that wraps others (a DTensor around its local shard) holds the
memory of its inner tensor, so it is keyed and sized by that. And an engine
may grow or shrink a storage in place (FSDP2 resizes the storage of an
unsharded parameter to its full size to gather it and to 0 to free it):
while the mode is active, `UntypedStorage.resize_` is watched, a storage
resized to a positive size counts from then on at that size and one resized
to 0 is freed.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import fields, is_dataclass
from typing import Any

import torch
from torch import nn

from planner.core.graph import Category
from planner.torch_internals import CpuScratch, TorchDispatchMode, is_wrapper_subclass, watching_storage_resizes

CUDA_BLOCK_BYTES = 512  # the CUDA caching allocator rounds every block up to this
# Operators that allocate and compute nothing: queries of a tensor's metadata that reach the dispatcher
# for fake tensors, and `detach`, which autograd's saved-tensor hooks call (the profile's and
# torch.utils.checkpoint's) as well as the model.
METADATA_OPS = frozenset({torch.ops.prim.device.default, torch.ops.aten.detach.default})


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested tuples, lists, dicts, dataclasses and output objects."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            yield from tensors_in(item)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            yield from tensors_in(item)
    elif is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            yield from tensors_in(getattr(obj, f.name))


def tensors_held(obj: Any, depth: int = 6) -> Iterator[torch.Tensor]:
    """Every tensor reachable from `obj` through containers and the attributes of plain objects (a
    key/value cache and its layers), `depth` levels down; modules, classes and functions are not
    looked into."""
    seen: set[int] = set()

    def walk(value: Any, level: int) -> Iterator[torch.Tensor]:
        if isinstance(value, torch.Tensor):
            yield value
            return
        if level > depth or id(value) in seen or isinstance(value, (nn.Module, type, str, bytes, int, float)):
            return
        seen.add(id(value))
        if isinstance(value, Mapping):
            items = value.values()
        elif isinstance(value, (list, tuple, set, frozenset)):
            items = value
        elif hasattr(value, "__dict__") and not callable(value) and type(value).__module__ != "builtins":
            items = vars(value).values()
        else:
            return
        for item in items:
            yield from walk(item, level + 1)

    yield from walk(obj, 0)


def public_state(module: nn.Module) -> dict[str, Any]:
    """A module's own attributes that are not parameters, buffers or submodules (nor private)."""
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}


def op_tensors(values: Iterable[Any]) -> list[torch.Tensor]:
    """The tensors among an operator's arguments or results (tensors, scalars and nested lists)."""
    found = []
    for v in values:
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            found.extend(op_tensors(v))
    return found


def storage_of(t: torch.Tensor) -> torch.UntypedStorage:
    """The storage that holds a tensor's memory; for a wrapper subclass (DTensor), its inner tensor's."""
    while is_wrapper_subclass(t):
        inner, _ = t.__tensor_flatten__()
        t = getattr(t, inner[0])
    return t.untyped_storage()


class Positions:
    """The position of each of some objects among them, by identity, without keeping them alive: an
    object freed since cannot pass for a new one that took its `id`."""

    def __init__(self, objects: Iterable[Any] = ()) -> None:
        self._refs = {id(o): (i, _ref(o)) for i, o in enumerate(objects)}

    def of(self, obj: Any) -> int | None:
        i, ref = self._refs.get(id(obj), (None, None))
        return i if ref is not None and ref() is obj else None


def _ref(obj: Any) -> Callable[[], Any]:
    try:
        return weakref.ref(obj)
    except TypeError:  # an int, None: no weak reference to it; holding it costs nothing
        return lambda: obj


def storage_key(t: torch.Tensor) -> int:
    """Identity of the storage behind a tensor (shared by its views)."""
    return id(storage_of(t))


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind some tensors."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = storage_of(t)
        seen[id(st)] = st.nbytes()
    return sum(seen.values())


def allocated_bytes(nbytes: int, device: torch.device) -> int:
    """What the device's allocator really takes for a storage of `nbytes`."""
    if device.type == "cuda":
        return -(-nbytes // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES
    return nbytes


class StorageTracker(TorchDispatchMode):
    """Counts the live bytes of storages allocated on `device` while active.

    `live_bytes` is what is alive now, `peak_bytes` the most ever alive; `tick`
    advances at every operator call, allocation and free.
    """

    def __init__(self, device: torch.device | str, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.device = torch.device(device)
        # Storages alive before the step; holding them keeps their ids from being reused.
        self._existing = {storage_key(t): t.untyped_storage() for t in existing}
        self.ignored = self._existing.keys()
        self.live: dict[int, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.tick = 0
        self.op_ms = 0.0  # time of the last operator call
        self.watch_scratch = self.device.type == "cuda" and torch.cuda.is_available()
        self.cpu_scratch = CpuScratch() if self.device.type == "cpu" else None
        self.watch_cpu_scratch = self.cpu_scratch is not None and self.cpu_scratch.available()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in METADATA_OPS or func.namespace == "profiler":  # record_function marks: no memory
            return func(*args, **kwargs)
        self.before_op()
        if self.watch_scratch:
            torch.cuda.reset_peak_memory_stats(self.device)
            torch.cuda.synchronize(self.device)  # the clock sees this operator's kernels, not those queued before
        cpu_scratch = self.watch_cpu_scratch and self.cpu_scratch.start()
        try:
            start = time.perf_counter()
            out = func(*args, **kwargs)
            if self.watch_scratch:
                torch.cuda.synchronize(self.device)
            self.op_ms = (time.perf_counter() - start) * 1e3
        finally:
            scratch = self.cpu_scratch.stop() if cpu_scratch else 0
        self.tick += 1
        ins = op_tensors((*args, *kwargs.values()))
        outs = op_tensors(out if isinstance(out, (list, tuple)) else (out,))
        inputs = {storage_key(t) for t in ins}
        new = []
        for t in outs:
            if t.device.type == self.device.type:
                key = storage_key(t)
                if key not in self.live and key not in inputs and key not in self.ignored:
                    self._alloc(storage_of(t))
                    new.append(key)
        self.on_op(func, args, kwargs, out, ins, outs, inputs, new)
        if self.watch_scratch:
            self._scratch(torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device))
        elif cpu_scratch:
            self._scratch(scratch)
        return out

    def __enter__(self):
        self._resizes = contextlib.ExitStack()
        self._resizes.enter_context(watching_storage_resizes(self._resized))
        return super().__enter__()

    def __exit__(self, *exc):
        self._resizes.close()
        return super().__exit__(*exc)

    def _resized(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if storage.device.type != self.device.type or key in self.ignored:
            return
        self._free(key)
        if storage.nbytes() > 0:
            self._alloc(storage)

    def _alloc(self, storage: torch.UntypedStorage) -> None:
        self._count(id(storage), allocated_bytes(storage.nbytes(), self.device))
        weakref.finalize(storage, self._free, id(storage))

    def _scratch(self, nbytes: int) -> None:
        if nbytes > 0:
            key = -self.tick  # no storage has this id
            self._count(key, nbytes)
            self._free(key)

    def _count(self, key: int, nbytes: int) -> None:
        self.live[key] = nbytes
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.tick += 1
        self.on_alloc(key, nbytes)

    def _free(self, key: int) -> None:
        nbytes = self.live.pop(key, None)
        if nbytes is None:
            return
        self.live_bytes -= nbytes
        self.tick += 1
        self.on_free(key)

    def stop_tracking(self) -> None:
        """Forget every live storage, so frees after this point are not seen."""
        self.live.clear()

    # Subclasses record more.
    def before_op(self) -> None:
        """Before an operator runs."""

    def on_op(self, func, args, kwargs, out, ins: list, outs: list, inputs: set[int], new: list[int]) -> None:
        """After an operator: its tensors in and out, its input storages and the storages it made."""

    def on_alloc(self, key: int, nbytes: int) -> None:
        """A storage counted from now on; a negative key is the last operator's scratch."""

    def on_free(self, key: int) -> None:
        pass


def fixed_groups(model: nn.Module, batch: Any, optimizer) -> dict[Category, list[torch.Tensor]]:
    """The tensors alive before the step, by category; `batch` is whatever holds the step's inputs."""
    return {
        Category.PARAMETERS: list(model.parameters()),
        Category.BUFFERS: list(model.buffers()),
        Category.INPUTS: list(tensors_in(batch)),
        Category.OPTIMIZER: optimizer_tensors(optimizer),
    }


def fixed_bytes(groups: dict[Category, list[torch.Tensor]], device: torch.device) -> dict[Category, int]:
    """Bytes per category, each storage counted once (in the first category that holds it)."""
    seen: set[int] = set()
    sizes = {}
    for category, tensors in groups.items():
        sizes[category] = 0
        for t in tensors:
            key = storage_key(t)
            if key not in seen:
                seen.add(key)
                sizes[category] += allocated_bytes(storage_of(t).nbytes(), device)
    return sizes


def optimizer_tensors(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    return [t for state in optimizer.state.values() for t in tensors_in(state)]
