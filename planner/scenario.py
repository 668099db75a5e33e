"""Training scenarios: a model, an example batch, a loss, a precision and an optimizer, from YAML.

A scenario file looks like this (only ``model`` and ``inputs`` are required)::

    name: resnet                      # defaults to the file's stem
    model: resnet                     # a zoo name, or "package.module:factory" for a user's model
    args: {depth: 18, width: 16, num_classes: 10}   # keyword arguments of the factory
    batch_size: 8                     # default 1
    inputs:                           # positional inputs of forward; "B" in a shape is the batch size
      - {shape: [B, 3, 32, 32], dtype: float32}
    kwargs:                           # optional keyword inputs of forward: name -> tensor spec
      attention_mask: {shape: [B, 64], dtype: bool}
    target: {shape: [B], dtype: int64, high: 10}
    loss: cross_entropy               # cross_entropy | lm_cross_entropy | mse | "package.module:function"
    precision: float32                # float32 | bfloat16 | float16
    optimizer: {name: adamw, lr: 1.0e-3}   # sgd | adam | adamw, plus keyword arguments of the torch optimizer
    budget: "60%"                     # optional: a share of the GPU ("60%") or a size ("12GiB", bytes as an integer)
    gpus: [a100-40gb, rtx4090]        # optional: GPU catalog names to compare
    world_size: 2                     # optional: data-parallel ranks (default 1); batch_size is per rank
    sharding: fsdp                    # optional: ddp (replicated, the default) or fsdp (FSDP2, sharded)
    full:                             # optional full-size variant
      args: {depth: 50, width: 64, num_classes: 1000}
      batch_size: 256
      inputs: [{shape: [B, 3, 224, 224], dtype: float32}]

Tensor specs: ``shape`` (integers and ``"B"``), ``dtype`` (default float32), for integer dtypes
``high`` (exclusive, required) and ``low`` (default 0), and ``fill`` for a constant tensor.
Float tensors are standard normal, integer tensors uniform in [low, high), bool tensors True.
``target`` is needed by the built-in losses; a custom loss is called as ``fn(output, target)``.
``lm_cross_entropy`` flattens logits [B, T, V] against targets [B, T]. ``bfloat16`` and
``float16`` mean autocast; parameters stay float32. The ``full`` variant overrides ``batch_size``,
``inputs``, ``kwargs`` and ``target`` and updates ``args`` key by key. A "package.module:name"
must be importable (on ``sys.path``).

Usage::

    scenario = load_scenario("resnet")          # built-in, or a path to a .yaml file
    workload = scenario.build("small", device="cpu", seed=0)
    loss = workload.step()                      # one training step, as a user would run it
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode

import scenarios
from planner.distributed.engines import SHARDINGS
from planner.workload import Workload
from scenarios.zoo import ZOO

_TOP_FIELDS = (
    "name", "model", "args", "batch_size", "inputs", "kwargs", "target", "loss",
    "precision", "optimizer", "budget", "gpus", "world_size", "sharding", "full",
)  # fmt: skip
_VARIANT_FIELDS = ("args", "batch_size", "inputs", "kwargs", "target")
_TENSOR_FIELDS = ("shape", "dtype", "low", "high", "fill")
_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}  # fmt: skip
_PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
_BUDGET = re.compile(r"^\d+(\.\d+)?\s*(%|B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?$")
BATCH = "B"
FAKE = "fake"  # a device name for Scenario.build: CPU tensors under a FakeTensorMode


__all__ = [
    "OptimizerSpec", "Scenario", "ScenarioError", "TensorSpec", "Variant", "Workload",
    "list_scenarios", "load_scenario", "parse_scenario", "scenario_dir",
]  # fmt: skip


class ScenarioError(ValueError):
    """A scenario file or argument is wrong; the message names the file, the field and what is expected."""


# ---------------------------------------------------------------------------------------------- losses


def cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Mean cross entropy of logits [B, C, ...] against class indices [B, ...]."""
    return F.cross_entropy(output, target)


