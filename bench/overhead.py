"""Predicted against measured step-time overhead of plans on every zoo scenario.

    python -m bench.overhead [--steps 15]

For each scenario (small variant): profile, plan at 50% of the unplanned peak (or, where no plan
fits 50%, at the smallest budget any plan reaches, the nearest to it) and at that budget + 10%,
then train under each plan with planned and unplanned steps taken in turns
(`planner.training.run_under_plan`). The target is a measured overhead within 10 percentage points
of the predicted one. Writes overhead.json beside this file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import planner
from planner.planning import InfeasibleBudget
from planner.scenario import list_scenarios, load_scenario
from planner.training import run_under_plan

OUT = Path(__file__).with_name("overhead.json")


def scenario_rows(name: str, steps: int) -> list[dict]:
    w = load_scenario(name).build()
    graph = planner.profile(w.model, w.batch, loss_fn=w.loss_closure(), optimizer=w.optimizer, autocast_dtype=w.autocast_dtype)
    unplanned = planner.simulate(graph).peak_bytes
    try:
        tight = planner.plan(graph, "50%").budget_bytes
        label = "50%"
    except InfeasibleBudget as error:
        tight, label = error.smallest_bytes, "smallest"
    rows = []
    for budget, what in ((tight, label), (int(tight * 1.1), f"{label} + 10%")):
        if budget >= unplanned:
            continue
        plan = planner.plan(graph, budget)
        base, planned = run_under_plan(w, plan, steps)
        rows.append(
            {
                "scenario": name,
                "budget": what,
                "budget_bytes": budget,
                "budget_pct": 100.0 * budget / unplanned,
                "predicted_peak_bytes": plan.predicted_peak_bytes,
                "measured_peak_bytes": planned.peak_bytes,
                "predicted_overhead_pct": plan.overhead_pct,
                "measured_overhead_pct": 100.0 * (planned.step_ms / base.step_ms - 1.0),
                "regions": sum(c.action.value == "recompute" for c in plan.choices),
                "offloads": sum(c.action.value == "offload" for c in plan.choices),
                "predicted_extra_ms": plan.predicted_overhead_ms,
                "unplanned_ms": base.step_ms,
                "planned_ms": planned.step_ms,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25, help="planned (and as many unplanned) steps per plan")
    args = parser.parse_args()
    rows = [r for name in list_scenarios() if name != "gpt7b" for r in scenario_rows(name, args.steps)]
    print("| scenario | budget | peak predicted / measured | overhead predicted | measured | difference |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        diff = r["measured_overhead_pct"] - r["predicted_overhead_pct"]
        print(
            f"| {r['scenario']} | {r['budget']} ({r['budget_pct']:.0f}%) | {r['predicted_peak_bytes'] / 2**20:.2f} / "
            f"{r['measured_peak_bytes'] / 2**20:.2f} MiB | {r['predicted_overhead_pct']:+.1f}% | "
            f"{r['measured_overhead_pct']:+.1f}% | {diff:+.1f} pp |"
        )
    OUT.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
