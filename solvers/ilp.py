"""Exact plans with CP-SAT: a 0-1 program over the options, memory written row by row.

    min   sum_o c_o y_o                                   (c_o: cost in ns, rounded)
    s.t.  sum_{o ∋ u} y_o <= 1                             for every unit u
          F_k = F_{k-1} + sum_{e starts at k} b_e y_o(e) - sum_{e ends at k-1} b_e y_o(e)
          peak_k - F_k <= budget                           for every row k
          base_o + replay_o - F_{k(o)} - G_o <= budget     for every chosen o, written
          F_{k(o)} + G_o >= (base_o + replay_o - budget) y_o
          y_o ∈ {0, 1}

F_k is what the chosen options free through row k, carried along the rows in
tick order so the model has O(entries + rows) nonzeros instead of one term per
option and row; entry e of option o covers the contiguous rows with
death_e < first_k and last_k <= back_e. k(o) is the row holding o's back
tick, and G_o adds the entries that cover that tick but not the whole row
(none when rows are cut at every entry's ends, as `build_problem` cuts
them). Bytes are divided by the gcd of the entries' bytes, which keeps every
constraint exact. `min_peak` minimises a variable M above every row and
every chosen replay instead, to find the smallest budget any plan meets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from solvers import arrays, greedy
from solvers.arrays import Arrays
from solvers.base import Solution, Status
from solvers.problem import Problem

NS_PER_MS = 1_000_000  # objective unit: costs in ms are rounded to whole nanoseconds
NUM_WORKERS = 2


@dataclass
class _Memory:
    """The part of the model shared by `solve` and `min_peak`."""

    model: cp_model.CpModel
    y: list[cp_model.IntVar]  # y[o] = 1: option o is chosen
    freed: dict[int, cp_model.LinearExpr]  # row k -> F_k, bytes / scale freed through row k
    scale: int  # bytes per unit of F


def solve(problem: Problem, time_limit_s: float = 10.0) -> Solution:
    start = time.perf_counter()
    # data
    arr = arrays.of(problem)
    need_rows = arr.row_peak - problem.budget_bytes
    need_replays = arr.option_replay_need - problem.budget_bytes
    replays = _binding(arr, arr.option_replay_need, problem.budget_bytes)
    hint, hint_peak = greedy.plan(problem, arr, problem.budget_bytes)
    # variables and constraints
    mem = _memory(problem, arr, rows=np.flatnonzero(need_rows > 0), replays=replays)
    for k in np.flatnonzero(need_rows > 0):
        mem.model.Add(mem.freed[k] >= _ceil_div(int(need_rows[k]), mem.scale))
    for o, freed in _freed_at_backs(mem, arr, replays).items():
        need = _ceil_div(int(need_replays[o]), mem.scale)
        mem.model.Add(freed >= need * mem.y[o])
    # objective
    cost = [round(c * NS_PER_MS) for c in arr.option_cost_ms]
    mem.model.Minimize(cp_model.LinearExpr.WeightedSum(mem.y, cost))
    # hint
    _hint(mem, arr, hint)
    # solve
    solver = _solver(time_limit_s - (time.perf_counter() - start))
    status = solver.Solve(mem.model)
    solve_s = time.perf_counter() - start
    # read back
    if status == cp_model.OPTIMAL:
        return Solution(_chosen(solver, mem, arr, problem.budget_bytes), Status.OPTIMAL, 0.0, solve_s)
    if status == cp_model.FEASIBLE:
        gap = _gap(solver.ObjectiveValue(), solver.BestObjectiveBound())
        return Solution(_chosen(solver, mem, arr, problem.budget_bytes), Status.TIME_LIMIT, gap, solve_s)
    if status == cp_model.INFEASIBLE:
        return Solution((), Status.INFEASIBLE, 0.0, solve_s)
    if status == cp_model.UNKNOWN and hint_peak <= problem.budget_bytes:
        objective = sum(cost[o] for o in hint)
        return Solution(hint, Status.TIME_LIMIT, _gap(objective, solver.BestObjectiveBound()), solve_s)
    if status == cp_model.UNKNOWN:
        return Solution((), Status.INFEASIBLE, 0.0, solve_s)
    raise RuntimeError(f"CP-SAT returned {solver.StatusName(status)} on the planning model: {mem.model.Validate()}")


def min_peak(problem: Problem, time_limit_s: float = 10.0) -> tuple[int, tuple[int, ...]]:
    """The smallest peak in bytes of any plan, and such a plan: the smallest budget a plan can meet.

    Proven minimal when CP-SAT finishes within the time limit; otherwise the best plan found.
    """
    # data
    start = time.perf_counter()
    arr = arrays.of(problem)
    lower = int(np.max(arr.row_peak - arrays.freed_rows(arr, range(arr.n_options))))  # nothing frees more
    rows = np.flatnonzero(arr.row_peak > lower)
    replays = _binding(arr, arr.option_replay_need, lower)
    hint, hint_peak = greedy.plan(problem, arr, lower)
    # variables: M, the peak in bytes, on top of the memory model
    mem = _memory(problem, arr, rows=rows, replays=replays)
    top = max(int(arr.row_peak.max()), int(arr.option_replay_need.max(initial=0)))
    peak = mem.model.NewIntVar(lower, top, "peak")
    # constraints: M above every row, and above every chosen replay
    for k in rows:
        mem.model.Add(peak + mem.scale * mem.freed[k] >= int(arr.row_peak[k]))
    for o, freed in _freed_at_backs(mem, arr, replays).items():
        mem.model.Add(peak + mem.scale * freed >= int(arr.option_replay_need[o]) * mem.y[o])
    # objective
    mem.model.Minimize(peak)
    # hint
    _hint(mem, arr, hint)
    mem.model.AddHint(peak, hint_peak)
    # solve
    solver = _solver(time_limit_s - (time.perf_counter() - start))
    status = solver.Solve(mem.model)
    # read back
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        chosen = tuple(o for o, y in enumerate(mem.y) if solver.Value(y))
        return arrays.peak_bytes(arr, chosen), chosen
    if status == cp_model.UNKNOWN:
        return hint_peak, hint
    raise RuntimeError(f"CP-SAT returned {solver.StatusName(status)} on the min-peak model: {mem.model.Validate()}")


def _binding(arr: Arrays, replay_bytes: np.ndarray, floor: int) -> np.ndarray:
    """Options whose replay can peak above `floor` and above the row holding their back tick
    (a replay below that row's peak is implied by the row's constraint)."""
    rows = arr.row_of_tick(arr.option_back)
    row_peak = np.where(rows >= 0, arr.row_peak[np.maximum(rows, 0)], np.iinfo(np.int64).min)
    return np.flatnonzero((replay_bytes > floor) & (replay_bytes > row_peak))


def _memory(problem: Problem, arr: Arrays, rows: np.ndarray, replays: np.ndarray) -> _Memory:
    """y per option, at most one option per unit, and F_k on `rows` and on the rows holding `replays`' backs."""
    model = cp_model.CpModel()
    y = [model.NewBoolVar(f"y{o}") for o in range(arr.n_options)]
    by_unit: dict[int, list[int]] = {}
    for o, option in enumerate(problem.options):
        for u in option.units:
            by_unit.setdefault(u, []).append(o)
    for options in by_unit.values():
        if len(options) > 1:
            model.AddAtMostOne(y[o] for o in options)
    scale = int(np.gcd.reduce(arr.entry_bytes)) if len(arr.entry_bytes) else 1
    back_rows = arr.row_of_tick(arr.option_back[replays])
    needed = np.unique(np.concatenate([rows, back_rows[back_rows >= 0]])).astype(np.int64)
    freed = _freed_rows(model, y, arr, needed, scale)
    return _Memory(model, y, freed, scale)


