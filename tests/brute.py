"""A brute force to check solvers against, on small synthetic problems (`solvers.synthetic`).

    problem = training_step(6, skips=False, seed=0, max_plans=MAX_PLANS)
    best = brute_force(problem)      # (overhead_ms, chosen) or None when no plan fits
"""

from __future__ import annotations

from solvers.problem import Problem

MAX_PLANS = 1500  # small problems keep at most this many plans, so that each can be tried


def plans(problem: Problem) -> list[tuple[int, ...]]:
    """Every set of compatible options (any unit sets)."""
    out: list[tuple[int, ...]] = []

    def extend(start: int, chosen: tuple[int, ...], used: frozenset[int]) -> None:
        out.append(chosen)
        for o in range(start, len(problem.options)):
            units = frozenset(problem.options[o].units)
            if not units & used:
                extend(o + 1, (*chosen, o), used | units)

    extend(0, (), frozenset())
    return out


def brute_force(problem: Problem) -> tuple[float, tuple[int, ...]] | None:
    """The least overhead of a plan within budget (and host budget), and one such plan; None when no plan fits."""
    for chosen in sorted(_within_host(problem), key=problem.overhead_ms):
        if problem.peak_bytes(chosen) <= problem.budget_bytes:
            return problem.overhead_ms(chosen), chosen
    return None


def brute_min_peak(problem: Problem) -> int:
    return min(problem.peak_bytes(chosen) for chosen in _within_host(problem))


def _within_host(problem: Problem) -> list[tuple[int, ...]]:
    bound = problem.host_budget_bytes
    return [chosen for chosen in plans(problem) if bound is None or problem.host_bytes(chosen) <= bound]

