"""The GPU catalog: memory, throughput and host link of the GPUs a plan can be made for.

    catalog = load_catalog()                          # built-in (planner/gpus.yaml)
    catalog = load_catalog("my_gpus.yaml")            # plus a user's entries, replacing by name
    a100, h100 = find_gpus("a100-80gb,h100-80gb", catalog)
    roofline = a100.roofline("bfloat16")              # for `costmodel.retime` and `planning.plan`
    roofline = roofline_for(graph)                    # the rates of the device a graph was profiled on

The file format is described at the top of `planner/gpus.yaml`. Rates are FLOP/s and bytes/s,
sizes bytes; a size may also be written as text such as "80GiB".
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from planner.core.costmodel import MATH_EFFICIENCY, MEMORY_EFFICIENCY, REFERENCE, Roofline
from planner.core.graph import ProfiledGraph
from planner.core.sizes import parse_bytes

BUILTIN = Path(__file__).with_name("gpus.yaml")
_PRECISIONS = {  # dtype name -> the GPU field holding its matrix rate
    "float32": "fp32_flops_per_s",
    "bfloat16": "bf16_flops_per_s",
    "float16": "fp16_flops_per_s",
}


@dataclass(frozen=True)
class GPU:
    """One catalog entry: sizes in bytes, rates in FLOP/s and bytes/s (dense, datasheet peaks)."""

    name: str
    description: str
    memory_bytes: int
    usable_bytes: int  # what one training process can allocate
    fp32_flops_per_s: float
    tf32_flops_per_s: float
    fp16_flops_per_s: float
    bf16_flops_per_s: float
    memory_bytes_per_s: float
    host_link: str
    host_bytes_per_s: float  # sustained, one way
    source: str
    device_names: tuple[str, ...] = ()

    def flops_per_s(self, dtype: Any = None, tf32: bool = False) -> float:
        """The peak matrix rate for a step in `dtype` (None or float32: full precision).

        float32 uses the FP32 rate, or the TF32 rate with `tf32` (when the step allows TF32
        matrix products); bfloat16 and float16 (autocast) use the 16-bit tensor-core rates.
        """
        name = _dtype_name(dtype)
        if name == "float32" and tf32:
            return self.tf32_flops_per_s
        return getattr(self, _PRECISIONS[name])

    def roofline(self, dtype: Any = None, tf32: bool = False) -> Roofline:
        """Sustained rates for a step in `dtype`, with the catalog-wide efficiency factors
        (`costmodel.MATH_EFFICIENCY`, `costmodel.MEMORY_EFFICIENCY`)."""
        return Roofline(
            flops_per_s=self.flops_per_s(dtype, tf32),
            bytes_per_s=self.memory_bytes_per_s,
            host_bytes_per_s=self.host_bytes_per_s,
            efficiency=MATH_EFFICIENCY,
            memory_efficiency=MEMORY_EFFICIENCY,
            device_names=self.device_names,
        )


_SIZES = ("memory_bytes", "usable_bytes")
_RATES = (
    "fp32_flops_per_s", "tf32_flops_per_s", "fp16_flops_per_s", "bf16_flops_per_s",
    "memory_bytes_per_s", "host_bytes_per_s",
)  # fmt: skip
_TEXTS = ("description", "host_link", "source")
_OPTIONAL = ("device_names",)


def load_catalog(extra: str | Path | None = None) -> dict[str, GPU]:
    """The built-in GPUs, plus those of the YAML file `extra`, which replace built-ins of the same name.

    ValueError naming the file, the GPU and the field for a malformed entry.
    """
    catalog = _read(BUILTIN)
    if extra is not None:
        path = Path(extra)
        if not path.is_file():
            raise ValueError(f"GPU catalog {path} does not exist")
        catalog |= _read(path)
    return catalog


def find_gpus(names: str | list[str], catalog: dict[str, GPU]) -> list[GPU]:
    """The GPUs named (a list, or one comma-separated string), in that order.

    ValueError for an unknown name, with the close matches and the valid names.
    """
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names)]
    wanted = [n for n in wanted if n]
    if not wanted:
        raise ValueError(f"no GPU named; valid names: {', '.join(catalog)}")
    by_lower = {n.lower(): n for n in catalog}
    for name in wanted:
        if name.lower() not in by_lower:
            raise ValueError(f"unknown GPU {name!r}; {_suggest(name, list(catalog))}valid names: {', '.join(catalog)}")
    return [catalog[by_lower[n.lower()]] for n in wanted]


def _suggest(name: str, valid: list[str]) -> str:
    """'did you mean x or y? ' for the names starting with `name` and the closest others, or ''."""
    key = name.lower().replace(" ", "")
    close = [n for n in valid if n.lower().startswith(key)]
    close += [n for n in difflib.get_close_matches(key, valid, n=3, cutoff=0.5) if n not in close]
    return f"did you mean {' or '.join(close[:3])}? " if close else ""


def _dtype_name(dtype: Any) -> str:
    """'float32', 'bfloat16' or 'float16' from a torch dtype, its name, or None (float32)."""
    name = "float32" if dtype is None else str(dtype).removeprefix("torch.")
    if name not in _PRECISIONS:
        raise ValueError(f"no GPU rate for dtype {dtype!r}; valid: {', '.join(_PRECISIONS)}")
    return name


def _read(path: Path) -> dict[str, GPU]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path.name}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: a GPU catalog must map GPU names to their fields")
    return {str(name): _entry(path.name, str(name), entry) for name, entry in data.items()}


def _entry(where: str, name: str, entry: Any) -> GPU:
    """One validated GPU; `where` and `name` go into the messages."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: GPU {name!r} must be a mapping of fields, got {entry!r}")
    valid = [f.name for f in fields(GPU) if f.name != "name"]
    unknown = [k for k in entry if k not in valid]
    if unknown:
        raise ValueError(f"{where}: GPU {name!r}: unknown field {unknown[0]!r}; valid fields: {', '.join(valid)}")
    missing = [k for k in valid if k not in entry and k not in _OPTIONAL]
    if missing:
        raise ValueError(f"{where}: GPU {name!r}: missing field {missing[0]!r}")
    values: dict[str, Any] = {"name": name}
    for key in _SIZES:
        values[key] = _size(where, name, key, entry[key])
    for key in _RATES:
        values[key] = _rate(where, name, key, entry[key])
    for key in _TEXTS:
        if not isinstance(entry[key], str) or not entry[key].strip():
            raise ValueError(f"{where}: GPU {name!r}: field {key!r} must be non-empty text, got {entry[key]!r}")
        values[key] = " ".join(entry[key].split())
    names = entry.get("device_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}: GPU {name!r}: field 'device_names' must be a list of names, got {names!r}")
    values["device_names"] = tuple(names)
    if values["usable_bytes"] > values["memory_bytes"]:
        raise ValueError(f"{where}: GPU {name!r}: field 'usable_bytes' is larger than 'memory_bytes'")
    return GPU(**values)


