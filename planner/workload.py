"""A runnable training workload: a model, its example batch, a loss and an optimizer.

``Workload.step()`` runs one training step exactly as a user's loop would, so that profiling and
measurement see the same work::

    workload = load_scenario("gpt").build("small")
    loss = workload.step()
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


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

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context of the forward pass (a no-op at float32 precision).

        PyTorch has no autocast for the meta device (and CPU or CUDA autocast leave meta tensors
        alone), so on meta the step runs in float32 and ``autocast_dtype`` only informs: outputs of
        matmul-like ops come out twice the bytes they would under bfloat16. To see mixed-precision
        tensors without allocating, build on "cpu" under
        ``torch._subclasses.fake_tensor.FakeTensorMode`` and step under the same mode: CPU
        autocast applies to fake tensors (with CPU's op lists, which differ from CUDA's in
        normalisation and softmax ops).
        """
        if self.autocast_dtype is None or self.device.type == "meta":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def loss_closure(self) -> Callable[[Any], Tensor]:
        """``fn(output) -> loss`` with the target bound."""
        loss_fn, target = self.loss_fn, self.target
        return lambda output: loss_fn(output, target)

    def step(self) -> Tensor:
        """One training step: forward and loss (under autocast), backward, optimizer step, zero grad.

        Returns the detached loss. Dropout draws from torch's global generator, as in user code.
        """
        with self.autocast():
            output = self.model(*self.inputs, **self.kwargs)
            loss = self.loss_fn(output, self.target)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()
