"""Profile one real training step of a model into a ProfiledGraph.

    graph = planner.profile(model, batch, loss_fn=lambda out: F.cross_entropy(out, y), optimizer=opt)

The step runs once under a dispatch mode that sees every operator and every new storage
(`recorder`), with module hooks marking the units (chosen by `survey` unless named) and
saved-tensor hooks telling which storages autograd keeps for backward and when backward first
needs them. Two more training steps, untracked, give the units' times (`timing`); on a device
whose times were measured, the executor's own costs and a CPU's offload copy rate are measured
too, once per process (`planner.execution.calibration`). The model, its buffers, the optimizer and
the random number generators are left exactly as they were found. On the meta device, or with fake
tensors (a model built under `FakeTensorMode`), nothing is allocated and times come from FLOPs and
bytes (`planner.core.costmodel`).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from planner.core.graph import Calibration, Category, Phase, ProfiledGraph
from planner.execution.calibration import host_copy_bytes_per_s, mechanism
from planner.profiling.compiled import compiled_saved_bytes, compiled_speedup
from planner.profiling.freeze import freeze
from planner.profiling.recorder import Recorder, unit_hooks
from planner.profiling.survey import survey_units
from planner.profiling.timing import TIMED_STEPS, calibrate, least, timed_step
from planner.step import (
    LossFn,
    StepFn,
    TrainingStep,
    every_layer_runs,
    forward_loss,
    layer_drop,
    optimizer_hooks,
    preserved,
)
from planner.torch_internals import fake_mode_of, is_compiled, original
from planner.tracking import fixed_bytes, fixed_groups, optimizer_tensors, storage_key
from planner.units import UnitSpec, select_units


def profile(
    model: nn.Module,
    example_batch: Any = None,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: StepFn | None = None,
    units: UnitSpec = None,
    autocast_dtype: torch.dtype | None = None,
    compiled: bool = False,
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
    module tree chooses them (`planner.profiling.survey`). On CUDA the allocator's peak
    statistics are reset at every operator (they measure its scratch memory). With `compiled` (or a
    model `torch.compile` returned), the profile is of the step under torch.compile: what each unit
    saves for backward is what the compiled forward saves (`planner.profiling.compiled`).
    """
    compiled = compiled or is_compiled(model)
    model = original(model)
    if compiled and step is not None:
        raise ValueError("a compiled step is profiled with the built-in step: give example_batch and loss_fn, not step")
    train = TrainingStep.of(model, example_batch, loss_fn, optimizer, autocast_dtype, step)
    device = train.device
    groups = fixed_groups(model, train.batch, optimizer)
    fake_mode = fake_mode_of([t for ts in groups.values() for t in ts])  # what the model was built under, if any
    if compiled and (fake_mode is not None or device.type == "meta"):
        raise ValueError("a compiled step is profiled by running it: profile it on a real device, not meta or fake")
    with every_layer_runs(model):  # the step that needs the most memory, where layers may be skipped
        graph = _profiled(train, units, compiled, groups, fake_mode)
    return replace(graph, drops_layers=bool(layer_drop(model)))


def _profiled(train: TrainingStep, units: UnitSpec, compiled: bool, groups, fake_mode) -> ProfiledGraph:
    """`profile`'s work, its arguments checked."""
    model, optimizer, device = train.model, train.optimizer, train.device
    existing = [t for ts in groups.values() for t in ts]
    with fake_mode or contextlib.nullcontext():
        names = _unit_names(train, units, device, existing)
    with fake_mode or contextlib.nullcontext(), preserved(model, optimizer):
        rec = Recorder(device, existing, estimated_times=device.type == "meta" or fake_mode is not None)
        forwards = _tracked_step(train, names, rec)
        opt_state = [rec.open[k] for k in map(storage_key, optimizer_tensors(optimizer)) if k in rec.open]
        # All optimizer state after the step, including what it made outside the dispatcher (step counts).
        state_after = fixed_bytes({Category.OPTIMIZER: optimizer_tensors(optimizer)}, device)[Category.OPTIMIZER]
        held = None  # what the CUDA allocator holds besides the step's storages: fixed memory and workspaces
        if rec.watch_scratch:
            held = torch.cuda.memory_allocated(device) - rec.live_bytes + sum(b.bytes for b in opt_state)
        rec.finish(casts_cached=not compiled)
        calibration = Calibration()
        if not rec.estimated_times:
            calibrate(rec, least([timed_step(train, names) for _ in range(TIMED_STEPS)]))
            calibration = _measured_calibration(device, rec.host_busy)
    sizes = fixed_bytes(groups, device)
    first_step_bytes = state_after - sizes[Category.OPTIMIZER]
    sizes[Category.OPTIMIZER] = state_after
    if held is not None:
        sizes[Category.WORKSPACE] = max(0, held - sum(sizes.values()))
    graph = freeze(model, device, rec, sizes, rec.grads or [], opt_state, first_step_bytes, calibration)
    if not compiled:
        return graph
    saved, recomputed = compiled_saved_bytes(train, graph.units)
    return graph.as_compiled(saved, forwards, compiled_speedup(train), recomputed)


def _measured_calibration(device: torch.device, host_busy: float) -> Calibration:
    """What costing plans on `device` needs beside the step: measured once per process."""
    return Calibration(
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        host_bytes_per_s=host_copy_bytes_per_s() if device.type == "cpu" else None,
        host_busy=host_busy if device.type == "cuda" else 1.0,
        mechanism=mechanism(str(device)),
    )


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
    model = original(model)
    train = TrainingStep.of(model, example_batch, loss_fn, optimizer, autocast_dtype, step)
    groups = fixed_groups(model, train.batch, optimizer)
    existing = [t for ts in groups.values() for t in ts]
    with fake_mode_of(existing) or contextlib.nullcontext(), every_layer_runs(model):
        return _unit_names(train, units, train.device, existing)


def _unit_names(train: TrainingStep, units: UnitSpec, device: torch.device, existing: list[torch.Tensor]) -> list[str]:
    """The units `units` names, or those a survey of the step chooses (state restored)."""
    if units is not None:
        return select_units(train.model, units)
    with preserved(train.model, train.optimizer):
        try:
            return survey_units(train.model, _survey_step(train), device, existing)
        except Exception as err:
            raise type(err)(f"the training step failed on the example batch: {err}") from err


def _survey_step(train: TrainingStep):
    """What the survey runs: the built-in step's forward and loss, which is all it reads; a whole step
    for a step of the user's own, or where ranks take part (engines expect a backward after a forward)."""
    if train.fn is not None or (dist.is_available() and dist.is_initialized()):
        return train
    return lambda: forward_loss(train.model, train.batch, train.loss_fn, train.autocast_dtype)


def _tracked_step(train: TrainingStep, names: list[str], rec: Recorder) -> list[tuple[int, int]]:
    """The profiled step: every operator and storage through `rec`, units and saved tensors hooked;
    returns the first and last tick of each forward of the model."""
    model = train.model
    forwards: list[tuple[int, int]] = []

    def on_phase(phase: Phase) -> None:
        if phase is Phase.OPTIMIZER:  # the gradients are all there now
            rec.collect_grads(model)

    def count_forward(module, args) -> None:
        rec.forwards += torch.is_grad_enabled()
        forwards.append((rec.tick, rec.tick))

    def end_forward(module, args, output) -> None:
        forwards[-1] = (forwards[-1][0], rec.tick)

    counter = model.register_forward_pre_hook(count_forward)
    ender = model.register_forward_hook(end_forward)
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
        ender.remove()
    return forwards
