"""Measure the real peak memory and time of a training step.

On CPU, live tensor storages are tracked during the step (what existed
before it, such as parameters and optimizer state, is added separately); on
CUDA the caching allocator's own statistics give the allocated and reserved
peaks. One warm-up step first, so that lazily created optimizer state exists
and the measured step is a steady-state one. The model, optimizer and random
number generators are restored afterwards.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from planner.profiler import fixed_groups, fixed_bytes, preserved
from planner.step import Batch, LossFn, device_of, timed_ms, train_step
from planner.tracking import StorageTracker


@dataclass(frozen=True)
class Measurement:
    """Measured peak bytes of a steady-state step and its median time in ms."""

    device: str
    peak_bytes: int  # CPU: live storages at the worst moment; CUDA: max_memory_allocated
    reserved_bytes: int | None  # CUDA only: max_memory_reserved
    step_ms: float
    steps: int


def measure(
    model: nn.Module,
    example_batch: Any,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    autocast_dtype: torch.dtype | None = None,
    steps: int = 3,
    warmup: int = 1,
) -> Measurement:
    """Warm up, time `steps` steps (median), then measure the peak of one more step."""
    batch = Batch.of(example_batch)
    device = device_of(model, batch)

    def step() -> None:
        train_step(model, batch, loss_fn, optimizer, autocast_dtype)

    with preserved(model, optimizer):
        for _ in range(warmup):
            step()
        times = [timed_ms(step, device) for _ in range(steps)]
        if device.type == "cuda":
            peak, reserved = _cuda_peak(step, device)
        else:
            peak, reserved = _tracked_peak(step, model, batch, optimizer, device), None
    return Measurement(str(device), peak, reserved, statistics.median(times), steps)


def _tracked_peak(step, model: nn.Module, batch: Batch, optimizer, device: torch.device) -> int:
    groups = fixed_groups(model, batch, optimizer)
    tracker = StorageTracker(device, [t for ts in groups.values() for t in ts])
    with tracker:
        step()
    tracker.stop_tracking()
    return sum(fixed_bytes(groups, device).values()) + tracker.peak_bytes


def _cuda_peak(step, device: torch.device) -> tuple[int, int]:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
