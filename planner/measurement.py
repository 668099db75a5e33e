"""Measure the real peak memory and time of a training step.

On CPU, live tensor storages are tracked during the step (what existed
before it, such as parameters and optimizer state, is added separately; for a
model `torch.compile` returned, whose kernels allocate outside the dispatcher,
every block of c10's CPU allocator is counted instead), and
on Linux the process's high-water mark is read too, which also sees memory
allocated outside PyTorch's dispatcher (NumPy buffers, library scratch): it
follows freed tensors only where the process was started with
MALLOC_MMAP_THRESHOLD_ set low (65536), so that they go back to the system.
On CUDA the caching allocator's own statistics give the allocated and reserved
peaks. One warm-up step first (on the CPU under a tracker too), so that lazily
created optimizer state exists and the measured step is a steady-state one.
The model, optimizer and random number generators are restored afterwards.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from planner.step import LossFn, StepFn, TrainingStep, every_layer_runs, preserved, timed_ms
from planner.torch_internals import CpuScratch, is_compiled
from planner.tracking import StorageTracker, fixed_bytes, fixed_groups


@dataclass(frozen=True)
class Measurement:
    """Measured peak bytes of a steady-state step and its median time in ms."""

    device: str
    peak_bytes: int  # CPU: live storages at the worst moment (compiled: c10's allocator); CUDA: max_memory_allocated
    reserved_bytes: int | None  # CUDA only: max_memory_reserved
    step_ms: float
    steps: int
    process_peak_bytes: int | None = None  # CPU on Linux: the fixed bytes + the rise of the process's high-water mark


def measure(
    model: nn.Module,
    example_batch: Any = None,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: StepFn | None = None,
    autocast_dtype: torch.dtype | None = None,
    steps: int = 3,
    warmup: int = 1,
) -> Measurement:
    """Warm up, time `steps` steps (median; 0 ms for none), then measure the peak of one more step.

    `step` is a training step of your own instead of the built-in one (see `planner.profile`). On
    CUDA the allocator's cache is emptied before the measured step, so that its reserved peak is
    this step's own. Where the model skips layers at random (LayerDrop), these steps skip none, as
    its profile did (`planner.step.every_layer_runs`).
    """
    train = TrainingStep.of(model, example_batch, loss_fn, optimizer, autocast_dtype, step)
    device = train.device
    with preserved(model, optimizer), every_layer_runs(model):
        for _ in range(warmup):
            _warm_up(train, device)
        times = [timed_ms(train, device) for _ in range(steps)]
        if device.type == "cuda":
            peak, reserved = _cuda_peak(train, device)
            process = None
        else:
            (peak, process), reserved = _tracked_peak(train, device), None
    return Measurement(str(device), peak, reserved, statistics.median(times) if times else 0.0, steps, process)


def _warm_up(train: TrainingStep, device: torch.device) -> None:
    """A warm-up step; on the CPU under a StorageTracker, as the measured step will run, so that the
    measured step runs no machine code for the first time. Code first run pages its shared library
    in, and the high-water mark counts those pages: a recompute region's replay stops early by
    raising from a saved-tensor hook, and under a dispatch mode that exception unwinds through boxed
    kernels whose code and unwind tables (1.4 MiB of libtorch_cpu.so for a BERT) no step without a
    mode runs. A compiled step is measured without a tracker, and warms up without one."""
    if device.type == "cuda" or is_compiled(train.model):
        train()
        return
    with StorageTracker(device) as warm:
        train()
    warm.stop_tracking()


def _tracked_peak(train: TrainingStep, device: torch.device) -> tuple[int, int | None]:
    """(fixed + the live storages' peak, fixed + the rise of the process's high-water mark). A compiled
    model's kernels allocate outside the dispatcher: its peak is what c10's CPU allocator held."""
    groups = fixed_groups(train.model, train.batch, train.optimizer)
    fixed = sum(fixed_bytes(groups, device).values())
    if is_compiled(train.model):
        allocator = CpuScratch()
        if not allocator.available() or not allocator.start():
            raise RuntimeError("a compiled step's memory is measured by the autograd profiler's memory events, "
                               "which this torch lacks or another profiler holds")
        with high_water_mark() as rise:
            train()
        peak, _ = allocator.stop_peak()
        return fixed + peak, None if rise() is None else fixed + rise()
    tracker = StorageTracker(device, [t for ts in groups.values() for t in ts])
    with high_water_mark() as rise, tracker:
        train()
    tracker.stop_tracking()
    return fixed + tracker.peak_bytes, None if rise() is None else fixed + rise()


@contextlib.contextmanager
def high_water_mark() -> Iterator[Callable[[], int | None]]:
    """Yields a function that gives, once the block is over, how far the process's resident memory
    rose above where it was at the start (bytes; None where /proc cannot tell)."""
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from now
        start = _status_kib(status, "VmRSS")
    except OSError:
        start = None
    result: list[int | None] = [None]
    yield lambda: result[0]
    if start is not None:
        result[0] = max(0, _status_kib(status, "VmHWM") - start) * 1024


def _status_kib(status: Path, field: str) -> int:
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{status} has no {field}")


def _cuda_peak(train: TrainingStep, device: torch.device) -> tuple[int, int]:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    train()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)


class _ReplayWatch(StorageTracker):
    """Which recompute regions' replays allocate storages that are still alive when the step ends."""

    def __init__(self, device: torch.device, existing: list[torch.Tensor]) -> None:
        super().__init__(device, existing)
        self.replaying = None  # the choice whose replay is running
        self.made_by: dict[int, Any] = {}  # storage key -> the choice whose replay made it

    def watch(self, choice) -> None:
        self.replaying = choice

    def on_alloc(self, key: int, nbytes: int) -> None:
        if self.replaying is not None and key >= 0:
            self.made_by[key] = self.replaying


def replays_left_behind(handle, example_batch=None, loss_fn=None, optimizer=None, *, step=None, autocast_dtype=None) -> set[int]:
    """The units of the plan's recompute regions whose replays, in one step under `handle`, made
    storages that outlive the step: a replay that does what its first run did leaves none."""
    train = TrainingStep.of(handle.model, example_batch, loss_fn, optimizer, autocast_dtype, step)
    groups = fixed_groups(train.model, train.batch, optimizer)
    watch = _ReplayWatch(train.device, [t for ts in groups.values() for t in ts])
    handle.regions.watch = watch.watch
    try:
        with preserved(train.model, optimizer), watch:
            train()
    finally:
        handle.regions.watch = None
    left = {watch.made_by[key].units for key in watch.live if key in watch.made_by}
    watch.stop_tracking()
    return {u for units in left for u in units}
