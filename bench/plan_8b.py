"""Operator-level plans for a 32-layer, 8-billion-parameter LLaMA, profiled without allocating.

    python -m bench.plan_8b             # writes bench/plan_8b.json

The `llama3_8b` scenario's full variant (Hugging Face LlamaForCausalLM, 4,096 tokens, bfloat16,
AdamW) profiled on fake tensors, then planned by the default solver (`planner.plan`, no offload)
at the smallest peak any plan reaches and a quarter, half and three quarters of the way from it
to the unplanned peak. Per budget: the options (each recomputed layer chooses among its points of
kept operator calls), the wall time of building the problem and of solving it, the solver's
status and gap, and how many operator calls the plan keeps saved. Target: under 30 s, optimal
or within 1%.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import planner
from planner.scenario import load_scenario
from solvers import auto_solver, build_problem, get_solver
from solvers.ilp import min_peak

OUT = Path(__file__).with_name("plan_8b.json")
TIME_LIMIT_S = 10.0  # planner.plan's default


def main() -> None:
    started = time.perf_counter()
    w = load_scenario("llama3_8b").build("full", device="fake")
    graph = planner.profile(w.model, w.batch, loss_fn=w.loss_closure(), optimizer=w.optimizer,
                            autocast_dtype=w.autocast_dtype)
    profile_s = time.perf_counter() - started
    unplanned = planner.simulate(graph).peak_bytes
    smallest = min_peak(build_problem(graph, 0, offload=False), TIME_LIMIT_S)[0]
    records = []
    print("| budget | options | build s | solve s | status | gap | kept operator calls | overhead |")
    print("|---|---|---|---|---|---|---|---|")
    for share in (0.0, 0.25, 0.5, 0.75):
        budget = int(smallest + share * (unplanned - smallest))
        start = time.perf_counter()
        problem = build_problem(graph, budget, offload=False)
        build_s = time.perf_counter() - start
        solution = get_solver(auto_solver(problem))(problem, TIME_LIMIT_S)
        solve_s = time.perf_counter() - start - build_s
        chosen = [problem.options[o].choice for o in solution.chosen]
        records.append({
            "budget_bytes": budget, "share": share, "options": len(problem.options), "build_s": build_s,
            "solve_s": solve_s, "status": solution.status.value, "gap": solution.gap,
            "kept_calls": sum(len(c.save_ops) for c in chosen),
            "overhead_pct": 100 * problem.overhead_ms(solution.chosen) / graph.step_ms,
        })
        r = records[-1]
        print(f"| smallest + {share:.0%} of the way ({budget / 2**30:.1f} GiB) | {r['options']:,} | {build_s:.1f} | "
              f"{solve_s:.1f} | {r['status']} | {r['gap']:.2%} | {r['kept_calls']} | +{r['overhead_pct']:.1f}% |",
              flush=True)
    OUT.write_text(json.dumps({"units": len(graph.units), "profile_s": profile_s, "unplanned_bytes": unplanned,
                               "smallest_bytes": smallest, "plans": records}, indent=1) + "\n")
    print(f"{len(graph.units)} units, profiled in {profile_s:.1f} s; wrote {OUT}")


if __name__ == "__main__":
    main()