def lm_cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Mean next-token cross entropy of logits [B, T, V] against token ids [B, T]."""
    return F.cross_entropy(output.flatten(0, -2), target.flatten())


def mse(output: Tensor, target: Tensor) -> Tensor:
    """Mean squared error between tensors of the same shape."""
    return F.mse_loss(output, target)


_LOSSES: dict[str, Callable[[Any, Any], Tensor]] = {
    "cross_entropy": cross_entropy,
    "lm_cross_entropy": lm_cross_entropy,
    "mse": mse,
}


# ---------------------------------------------------------------------------------------------- data


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
    """One size of a scenario: factory arguments and the example batch."""

    args: dict[str, Any]
    batch_size: int
    inputs: tuple[TensorSpec, ...]
    kwargs: dict[str, TensorSpec]
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
            with FakeTensorMode():
                return self.build(variant, "cpu", seed, batch_size)
        spec, device = self.variant(variant), torch.device(device)
        if batch_size is not None and not _is_positive_int(batch_size):
            raise ScenarioError(f"{self.path.name}: batch_size must be a positive integer, got {batch_size!r}")
        batch = spec.batch_size if batch_size is None else batch_size
        model = self.build_model(variant, device, seed)
        generator = torch.Generator().manual_seed(seed)
        inputs = tuple(s.make(batch, device, generator) for s in spec.inputs)
        kwargs = {k: s.make(batch, device, generator) for k, s in spec.kwargs.items()}
        target = None if spec.target is None else spec.target.make(batch, device, generator)
        optimizer = self.optimizer.build(model.parameters())
        return Workload(model, inputs, kwargs, target, self.loss_fn, optimizer, self.autocast_dtype, device)

    def _call_factory(self, args: dict[str, Any]) -> nn.Module:
        try:
            return self.factory(**args)
        except ValueError as error:
            message = f"{self.path.name}: field 'args': model {self.model!r} rejected them: {error}"
            raise ScenarioError(message) from error


# ---------------------------------------------------------------------------------------------- loading


def scenario_dir() -> Path:
    """The folder of the built-in scenario files."""
    return Path(scenarios.__file__).parent


def list_scenarios() -> list[str]:
    """Names of the built-in scenarios, sorted."""
    return sorted(p.stem for p in scenario_dir().glob("*.yaml"))


def load_scenario(path_or_name: str | Path) -> Scenario:
    """Load and validate a scenario: a built-in name such as "resnet", or a path to a YAML file."""
    path = _locate(path_or_name)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ScenarioError(f"{path.name}: not valid YAML: {error}") from error
    return parse_scenario(data, path)


def parse_scenario(data: Any, path: Path) -> Scenario:
    """Validate the parsed YAML ``data`` of the file at ``path`` (used in messages and as default name)."""
    where = path.name
    if not isinstance(data, dict):
        raise ScenarioError(f"{where}: must be a mapping of fields, got {type(data).__name__}")
    _check_fields(where, "", data, _TOP_FIELDS, required=("model", "inputs"))
    model = data["model"]
    if not isinstance(model, str) or not model:
        _fail(where, "model", "a zoo name or 'package.module:factory'", model)
    factory = _resolve_factory(where, model)
    small = _parse_variant(where, "", data, factory, base=None)
    full = None
    if "full" in data:
        if not isinstance(data["full"], dict):
            _fail(where, "full", "a mapping of overrides", data["full"])
        _check_fields(where, "full.", data["full"], _VARIANT_FIELDS)
        full = _parse_variant(where, "full.", data["full"], factory, base=small)
    loss = data.get("loss", "cross_entropy")
    loss_fn = _resolve_loss(where, loss)
    if loss in _LOSSES and any(v.target is None for v in (small, full) if v is not None):
        raise ScenarioError(f"{where}: field 'target' is required by loss {loss!r}")
    return Scenario(
        name=_parse_name(where, data.get("name", path.stem)),
        path=path,
        model=model,
        small=small,
        full=full,
        loss=loss,
        precision=_parse_choice(where, "precision", data.get("precision", "float32"), _PRECISIONS),
        optimizer=_parse_optimizer(where, data.get("optimizer", {"name": "adamw", "lr": 1e-3})),
        budget=_parse_budget(where, data.get("budget")),
        gpus=_parse_gpus(where, data.get("gpus", [])),
        factory=factory,
        loss_fn=loss_fn,
        world_size=_parse_world_size(where, data.get("world_size", 1)),
        sharding=_parse_sharding(where, data.get("sharding")),
    )


def _locate(path_or_name: str | Path) -> Path:
    text = str(path_or_name)
    is_name = isinstance(path_or_name, str) and "/" not in text and not text.endswith((".yaml", ".yml"))
    if is_name:
        path = scenario_dir() / f"{text}.yaml"
        if not path.is_file():
            raise ScenarioError(f"unknown scenario {text!r}; built-in scenarios: {', '.join(list_scenarios())}")
        return path
    path = Path(path_or_name)
    if not path.is_file():
        raise ScenarioError(f"{path}: no such scenario file")
    return path


# ---------------------------------------------------------------------------------------------- fields


def _fail(where: str, name: str, expected: str, got: Any) -> NoReturn:
    raise ScenarioError(f"{where}: field '{name}' must be {expected}, got {got!r}")


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_fields(where: str, prefix: str, data: dict, valid: tuple[str, ...], required: tuple[str, ...] = ()) -> None:
    unknown = [k for k in data if k not in valid]
    if unknown:
        names = ", ".join(f"'{prefix}{k}'" for k in unknown)
        raise ScenarioError(f"{where}: unknown field {names}; valid fields: {', '.join(prefix + v for v in valid)}")
    for name in required:
        if name not in data:
            raise ScenarioError(f"{where}: missing required field '{prefix}{name}'")


def _parse_name(where: str, name: Any) -> str:
    if not isinstance(name, str) or not name:
        _fail(where, "name", "a non-empty string", name)
    return name


def _parse_choice(where: str, name: str, value: Any, choices: Mapping[str, Any]) -> str:
    if not isinstance(value, str) or value not in choices:
        _fail(where, name, f"one of {', '.join(choices)}", value)
    return value


def _import_attribute(where: str, name: str, spec: str) -> Any:
    """The object named by "package.module:attribute" (attribute may be dotted)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        _fail(where, name, "'package.module:attribute'", spec)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ScenarioError(
            f"{where}: field '{name}': cannot import module {module_name!r} ({type(error).__name__}: {error})"
        ) from error
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ScenarioError(f"{where}: field '{name}': module {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        _fail(where, name, "a callable", spec)
    return obj


def _resolve_factory(where: str, model: str) -> Callable[..., nn.Module]:
    if ":" in model:
        return _import_attribute(where, "model", model)
    if model not in ZOO:
        raise ScenarioError(
            f"{where}: field 'model': unknown zoo model {model!r}; valid names: {', '.join(sorted(ZOO))}, "
            "or 'package.module:factory'"
        )
    return ZOO[model]


def _resolve_loss(where: str, loss: Any) -> Callable[[Any, Any], Tensor]:
    if isinstance(loss, str) and ":" in loss:
        return _import_attribute(where, "loss", loss)
    if not isinstance(loss, str) or loss not in _LOSSES:
        _fail(where, "loss", f"one of {', '.join(_LOSSES)} or 'package.module:function'", loss)
    return _LOSSES[loss]


def _parse_args(where: str, name: str, args: Any, factory: Callable[..., nn.Module]) -> dict[str, Any]:
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        _fail(where, name, "a mapping of keyword arguments", args)
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(args)
    unknown = [k for k in args if k not in params]
    if unknown:
        raise ScenarioError(
            f"{where}: field '{name}': unknown argument {', '.join(map(repr, unknown))} of the model factory; "
            f"valid: {', '.join(params)}"
        )
    return dict(args)


def _parse_variant(
    where: str, prefix: str, data: dict, factory: Callable[..., nn.Module], base: Variant | None
) -> Variant:
    """The variant in ``data``; fields it lacks come from ``base`` (``args`` are merged into base's)."""
    args = _parse_args(where, prefix + "args", data.get("args", {}), factory)
    if base is None:
        return Variant(
            args=args,
            batch_size=_parse_batch_size(where, prefix, data.get("batch_size", 1)),
            inputs=_parse_inputs(where, prefix, data["inputs"]),
            kwargs=_parse_kwargs(where, prefix, data.get("kwargs", {})),
            target=None if data.get("target") is None else _parse_tensor(where, prefix + "target", data["target"]),
        )
    return Variant(
        args={**base.args, **args},
        batch_size=_parse_batch_size(where, prefix, data["batch_size"]) if "batch_size" in data else base.batch_size,
        inputs=_parse_inputs(where, prefix, data["inputs"]) if "inputs" in data else base.inputs,
        kwargs=_parse_kwargs(where, prefix, data["kwargs"]) if "kwargs" in data else base.kwargs,
        target=_parse_tensor(where, prefix + "target", data["target"]) if "target" in data else base.target,
    )


def _parse_batch_size(where: str, prefix: str, value: Any) -> int:
    if not _is_positive_int(value):
        _fail(where, prefix + "batch_size", "a positive integer", value)
    return value


def _parse_inputs(where: str, prefix: str, value: Any) -> tuple[TensorSpec, ...]:
    if not isinstance(value, list):
        _fail(where, prefix + "inputs", "a list of tensor specs", value)
    return tuple(_parse_tensor(where, f"{prefix}inputs[{i}]", spec) for i, spec in enumerate(value))


def _parse_kwargs(where: str, prefix: str, value: Any) -> dict[str, TensorSpec]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        _fail(where, prefix + "kwargs", "a mapping of argument name to tensor spec", value)
    return {k: _parse_tensor(where, f"{prefix}kwargs.{k}", spec) for k, spec in value.items()}


def _parse_tensor(where: str, name: str, spec: Any) -> TensorSpec:
    if not isinstance(spec, dict):
        _fail(where, name, "a tensor spec such as {shape: [B, 3, 32, 32], dtype: float32}", spec)
    _check_fields(where, name + ".", spec, _TENSOR_FIELDS, required=("shape",))
    shape = spec["shape"]
    if not isinstance(shape, list) or not all(d == BATCH or _is_positive_int(d) for d in shape):
        _fail(where, name + ".shape", f"a list of positive integers and {BATCH!r}", shape)
    dtype = _DTYPES[_parse_choice(where, name + ".dtype", spec.get("dtype", "float32"), _DTYPES)]
    is_int = not dtype.is_floating_point and dtype != torch.bool
    if not is_int and ("low" in spec or "high" in spec):
        raise ScenarioError(f"{where}: field '{name}': 'low' and 'high' apply to integer dtypes only")
    if is_int and "fill" not in spec and "high" not in spec:
        raise ScenarioError(f"{where}: field '{name}': an integer tensor needs 'high' (exclusive) or 'fill'")
    low, high, fill = spec.get("low", 0), spec.get("high"), spec.get("fill")
    for key, value in (("low", low), ("high", high)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            _fail(where, f"{name}.{key}", "an integer", value)
    if high is not None and high <= low:
        _fail(where, f"{name}.high", f"greater than low ({low})", high)
    if fill is not None and not isinstance(fill, (int, float)):
        _fail(where, f"{name}.fill", "a number or boolean", fill)
    return TensorSpec(tuple(shape), dtype, low, high, fill)


def _parse_optimizer(where: str, value: Any) -> OptimizerSpec:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or "name" not in value:
        _fail(where, "optimizer", "a mapping with a 'name' (sgd, adam, adamw) and keyword arguments", value)
    name = _parse_choice(where, "optimizer.name", value["name"], _OPTIMIZERS)
    kwargs = {k: _as_number(v) for k, v in value.items() if k != "name"}
    valid = [p for p in inspect.signature(_OPTIMIZERS[name]).parameters if p != "params"]
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise ScenarioError(
            f"{where}: field 'optimizer': unknown argument {', '.join(map(repr, unknown))} of {name}; "
            f"valid: {', '.join(valid)}"
        )
    return OptimizerSpec(name, kwargs)


def _as_number(value: Any) -> Any:
    """YAML reads ``1e-3`` (no dot) as a string; turn numeric strings back into floats."""
    if isinstance(value, list):
        return [_as_number(v) for v in value]
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


def _parse_budget(where: str, value: Any) -> str | int | None:
    if value is None or _is_positive_int(value):
        return value
    if not isinstance(value, str) or not _BUDGET.match(value.strip()):
        _fail(where, "budget", "a share such as '60%', a size such as '12GiB', or bytes as an integer", value)
    return value.strip()


def _parse_sharding(where: str, value: Any) -> str | None:
    return None if value is None else _parse_choice(where, "sharding", value, SHARDINGS)


def _parse_world_size(where: str, value: Any) -> int:
    if not _is_positive_int(value):
        _fail(where, "world_size", "a positive integer (the number of data-parallel ranks)", value)
    return value


def _parse_gpus(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(g, str) and g for g in value):
        _fail(where, "gpus", "a list of GPU names", value)
    return tuple(value)
