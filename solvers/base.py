"""What every solver returns, and the signature they share.

    solve(problem: Problem, time_limit_s: float) -> Solution

A solver chooses a set of compatible options (indices into
`problem.options`) whose peak is at most `problem.budget_bytes` at the least
`problem.overhead_ms`. It never mutates the problem.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from planner.core.plan import Status
from solvers.problem import Problem


@dataclass(frozen=True)
class Solution:
    chosen: tuple[int, ...]
    status: Status
    gap: float = 0.0  # relative gap between the plan's overhead and the best bound; 0 when optimal
    solve_s: float = 0.0


Solver = Callable[[Problem, float], Solution]
