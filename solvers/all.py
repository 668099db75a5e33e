"""Baseline: checkpoint every unit on its own (torch.utils.checkpoint around each block).

    C = { o : o recomputes one unit, in full (no operator outputs kept saved) }

Units with no such option (they free nothing when recomputed) are kept.
FEASIBLE if peak(C) <= budget, else INFEASIBLE; like every baseline it
returns its plan whatever the status, so a user can see what it would do.
"""

from __future__ import annotations

import time

from planner.core.actions import Action
from solvers import arrays
from planner.core.plan import Status
from solvers.base import Solution
from solvers.problem import Problem


def solve(problem: Problem, time_limit_s: float = 10.0) -> Solution:
    start = time.perf_counter()
    chosen: dict[int, int] = {}
    for o, option in enumerate(problem.options):
        c = option.choice
        if c.action is Action.RECOMPUTE and len(c.units) == 1 and not c.save_ops:
            chosen.setdefault(c.units[0], o)
    plan = tuple(sorted(chosen.values()))
    fits = arrays.peak_bytes(arrays.of(problem), plan) <= problem.budget_bytes
    return Solution(plan, Status.FEASIBLE if fits else Status.INFEASIBLE, solve_s=time.perf_counter() - start)