def _freed_rows(
    model: cp_model.CpModel, y: list[cp_model.IntVar], arr: Arrays, needed: np.ndarray, scale: int
) -> dict[int, cp_model.LinearExpr]:
    """F at each needed row: the previous needed row's F, plus entries starting, minus entries ending, in between."""
    lo, hi = arr.entry_row_lo, arr.entry_row_hi
    first = np.searchsorted(needed, lo, side="left")  # first needed row an entry covers
    last = np.searchsorted(needed, hi, side="right") - 1  # last needed row it covers
    live = (lo <= hi) & (first <= last)
    opt, b = arr.entry_option[live], arr.entry_bytes[live] // scale
    starts = _sum_terms(first[live], opt, b)
    ends = _sum_terms(last[live] + 1, opt, b)
    total = int(b.sum())
    freed: dict[int, cp_model.LinearExpr] = {}
    previous: cp_model.LinearExpr | int = 0
    for i, k in enumerate(needed.tolist()):
        plus, minus = starts.get(i, {}), ends.get(i, {})
        terms = {o: plus.get(o, 0) - minus.get(o, 0) for o in plus.keys() | minus.keys()}
        change = cp_model.LinearExpr.WeightedSum([y[o] for o in terms], list(terms.values()))
        f = model.NewIntVar(0, total, f"F{k}")
        model.Add(f == previous + change)
        freed[k] = previous = f
    return freed


