"""The problem the solvers see and the simulator agree on every plan, on real profiles."""

from __future__ import annotations

import random

import pytest

import planner
from planner.core.simulator import simulate
from planner.scenario import load_scenario
from solvers import build_problem
from tests.plans import assert_problem_agrees


@pytest.mark.parametrize("name", ["gpt", "resnet", "unet", "lstm_cell"])
def test_problem_peak_equals_simulated_peak_on_random_plans(name):
    w = load_scenario(name).build()
    graph = planner.profile(w.model, w.batch, loss_fn=w.loss_closure(), optimizer=w.optimizer)
    problem = build_problem(graph, 0)
    rng = random.Random(0)
    for _ in range(40):
        chosen: list[int] = []
        for option in rng.sample(range(len(problem.options)), rng.randint(1, 8)):
            if problem.compatible([*chosen, option]):
                chosen.append(option)
        choices = [problem.options[o].choice for o in chosen]
        assert_problem_agrees(graph, problem, chosen)
        assert problem.overhead_ms(chosen) == pytest.approx(simulate(graph, choices).extra_ms)