def _size(where: str, name: str, key: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    try:
        return parse_bytes(value)
    except ValueError:
        raise ValueError(
            f"{where}: GPU {name!r}: field {key!r} must be a positive size in bytes or like '24GiB', got {value!r}"
        ) from None


def _rate(where: str, name: str, key: str, value: Any) -> float:
    """A positive number; YAML reads 1e12 (no dot, no exponent sign) as text, so text is parsed too."""
    try:
        rate = float(value) if not isinstance(value, bool) else -1.0
    except (TypeError, ValueError):
        rate = -1.0
    if not rate > 0 or rate == float("inf"):
        raise ValueError(f"{where}: GPU {name!r}: field {key!r} must be a positive number, got {value!r}")
    return rate


def roofline_for(graph: ProfiledGraph) -> Roofline:
    """The rates that cost plans for `graph` when none are given: REFERENCE for estimated times;
    for times measured on a device, that device's (a catalog GPU by its CUDA name; a CPU's measured
    copy rate, paid in full since its copies stop compute) with the fixed costs of recompute
    regions and offloaded calls that profiling measured there (`graph.calibration`). Those costs are
    the host's work: where a GPU runs behind the host, only the share of the step that the host is
    busy issuing work counts."""
    if not graph.measured_times:
        return REFERENCE
    calibration = graph.calibration
    rates = REFERENCE
    if calibration.host_bytes_per_s is not None:
        rates = replace(REFERENCE, host_bytes_per_s=calibration.host_bytes_per_s, copies_overlap=False)
    for gpu in load_catalog().values():
        if calibration.device_name in gpu.device_names:
            rates = gpu.roofline()
    if calibration.mechanism is None:
        return rates
    return replace(rates, mechanism=calibration.mechanism.scaled(calibration.host_busy))
