"""A plan: what to do with each unit, what the solver claims for it, and its status.

Plain data, no torch. `to_dict` / `from_dict` give the plan file's content:

    model: GPT
    fingerprint: 3f2a9c0d1e4b5a6f
    budget_bytes: 12582912
    solver: ilp
    status: optimal
    gap: 0.0
    solve_s: 0.04
    predicted: {peak_bytes: 12001234, overhead_ms: 3.1, step_ms: 40.2, host_bytes: 1048576}
    unplanned: {peak_bytes: 25499400}
    units:
      - {unit: "wte#0", action: keep}
      - {unit: "blocks.0#0", action: recompute, region: 0}
      - {unit: "blocks.1#0", action: recompute, region: 0}
      - {unit: "blocks.2#0", action: recompute, region: 1, save_ops: ["aten.mm#0", "aten.addmm#2"]}
      - {unit: "blocks.3#0", action: recompute, region: 2, save_ops: [aten.mm]}
      - {unit: "blocks.4#0", action: offload}

Consecutive units with the same `region` are recomputed together. `save_ops` are the operator calls
in the unit's forward whose outputs the region keeps saved: `aten.mm#2` is its third call of
`aten.mm`, and an operator without a call number means every call of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from planner.core.actions import Action, Choice, Kept


class Status(str, Enum):
    """What a solver says of its plan."""

    OPTIMAL = "optimal"
    FEASIBLE = "feasible"  # under budget, optimality not proven
    INFEASIBLE = "infeasible"  # no plan of this solver's kind fits the budget
    TIME_LIMIT = "time limit"  # stopped by the time limit with a plan under budget


@dataclass(frozen=True)
class Plan:
    """Choices for a profiled model, with the predicted peak (bytes) and overhead (ms) of the step."""

    model: str
    fingerprint: str
    units: tuple[str, ...]  # unit keys in forward order
    choices: tuple[Choice, ...]
    budget_bytes: int
    solver: str
    status: Status
    gap: float
    solve_s: float
    predicted_peak_bytes: int
    predicted_overhead_ms: float
    step_ms: float  # the unplanned step
    unplanned_peak_bytes: int
    forwards: int = 1  # forwards of the model in one training step: unit calls are counted over them
    margin_bytes: int = 0  # kept free under the budget for what a measured step showed beyond the prediction
    predicted_host_bytes: int = 0  # host memory the offloads hold at once
    compiled: bool = False  # made for the step under torch.compile (regions of one unit, no offload)

    @property
    def overhead_pct(self) -> float:
        return 100.0 * self.predicted_overhead_ms / self.step_ms if self.step_ms else 0.0

    def decisions(self) -> list[tuple[str, Action, int | None, frozenset[Kept]]]:
        """Per unit: key, action, region number (recompute only) and its operator calls kept saved."""
        by_unit: dict[int, tuple[Action, int | None, frozenset[Kept]]] = {}
        region = 0
        for choice in self.choices:
            for u in choice.units:
                number = region if choice.action is Action.RECOMPUTE else None
                by_unit[u] = (choice.action, number, frozenset(k for k in choice.save_ops if k.unit == u))
            region += choice.action is Action.RECOMPUTE
        keep = (Action.KEEP, None, frozenset())
        return [(key, *by_unit.get(i, keep)) for i, key in enumerate(self.units)]

    def to_dict(self) -> dict[str, Any]:
        units = []
        for key, action, region, save_ops in self.decisions():
            entry: dict[str, Any] = {"unit": key, "action": action.value}
            if region is not None:
                entry["region"] = region
            if save_ops:
                entry["save_ops"] = sorted(str(k) for k in save_ops)
            units.append(entry)
        return {
            "model": self.model,
            "fingerprint": self.fingerprint,
            "budget_bytes": self.budget_bytes,
            "solver": self.solver,
            "status": self.status.value,
            "gap": self.gap,
            "solve_s": self.solve_s,
            "predicted": {
                "peak_bytes": self.predicted_peak_bytes,
                "overhead_ms": self.predicted_overhead_ms,
                "step_ms": self.step_ms,
                "host_bytes": self.predicted_host_bytes,
            },
            "unplanned": {"peak_bytes": self.unplanned_peak_bytes},
            "forwards": self.forwards,
            "margin_bytes": self.margin_bytes,
            "compiled": self.compiled,
            "units": units,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> Plan:
        """Read a plan back; a missing or malformed field is a ValueError that names it."""
        fields = _Fields(data, source)
        predicted = _Fields(fields.get("predicted", dict), f"{source}: predicted")
        unplanned = _Fields(fields.get("unplanned", dict), f"{source}: unplanned")
        entries = fields.get("units", list)
        keys, choices = _read_units(entries, source)
        return cls(
            model=fields.get("model", str),
            fingerprint=fields.get("fingerprint", str),
            units=keys,
            choices=choices,
            budget_bytes=fields.get("budget_bytes", int),
            solver=fields.get("solver", str),
            status=_enum(Status, fields.get("status", str), f"{source}: field 'status'"),
            gap=float(fields.get("gap", (int, float))),
            solve_s=float(fields.get("solve_s", (int, float))),
            predicted_peak_bytes=predicted.get("peak_bytes", int),
            predicted_overhead_ms=float(predicted.get("overhead_ms", (int, float))),
            step_ms=float(predicted.get("step_ms", (int, float))),
            unplanned_peak_bytes=unplanned.get("peak_bytes", int),
            forwards=fields.get("forwards", int) if "forwards" in fields.data else 1,
            margin_bytes=fields.get("margin_bytes", int) if "margin_bytes" in fields.data else 0,
            predicted_host_bytes=predicted.get("host_bytes", int) if "host_bytes" in predicted.data else 0,
            compiled=fields.get("compiled", bool) if "compiled" in fields.data else False,
        )


class _Fields:
    def __init__(self, data: Any, source: str) -> None:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping, got {type(data).__name__}")
        self.data, self.source = data, source

    def get(self, name: str, kind):
        if name not in self.data:
            raise ValueError(f"{self.source}: missing field '{name}'")
        value = self.data[name]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise ValueError(f"{self.source}: field '{name}' must be {expected}, got {value!r}")
        return value


def _enum(enum, value: str, where: str):
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"{where} must be one of {', '.join(e.value for e in enum)}, got {value!r}") from None


def _read_units(entries: list, source: str) -> tuple[tuple[str, ...], tuple[Choice, ...]]:
    keys: list[str] = []
    choices: list[Choice] = []
    region_of_last: int | None = None
    for i, raw in enumerate(entries):
        entry = _Fields(raw, f"{source}: units[{i}]")
        keys.append(entry.get("unit", str))
        action = _enum(Action, entry.get("action", str), f"{source}: units[{i}].action")
        save_ops = _save_ops(entry, i) if "save_ops" in entry.data else frozenset()
        if action is Action.OFFLOAD:
            choices.append(Choice(action, (i,)))
        if action is Action.RECOMPUTE:
            region = entry.get("region", int)
            if region == region_of_last:
                choices[-1] = Choice(action, (*choices[-1].units, i), choices[-1].save_ops | save_ops)
            else:
                choices.append(Choice(action, (i,), save_ops))
            region_of_last = region
        else:
            region_of_last = None
    return tuple(keys), tuple(choices)


def _save_ops(entry: _Fields, unit: int) -> frozenset[Kept]:
    names = entry.get("save_ops", list)
    try:
        return frozenset(Kept.parse(unit, name) for name in names)
    except ValueError as err:
        raise ValueError(f"{entry.source}: field 'save_ops': {err}") from None
