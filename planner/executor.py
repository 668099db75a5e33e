"""Apply a plan to an unchanged model.

    handle = planner.apply(model, plan)   # training code stays as it was
    ...
    handle.remove()                       # the model runs as before

Each unit module gets an instance-level `forward` that looks up what the
plan says for this call (the n-th call of the module in the current forward
of the model) and runs it:

- recompute: through PyTorch's non-reentrant checkpoint, one region per run
  of units, with a selective-save policy for operators the plan keeps; any
  buffer the region's forward mutates (batch-norm statistics) is restored
  after the replay, so the replay changes nothing but what backward needs;
- offload: tensors the unit saves for backward, other than parameters, its
  inputs and its outputs, go to host memory when the unit returns (pinned,
  on a side stream, on CUDA) and come back when backward reaches the next
  unit (prefetch), or when first needed.

Parameters, buffers, state_dict keys and the module tree are untouched.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import checkpoint as ckpt
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_unflatten

from planner.actions import Action, Choice
from planner.tracking import storage_key, tensors_in
from planner.units import fingerprint
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
    buffers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (buffer, value after forward)


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
        self.depth = 0
        self.region: _Region | None = None
        self.offload = _Offloader()
        self.seen: set[tuple[str, int]] = set()
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
        self.calls = dict.fromkeys(self.names, 0)
        self.seen = set()
        self.offload.start()

    def _end(self, module, args, output) -> None:
        if self.region is not None:
            self._close_region()
            raise PlanMismatch(f"a recompute region of the plan did not run to its end: {self.plan.units[self.region.choice.units[-1]]}")
        if torch.is_grad_enabled():
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
            action = self.actions.get((name, call))
            self.depth += 1
            try:
                if action is None:
                    return forward(*args, **kwargs)
                self.seen.add((name, call))
                choice, position = action
                if choice.action is Action.OFFLOAD:
                    return self.offload.run(forward, args, kwargs, self.modules[name])
                return self._recompute(choice, position, forward, args, kwargs)
            finally:
                self.depth -= 1

        return run

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
            modules = [self.modules[self.plan.units[u].rsplit("#", 1)[0]] for u in region.choice.units]
            region.buffers = [(b, b.clone()) for m in modules for b in m.buffers()]

    def _replay(self, region: _Region, *args, **kwargs) -> None:
        """Run the region's forward again from its first inputs, leaving every buffer as the forward left it."""
        self.depth += 1
        try:
            output = region.calls[0][0](*args, **kwargs)
            for forward, kept, spec, links in region.calls[1:]:
                previous = tree_flatten(output)[0]
                leaves = [previous[link] if link is not None else leaf for leaf, link in zip(kept, links)]
                call_args, call_kwargs = tree_unflatten(leaves, spec)
                output = forward(*call_args, **call_kwargs)
        finally:
            self.depth -= 1
            # Outside the checkpoint's own dispatch modes, which expect only the forward's operators.
            with torch.no_grad(), _disable_current_modes():
                for buffer, value in region.buffers:
                    buffer.copy_(value)

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


class _Offloader:
    """Moves saved tensors of offloaded unit calls to host memory and back."""

    def __init__(self) -> None:
        self.pending: list[_Offloaded] = []  # offloaded calls whose tensors are on the host, in forward order
        self.stream = None

    def start(self) -> None:
        self.pending = []

    def run(self, forward: Callable, args: tuple, kwargs: dict, module: nn.Module):
        keep = {storage_key(t) for t in tensors_in((args, kwargs))}
        keep |= {storage_key(t) for t in [*module.parameters(), *module.buffers()]}
        call = _Offloaded(self, keep)
        if self.pending:  # backward reaching this call's outputs brings the previous one back
            call.prefetch_before = self.pending[-1]
        with torch.autograd.graph.saved_tensors_hooks(call.pack, call.unpack):
            output = forward(*args, **kwargs)
        call.finish(output)
        self.pending.append(call)
        return output

    def side_stream(self, device: torch.device):
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        return self.stream


class _Slot:
    """One saved tensor: on the device, on the host, or back on the device. Autograd holds it."""

    __slots__ = ("device", "host", "restored", "__weakref__")

    def __init__(self, t: torch.Tensor) -> None:
        self.device: torch.Tensor | None = t
        self.host: _HostCopy | None = None
        self.restored: torch.Tensor | None = None


class _Offloaded:
    """The saved tensors of one offloaded call: on the device during its forward, on the host after."""

    def __init__(self, owner: _Offloader, keep: set[int]) -> None:
        self.owner = owner
        self.keep = keep
        self.slots: list[weakref.ref[_Slot]] = []  # released as soon as backward is done with them
        self.prefetch_before: _Offloaded | None = None

    def pack(self, t: torch.Tensor):
        if storage_key(t) in self.keep:
            return t
        slot = _Slot(t)
        self.slots.append(weakref.ref(slot))
        return slot

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        if packed.host is not None:
            self.fetch()
        return packed.restored if packed.restored is not None else packed.device

    def live_slots(self) -> list[_Slot]:
        return [slot for ref in self.slots if (slot := ref()) is not None]

    def finish(self, output: Any) -> None:
        """The call returned: its outputs stay, every other saved tensor goes to the host."""
        outputs = {storage_key(t) for t in tensors_in(output)}
        for slot in self.live_slots():
            if storage_key(slot.device) not in outputs:
                slot.host, slot.device = _to_host(slot.device, self.owner), None
        for t in tensors_in(output):
            if t.grad_fn is not None and self.prefetch_before is not None:
                t.grad_fn.register_prehook(lambda grads, before=self.prefetch_before: before.fetch())
                break

    def fetch(self) -> None:
        for slot in self.live_slots():
            if slot.host is not None:
                slot.restored, slot.host = _to_device(slot.host, self.owner), None


@dataclass
class _HostCopy:
    data: Any  # a pinned CPU tensor, or a NumPy array for tensors that live on the CPU
    device: torch.device
    dtype: torch.dtype
    shape: torch.Size
    event: Any = None


def _to_host(t: torch.Tensor, owner: _Offloader) -> _HostCopy:
    if t.is_cuda:
        stream = owner.side_stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(stream):
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            t.record_stream(stream)
            event = torch.cuda.Event()
            event.record(stream)
        return _HostCopy(host, t.device, t.dtype, t.shape, event)
    # On the CPU "host memory" is memory outside the tensor allocator: a NumPy copy of the bytes.
    data = t.detach().contiguous().view(-1).view(torch.uint8).numpy().copy()
    return _HostCopy(data, t.device, t.dtype, t.shape)


def _to_device(copy: _HostCopy, owner: _Offloader) -> torch.Tensor:
    if copy.device.type == "cuda":
        stream = owner.side_stream(copy.device)
        stream.wait_event(copy.event)
        with torch.cuda.stream(stream):
            t = copy.data.to(copy.device, non_blocking=True)
        torch.cuda.current_stream(copy.device).wait_stream(stream)
        t.record_stream(torch.cuda.current_stream(copy.device))
        return t
    return torch.from_numpy(copy.data).view(copy.dtype).view(copy.shape).clone()


@contextlib.contextmanager
def applied(model: nn.Module, plan: Plan) -> Iterator[Handle]:
    """`with applied(model, plan): ...` runs the model under the plan inside the block."""
    handle = apply(model, plan)
    try:
        yield handle
    finally:
        handle.remove()
