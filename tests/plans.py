"""Plans made by hand from choices, for tests that apply a given set of choices, and the problem's
peak checked against the simulator's."""

from __future__ import annotations

import planner
from planner.core.actions import Semantics
from planner.core.gpus import roofline_for
from planner.core.plan import Plan, Status


def plan_of(graph, *choices) -> Plan:
    """A plan of the given choices, its budget its predicted peak."""
    sim = planner.simulate(graph, choices)
    return Plan(model=graph.model, fingerprint=graph.fingerprint, units=tuple(u.key for u in graph.units),
                choices=choices, budget_bytes=sim.peak_bytes, solver="by hand", status=Status.FEASIBLE, gap=0.0,
                solve_s=0.0, predicted_peak_bytes=sim.peak_bytes, predicted_overhead_ms=sim.extra_ms,
                step_ms=graph.step_ms, unplanned_peak_bytes=planner.simulate(graph).peak_bytes)


def assert_problem_agrees(graph, problem, chosen) -> None:
    """The problem's peak of `chosen` is the simulator's, or above it where two of the regions read the
    same block from outside (the problem's rows hold it once per region, the simulator once)."""
    choices = [problem.options[o].choice for o in chosen]
    semantics = Semantics(graph, roofline_for(graph))
    inputs = [r.block for c in choices for r in getattr(semantics.effect(c), "held", ()) if not r.in_replay]
    peak = planner.simulate(graph, choices).peak_bytes
    if len(inputs) == len(set(inputs)):
        assert problem.peak_bytes(chosen) == peak, choices
    else:
        assert problem.peak_bytes(chosen) >= peak, choices
