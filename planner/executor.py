"""Apply a plan to an unchanged model.

    handle = planner.apply(model, plan)   # training code stays as it was
    ...
    handle.remove()                       # the model runs as before

Each unit module gets an instance-level `forward` that looks up what the
plan says for this call (the n-th call of the module in the current forward
of the model) and runs it:

- recompute: through PyTorch's non-reentrant checkpoint, one region per run
  of units, with a selective-save policy for operators the plan keeps; the
  buffers of the region's modules (batch-norm statistics) are copied while
  it replays and put back, so the replay changes nothing but what backward
  needs;
- offload: tensors the unit saves for backward, other than parameters, its
  inputs and its outputs, go to host memory when the unit returns (pinned,
  on a side stream, on CUDA) and come back when backward reaches the next
  unit (prefetch), or when first needed.

Parameters, buffers, state_dict keys and the module tree are untouched.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import weakref
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import checkpoint as ckpt
from torch.utils._python_dispatch import _get_current_dispatch_mode, _pop_mode_temporarily
from torch.utils._pytree import tree_flatten, tree_unflatten

from planner.actions import Action, Choice
from planner.step import timed_ms
from planner.tracking import storage_key, tensors_in
from planner.units import buffers_of, fingerprint
from solvers.plan import Plan


class PlanMismatch(ValueError):
    """The plan was made for another model, or names units this model does not have."""


def apply(model: nn.Module, plan: Plan) -> Handle:
    """Make `model` run under `plan` until `remove()` is called on the returned handle."""
    check_plan(model, plan)
    handle = Handle(model, plan)
    handle.install()
    return handle


def check_plan(model: nn.Module, plan: Plan) -> None:
    modules = dict(model.named_modules())
    missing = sorted({key.rsplit("#", 1)[0] for key in plan.units} - modules.keys())
    if type(model).__name__ != plan.model or fingerprint(model) != plan.fingerprint or missing:
        detail = f"; units it names that this model lacks: {', '.join(missing)}" if missing else ""
        raise PlanMismatch(
            f"the plan was made for a {plan.model} (fingerprint {plan.fingerprint}), and this model is a "
            f"{type(model).__name__} (fingerprint {fingerprint(model)}){detail}: profile this model and make a new plan"
        )


@dataclass
class _Region:
    """One checkpointed run of units during one forward."""

    choice: Choice
    calls: list[tuple[Callable, list, Any, list]] = field(default_factory=list)  # forward, leaves, spec, links
    last_outputs: dict[int, int] = field(default_factory=dict)  # id of a leaf of the last output -> position
    generator: Iterator | None = None
    buffers: list[torch.Tensor] = field(default_factory=list)  # of its units' modules, put back after a replay


class Handle:
    """Installs the plan on a model; `remove()` (or leaving a `with` block) takes it off."""

    def __init__(self, model: nn.Module, plan: Plan) -> None:
        self.model = model
        self.plan = plan
        self.modules = dict(model.named_modules())
        self.actions: dict[tuple[str, int], tuple[Choice, int]] = {}  # (name, call) -> choice, position
        for choice in plan.choices:
            for position, u in enumerate(choice.units):
                name, call = plan.units[u].rsplit("#", 1)
                self.actions[(name, int(call))] = (choice, position)
        self.names = sorted({key.rsplit("#", 1)[0] for key in plan.units})
        self.calls: dict[str, int] = {}
        self.forwards = 0  # forwards with gradients so far: a step has plan.forwards of them
        self.depth = 0
        self.region: _Region | None = None
        self.offload = _Offloader()
        self.seen: set[tuple[str, int]] = set()
        self.watch: Callable[[Choice | None], None] | None = None  # told when a replay starts (its choice) and ends
        self.measured = None  # `planner.auto`'s measurement of a planned step
        self._hooks: list = []

    # Installation.
    def install(self) -> None:
        for name in self.names:
            module = self.modules[name]
            module.forward = self._forward(name, module.forward)
        self._hooks = [
            self.model.register_forward_pre_hook(self._begin),
            self.model.register_forward_hook(self._end, always_call=True),
        ]

    def remove(self) -> None:
        for name in self.names:
            self.modules[name].__dict__.pop("forward", None)
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _begin(self, module, args) -> None:
        if not torch.is_grad_enabled():
            return
        if self.forwards % self.plan.forwards == 0:  # a new step: unit calls count from 0
            self.calls = dict.fromkeys(self.names, 0)
            self.seen = set()
        self.forwards += 1
        self.offload.start()

    def _end(self, module, args, output) -> None:
        if self.region is not None:
            self._close_region()
            raise PlanMismatch(f"a recompute region of the plan did not run to its end: {self.plan.units[self.region.choice.units[-1]]}")
        if torch.is_grad_enabled() and self.forwards % self.plan.forwards == 0:
            missing = sorted(f"{n}#{c}" for n, c in self.actions.keys() - self.seen)
            if missing:
                raise PlanMismatch(f"the plan names unit calls that did not run in this forward: {', '.join(missing[:8])}")

    # Running one unit call.
    def _forward(self, name: str, forward: Callable) -> Callable:
        @functools.wraps(forward)
        def run(*args, **kwargs):
            if self.depth or not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            call = self.calls.get(name, 0)
            self.calls[name] = call + 1
            self.depth += 1
            try:
                waiting, self.offload.waiting = self.offload.waiting, None
                output = self._run(name, call, forward, args, kwargs)
                self.offload.prefetch_on_grad(waiting, output)
                return output
            finally:
                self.depth -= 1

        return run

    def _run(self, name: str, call: int, forward: Callable, args: tuple, kwargs: dict):
        action = self.actions.get((name, call))
        if action is None:
            return forward(*args, **kwargs)
        self.seen.add((name, call))
        choice, position = action
        if choice.action is Action.OFFLOAD:
            return self.offload.run(forward, args, kwargs, self.modules[name])
        return self._recompute(choice, position, forward, args, kwargs)

    def _recompute(self, choice: Choice, position: int, forward: Callable, args: tuple, kwargs: dict):
        if position == 0:
            self.region = _Region(choice)
            self.region.generator = ckpt._checkpoint_without_reentrant_generator(
                functools.partial(self._replay, self.region),
                True,
                self._context_fn(choice),
                "default",
                False,
                True,
                *args,
                **kwargs,
            )
            next(self.region.generator)
            units = [self.plan.units[u].rsplit("#", 1)[0] for u in choice.units]
            self.region.buffers = buffers_of([self.modules[name] for name in units])
        region = self.region
        leaves, spec = tree_flatten((args, kwargs))
        links = [region.last_outputs.get(id(leaf)) for leaf in leaves]
        kept = [None if link is not None else leaf for leaf, link in zip(leaves, links)]
        region.calls.append((forward, kept, spec, links))
        try:
            output = forward(*args, **kwargs)
        except BaseException:
            self._close_region()
            raise
        region.last_outputs = {id(leaf): i for i, leaf in enumerate(tree_flatten(output)[0])}
        if position == len(choice.units) - 1:
            self._close_region()
        return output

    def _close_region(self) -> None:
        region, self.region = self.region, None
        if region is not None and region.generator is not None:
            next(region.generator, None)
            region.generator = None  # the generator refers to the region: no cycle may outlive the step

    def _replay(self, region: _Region, *args, **kwargs) -> None:
        """Run the region's forward again from its first inputs; its units' buffers are left as they were."""
        with _outside_checkpoint_modes(), torch.no_grad():
            snapshot = [b.clone() for b in region.buffers]
        self.depth += 1
        if self.watch is not None:
            self.watch(region.choice)
        try:
            output = region.calls[0][0](*args, **kwargs)
            for forward, kept, spec, links in region.calls[1:]:
                previous = tree_flatten(output)[0]
                leaves = [previous[link] if link is not None else leaf for leaf, link in zip(kept, links)]
                call_args, call_kwargs = tree_unflatten(leaves, spec)
                output = forward(*call_args, **call_kwargs)
        finally:
            self.depth -= 1
            if self.watch is not None:
                self.watch(None)
            with _outside_checkpoint_modes(), torch.no_grad():
                for buffer, value in zip(region.buffers, snapshot):
                    # through `.data`: putting the values back is no change autograd must see; bumping the
                    # buffer's version would fail the backward of a call of the module outside the region
                    # (batch norm saves its running statistics)
                    buffer.data.copy_(value)

    @staticmethod
    def _context_fn(choice: Choice):
        if not choice.save_ops:
            return ckpt.noop_context_fn
        save_ops = choice.save_ops

        def policy(ctx, func, *args, **kwargs):
            if str(func.overloadpacket) in save_ops:
                return ckpt.CheckpointPolicy.MUST_SAVE
            return ckpt.CheckpointPolicy.PREFER_RECOMPUTE

        return functools.partial(ckpt.create_selective_checkpoint_contexts, policy)


def _outside_checkpoint_modes():
    """Steps out of a selective checkpoint's dispatch mode, which expects only the forward's
    operators; modes below it (a memory tracker) still see what runs."""
    mode = _get_current_dispatch_mode()
    if mode is not None and type(mode).__module__ == ckpt.__name__:
        return _pop_mode_temporarily()
    return contextlib.nullcontext()


class _Offloader:
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

    def __init__(self, owner: _Offloader, keep: set[int]) -> None:
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
                stored.host, stored.device = _to_host(stored.device, self.owner), None
        self.stored = {}
        self.owner.waiting = self

    def fetch(self) -> None:
        for ref in self.slots:
            slot = ref()
            if slot is not None and slot.stored.host is not None:
                stored = slot.stored
                stored.restored, stored.ready = _to_device(stored.host, self.owner)
                stored.host = None


@dataclass
class _HostCopy:
    data: Any  # a pinned CPU tensor of bytes, or a NumPy array for storages that live on the CPU
    device: torch.device
    event: Any = None


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _to_host(storage: torch.UntypedStorage, owner: _Offloader) -> _HostCopy:
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


@dataclass(frozen=True)
class Mechanism:
    """What the executor costs on a device beyond the forward a region replays and the bytes an
    offload copies (hooks, checkpoint and copy bookkeeping): per choice, and per storage it frees."""

    region_ms: float
    region_storage_ms: float
    offload_ms: float
    offload_storage_ms: float

    def scaled(self, share: float) -> Mechanism:
        """These costs where only `share` of the host's extra work delays the step."""
        return Mechanism(*(share * ms for ms in astuple(self)))


