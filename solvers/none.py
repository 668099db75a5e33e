"""Baseline: no checkpointing, no offloading.

    C = {}        FEASIBLE iff peak({}) = unplanned peak <= budget, else INFEASIBLE

Like every baseline it returns its plan (here the empty one) whatever the
status, so a user can see what it would do.
"""

from __future__ import annotations

import time

from planner.core.plan import Status
from solvers.base import Solution
from solvers.problem import Problem


def solve(problem: Problem, time_limit_s: float = 10.0) -> Solution:
    start = time.perf_counter()
    fits = problem.peak_bytes(()) <= problem.budget_bytes
    return Solution((), Status.FEASIBLE if fits else Status.INFEASIBLE, solve_s=time.perf_counter() - start)
