"""Plans made by hand from choices, for tests that apply a given set of choices."""

from __future__ import annotations

import planner
from planner.core.plan import Plan, Status


def plan_of(graph, *choices) -> Plan:
    """A plan of the given choices, its budget its predicted peak."""
    sim = planner.simulate(graph, choices)
    return Plan(model=graph.model, fingerprint=graph.fingerprint, units=tuple(u.key for u in graph.units),
                choices=choices, budget_bytes=sim.peak_bytes, solver="by hand", status=Status.FEASIBLE, gap=0.0,
                solve_s=0.0, predicted_peak_bytes=sim.peak_bytes, predicted_overhead_ms=sim.extra_ms,
                step_ms=graph.step_ms, unplanned_peak_bytes=planner.simulate(graph).peak_bytes)
