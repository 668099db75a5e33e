"""Baseline: sqrt(n) segments (Chen et al. 2016, as torch.utils.checkpoint.checkpoint_sequential).

    m = round(sqrt(n)) segments of L = ceil(n / m) consecutive units; every segment but the last is
    recomputed as one region, in full (no operator outputs kept saved).

Where a segment's option does not exist (a link inside it is not a segment
link, or it is longer than the longest region offered), the segment is
covered from its first unit by the longest recompute options available,
one after the other; a unit with none is kept. FEASIBLE if the plan's peak
fits the budget, else INFEASIBLE; like every baseline it returns its plan
whatever the status, so a user can see what it would do.
"""

from __future__ import annotations

import math
import time

from planner.core.actions import Action
from solvers import arrays
from planner.core.plan import Status
from solvers.base import Solution
from solvers.problem import Problem


def solve(problem: Problem, time_limit_s: float = 10.0) -> Solution:
    start = time.perf_counter()
    n = problem.n_units
    segments = max(1, round(math.sqrt(n)))
    length = math.ceil(n / segments) if n else 0
    longest = _full_recomputes(problem)
    chosen = []
    for first in range(0, length * (segments - 1), length):
        u, end = first, min(first + length, n) - 1
        while u <= end:
            fitting = [(last, o) for last, o in longest.get(u, []) if last <= end]
            if fitting:
                last, o = max(fitting)
                chosen.append(o)
                u = last + 1
            else:
                u += 1
    plan = tuple(sorted(chosen))
    fits = arrays.peak_bytes(arrays.of(problem), plan) <= problem.budget_bytes
    return Solution(plan, Status.FEASIBLE if fits else Status.INFEASIBLE, solve_s=time.perf_counter() - start)


def _full_recomputes(problem: Problem) -> dict[int, list[tuple[int, int]]]:
    """Per first unit: (last unit, option) of the options recomputing consecutive units in full."""
    out: dict[int, list[tuple[int, int]]] = {}
    for o, option in enumerate(problem.options):
        c = option.choice
        units = sorted(c.units)
        if c.action is Action.RECOMPUTE and not c.save_ops and units == list(range(units[0], units[-1] + 1)):
            out.setdefault(units[0], []).append((units[-1], o))
    return out