@functools.cache
def mechanism(device: str, repeats: int = 21) -> Mechanism:
    """`Mechanism` measured once per process on small models whose first unit saves few storages or
    many: each plan in turn with the unplanned step, medians of the differences, fitted by a line."""
    points = [_mechanism_point(device, layers, repeats) for layers in (1, 6)]
    (n1, r1, o1), (n2, r2, o2) = points
    region_slope, offload_slope = max(0.0, (r2 - r1) / (n2 - n1)), max(0.0, (o2 - o1) / (n2 - n1))
    return Mechanism(max(0.0, r1 - region_slope * n1), region_slope, max(0.0, o1 - offload_slope * n1), offload_slope)


def _mechanism_point(device: str, layers: int, repeats: int) -> tuple[int, float, float]:
    """(storages the first unit saves, region ms beyond its forward, offload ms) for units of `layers` layers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(
            *(nn.Sequential(*(m for _ in range(layers) for m in (nn.Linear(64, 64), nn.GELU()))) for _ in range(2))
        ).to(device)
        x = torch.randn(16, 64, device=device)

    def step() -> None:
        model(x).sum().backward()
        model.zero_grad(set_to_none=True)

    def handle(action: Action) -> Handle:
        plan = Plan(type(model).__name__, fingerprint(model), ("0#0", "1#0"), (Choice(action, (0,)),), 0, "", None, 0.0, 0.0, 0, 0.0, 0.0, 0)
        return Handle(model, plan)

    skip = {storage_key(t) for t in [x, *model.parameters()]}
    saved = set()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.add(storage_key(t)) or t, lambda t: t):
        model[0](x)
    recompute, offload = handle(Action.RECOMPUTE), handle(Action.OFFLOAD)
    diffs: dict[Handle, list[float]] = {recompute: [], offload: []}
    forward = []
    for _ in range(repeats + 1):
        forward.append(timed_ms(lambda: model[0](x), x.device))
        for h, times in diffs.items():
            plain = timed_ms(step, x.device)
            h.install()
            times.append(timed_ms(step, x.device) - plain)
            h.remove()
    region = statistics.median(diffs[recompute][1:]) - statistics.median(forward[1:])
    return len(saved - skip), region, statistics.median(diffs[offload][1:])


@functools.cache
def host_copy_bytes_per_s(nbytes: int = 32 << 20, repeats: int = 3, device: str = "cpu") -> float:
    """Bytes per second, each way, of offloading a storage of `nbytes` and bringing it back (median
    of `repeats` round trips after a warm-up), measured once per process. On a CPU, 32 MiB is large
    enough that what comes back lands on freshly mapped pages, whose faults cost more than the copy,
    as restores in a training step mostly do (the allocator gives large freed blocks back to the
    system)."""
    storage = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device).untyped_storage()
    owner = _Offloader()
    times = [timed_ms(lambda: _to_device(_to_host(storage, owner), owner)[0], storage.device) for _ in range(repeats + 1)]
    return 2 * storage.nbytes() / statistics.median(times[1:]) * 1e3


def _to_device(copy: _HostCopy, owner: _Offloader) -> tuple[torch.UntypedStorage, Any]:
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
