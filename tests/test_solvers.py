"""Every solver against the problem's own peak, and the exact ones against brute force.

Run: ``python -m pytest tests/test_solvers.py -q``
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from solvers import SOLVERS, Problem, Status, arrays, auto_solver, get_solver, ilp
from synthetic import brute_force, brute_min_peak, plans, random_problem

FITS = (Status.OPTIMAL, Status.FEASIBLE, Status.TIME_LIMIT)
EXACT = ("ilp", "dp")
BASELINES = ("none", "all", "sqrt")
TOLERANCE_MS = 1e-5  # the ILP rounds costs to whole nanoseconds


@dataclass(frozen=True)
class Case:
    name: str
    seed: int
    n_units: int
    chain: bool
    structured: bool = True
    aligned: bool = True
    budget: str = "drawn"  # "drawn", "unplanned" (the step fits as it is) or "below" (no plan fits)

    def problem(self) -> Problem:
        rng = random.Random(self.seed)
        p = random_problem(rng, self.n_units, chain=self.chain, structured=self.structured, aligned=self.aligned)
        if self.budget == "unplanned":
            return p.with_budget(p.unplanned_peak_bytes)
        if self.budget == "below":
            return p.with_budget(brute_min_peak(p) - 1)
        return p


CASES = [
    Case("chain", 1, 8, chain=True),
    Case("chain-long", 7, 10, chain=True),
    Case("chain-fits-as-is", 2, 6, chain=True, budget="unplanned"),
    Case("chain-below-any-plan", 3, 6, chain=True, budget="below"),
    Case("chain-replay-binds", 39, 6, chain=True),  # the cheapest plan by rows alone peaks in a replay
    Case("chain-unstructured", 4, 7, chain=True, structured=False),
    Case("chain-rows-uncut", 5, 7, chain=True, aligned=False),
    Case("dag", 6, 8, chain=False),
    Case("dag-replay-binds", 1, 6, chain=False),
    Case("dag-unstructured", 8, 7, chain=False, structured=False, aligned=False),
    Case("single-unit", 9, 1, chain=True),
]


def check(problem: Problem, name: str, status: Status, chosen: tuple[int, ...]) -> None:
    """The contract every solver keeps."""
    assert problem.compatible(chosen)
    if status in FITS:
        assert problem.peak_bytes(chosen) <= problem.budget_bytes, name
    if status is Status.INFEASIBLE and name not in BASELINES:
        assert chosen == ()


def run(name: str, problem: Problem):
    if name == "dp" and not problem.chain:
        with pytest.raises(ValueError, match="ilp"):
            get_solver(name)(problem, 10.0)
        return None
    return get_solver(name)(problem, 10.0)


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_case_table(case: Case, name: str) -> None:
    problem = case.problem()
    solution = run(name, problem)
    if solution is None:
        return
    check(problem, name, solution.status, solution.chosen)
    best = brute_force(problem)
    if name in EXACT:
        if best is None:
            assert solution.status is Status.INFEASIBLE
        else:
            assert solution.status is Status.OPTIMAL
            assert problem.overhead_ms(solution.chosen) == pytest.approx(best[0], abs=TOLERANCE_MS)
    if name == "none":
        fits = problem.peak_bytes(()) <= problem.budget_bytes
        assert solution.chosen == () and solution.status is (Status.FEASIBLE if fits else Status.INFEASIBLE)
    if best is None and solution.status in FITS:
        pytest.fail(f"{name} claims a plan where none fits")


@st.composite
def problems(draw, chain: bool | None = None) -> Problem:
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    return random_problem(
        rng,
        draw(st.integers(2, 10)),
        chain=draw(st.booleans()) if chain is None else chain,
        structured=draw(st.booleans()),
        aligned=draw(st.booleans()),
        max_segment_units=draw(st.integers(1, 4)),
    )


@settings(max_examples=60, deadline=None)
@given(problems())
def test_ilp_matches_brute_force(problem: Problem) -> None:
    solution = ilp.solve(problem)
    best = brute_force(problem)
    if best is None:
        assert solution.status is Status.INFEASIBLE and solution.chosen == ()
    else:
        assert solution.status is Status.OPTIMAL
        assert problem.overhead_ms(solution.chosen) == pytest.approx(best[0], abs=TOLERANCE_MS)


@settings(max_examples=80, deadline=None)
@given(problems(chain=True))
def test_dp_matches_ilp_on_chains(problem: Problem) -> None:
    exact, mine = ilp.solve(problem), get_solver("dp")(problem, 10.0)
    assert mine.status is exact.status
    if exact.status is Status.OPTIMAL:
        assert problem.overhead_ms(mine.chosen) == pytest.approx(problem.overhead_ms(exact.chosen), abs=TOLERANCE_MS)


@settings(max_examples=25, deadline=None)
@given(problems(), st.sampled_from(sorted(SOLVERS)))
def test_every_plan_claimed_to_fit_fits(problem: Problem, name: str) -> None:
    solution = run(name, problem)
    if solution is not None:
        check(problem, name, solution.status, solution.chosen)


@settings(max_examples=40, deadline=None)
@given(problems())
def test_min_peak_matches_brute_force(problem: Problem) -> None:
    peak, chosen = ilp.min_peak(problem)
    assert problem.compatible(chosen) and problem.peak_bytes(chosen) == peak
    assert peak == brute_min_peak(problem)


@settings(max_examples=30, deadline=None)
@given(problems())
def test_vectorised_peak_matches_the_problem(problem: Problem) -> None:
    arr = arrays.of(problem)
    for chosen in plans(problem)[:50]:
        assert arrays.peak_bytes(arr, chosen) == problem.peak_bytes(chosen)


def test_unknown_solver_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="ilp, dp, greedy, none, all, sqrt"):
        get_solver("rotor")


def test_auto_solver_picks_dp_for_long_chains_only() -> None:
    chain = random_problem(random.Random(0), 4, chain=True)
    long_chain = Problem(61, chain.options, chain.rows, chain.budget_bytes, chain.unplanned_peak_bytes, 1.0, True)
    dag = Problem(61, chain.options, chain.rows, chain.budget_bytes, chain.unplanned_peak_bytes, 1.0, False)
    assert (auto_solver(chain), auto_solver(long_chain), auto_solver(dag)) == ("ilp", "dp", "ilp")


@pytest.mark.parametrize("seed", range(5))
def test_large_pareto_fronts_are_the_same_with_the_band_filter(seed: int) -> None:
    """dp drops states beaten from a higher band of S before sorting large fronts; the front is the same."""
    import numpy as np

    from solvers.dp import _pareto

    rng = np.random.default_rng(seed)
    n = 20_000
    cost = np.round(rng.random(n) * 50, 1)  # rounded: many ties in cost
    s = (cost * 1e6 + rng.integers(0, 5_000_000, n)).astype(np.int64)
    filtered = _pareto(cost, s)
    plain = _pareto(cost, s, bands=n)  # never filters: a plain sort
    assert len(plain) > 10
    assert filtered.tolist() == plain.tolist()
