"""How every solver scales with the number of units, on synthetic training steps (`solvers.synthetic`).

    python -m bench.solver_scaling                       # 100, 1,000 and 10,000 units; chains and DAGs
    python -m bench.solver_scaling --sizes 100 1000      # a subset

Prints a markdown table and writes bench/solver_scaling.json. Each solver gets
TIME_LIMIT_S (LARGE_TIME_LIMIT_S from LARGE_UNITS units on); a solver is
skipped where it would take over a minute, and the table says so. Times are
wall and CPU seconds of this process, the median of REPEATS runs below 10,000
units (one run for the ILP, which uses its time limit). Targets:
ilp optimal or within 1% gap in under 10 s on 1,000 units; dp under 2 s on a
1,000-unit chain.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from solvers.synthetic import training_step
from solvers import SOLVERS, Problem, Status, get_solver

SIZES = (100, 1_000, 10_000)
TIME_LIMIT_S = 10.0
LARGE_UNITS = 10_000
LARGE_TIME_LIMIT_S = 60.0
ILP_MAX_OPTIONS = 100_000  # beyond, building the model alone takes tens of seconds and presolve minutes
REPEATS = 3  # runs of each solver but the ILP below LARGE_UNITS: this machine's timings vary by up to 40%
OUT = Path(__file__).with_name("solver_scaling.json")


def run(sizes: tuple[int, ...], seed: int = 0) -> list[dict]:
    _warm_up()
    records = []
    for n in sizes:
        for skips in (False, True):
            start = time.perf_counter()
            problem = training_step(n, skips=skips, seed=seed)
            shape = "dag" if skips else "chain"
            print(f"# {n} units, {shape}: {len(problem.options)} options, {len(problem.rows)} rows "
                  f"(built in {time.perf_counter() - start:.0f} s)", flush=True)
            for name in SOLVERS:
                records.append(_solve(problem, name, n, shape))
                print(_row(records[-1]), flush=True)
    return records


def _solve(problem: Problem, name: str, n: int, shape: str) -> dict:
    record = {"units": n, "shape": shape, "solver": name, "options": len(problem.options)}
    if name == "ilp" and len(problem.options) > ILP_MAX_OPTIONS:
        return record | {"status": f"skipped: over 60 s ({len(problem.options):,} options)"}
    if name == "dp" and not problem.chain:
        return record | {"status": "n/a: not a chain"}
    limit = LARGE_TIME_LIMIT_S if n >= LARGE_UNITS else TIME_LIMIT_S
    runs = []  # (wall, cpu, solution); the median by wall is reported
    for _ in range(1 if name == "ilp" or n >= LARGE_UNITS else REPEATS):
        wall, cpu = time.perf_counter(), time.process_time()
        solution = get_solver(name)(problem, limit)
        runs.append((time.perf_counter() - wall, time.process_time() - cpu, solution))
    wall, cpu, solution = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    peak = problem.peak_bytes(solution.chosen) if n < LARGE_UNITS else None  # the pure-Python referee is slow
    return record | {
        "status": solution.status.value,
        "overhead_ms": problem.overhead_ms(solution.chosen),
        "peak_over_budget": None if peak is None else peak / problem.budget_bytes,
        "gap": solution.gap,
        "wall_s": wall,
        "wall_s_runs": [r[0] for r in runs],
        "cpu_s": cpu,
        "time_limit_s": limit,
    }


def _warm_up() -> None:
    """Load CP-SAT and numpy paths once, so the first timed solve does not pay for it."""
    problem = training_step(20, skips=False, seed=1)
    for name in SOLVERS:
        get_solver(name)(problem, 5.0)


def _row(r: dict) -> str:
    if "wall_s" not in r:
        return f"| {r['units']:,} | {r['shape']} | {r['solver']} | {r['status']} | | | | |"
    fits = r["status"] in (Status.OPTIMAL.value, Status.FEASIBLE.value, Status.TIME_LIMIT.value)
    overhead = f"{r['overhead_ms']:.3f}" if fits else "-"
    gap = f"{100 * r['gap']:.2f}%" if r["status"] == Status.TIME_LIMIT.value and r["solver"] == "ilp" else ""
    return (
        f"| {r['units']:,} | {r['shape']} | {r['solver']} | {r['status']} | {overhead} | {gap} "
        f"| {r['wall_s']:.2f} | {r['cpu_s']:.2f} |"
    )


def table(records: list[dict]) -> str:
    head = "| units | graph | solver | status | overhead ms | gap | wall s | cpu s |\n|---:|---|---|---|---:|---:|---:|---:|"
    return "\n".join([head, *map(_row, records)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    records = run(tuple(args.sizes), args.seed)
    print()
    print(table(records))
    OUT.write_text(json.dumps(records, indent=1))
    print(f"\nwrote {OUT}")


if __name__ == "__main__":
    main()
