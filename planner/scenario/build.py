"""Scenarios as data, and how a variant of one becomes a runnable workload.

    workload = scenario.build("small", device="cpu", seed=0)   # model, batch, loss and optimizer
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from planner.step import default_loss
from planner.torch_internals import fake_tensor_mode
from planner.workload import Workload

_PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
BATCH = "B"
FAKE = "fake"  # a device name for Scenario.build: CPU tensors under a FakeTensorMode


class ScenarioError(ValueError):
    """A scenario file or argument is wrong; the message names the file, the field and what is expected."""


def cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Mean cross entropy of logits [B, C, ...] against class indices [B, ...]."""
    return F.cross_entropy(output, target)


def lm_cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Mean next-token cross entropy of logits [B, T, V] against token ids [B, T]."""
    return F.cross_entropy(output.flatten(0, -2), target.flatten())


def mse(output: Tensor, target: Tensor) -> Tensor:
    """Mean squared error between tensors of the same shape."""
    return F.mse_loss(output, target)


def output(output: Any, target: Any) -> Tensor:
    """The loss the model computed itself (its output's `.loss`), the output if it is a scalar, or the
    sum of its tensors; the target is not used."""
    return default_loss(output)


_LOSSES: dict[str, Callable[[Any, Any], Tensor]] = {
    "cross_entropy": cross_entropy,
    "lm_cross_entropy": lm_cross_entropy,
    "mse": mse,
    "output": output,
}
NEEDS_TARGET = ("cross_entropy", "lm_cross_entropy", "mse")


def transformers_model(class_name: str) -> Callable[..., nn.Module]:
    """A factory of the transformers model class `class_name` from its config's fields, with random
    weights (nothing is downloaded)."""

    def build(**config: Any) -> nn.Module:
        import transformers

        cls = getattr(transformers, class_name)
        return cls(cls.config_class(**config))

    build.__name__ = class_name
    return build


@dataclass(frozen=True)
class TensorSpec:
    """How to make one example tensor: ``shape`` may contain ``"B"``, the batch size."""

    shape: tuple[int | str, ...]
    dtype: torch.dtype = torch.float32
    low: int = 0
    high: int | None = None
    fill: float | None = None

    def sizes(self, batch_size: int) -> tuple[int, ...]:
        """The concrete shape for ``batch_size``."""
        return tuple(batch_size if d == BATCH else int(d) for d in self.shape)

    def make(self, batch_size: int, device: torch.device, generator: torch.Generator) -> Tensor:
        """A tensor on ``device``, drawn on the CPU from ``generator`` (empty on the meta device)."""
        sizes = self.sizes(batch_size)
        if device.type == "meta":
            return torch.empty(sizes, dtype=self.dtype, device=device)
        if self.fill is not None or self.dtype == torch.bool:
            value = True if self.fill is None else self.fill
            tensor = torch.full(sizes, value, dtype=self.dtype)
        elif self.dtype.is_floating_point:
            tensor = torch.randn(sizes, generator=generator, dtype=self.dtype)
        else:
            assert self.high is not None, "validated at load"
            tensor = torch.randint(self.low, self.high, sizes, generator=generator, dtype=self.dtype)
        return tensor.to(device)


@dataclass(frozen=True)
class Variant:
    """One size of a scenario: factory arguments (a transformers model's config fields) and the
    example batch; a keyword input given as a name is the same tensor as that keyword input."""

    args: dict[str, Any]
    batch_size: int
    inputs: tuple[TensorSpec, ...]
    kwargs: dict[str, TensorSpec | str]
    target: TensorSpec | None


@dataclass(frozen=True)
class OptimizerSpec:
    """A torch optimizer by name (``sgd``, ``adam``, ``adamw``) and its keyword arguments."""

    name: str
    kwargs: dict[str, Any]

    def build(self, params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
        return _OPTIMIZERS[self.name](params, **self.kwargs)


@dataclass(frozen=True)
class Scenario:
    """A validated scenario file; ``build`` turns a variant of it into a runnable ``Workload``."""

    name: str
    path: Path
    model: str
    small: Variant
    full: Variant | None
    loss: str
    precision: str
    optimizer: OptimizerSpec
    budget: str | int | None
    gpus: tuple[str, ...]
    factory: Callable[..., nn.Module] = field(repr=False, compare=False)
    loss_fn: Callable[[Any, Any], Tensor] = field(repr=False, compare=False)
    world_size: int = 1
    sharding: str | None = None  # ddp or fsdp; None: ddp when world_size > 1

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of ``precision``; None for float32."""
        return _PRECISIONS[self.precision]

    @property
    def variants(self) -> tuple[str, ...]:
        """The variant names this scenario has: "small", and "full" when given."""
        return ("small",) if self.full is None else ("small", "full")

    def variant(self, name: str = "small") -> Variant:
        """The variant ``name``; ScenarioError when the scenario has none of that name."""
        if name not in self.variants:
            raise ScenarioError(f"{self.path.name}: no variant {name!r}; valid: {', '.join(self.variants)}")
        if name == "full" and self.full is not None:
            return self.full
        return self.small

    def build_model(self, variant: str = "small", device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
        """The model of ``variant`` in training mode, on ``device``, float32.

        On "meta" the model is constructed under ``torch.device("meta")`` and allocates nothing.
        Elsewhere it is initialised on the CPU from ``seed`` (torch's global generator is restored
        afterwards), then moved, so every device gets the same weights.
        """
        args, device = self.variant(variant).args, torch.device(device)
        if device.type == "meta":
            with torch.device(device):
                return self._call_factory(args)
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.default_generator.manual_seed(seed)
            model = self._call_factory(args)
        return model if device.type == "cpu" else model.to(device)

    def build(
        self,
        variant: str = "small",
        device: str | torch.device = "cpu",
        seed: int = 0,
        batch_size: int | None = None,
    ) -> Workload:
        """Model, example inputs and target (deterministic from ``seed``), loss and optimizer of ``variant``.

        ``batch_size`` overrides the variant's. On the meta device the tensors are empty. ``"fake"``
        builds for the CPU under a ``FakeTensorMode``: the tensors have shapes, dtypes and storages but
        no memory, and profiling them runs the CPU's autocast and kernel choices without allocating.
        """
        if device == FAKE:
            with fake_tensor_mode():
                return self.build(variant, "cpu", seed, batch_size)
        spec, device = self.variant(variant), torch.device(device)
        if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
            raise ScenarioError(f"{self.path.name}: batch_size must be a positive integer, got {batch_size!r}")
        batch = spec.batch_size if batch_size is None else batch_size
        model = self.build_model(variant, device, seed)
        generator = torch.Generator().manual_seed(seed)
        inputs = tuple(s.make(batch, device, generator) for s in spec.inputs)
        kwargs = {k: s.make(batch, device, generator) for k, s in spec.kwargs.items() if isinstance(s, TensorSpec)}
        kwargs |= {k: kwargs[s] for k, s in spec.kwargs.items() if isinstance(s, str)}  # labels: input_ids
        target = None if spec.target is None else spec.target.make(batch, device, generator)
        optimizer = self.optimizer.build(model.parameters())
        return Workload(model, inputs, kwargs, target, self.loss_fn, optimizer, self.autocast_dtype, device)

    def _call_factory(self, args: dict[str, Any]) -> nn.Module:
        try:
            return self.factory(**args)
        except ValueError as error:
            message = f"{self.path.name}: field 'args': model {self.model!r} rejected them: {error}"
            raise ScenarioError(message) from error
