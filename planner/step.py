"""One training step, the same for profiling, measuring and training."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from planner.graph import Phase
from planner.tracking import tensors_in


@dataclass(frozen=True)
class Batch:
    """Positional and keyword inputs of a model's forward."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, batch: Any) -> Batch:
        """A tensor is one positional input, a tuple or list several, a dict keyword inputs."""
        if isinstance(batch, Batch):
            return batch
        if isinstance(batch, (tuple, list)):
            return cls(tuple(batch))
        if isinstance(batch, dict):
            return cls((), dict(batch))
        return cls((batch,))


LossFn = Callable[[Any], torch.Tensor]


def default_loss(output: Any) -> torch.Tensor:
    """The output itself if it is a scalar, its `.loss` if it has one, else the sum of its tensors."""
    if isinstance(output, torch.Tensor) and output.dim() == 0:
        return output
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    tensors = [t for t in tensors_in(output) if t.is_floating_point() and t.requires_grad]
    if not tensors:
        raise ValueError("the model's output holds no tensor that requires grad; pass loss_fn=")
    return sum(t.float().sum() for t in tensors)


def device_of(model: nn.Module, batch: Batch) -> torch.device:
    """The device the step runs on: the parameters', else the batch's."""
    for t in [*model.parameters(), *tensors_in((batch.args, batch.kwargs))]:
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Automatic mixed precision in `dtype`, or nothing when dtype is None or float32."""
    if dtype is None or dtype == torch.float32 or device.type == "meta":
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


def train_step(
    model: nn.Module,
    batch: Batch,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    autocast_dtype: torch.dtype | None = None,
    on_phase: Callable[[Phase], None] = lambda phase: None,
) -> torch.Tensor:
    """Forward, loss, backward, optimizer step and zero_grad(set_to_none=True); returns the loss."""
    device = device_of(model, batch)
    on_phase(Phase.FORWARD)
    with autocast(device, autocast_dtype):
        output = model(*batch.args, **batch.kwargs)
        loss = (loss_fn or default_loss)(output)
    on_phase(Phase.BACKWARD)
    loss.backward()
    on_phase(Phase.OPTIMIZER)
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        for p in model.parameters():
            p.grad = None
    return loss.detach()


def timed_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of `fn()` in ms, with the device's queued work finished before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3
