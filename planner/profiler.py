"""Profile one real training step of a model into a ProfiledGraph.

    graph = planner.profile(model, batch, loss_fn=lambda out: F.cross_entropy(out, y), optimizer=opt)

The step runs once under a dispatch mode that sees every operator and every
new storage, with module hooks marking the units and saved-tensor hooks
telling which storages autograd keeps for backward and when backward first
needs them. Two more training steps, untracked, give the units' times (the
tracker's own work inflates the profiled step's clock); on a CPU, the rate of
an offload's copies is measured too. The
model, its buffers, the optimizer and the random number generators are left
exactly as they were found. On the meta device, or with fake tensors (a model
built under `FakeTensorMode`), nothing is allocated and times come from FLOPs
and bytes (`planner.costmodel`).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._guards import detect_fake_mode
from torch.utils import flop_counter
from torch.utils.flop_counter import flop_registry
from torch.utils._pytree import tree_map_only

from planner import costmodel
from planner.executor import host_copy_bytes_per_s
from planner.graph import Block, Category, FixedMemory, Op, Phase, ProfiledGraph, Unit
from planner.step import Batch, LossFn, StepFn, TrainingStep, optimizer_hooks
from planner.survey import survey_units
from planner.tracking import (
    StorageTracker,
    allocated_bytes,
    public_state,
    storage_bytes,
    storage_key,
    storage_of,
    tensors_held,
    tensors_in,
)
from planner.units import UnitSpec, buffers_of, fingerprint, select_units

OUTSIDE = -1  # saver index for code outside every unit


@dataclass(eq=False)
class _Block:
    bytes: int
    phase: Phase
    alloc: int
    owner: int | None
    free: int | None = None
    savers: set[int] = field(default_factory=set)
    sources: frozenset[int] = frozenset()  # units whose outputs this storage was computed from
    last_use: int | None = None
    op: str = ""
    mutated: bool = False  # written in place after it was made
    unit_output: bool = False  # returned by the unit that made it
    in_state: bool = False  # stored by a unit into an object it was given (a key/value cache)
    scratch: bool = False  # an operator's scratch: allocated and freed at its tick


@dataclass
class _Op:
    name: str
    flops: int
    bytes_moved: int
    ms: float
    blocks: list[_Block]
    random: bool


@dataclass
class _Unit:
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
    ops: list[_Op] = field(default_factory=list)
    direct_from: int | None = None
    side_from: int = -1
    mutates_inputs: bool = False
    grad_tick: int | None = None
    bwd_end: int | None = None
    inputs: list[_Block] = field(default_factory=list)  # blocks of its tensor inputs made in this step
    buffer_bytes: int = 0
    replayable: bool = True
    writes_state: bool = False
    state: tuple[list, set[int]] = ((), set())  # during the call: objects it was given, storages they held


class _Recorder(StorageTracker):
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
        self.grads: list[_Block] | None = None  # the gradients' storages, once backward is over
        self.current: int | None = None  # the unit running now (forward, or backward by saved tensors)
        self.units: list[_Unit] = []
        self.open: dict[int, _Block] = {}
        self.blocks: list[_Block] = []
        self.other_ms = 0.0
        self.backward_ops: list[tuple[int | None, Any, float]] = []  # (unit, operator and inputs, ms)
        self.backward_ms = 0.0  # operator time in backward, in units or not
        self.other_backward_ms = 0.0  # of which outside units
        self.optimizer_ms = 0.0  # operator time in the optimizer's step
        self.host_bytes_per_s: float | None = None  # CPU offload copy rate, measured
        self.host_busy = 1.0  # share of the timed step the host spends issuing it
        self.other_flops = 0  # operators outside every unit: loss, optimizer, glue
        self.other_bytes = 0
        self.last_outputs: set[int] = set()  # ids of the tensors the last unit returned
        self.op_name = ""

    def before_op(self) -> None:
        """Phases as autograd and the optimizer say: a user's step need not mark them."""
        if torch._C._current_graph_task_id() != -1:
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

    def finish(self) -> None:
        self.spans[-1][2] = self.tick
        self.stop_tracking()
        self._sum_backward()

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
        block = _Block(nbytes, self.phase, self.tick, self.current, op=self.op_name if key < 0 else "", scratch=key < 0)
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
            # an operator's outputs that share an input's storage wrote into it, unless it is a view
            written = set() if func.is_view else {storage_key(t) for t in outs} & inputs
            self._trace_forward(inputs, new, written)
            if unit is not None:
                random = _draws_random(func, args, kwargs)
                # cuDNN's RNN dropout draws from cuDNN's own state, which no checkpoint saves and restores
                unit.replayable &= not (random and func.overloadpacket is torch.ops.aten._cudnn_rnn)
                unit.fwd_ms += ms
                unit.fwd_flops += flops
                unit.ops.append(_Op(self.op_name, flops, moved, ms, [self.open[k] for k in new], random))
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

    def _trace_forward(self, inputs: set[int], new: list[int], written: set[int]) -> None:
        """Last uses, and which units each new or overwritten storage was computed from."""
        read = [self.open[k] for k in inputs if k in self.open]
        for block in read:
            block.last_use = self.tick
        if self.current is None:
            sources = frozenset().union(*(b.sources for b in read))
        else:
            sources = frozenset({self.current})
            for block in read:
                if block.owner != self.current:
                    self.units[self.current].preds |= block.sources
        for key in new:
            self.open[key].sources = sources
            self.open[key].op = self.op_name
        for key in written & self.open.keys():  # an in-place result now holds what was computed here
            block = self.open[key]
            block.sources = sources
            block.mutated = True
            if self.current is not None and block.owner != self.current:
                self.units[self.current].mutates_inputs = True

    # Saved tensors.
    def pack(self, t: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        block = self.open.get(storage_key(t))
        if block is not None and self.phase is Phase.FORWARD:
            block.savers.add(OUTSIDE if self.current is None else self.current)
        return t, self.current

    def unpack(self, packed: tuple[torch.Tensor, int | None]) -> torch.Tensor:
        t, unit = packed
        if self.phase is Phase.BACKWARD and unit is not None:
            self.current = unit
            if self.units[unit].bwd_start is None:
                self.units[unit].bwd_start = self.tick
        return t

    # Units.
    def enter_unit(self, name: str, call: int, module: nn.Module, inputs: Any) -> None:
        tensors = list(tensors_in(inputs))
        unit = _Unit(name, call, type(module).__name__, self.tick, storage_bytes(tensors))
        unit.inputs = list({id(b): b for t in tensors if (b := self.open.get(storage_key(t))) is not None}.values())
        unit.buffer_bytes = sum(allocated_bytes(b.numel() * b.element_size(), self.device) for b in buffers_of([module]))
        self._link(unit, tensors)
        objects = [inputs, public_state(module)]
        unit.state = (objects, set(map(storage_key, tensors_held(objects))))
        self.units.append(unit)
        self.current = len(self.units) - 1

    def _reached(self, unit: _Unit) -> None:
        if unit.grad_tick is None:
            unit.grad_tick = self.tick

    def _link(self, unit: _Unit, tensors: list[torch.Tensor]) -> None:
        """The last unit is `direct_from` when it made some of the inputs; `side_from` is the latest
        other unit that made the rest (a region may span the link if it starts after that unit)."""
        from_units = [t for t in tensors if self._sources(t)]
        if self.units and any(id(t) in self.last_outputs for t in from_units):
            unit.direct_from = len(self.units) - 1
            side = [max(self._sources(t)) for t in from_units if id(t) not in self.last_outputs]
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
        self.last_outputs = {id(t) for t in tensors}
        self.current = None


def _draws_random(func, args, kwargs) -> bool:
    """Whether an operator call draws random numbers: a seeded operator, unless its dropout is 0."""
    if torch.Tag.nondeterministic_seeded not in func.tags:
        return False
    for i, arg in enumerate(func._schema.arguments):
        if arg.name in ("dropout_p", "dropout"):
            return bool(args[i] if i < len(args) else kwargs.get(arg.name, arg.default_value))
    return True


# Most FLOP formulas take shapes, through a wrapper that walks the arguments with pytree: slow per operator.
_TAKES_SHAPES = flop_counter.shape_wrapper(lambda: 0).__code__


def _flops(func, args, kwargs, out) -> int:
    count = flop_registry.get(func.overloadpacket)
    if count is None:
        return 0
    if count.__code__ is _TAKES_SHAPES:
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


@contextlib.contextmanager
def preserved(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
    """Restores parameters, buffers, gradients, optimizer state and RNG states on exit."""
    tensors = [*model.parameters(), *model.buffers()]
    saved = [_host_copy(t) for t in tensors]
    grads = [p.grad for p in model.parameters()]
    # copies on the host: a measured step must not count them (load_state_dict moves state back)
    opt_state = tree_map_only(torch.Tensor, _host_copy, optimizer.state_dict()) if optimizer is not None else None
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    for p in model.parameters():
        p.grad = None
    try:
        yield
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        if optimizer is not None:
            optimizer.state.clear()
            optimizer.load_state_dict(opt_state)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True) if t.is_cuda else t.detach().clone()


def profile(
    model: nn.Module,
    example_batch: Any = None,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: StepFn | None = None,
    units: UnitSpec = None,
    autocast_dtype: torch.dtype | None = None,
) -> ProfiledGraph:
    """Run one training step with hooks and return what it did.

    `example_batch` is a tensor (one positional input), a tuple or list
    (positional inputs), a dict (keyword inputs) or a `Batch`. `loss_fn`
    turns the model's output into a scalar (default: the output itself, its
    `.loss`, or the sum of its tensors). `step` is instead a function of no
    arguments that runs one whole training step of your own (several
    micro-batches, a GradScaler, a custom loss); give its optimizer too, so
    that its state counts as fixed memory. `units` chooses the modules a plan
    acts on (see `planner.units.select_units`); by default a survey of the
    module tree chooses them (`planner.survey`). On CUDA the allocator's peak
    statistics are reset at every operator (they measure its scratch memory).
    """
    train = TrainingStep.of(model, example_batch, loss_fn, optimizer, autocast_dtype, step)
    device = train.device
    groups = fixed_groups(model, train.batch, optimizer)
    existing = [t for ts in groups.values() for t in ts]
    fake_mode = detect_fake_mode(existing)  # the FakeTensorMode the model was built under; None for real tensors
    with fake_mode or contextlib.nullcontext():
        names = _unit_names(train, units, device, existing)
    with fake_mode or contextlib.nullcontext(), preserved(model, optimizer):
        rec = _Recorder(device, existing, estimated_times=device.type == "meta" or fake_mode is not None)
        _tracked_step(train, names, rec)
        opt_state = [rec.open[k] for k in map(storage_key, _optimizer_tensors(optimizer)) if k in rec.open]
        # All optimizer state after the step, including what it made outside the dispatcher (step counts).
        state_after = fixed_bytes({Category.OPTIMIZER: _optimizer_tensors(optimizer)}, device)[Category.OPTIMIZER]
        held = None  # what the CUDA allocator holds besides the step's storages: fixed memory and workspaces
        if rec.watch_scratch:
            held = torch.cuda.memory_allocated(device) - rec.live_bytes + sum(b.bytes for b in opt_state)
        rec.finish()
        if not rec.estimated_times:
            timings = [_timed_step(train, names) for _ in range(TIMED_STEPS)]
            _calibrate(rec, _least(timings))
            if device.type == "cpu":
                rec.host_bytes_per_s = host_copy_bytes_per_s()
    sizes = fixed_bytes(groups, device)
    first_step_bytes = state_after - sizes[Category.OPTIMIZER]
    sizes[Category.OPTIMIZER] = state_after
    if held is not None:
        sizes[Category.WORKSPACE] = max(0, held - sum(sizes.values()))
    return _graph(model, device, rec, sizes, rec.grads or [], opt_state, first_step_bytes)


def unit_names(
    model: nn.Module,
    example_batch: Any = None,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: StepFn | None = None,
    units: UnitSpec = None,
    autocast_dtype: torch.dtype | None = None,
) -> list[str]:
    """The names of the modules `profile` takes as units, for the same arguments."""
    train = TrainingStep.of(model, example_batch, loss_fn, optimizer, autocast_dtype, step)
    groups = fixed_groups(model, train.batch, optimizer)
    existing = [t for ts in groups.values() for t in ts]
    with detect_fake_mode(existing) or contextlib.nullcontext():
        return _unit_names(train, units, train.device, existing)


def _unit_names(train: TrainingStep, units: UnitSpec, device: torch.device, existing: list[torch.Tensor]) -> list[str]:
    """The units `units` names, or those a survey of the step chooses (state restored)."""
    if units is not None:
        return select_units(train.model, units)
    with preserved(train.model, train.optimizer):  # a whole step: engines expect a backward after a forward
        try:
            return survey_units(train.model, train, device, existing)
        except Exception as err:
            raise type(err)(f"the training step failed on the example batch: {err}") from err


def _tracked_step(train: TrainingStep, names: list[str], rec: _Recorder) -> None:
    """The profiled step: every operator and storage through `rec`, units and saved tensors hooked."""
    model = train.model

    def on_phase(phase: Phase) -> None:
        if phase is Phase.OPTIMIZER:  # the gradients are all there now
            rec.collect_grads(model)

    def count_forward(module, args) -> None:
        rec.forwards += torch.is_grad_enabled()

    counter = model.register_forward_pre_hook(count_forward)
    try:
        with unit_hooks(model, names, rec.enter_unit, rec.exit_unit), torch.autograd.graph.saved_tensors_hooks(
            rec.pack, rec.unpack
        ), optimizer_hooks(lambda: rec.optimizer_step(model, True), lambda: rec.optimizer_step(model, False)), rec:
            train(on_phase)
            rec.collect_grads(model)
    except Exception as err:
        raise type(err)(f"the training step failed on the example batch: {err}") from err
    finally:
        counter.remove()


TIMED_STEPS = 2  # untracked training steps that give the profile its times


@dataclass
class _Timing:
    units: list[float]  # forward ms of each unit call
    backward_ms: float | None  # None: a user's step, whose phases are not marked
    step_ms: float
    host_busy: float = 1.0  # share of the step the host spends issuing it (below 1 where a GPU runs behind)
    optimizer_ms: float | None = None


def _timed_step(train: TrainingStep, names: list[str]) -> _Timing:
    """Times one more training step, untracked: each unit call's forward, the backward, and the
    optimizer's step if there is one (the caller restores what it changes).

    The profiled step runs every operator through the tracker, so its operator times carry costs
    that training does not pay; this step's clock is the truth. A whole step leaves data-parallel
    engines as training does.
    """
    device = train.device
    cuda = device.type == "cuda"

    def mark():
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(start, end) -> float:
        return start.elapsed_time(end) if cuda else (end - start) * 1e3

    starts, ends, phases, steps = [], [], {}, []
    if cuda:
        torch.cuda.synchronize(device)
    begin, first = time.perf_counter(), mark()
    with unit_hooks(train.model, names, lambda *call: starts.append(mark()), lambda output: ends.append(mark())):
        with optimizer_hooks(lambda: steps.append(mark()), lambda: steps.append(mark())):
            train(lambda phase: phases.__setitem__(phase, mark()))
    end, issued = mark(), time.perf_counter()
    if cuda:
        torch.cuda.synchronize(device)
    busy = (issued - begin) / (time.perf_counter() - begin)
    return _Timing(
        [ms(a, b) for a, b in zip(starts, ends)],
        ms(phases[Phase.BACKWARD], phases[Phase.OPTIMIZER]) if phases else None,
        ms(first, end),
        busy,
        sum(ms(a, b) for a, b in zip(steps[::2], steps[1::2])) if steps else None,
    )


def _least(timings: list[_Timing]) -> _Timing:
    """Each time at its least over some steps: the steps after the first of a process run faster."""
    if len({len(t.units) for t in timings}) > 1:
        return timings[-1]
    return _Timing(
        [min(ms) for ms in zip(*(t.units for t in timings))],
        min((t.backward_ms for t in timings if t.backward_ms is not None), default=None),
        min(t.step_ms for t in timings),
        min(t.host_busy for t in timings),
        min((t.optimizer_ms for t in timings if t.optimizer_ms is not None), default=None),
    )


def _calibrate(rec: _Recorder, timing: _Timing) -> None:
    """Units take their clocked forward times (their operators scaled to them); backward operators
    share the clocked backward in proportion, and other work shrinks as the phase it ran in did. In
    a user's step, whose backward is not marked, the backward and the work outside units in forward
    share what the clock leaves of the step beside the units and the optimizer."""
    profiled = sum(u.fwd_ms for u in rec.units)
    if len(timing.units) != len(rec.units) or not profiled:  # the model took another path: keep the operator times
        return
    optimizer_ms = rec.optimizer_ms if timing.optimizer_ms is None else timing.optimizer_ms
    forward_other = rec.other_ms - rec.other_backward_ms - rec.optimizer_ms
    forward_scale = sum(timing.units) / profiled
    if timing.backward_ms is not None:
        backward_scale = timing.backward_ms / rec.backward_ms if rec.backward_ms else 1.0
    else:
        rest = rec.backward_ms + forward_other
        backward_scale = forward_scale = max(0.0, timing.step_ms - sum(timing.units) - optimizer_ms) / rest if rest else 1.0
    for unit, ms in zip(rec.units, timing.units):
        scale = ms / unit.fwd_ms if unit.fwd_ms else 0.0
        for op in unit.ops:
            op.ms *= scale
        unit.fwd_ms = ms
        unit.bwd_ms *= backward_scale
    rec.other_ms = forward_other * forward_scale + rec.other_backward_ms * backward_scale + optimizer_ms
    rec.host_busy = timing.host_busy


def _graph(
    model: nn.Module,
    device: torch.device,
    rec: _Recorder,
    fixed_sizes: dict[Category, int],
    grads: list[_Block],
    opt_state: list[_Block],
    first_step_bytes: int,
) -> ProfiledGraph:
    """Freezes what the recorder saw; optimizer state first allocated in this step counts as fixed."""
    grad_ids = {id(b) for b in grads}
    new_state_ids = {id(b) for b in opt_state}
    blocks = []
    index: dict[int, int] = {}  # id of a recorded block -> its index in the graph
    for b in rec.blocks:
        if id(b) in new_state_ids:
            continue
        index[id(b)] = len(blocks)
        if id(b) in grad_ids:
            category = Category.GRADIENTS
        elif b.phase is Phase.FORWARD and (b.free is None or b.free > rec.span_end(b.alloc)):
            category = Category.ACTIVATIONS  # outlives the forward that made it
        else:
            category = Category.TRANSIENTS
        blocks.append(
            Block(
                bytes=b.bytes,
                category=category,
                phase=b.phase,
                alloc=b.alloc,
                free=b.free,
                owner=b.owner,
                savers=frozenset(b.savers),
                last_use=b.last_use,
                op=b.op,
                mutated=b.mutated,
                unit_output=b.unit_output,
                in_state=b.in_state,
                scratch=b.scratch,
            )
        )
    meta = {"other_ms": rec.other_ms, "other_flops": rec.other_flops, "other_bytes": rec.other_bytes}
    if device.type == "cuda" and not rec.estimated_times:  # `costmodel.retime` keeps times measured on the same GPU
        meta["device_name"] = torch.cuda.get_device_name(device)
    if rec.host_bytes_per_s is not None:
        meta["host_bytes_per_s"] = rec.host_bytes_per_s
    if device.type == "cuda":
        meta["host_busy"] = rec.host_busy
    fixed = FixedMemory(
        parameters=fixed_sizes[Category.PARAMETERS],
        buffers=fixed_sizes[Category.BUFFERS],
        inputs=fixed_sizes[Category.INPUTS],
        optimizer=fixed_sizes[Category.OPTIMIZER],
        workspace=fixed_sizes.get(Category.WORKSPACE, 0),
    )
    return ProfiledGraph(
        model=type(model).__name__,
        fingerprint=fingerprint(model),
        device=str(device),
        units=tuple(_freeze_unit(i, u, rec.blocks, index) for i, u in enumerate(rec.units)),
        edges=tuple(sorted((p, v) for v, u in enumerate(rec.units) for p in u.preds if p < v)),
        fixed=fixed,
        blocks=tuple(blocks),
        phases=rec.phases,
        forwards=max(rec.forwards, 1),
        step_ms=rec.other_ms + sum(u.fwd_ms + u.bwd_ms for u in rec.units),
        measured_times=not rec.estimated_times,
        first_step_extra_bytes=first_step_bytes,
        meta=meta,
    )


def _freeze_unit(index: int, u: _Unit, blocks: list[_Block], block_index: dict[int, int]) -> Unit:
    saved = sum(b.bytes for b in blocks if b.owner == index and b.phase is Phase.FORWARD and b.savers)
    ops = tuple(
        Op(o.name, o.flops, o.ms, sum(b.bytes for b in o.blocks), sum(b.bytes for b in o.blocks if b.savers),
           o.bytes_moved, o.random)
        for o in u.ops
    )
    return Unit(
        index=index,
        name=u.name,
        call=u.call,
        kind=u.kind,
        fwd_ms=u.fwd_ms,
        bwd_ms=u.bwd_ms,
        fwd_flops=u.fwd_flops,
        bwd_flops=u.bwd_flops,
        saved_bytes=saved,
        input_bytes=u.input_bytes,
        output_bytes=u.output_bytes,
        fwd_start=u.fwd_start,
        fwd_end=u.fwd_end,
        bwd_start=u.bwd_start,
        ops=ops,
        direct_from=u.direct_from,
        side_from=u.side_from,
        writes_state=u.writes_state,
        mutates_inputs=u.mutates_inputs,
        grad_tick=u.grad_tick,
        bwd_end=u.bwd_end,
        bwd_bytes=u.bwd_bytes,
        inputs=tuple(block_index[id(b)] for b in u.inputs if id(b) in block_index),
        buffer_bytes=u.buffer_bytes,
        replayable=u.replayable,
    )


def fixed_groups(model: nn.Module, batch: Batch, optimizer) -> dict[Category, list[torch.Tensor]]:
    """The tensors alive before the step, by category."""
    return {
        Category.PARAMETERS: list(model.parameters()),
        Category.BUFFERS: list(model.buffers()),
        Category.INPUTS: list(tensors_in((batch.args, batch.kwargs))),
        Category.OPTIMIZER: _optimizer_tensors(optimizer),
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


def _optimizer_tensors(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    return [t for state in optimizer.state.values() for t in tensors_in(state)]
