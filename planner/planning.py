"""From a profiled graph and a budget to a plan.

    plan = planner.plan(graph, "60%")                 # 60% of the unplanned peak
    plan = planner.plan(graph, "6GiB", solver="ilp")

The solver's choices are checked by the simulator, which gives the plan's
predicted peak and overhead.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from planner.costmodel import Roofline, roofline_for
from planner.graph import ProfiledGraph
from planner.report import format_bytes, parse_bytes
from planner.simulator import simulate
from solvers import auto_solver, build_problem, get_solver
from solvers.base import Status
from solvers.ilp import min_peak
from solvers.plan import Plan
from solvers.problem import Problem


class InfeasibleBudget(ValueError):
    """No plan fits the budget; `smallest_bytes` is the least budget that any plan fits."""

    def __init__(self, message: str, smallest_bytes: int) -> None:
        super().__init__(message)
        self.smallest_bytes = smallest_bytes

    def __reduce__(self):  # it travels between processes (one rank solves for all)
        return type(self), (str(self), self.smallest_bytes)


def parse_budget(budget: int | float | str, unplanned_peak_bytes: int) -> int:
    """Bytes from a size ("6GiB", "6000MB", 123456) or a share of the unplanned peak ("60%")."""
    if isinstance(budget, str) and budget.strip().endswith("%"):
        number = budget.strip()[:-1].strip()
        if not re.fullmatch(r"\d+(\.\d*)?|\.\d+", number) or float(number) <= 0:
            raise ValueError(f"budget {budget!r}: a percentage must be a positive number followed by %, like 60%")
        return int(unplanned_peak_bytes * float(number) / 100)
    if isinstance(budget, bool):
        raise ValueError(f"budget {budget!r} is not a size; give bytes, a size like 6GiB or a percentage like 60%")
    if isinstance(budget, (int, float)):
        if budget <= 0:
            raise ValueError(f"budget {budget!r} must be positive; give bytes, a size like 6GiB or a percentage")
        return int(budget)
    return parse_bytes(budget)


def plan(
    graph: ProfiledGraph,
    budget: int | float | str,
    solver: str = "auto",
    roofline: Roofline | None = None,
    time_limit_s: float = 10.0,
) -> Plan:
    """The least-overhead plan whose peak fits `budget`; raises InfeasibleBudget when none does."""
    roofline = roofline or roofline_for(graph)
    unplanned = simulate(graph, roofline=roofline).peak_bytes
    budget_bytes = parse_budget(budget, unplanned)
    problem = build_problem(graph, budget_bytes, roofline)
    name = auto_solver(problem) if solver == "auto" else solver
    solution = get_solver(name)(problem, time_limit_s)
    if solution.status is Status.INFEASIBLE:
        raise _infeasible(problem, name, time_limit_s)
    choices = tuple(problem.options[o].choice for o in solution.chosen)
    sim = simulate(graph, choices, roofline)
    assert sim.peak_bytes == problem.peak_bytes(solution.chosen), "the problem and the simulator disagree"
    return Plan(
        model=graph.model,
        fingerprint=graph.fingerprint,
        units=tuple(u.key for u in graph.units),
        choices=choices,
        budget_bytes=budget_bytes,
        solver=name,
        status=solution.status,
        gap=solution.gap,
        solve_s=solution.solve_s,
        predicted_peak_bytes=sim.peak_bytes,
        predicted_overhead_ms=sim.extra_ms,
        step_ms=graph.step_ms,
        unplanned_peak_bytes=unplanned,
    )


def _infeasible(problem: Problem, solver: str, time_limit_s: float) -> InfeasibleBudget:
    smallest, _ = min_peak(problem, time_limit_s)
    budget = format_bytes(problem.budget_bytes)
    if smallest > problem.budget_bytes:
        return InfeasibleBudget(
            f"no plan fits a budget of {budget}: the smallest peak any plan reaches is {format_bytes(smallest)} "
            f"(unplanned: {format_bytes(problem.unplanned_peak_bytes)}); give a budget of at least "
            f"{smallest} bytes ({format_bytes(smallest)})",
            smallest,
        )
    return InfeasibleBudget(
        f"solver '{solver}' found no plan under {budget}, though the ilp solver can reach {format_bytes(smallest)}; "
        "use --solver ilp",
        smallest,
    )


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write the plan file (YAML, or JSON by the suffix), whole or not at all."""
    from planner.export import write

    return write(plan.to_dict(), path)


def load_plan(path: str | Path) -> Plan:
    """Read a plan file back; a malformed file is a ValueError naming the field."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"plan file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path.name}: not a YAML or JSON file: {err}") from None
    return Plan.from_dict(data, source=path.name)


def auto(
    model,
    example_batch,
    budget: int | float | str,
    loss_fn=None,
    optimizer=None,
    *,
    solver: str = "auto",
    units=None,
    autocast_dtype=None,
):
    """Profile, plan and apply in one call; returns the handle (its `.plan` says what was chosen).

        handle = planner.auto(model, batch, "60%", loss_fn=loss_fn, optimizer=opt)
    """
    from planner.executor import apply
    from planner.profiler import profile

    graph = profile(model, example_batch, loss_fn, optimizer, units=units, autocast_dtype=autocast_dtype)
    return apply(model, plan(graph, budget, solver=solver))
