"""One training step, the same for profiling, measuring and training.

The built-in step is what most loops do: forward, loss, drop the output, backward, optimizer step,
zero_grad. A user's own step (gradient accumulation over micro-batches, a GradScaler, a custom
loss) is a function of no arguments that runs one whole step; `TrainingStep` holds either.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from planner.core.graph import Phase
from planner.torch_internals import tree_map_only
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
    """Forward, loss, backward, optimizer step and zero_grad(set_to_none=True); returns the loss.

    The model's output is dropped before backward, as `loss = model(**batch).loss; loss.backward()`
    drops it.
    """
    on_phase(Phase.FORWARD)
    loss = forward_loss(model, batch, loss_fn, autocast_dtype)
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


def forward_loss(
    model: nn.Module, batch: Batch, loss_fn: LossFn | None = None, autocast_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The forward and the loss of the built-in step; nothing but the loss outlives it."""
    with autocast(device_of(model, batch), autocast_dtype):
        return (loss_fn or default_loss)(model(*batch.args, **batch.kwargs))


StepFn = Callable[[], Any]  # runs one whole training step of the user's: forward(s), backward(s), optimizer step


@dataclass(frozen=True)
class TrainingStep:
    """One training step of `model`: the user's own `fn`, or the built-in one on `batch`.

    `batch` of a user's step is only counted as the step's inputs (it may be empty).
    """

    model: nn.Module
    batch: Batch
    loss_fn: LossFn | None = None
    optimizer: torch.optim.Optimizer | None = None
    autocast_dtype: torch.dtype | None = None
    fn: StepFn | None = None

    @classmethod
    def of(cls, model, batch=None, loss_fn=None, optimizer=None, autocast_dtype=None, fn=None) -> TrainingStep:
        if fn is None and batch is None:
            raise ValueError("give an example batch, or your own training step as step=")
        if fn is not None and (loss_fn is not None or autocast_dtype is not None):
            raise ValueError("a step of your own computes its loss and autocasts itself: drop loss_fn and autocast_dtype")
        return cls(model, Batch.of(() if batch is None else batch), loss_fn, optimizer, autocast_dtype, fn)

    @property
    def device(self) -> torch.device:
        return device_of(self.model, self.batch)

    def __call__(self, on_phase: Callable[[Phase], None] = lambda phase: None) -> None:
        """Run the step. The built-in one tells `on_phase` where its phases begin; a user's step does not."""
        if self.fn is not None:
            self.fn()
        else:
            train_step(self.model, self.batch, self.loss_fn, self.optimizer, self.autocast_dtype, on_phase)


@contextlib.contextmanager
def optimizer_hooks(before: Callable[[], None], after: Callable[[], None]) -> Iterator[None]:
    """Calls `before()` and `after()` around every optimizer's `step()` while active."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    handles = [
        register_optimizer_step_pre_hook(lambda opt, args, kwargs: before()),
        register_optimizer_step_post_hook(lambda opt, args, kwargs: after()),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def timed_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of `fn()` in ms, with the device's queued work finished before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def paired_ratio(before: list[float], after: list[float]) -> float:
    """The median of `after[i] / before[i]`, each the time of a step over that of the step taken just
    before it. The machine's pace can change by a third from one minute to the next; a ratio of two
    neighbouring steps sees one pace, where a ratio of two medians mixes them."""
    return statistics.median(a / b for b, a in zip(before, after, strict=True))


def paired_ms(before: list[float], after: list[float]) -> tuple[float, float]:
    """The median of `before`, and that times `paired_ratio(before, after)`: the step times of steps
    without a plan and, each taken just after one of them, with it."""
    ms = statistics.median(before)
    return ms, ms * paired_ratio(before, after)


def timed_in_turns(
    handle: Any, fn: Callable[[], Any], device: torch.device, rounds: Iterable[Any]
) -> tuple[float, float]:
    """Per round, `fn()` with the plan's `handle` removed, then installed (it is left installed); the
    step times of both by `paired_ms`."""
    before, after = [], []
    for _ in rounds:
        handle.remove()
        before.append(timed_ms(fn, device))
        handle.install()
        after.append(timed_ms(fn, device))
    return paired_ms(before, after)


@contextlib.contextmanager
def preserved(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
    """Restores parameters, buffers, gradients, optimizer state and random number generators (torch's,
    NumPy's and Python's: a model may draw from any) on exit."""
    tensors = [*model.parameters(), *model.buffers()]
    saved = [_host_copy(t) for t in tensors]
    grads = [p.grad for p in model.parameters()]
    # copies on the host: a measured step must not count them (load_state_dict moves state back)
    opt_state = tree_map_only(torch.Tensor, _host_copy, optimizer.state_dict()) if optimizer is not None else None
    rng = torch.get_rng_state()
    host_rng = random.getstate(), np.random.get_state()
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
        random.setstate(host_rng[0])
        np.random.set_state(host_rng[1])
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def layer_drop(model: nn.Module) -> list[tuple[Any, str, float]]:
    """Where `model` skips layers at random in training (LayerDrop: Hugging Face's `layerdrop`,
    `encoder_layerdrop`, ... on a module or its config): (owner, attribute, probability) for each
    probability above 0."""
    owners = {id(m): m for m in model.modules()}
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None:
            owners.setdefault(id(config), config)
    return [(owner, name, value) for owner in owners.values() for name, value in vars(owner).items()
            if name.endswith("layerdrop") and type(value) in (int, float) and value > 0]


@contextlib.contextmanager
def every_layer_runs(model: nn.Module) -> Iterator[None]:
    """No layer skipped at random inside the block (`layer_drop`'s probabilities set to 0): a step that
    runs every layer, the most memory of the steps it stands for."""
    settings = layer_drop(model)
    for owner, name, _ in settings:
        setattr(owner, name, 0.0)
    try:
        yield
    finally:
        for owner, name, value in settings:
            setattr(owner, name, value)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True) if t.is_cuda else t.detach().clone()
