"""The profile's times, from untracked training steps.

The profiled step runs every operator through the tracker, so its operator times carry costs that
training does not pay. Two more steps, untracked, are clocked (CUDA events on a GPU): each unit
call's forward, the backward and the optimizer's step; `calibrate` gives the units those times,
and shares the clocked backward among the profiled step's backward operators.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from planner.core.graph import Phase
from planner.profiling.recorder import Recorder, unit_hooks
from planner.step import TrainingStep, optimizer_hooks

TIMED_STEPS = 2  # untracked training steps that give the profile its times


@dataclass
class _Timing:
    units: list[float]  # forward ms of each unit call
    backward_ms: float | None  # None: a user's step, whose phases are not marked
    step_ms: float
    host_busy: float = 1.0  # share of the step the host spends issuing it (below 1 where a GPU runs behind)
    optimizer_ms: float | None = None


def timed_step(train: TrainingStep, names: list[str]) -> _Timing:
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


def least(timings: list[_Timing]) -> _Timing:
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


def calibrate(rec: Recorder, timing: _Timing) -> None:
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