def _sum_terms(at: np.ndarray, option: np.ndarray, nbytes: np.ndarray) -> dict[int, dict[int, int]]:
    """{position: {option: summed bytes}} over entries."""
    out: dict[int, dict[int, int]] = {}
    for i, o, b in zip(at.tolist(), option.tolist(), nbytes.tolist()):
        terms = out.setdefault(i, {})
        terms[o] = terms.get(o, 0) + b
    return out


def _freed_at_backs(mem: _Memory, arr: Arrays, options: np.ndarray) -> dict[int, cp_model.LinearExpr]:
    """Bytes / scale freed at each option's back tick: F of the row holding it, plus the entries that
    cover the tick but not that whole row (they die or come back inside it)."""
    ticks = arr.option_back[options]
    rows = arr.row_of_tick(ticks)
    first = np.where(rows >= 0, arr.row_first[np.maximum(rows, 0)], np.iinfo(np.int64).min)
    last = np.where(rows >= 0, arr.row_last[np.maximum(rows, 0)], np.iinfo(np.int64).min)
    by_death = np.argsort(arr.entry_death, kind="stable")
    by_back = np.argsort(arr.entry_back, kind="stable")
    deaths, backs = arr.entry_death[by_death], arr.entry_back[by_back]
    # dies inside the row before the tick, or (died before the row and) comes back inside it at or after the tick
    d_lo, d_hi = np.searchsorted(deaths, first, "left"), np.searchsorted(deaths, ticks, "left")
    b_lo, b_hi = np.searchsorted(backs, ticks, "left"), np.searchsorted(backs, last, "left")
    out = {}
    for i, o in enumerate(options.tolist()):
        extra = []
        if d_lo[i] < d_hi[i]:
            e = by_death[d_lo[i] : d_hi[i]]
            extra.append(e[arr.entry_back[e] >= ticks[i]])
        if b_lo[i] < b_hi[i]:
            e = by_back[b_lo[i] : b_hi[i]]
            extra.append(e[arr.entry_death[e] < min(first[i], ticks[i])])
        base: cp_model.LinearExpr | int = mem.freed[int(rows[i])] if rows[i] >= 0 else 0
        if extra:
            e = np.concatenate(extra)
            terms = [mem.y[int(o2)] for o2 in arr.entry_option[e]]
            base = base + cp_model.LinearExpr.WeightedSum(terms, (arr.entry_bytes[e] // mem.scale).tolist())
        out[o] = base
    return out


def _hint(mem: _Memory, arr: Arrays, chosen: tuple[int, ...]) -> None:
    """A complete starting point: the plan's y and the F they give."""
    picked = set(chosen)
    for o, y in enumerate(mem.y):
        mem.model.AddHint(y, o in picked)
    freed = arrays.freed_rows(arr, chosen) // mem.scale
    for k, f in mem.freed.items():
        mem.model.AddHint(f, int(freed[k]))


def _solver(time_limit_s: float) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(time_limit_s, 0.01)
    solver.parameters.num_workers = NUM_WORKERS
    return solver


def _chosen(solver: cp_model.CpSolver, mem: _Memory, arr: Arrays, budget_bytes: int) -> tuple[int, ...]:
    chosen = tuple(o for o, y in enumerate(mem.y) if solver.Value(y))
    peak = arrays.peak_bytes(arr, chosen)
    if peak > budget_bytes:
        raise RuntimeError(f"the ILP's plan peaks at {peak} bytes over the budget of {budget_bytes}: a modelling bug")
    return chosen


def _gap(objective: float, bound: float) -> float:
    return max(0.0, (objective - bound) / objective) if objective > 0 else 0.0


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)

