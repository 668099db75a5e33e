"""What the profiled step does, recorded as it runs: storages, operators, units and phases.

`Recorder` is a live-storage tracker (`planner.tracking`) that also records, for every storage,
the unit whose forward made it, the units that saved it for backward, the units it was computed
from and when forward last read it; for every unit call, its operators, FLOPs and times, its
inputs and outputs and the links to the unit before it; and the phases of the step as autograd and
the optimizer's hooks tell them. `planner.profiling.freeze` turns it into a `ProfiledGraph`.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from planner.core import costmodel
from planner.core.graph import Phase
from planner.torch_internals import autocast_caches, draws_random, flop_registry, in_backward, takes_shapes, writes_inputs
from planner.tracking import (
    Positions, StorageTracker, allocated_bytes, public_state, storage_bytes, storage_key, tensors_held, tensors_in
)
from planner.units import buffers_of

OUTSIDE = -1  # saver index for code outside every unit


@dataclass(eq=False)
class RecordedBlock:
    bytes: int
    phase: Phase
    alloc: int
    owner: int | None
    free: int | None = None
    savers: set[int] = field(default_factory=set)
    sources: frozenset[int] = frozenset()  # units whose outputs this storage was computed from
    made_from: list[RecordedBlock] = field(default_factory=list)  # what the forward operators that wrote it read
    last_use: int | None = None  # forward read it last, or autocast's cache of casts let it go
    op: str = ""
    op_call: int = 0
    mutated: bool = False  # written in place after it was made
    writers: list = field(default_factory=list)  # (unit, op, call) of those writes
    read: bool = False  # by an operator that did not write into it
    read_then_written: bool = False
    unit_output: bool = False  # returned by the unit that made it
    in_state: bool = False  # stored by a unit into an object it was given (a key/value cache)
    scratch: bool = False  # an operator's scratch: allocated and freed at its tick


@dataclass
class RecordedOp:
    name: str
    flops: int
    bytes_moved: int
    ms: float
    blocks: list[RecordedBlock]
    random: bool
    call: int


@dataclass
class RecordedUnit:
    name: str
    call: int
    kind: str
    fwd_start: int
    input_bytes: int
    fwd_end: int = 0
    bwd_start: int | None = None
    output_bytes: int = 0
    fwd_ms: float = 0.0
    bwd_ms: float = 0.0
    fwd_flops: int = 0
    bwd_flops: int = 0
    bwd_bytes: int = 0
    preds: set[int] = field(default_factory=set)
    ops: list[RecordedOp] = field(default_factory=list)
    op_calls: dict[str, int] = field(default_factory=dict)  # operator -> its calls in the forward so far
    direct_from: int | None = None
    side_from: int = -1
    mutates_inputs: bool = False
    grad_tick: int | None = None
    bwd_end: int | None = None
    inputs: list[RecordedBlock] = field(default_factory=list)  # blocks of its tensor inputs made in this step
    buffer_bytes: int = 0
    replayable: bool = True
    writes_state: bool = False
    state: tuple[list, set[int]] = ((), set())  # during the call: objects it was given, storages they held


class Recorder(StorageTracker):
    """Records blocks, ops and units during the profiled step."""

    def __init__(self, device: torch.device, existing: list[torch.Tensor], estimated_times: bool) -> None:
        super().__init__(device, existing)
        self.estimated_times = estimated_times  # times from FLOPs and bytes, not the clock
        self.watch_scratch = self.watch_scratch and not estimated_times
        self.watch_cpu_scratch = self.watch_cpu_scratch and not estimated_times
        self.phase = Phase.FORWARD
        self.spans: list[list] = [[Phase.FORWARD, 1, None]]  # [phase, first tick, last tick], in order
        self.in_optimizer = False
        self.forwards = 0  # forwards of the model with gradients in the step
        self.grads: list[RecordedBlock] | None = None  # the gradients' storages, once backward is over
        self.current: int | None = None  # the unit running now (forward, or backward by saved tensors)
        self.units: list[RecordedUnit] = []
        self.open: dict[int, RecordedBlock] = {}
        self.blocks: list[RecordedBlock] = []
        self.other_ms = 0.0
        self.backward_ops: list[tuple[int | None, Any, float]] = []  # (unit, operator and inputs, ms)
        self.backward_ms = 0.0  # operator time in backward, in units or not
        self.other_backward_ms = 0.0  # of which outside units
        self.optimizer_ms = 0.0  # operator time in the optimizer's step
        self.host_busy = 1.0  # share of the timed step the host spends issuing it
        self.other_flops = 0  # operators outside every unit: loss, optimizer, glue
        self.other_bytes = 0
        self.last_outputs = Positions()  # of the tensors the last unit returned
        self.op_name = ""
        self.autocast: torch.dtype | None = None  # autocast's dtype where the last unit entered under it
        self.cast_cache: list[RecordedBlock] = []  # casts autocast keeps until it ends (`autocast_caches`)

    def before_op(self) -> None:
        """Phases as autograd and the optimizer say: a user's step need not mark them."""
        if in_backward():
            phase = Phase.BACKWARD
        else:
            phase = Phase.OPTIMIZER if self.in_optimizer else Phase.FORWARD
        if phase is not self.phase:
            self.set_phase(phase)

    def set_phase(self, phase: Phase) -> None:
        if phase is self.phase:
            return
        self.spans[-1][2] = self.tick
        self.spans.append([phase, self.tick + 1, None])
        self.phase = phase
        self.current = None

    def optimizer_step(self, model: nn.Module, starting: bool) -> None:
        self.in_optimizer = starting
        if starting:
            self.collect_grads(model)

    def collect_grads(self, model: nn.Module) -> None:
        if self.grads is None:
            keys = {storage_key(p.grad) for p in model.parameters() if p.grad is not None}
            self.grads = [self.open[k] for k in keys if k in self.open]

    @property
    def phases(self) -> dict[Phase, tuple[int, int]]:
        """Each phase's first and last tick (a step of several forwards has several spans of some)."""
        first: dict[Phase, tuple[int, int]] = {}
        for phase, start, end in self.spans:
            first[phase] = (first.get(phase, (start,))[0], end)
        return first

    def span_end(self, tick: int) -> int:
        """The last tick of the phase span holding `tick`."""
        for _, start, end in self.spans:
            if start <= tick <= end:
                return end
        return self.spans[-1][2]

    def finish(self, casts_cached: bool = True) -> None:
        """The step is over; `casts_cached`: autocast keeps its casts of parameters until it ends (not in
        compiled code, whose graph makes the casts)."""
        self.spans[-1][2] = self.tick
        self.stop_tracking()
        self._sum_backward()
        for block in self.cast_cache if casts_cached else ():  # autocast ends with the forward, as the usual loop's does
            block.last_use = max(block.last_use or block.alloc, self.span_end(block.alloc))

    def _sum_backward(self) -> None:
        """Backward times by unit. The first call of an operator on inputs of some shapes may load or
        tune its kernels (lazily, on CUDA); where the same call comes again, it takes their median."""
        calls: dict[Any, list[float]] = {}
        for _, signature, ms in self.backward_ops:
            calls.setdefault(signature, []).append(ms)
        seen = set()
        for unit, signature, ms in self.backward_ops:
            if signature not in seen and len(calls[signature]) > 1:
                ms = min(ms, statistics.median(calls[signature][1:]))
            seen.add(signature)
            self.backward_ms += ms
            if unit is None:
                self.other_backward_ms += ms
                self.other_ms += ms
            else:
                self.units[unit].bwd_ms += ms

    # Storages.
    def on_alloc(self, key: int, nbytes: int) -> None:
        block = RecordedBlock(nbytes, self.phase, self.tick, self.current, op=self.op_name if key < 0 else "", scratch=key < 0)
        self.open[key] = block
        self.blocks.append(block)

    def on_free(self, key: int) -> None:
        block = self.open.pop(key, None)
        if block is not None:
            block.free = self.tick

    # Operators.
    def on_op(self, func, args, kwargs, out, ins: list, outs: list, inputs: set[int], new: list[int]) -> None:
        flops = _flops(func, args, kwargs, out)
        moved = sum(t.numel() * t.element_size() for t in (*ins, *outs))
        self.op_name = str(func.overloadpacket)
        ms = self.op_ms
        if self.estimated_times:
            ms = costmodel.REFERENCE.op_ms(flops, moved)
        unit = self.units[self.current] if self.current is not None else None
        if self.phase is Phase.FORWARD:
            call = 0
            if unit is not None:
                call = unit.op_calls.get(self.op_name, 0)
                unit.op_calls[self.op_name] = call + 1
            # an operator's outputs that share an input's storage wrote into it, if its schema says so
            written = {storage_key(t) for t in outs} & inputs if writes_inputs(func) else set()
            self._trace_forward(inputs, new, written, call)
            if self.autocast is not None and autocast_caches(func, args, kwargs, self.autocast):
                self.cast_cache.extend(self.open[k] for k in new)
            if unit is not None:
                random = draws_random(func, args, kwargs)
                # cuDNN's RNN dropout draws from cuDNN's own state, which no checkpoint saves and restores
                unit.replayable &= not (random and func.overloadpacket is torch.ops.aten._cudnn_rnn)
                unit.fwd_ms += ms
                unit.fwd_flops += flops
                unit.ops.append(RecordedOp(self.op_name, flops, moved, ms, [self.open[k] for k in new], random, call))
                return
        elif self.phase is Phase.BACKWARD:
            # estimated times are the same for the same call: no signature needed
            signature = len(self.backward_ops) if self.estimated_times else (func, tuple((t.shape, t.dtype) for t in ins))
            self.backward_ops.append((self.current, signature, ms))
            if unit is not None:
                unit.bwd_flops += flops
                unit.bwd_bytes += moved
                unit.bwd_end = self.tick
                return
        else:
            self.other_ms += ms
            if self.phase is Phase.OPTIMIZER:
                self.optimizer_ms += ms
        self.other_flops += flops
        self.other_bytes += moved

    def _trace_forward(self, inputs: set[int], new: list[int], written: set[int], call: int) -> None:
        """Last uses, which units each new or overwritten storage was computed from, and which call of
        which operator made each new one."""
        read = [self.open[k] for k in inputs if k in self.open]
        for block in read:
            block.last_use = self.tick
        for key in inputs - written:
            if key in self.open:
                self.open[key].read = True
        if self.current is None:
            sources = frozenset().union(*(b.sources for b in read))
        else:
            sources = frozenset({self.current})
            for block in read:
                if block.owner != self.current:
                    self.units[self.current].preds |= block.sources
        for key in new:
            self.open[key].sources = sources
            self.open[key].made_from = read
            self.open[key].op = self.op_name
            self.open[key].op_call = call
        for key in written & self.open.keys():  # an in-place result now holds what was computed here
            block = self.open[key]
            block.sources = sources
            block.made_from = block.made_from + [b for b in read if b is not block]
            block.mutated = True
            block.writers.append((self.current, self.op_name, call))
            block.read_then_written |= block.read
            if self.current is not None and block.owner != self.current:
                self.units[self.current].mutates_inputs = True

    # Saved tensors.
    def pack(self, t: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """Which unit saved `t`. What autograd keeps is `t` detached, as torch.utils.checkpoint keeps it:
        an operator's output keeps its own node alive otherwise, a cycle that a graph backward retains
        (`retain_graph=True`, as Reformer's reversible layers run theirs) leaves to Python's collector."""
        block = self.open.get(storage_key(t))
        if block is not None and self.phase is Phase.FORWARD:
            block.savers.add(OUTSIDE if self.current is None else self.current)
        return t.detach() if t.requires_grad else t, self.current

    def unpack(self, packed: tuple[torch.Tensor, int | None]) -> torch.Tensor:
        t, unit = packed
        if self.phase is Phase.BACKWARD and unit is not None:
            self.current = unit
            if self.units[unit].bwd_start is None:
                self.units[unit].bwd_start = self.tick
        return t

    # Units.
    def enter_unit(self, name: str, call: int, module: nn.Module, inputs: Any) -> None:
        self.before_op()  # a forward after a backward (the next micro-batch's) may begin in a unit
        tensors = list(tensors_in(inputs))
        device = self.device.type  # (autocast's state reads true here, outside the dispatcher, not in `on_op`)
        cached = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        self.autocast = torch.get_autocast_dtype(device) if cached and torch.is_autocast_cache_enabled() else None
        unit = RecordedUnit(name, call, type(module).__name__, self.tick, storage_bytes(tensors))
        unit.inputs = list({id(b): b for t in tensors if (b := self.open.get(storage_key(t))) is not None}.values())
        unit.buffer_bytes = sum(allocated_bytes(b.numel() * b.element_size(), self.device) for b in buffers_of([module]))
        self._link(unit, tensors)
        objects = [inputs, public_state(module)]
        unit.state = (objects, set(map(storage_key, tensors_held(objects))))
        self.units.append(unit)
        self.current = len(self.units) - 1

    def _reached(self, unit: RecordedUnit) -> None:
        if unit.grad_tick is None:
            unit.grad_tick = self.tick

    def _link(self, unit: RecordedUnit, tensors: list[torch.Tensor]) -> None:
        """The last unit is `direct_from` when it made some of the inputs; `side_from` is the latest
        other unit that made the rest (a region may span the link if it starts after that unit)."""
        from_units = [t for t in tensors if self._sources(t)]
        if self.units and any(self.last_outputs.of(t) is not None for t in from_units):
            unit.direct_from = len(self.units) - 1
            side = [max(self._sources(t)) for t in from_units if self.last_outputs.of(t) is None]
            unit.side_from = max(side, default=-1)

    def _sources(self, t: torch.Tensor) -> frozenset[int]:
        block = self.open.get(storage_key(t))
        return block.sources if block is not None else frozenset()

    def exit_unit(self, output: Any) -> None:
        unit = self.units[self.current]
        unit.fwd_end = self.tick
        objects, before = unit.state
        unit.state = ((), set())
        for key in {storage_key(t) for t in tensors_held(objects)} - before - {storage_key(t) for t in tensors_in(output)}:
            unit.writes_state = True  # a replay would store again what it stored
            if key in self.open:
                self.open[key].in_state = True
        tensors = list(tensors_in(output))
        unit.output_bytes = storage_bytes(tensors)
        with_grad = [t for t in tensors if t.grad_fn is not None]
        if with_grad:
            with_grad[0].grad_fn.register_prehook(lambda grads, unit=unit: self._reached(unit))
        for t in tensors:  # an output passed through untouched now comes from this unit
            block = self.open.get(storage_key(t))
            if block is not None and block.owner == self.current:
                block.unit_output = True
            elif block is not None:
                unit.preds |= block.sources
                block.sources = frozenset({self.current})
        self.last_outputs = Positions(tensors)
        self.current = None


def _flops(func, args, kwargs, out) -> int:
    count = flop_registry.get(func.overloadpacket)
    if count is None:
        return 0
    if takes_shapes(count):  # shapes alone: much cheaper than the wrapper that walks the arguments
        shapes = {k: _shape(v) for k, v in kwargs.items()}
        return int(count.__wrapped__(*map(_shape, args), out_shape=_shape(out), **shapes))
    return int(count(*args, **kwargs, out_val=out))


def _shape(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.shape
    if type(value) in (list, tuple):
        return type(value)(map(_shape, value))
    return value


@contextlib.contextmanager
def unit_hooks(model: nn.Module, names: list[str], enter, exit) -> Iterator[None]:
    """Calls enter(name, call, module, inputs) and exit(output) around each outermost unit call
    with gradients enabled (calls without them save nothing, and a plan leaves them alone)."""
    modules = dict(model.named_modules())
    calls = dict.fromkeys(names, 0)
    active: list[bool] = []  # per hooked call in flight: was it entered?

    def pre(name: str):
        def hook(module, args, kwargs):
            entered = not active and torch.is_grad_enabled()
            active.append(entered)
            if entered:
                enter(name, calls[name], module, (args, kwargs))
                calls[name] += 1

        return hook

    def post(module, args, kwargs, output):
        if active.pop():
            exit(output)

    handles = []
    for name in names:
        module = modules[name]
        handles.append(module.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
