"""A runnable training workload: a model, its example batch, a loss and an optimizer.

``Workload.step()`` runs one training step exactly as a user's loop would, so that profiling and
measurement see the same work::

    workload = load_scenario("gpt").build("small")
    loss = workload.step()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from planner.step import Batch, train_step


@dataclass(frozen=True)
class Workload:
    """A model with its example batch, loss and optimizer: everything one training step needs."""

    model: nn.Module
    inputs: tuple[Tensor, ...]
    kwargs: dict[str, Tensor]
    target: Tensor | None
    loss_fn: Callable[[Any, Any], Tensor]
    optimizer: torch.optim.Optimizer
    autocast_dtype: torch.dtype | None
    device: torch.device

    @property
    def batch(self) -> Batch:
        """The example inputs of the forward."""
        return Batch(self.inputs, self.kwargs)

    def loss_closure(self) -> Callable[[Any], Tensor]:
        """``fn(output) -> loss`` with the target bound."""
        loss_fn, target = self.loss_fn, self.target
        return lambda output: loss_fn(output, target)

    def step(self) -> Tensor:
        """One training step as a user's loop runs it (see `planner.step.train_step`); returns the loss.

        On the meta device there is no autocast, so a mixed-precision scenario steps in float32 there.
        """
        return train_step(self.model, self.batch, self.loss_closure(), self.optimizer, self.autocast_dtype)
