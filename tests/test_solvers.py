"""Every solver against the problem's own peak, and the exact ones against brute force.

Run: ``python -m pytest tests/test_solvers.py -q``
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.core.actions import Action
from solvers import SOLVERS, Problem, Status, arrays, auto_solver, get_solver, ilp
from brute import MAX_PLANS, brute_force, brute_min_peak, plans
from solvers.synthetic import training_step

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
    scrambled: bool = False
    aligned: bool = True
    budget: str = "drawn"  # "drawn", "unplanned" (the step fits as it is) or "below" (no plan fits)

    def problem(self) -> Problem:
        p = small_problem(self.n_units, skips=not self.chain, seed=self.seed, scrambled=self.scrambled, aligned=self.aligned)
        if self.budget == "unplanned":
            return p.with_budget(p.unplanned_peak_bytes)
        if self.budget == "below":
            return p.with_budget(brute_min_peak(p) - 1)
        return p


def _rows_peak(problem: Problem, chosen: tuple[int, ...]) -> int:
    return max(r.peak_bytes - problem.freed_at(chosen, r.first, r.last) for r in problem.rows)


def _replay_binds(problem: Problem) -> bool:
    fit = [c for c in plans(problem) if _rows_peak(problem, c) <= problem.budget_bytes]
    return bool(fit) and problem.peak_bytes(min(fit, key=problem.overhead_ms)) > problem.budget_bytes


CASES = [
    Case("chain", 1, 8, chain=True),
    Case("chain-long", 7, 10, chain=True),
    Case("chain-fits-as-is", 2, 6, chain=True, budget="unplanned"),
    Case("chain-below-any-plan", 3, 6, chain=True, budget="below"),
    Case("chain-replay-binds", 11, 6, chain=True, scrambled=True),  # see test_replay_cases_bind
    Case("chain-scrambled", 4, 7, chain=True, scrambled=True),
    Case("chain-rows-uncut", 5, 7, chain=True, aligned=False),
    Case("dag", 6, 8, chain=False),
    Case("dag-replay-binds", 1, 7, chain=False, scrambled=True),
    Case("dag-scrambled", 8, 7, chain=False, scrambled=True, aligned=False),
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


def small_problem(n_units: int, **shape) -> Problem:
    """A synthetic problem small enough for the brute force (regions of up to 3 units unless told)."""
    return training_step(n_units, max_plans=MAX_PLANS, **{"max_segment_units": 3} | shape)


def test_replay_cases_bind() -> None:
    """In the cases so named, the cheapest plan by the rows alone peaks in a replay, over the budget."""
    cases = [c for c in CASES if "replay" in c.name]
    assert cases and all(_replay_binds(c.problem()) for c in cases)
    assert all(c.problem().chain is c.chain for c in CASES)


@st.composite
def problems(draw, chain: bool | None = None) -> Problem:
    return small_problem(
        draw(st.integers(2, 10)),
        skips=not draw(st.booleans()) if chain is None else not chain,
        seed=draw(st.integers(0, 2**32 - 1)),
        budget_share=draw(st.floats(-0.1, 1.0)),
        scrambled=draw(st.booleans()),
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


@st.composite
def host_bound_problems(draw) -> Problem:
    """A problem whose offloads hold host memory, with room in it for some of them only."""
    problem = draw(problems())
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    options = tuple(
        replace(o, host_bytes=rng.randint(1, 1000) if o.choice.action is Action.OFFLOAD else 0) for o in problem.options
    )
    total = sum(o.host_bytes for o in options)
    return replace(problem, options=options, host_budget_bytes=rng.randint(0, total) if total else 0)


@settings(max_examples=60, deadline=None)
@given(host_bound_problems())
def test_host_memory_bounds_what_plans_offload(problem: Problem) -> None:
    solution, best = ilp.solve(problem), brute_force(problem)
    if best is None:
        assert solution.status is Status.INFEASIBLE
    else:
        assert problem.overhead_ms(solution.chosen) == pytest.approx(best[0], abs=TOLERANCE_MS)
    peak, chosen = ilp.min_peak(problem)
    assert peak == brute_min_peak(problem) and problem.host_bytes(chosen) <= problem.host_budget_bytes
    for name in ("auto", "greedy"):
        chosen = run(auto_solver(problem) if name == "auto" else name, problem)
        if chosen is not None and chosen.status is not Status.INFEASIBLE:
            assert problem.host_bytes(chosen.chosen) <= problem.host_budget_bytes


def test_greedy_stays_within_the_host_memory_on_large_steps() -> None:
    """Greedy adds several options a round on large graphs; together they must fit the host memory too."""
    problem = training_step(400, skips=False, budget_share=0.0)
    offloads = sum(o.host_bytes for o in problem.options)
    bound = replace(problem, host_budget_bytes=offloads // 20)
    chosen = get_solver("greedy")(bound, 10.0).chosen
    assert chosen and bound.host_bytes(chosen) <= bound.host_budget_bytes


def test_unknown_solver_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="ilp, dp, greedy, none, all, sqrt"):
        get_solver("rotor")


def test_auto_solver_picks_dp_for_long_chains_only() -> None:
    chain = small_problem(4, skips=False)
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
