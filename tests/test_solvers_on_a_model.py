"""Every solver on a profiled model: the simulator, the referee, agrees with each plan's predicted peak.

Run: ``python -m pytest tests/test_solvers_on_a_model.py -q``
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import planner
from planner.core.simulator import simulate
from planner.planning import InfeasibleBudget
from planner.scenario import list_scenarios, load_scenario
from solvers import SOLVERS, Status, build_problem, get_solver, ilp
from tests.plans import assert_problem_agrees

FITS = (Status.OPTIMAL, Status.FEASIBLE, Status.TIME_LIMIT)


@pytest.fixture(scope="module")
def mlp():
    """An 8-block Linear + GELU MLP profiled for one SGD step, and its problem at 60% of the unplanned peak."""
    torch.manual_seed(0)
    layers = [m for _ in range(8) for m in (nn.Linear(64, 64), nn.GELU())]
    model = nn.Sequential(*layers, nn.Linear(64, 10))
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))  # [B, D], [B]: activations outweigh the weights
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    graph = planner.profile(model, x, loss_fn=lambda out: F.cross_entropy(out, y), optimizer=optimizer)
    unplanned = simulate(graph).peak_bytes
    return graph, build_problem(graph, int(0.6 * unplanned))


@pytest.fixture(scope="module")
def solutions(mlp):
    _, problem = mlp
    return {name: get_solver(name)(problem, 10.0) for name in SOLVERS}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_referee_agrees_with_the_plan(mlp, solutions, name: str) -> None:
    graph, problem = mlp
    chosen = solutions[name].chosen
    assert problem.compatible(chosen)
    assert_problem_agrees(graph, problem, chosen)
    if solutions[name].status in FITS:
        assert problem.peak_bytes(chosen) <= problem.budget_bytes


def test_exact_solvers_agree_and_beat_the_baselines(mlp, solutions) -> None:
    _, problem = mlp
    assert problem.chain
    best = solutions["ilp"]
    assert best.status is Status.OPTIMAL and solutions["dp"].status is Status.OPTIMAL
    assert problem.overhead_ms(solutions["dp"].chosen) == pytest.approx(problem.overhead_ms(best.chosen), abs=1e-5)
    for name in ("all", "sqrt", "greedy"):
        if solutions[name].status in FITS:
            assert problem.overhead_ms(best.chosen) <= problem.overhead_ms(solutions[name].chosen) + 1e-5


def test_min_peak_is_below_every_plan(mlp, solutions) -> None:
    _, problem = mlp
    peak, chosen = ilp.min_peak(problem)
    assert peak == problem.peak_bytes(chosen) <= min(problem.peak_bytes(s.chosen) for s in solutions.values())
    assert ilp.solve(problem.with_budget(peak)).status is Status.OPTIMAL
    assert ilp.solve(problem.with_budget(peak - 1)).status is Status.INFEASIBLE


@pytest.mark.parametrize("name", [n for n in list_scenarios() if n != "gpt7b" and not load_scenario(n).model.startswith("transformers:")])
def test_plans_at_half_the_peak_beat_checkpointing_every_unit_and_sqrt_segments(name: str) -> None:
    """The full-size zoo, profiled on the meta device (times from FLOPs): at 50% of the unplanned
    peak, where some plan fits, the plan costs no more than `all` or `sqrt` wherever those fit, and
    peaks no higher at equal cost."""
    w = load_scenario(name).build("full", device="meta")
    graph = planner.profile(w.model, w.batch, loss_fn=w.loss_closure(), optimizer=w.optimizer)
    try:
        plan = planner.plan(graph, "50%", time_limit_s=2.0)
    except InfeasibleBudget:
        pytest.skip(f"no plan of {name} fits 50% of its peak")
    problem = build_problem(graph, plan.budget_bytes)
    for baseline in ("all", "sqrt"):  # where neither fits (unet: long skips), the plan is the only one that does
        chosen = get_solver(baseline)(problem, 10.0).chosen
        if problem.peak_bytes(chosen) > plan.budget_bytes:
            continue
        cost = problem.overhead_ms(chosen)
        assert plan.predicted_overhead_ms <= cost + 1e-6
        if plan.predicted_overhead_ms >= cost - 1e-6:
            assert plan.predicted_peak_bytes <= problem.peak_bytes(chosen)
