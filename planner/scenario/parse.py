"""Reading and checking scenario files: every mistake names the file, the field and what is expected.

The format is described in `planner.scenario`.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from torch import Tensor, nn

import scenarios
from planner.core.sizes import parse_budget
from planner.distributed.engines import SHARDINGS
from planner.scenario.build import (
    _LOSSES,
    _OPTIMIZERS,
    _PRECISIONS,
    BATCH,
    NEEDS_TARGET,
    OptimizerSpec,
    Scenario,
    ScenarioError,
    TensorSpec,
    Variant,
    transformers_model,
)
from scenarios.zoo import ZOO

_TOP_FIELDS = (
    "name", "model", "args", "config", "batch_size", "inputs", "kwargs", "target", "loss",
    "precision", "optimizer", "budget", "gpus", "world_size", "sharding", "full",
)  # fmt: skip
_VARIANT_FIELDS = ("args", "config", "batch_size", "inputs", "kwargs", "target")
TRANSFORMERS = "transformers:"  # model: transformers:LlamaForCausalLM, built from `config`
_TENSOR_FIELDS = ("shape", "dtype", "low", "high", "fill")
_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}  # fmt: skip


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
    _check_fields(where, "", data, _TOP_FIELDS, required=("model",))
    model = data["model"]
    if not isinstance(model, str) or not model:
        _fail(where, "model", "a zoo name, 'transformers:ModelClass' or 'package.module:factory'", model)
    factory = _resolve_factory(where, model)
    data = _with_config(where, path, "", data, model)
    if "inputs" not in data and "kwargs" not in data:
        raise ScenarioError(f"{where}: give the model's inputs: field 'inputs' (positional) or 'kwargs' (keyword)")
    small = _parse_variant(where, "", data, factory, base=None)
    full = None
    if "full" in data:
        if not isinstance(data["full"], dict):
            _fail(where, "full", "a mapping of overrides", data["full"])
        _check_fields(where, "full.", data["full"], _VARIANT_FIELDS)
        full = _parse_variant(where, "full.", _with_config(where, path, "full.", data["full"], model), factory, base=small)
    loss = data.get("loss", "cross_entropy" if "target" in data else "output")
    loss_fn = _resolve_loss(where, loss)
    if loss in NEEDS_TARGET and any(v.target is None for v in (small, full) if v is not None):
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
    if model.startswith(TRANSFORMERS):
        return transformers_model(_transformers_class(where, model[len(TRANSFORMERS) :]).__name__)
    if ":" in model:
        return _import_attribute(where, "model", model)
    if model not in ZOO:
        raise ScenarioError(
            f"{where}: field 'model': unknown zoo model {model!r}; valid names: {', '.join(sorted(ZOO))}, "
            "'transformers:ModelClass' or 'package.module:factory'"
        )
    return ZOO[model]


def _transformers_class(where: str, name: str) -> type:
    try:
        import transformers
    except ImportError:
        raise ScenarioError(f"{where}: field 'model': {TRANSFORMERS}{name} needs the transformers package: pip install transformers") from None
    cls = getattr(transformers, name, None) if name else None
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise ScenarioError(f"{where}: field 'model': transformers has no model class {name!r} (such as LlamaForCausalLM)")
    return cls


def _with_config(where: str, path: Path, prefix: str, data: dict, model: str) -> dict:
    """`data` with a transformers model's `config` as the factory's `args`: a mapping of config fields,
    a path to a config.json (from the scenario's folder) or a Hub id (online only). A training step
    keeps no key/value cache: `use_cache` is False unless the config says otherwise."""
    if "config" not in data:
        return data
    if not model.startswith(TRANSFORMERS):
        raise ScenarioError(f"{where}: field '{prefix}config' is for {TRANSFORMERS}ModelClass models; use 'args'")
    if "args" in data:
        raise ScenarioError(f"{where}: give either '{prefix}config' or '{prefix}args', not both")
    cls = _transformers_class(where, model[len(TRANSFORMERS) :])
    config = data["config"]
    if isinstance(config, str):
        config = _config_file(where, prefix, path.parent / config if (path.parent / config).is_file() else config, cls)
    elif isinstance(config, dict):
        default = cls.config_class()
        # a field the config has, or one it takes in (rope_theta goes into rope_parameters); a typo is kept as is
        unknown = sorted(k for k in config if not hasattr(default, k) and hasattr(cls.config_class(**{k: config[k]}), k))
        if unknown:
            raise ScenarioError(f"{where}: field '{prefix}config': {cls.config_class.__name__} has no field {', '.join(map(repr, unknown))}")
    else:
        _fail(where, prefix + "config", "a mapping of config fields, a path to a config.json or a Hub id", config)
    args = ({"use_cache": False} if not prefix else {}) | config
    return {k: v for k, v in data.items() if k != "config"} | {"args": args}


def _config_file(where: str, prefix: str, source: Path | str, cls: type) -> dict:
    if isinstance(source, Path):
        try:
            return dict(yaml.safe_load(source.read_text()))  # JSON is YAML
        except (yaml.YAMLError, TypeError, ValueError) as error:
            raise ScenarioError(f"{where}: field '{prefix}config': {source} is not a config file: {error}") from None
    try:
        return cls.config_class.from_pretrained(source).to_diff_dict()
    except (OSError, ValueError) as error:
        raise ScenarioError(
            f"{where}: field '{prefix}config': no file {source!r} next to the scenario, and no Hub config by that "
            f"id here ({type(error).__name__}); give a path to a config.json"
        ) from None


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
            inputs=_parse_inputs(where, prefix, data.get("inputs", [])),
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


def _parse_kwargs(where: str, prefix: str, value: Any) -> dict[str, TensorSpec | str]:
    """Keyword inputs: a tensor spec each, or the name of another keyword input (the same tensor)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        _fail(where, prefix + "kwargs", "a mapping of argument name to tensor spec", value)
    specs = {k: _parse_tensor(where, f"{prefix}kwargs.{k}", spec) for k, spec in value.items() if not isinstance(spec, str)}
    for k, other in value.items():
        if isinstance(other, str) and other not in specs:
            _fail(where, f"{prefix}kwargs.{k}", f"a tensor spec or the name of another keyword input ({', '.join(specs)})", other)
    return {k: specs.get(k, spec) for k, spec in value.items()}


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
    try:
        parse_budget(value, 100)  # only to check it: a share needs the unplanned peak
    except (ValueError, TypeError):
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
