"""Solvers: pure optimisation over a `Problem`, one per module, one signature, one registry.

    from solvers import build_problem, get_solver, auto_solver
    problem = build_problem(graph, budget_bytes)
    solution = get_solver(auto_solver(problem))(problem, 10.0)
    problem.peak_bytes(solution.chosen) <= problem.budget_bytes   # whenever solution.status fits

Exact: "ilp" (CP-SAT, any graph), "dp" (chains). Heuristic: "greedy".
Baselines a user would otherwise pick: "none", "all" (checkpoint every unit),
"sqrt" (sqrt(n) segments); they return their plan even when it does not fit.
"""

from __future__ import annotations

import importlib

from planner.core.plan import Status
from solvers.base import Solution, Solver
from solvers.problem import Problem, build_problem

SOLVERS: dict[str, str] = {  # name -> the module whose `solve` it is, imported when first asked for
    "ilp": "solvers.ilp",
    "dp": "solvers.dp",
    "greedy": "solvers.greedy",
    "none": "solvers.none",
    "all": "solvers.all",
    "sqrt": "solvers.sqrt",
}

DP_MIN_UNITS = 60  # longer chains go to the dynamic programme, shorter ones to the ILP


def get_solver(name: str) -> Solver:
    """The solver registered as `name`; a ValueError listing the valid names otherwise."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of: {', '.join(SOLVERS)}")
    return importlib.import_module(SOLVERS[name]).solve


def auto_solver(problem: Problem) -> str:
    """The exact solver that fits the graph: "dp" for chains longer than DP_MIN_UNITS units (unless host
    memory bounds their offloads), else "ilp"."""
    return "dp" if problem.chain and problem.n_units > DP_MIN_UNITS and not problem.host_bound else "ilp"


__all__ = ["SOLVERS", "Problem", "Solution", "Solver", "Status", "auto_solver", "build_problem", "get_solver"]
