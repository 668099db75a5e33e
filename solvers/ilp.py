"""Exact plans with CP-SAT: a 0-1 program over the options, memory written row by row.

    min   sum_o c_o y_o                                        c_o: cost in ns, rounded
    s.t.  sum_{o ∋ u} y_o <= 1                                  every unit u
          F_k = F_j + sum_{e starts in (j, k]} b_e y_o(e) - sum_{e ends in [j, k)} b_e y_o(e)
          peak_k - F_k <= budget                                every row k (j: the row before it in the model)
          F_k(o) + G_o - L_o >= (base_o + replay_o - budget - L_o) y_o   every option o (its replay, if chosen)
          y_o ∈ {0, 1}

F_k is what the chosen options free through row k (held bytes count
negative), carried from row to row in tick order, so the model has
O(entries + rows) nonzeros instead of a term per option and row; entry e
covers the contiguous rows with death_e < first_k and last_k <= back_e. k(o)
is the row holding o's back tick and G_o the entries freeing bytes at that
tick but not through the whole row (none when rows are cut at every entry's
ends, as `build_problem` cuts them); L_o <= 0, the bytes every option holding
some there would hold, leaves the constraint empty when o is not chosen.
Options sharing k(o) and their last unit (at most one is chosen) share one
replay constraint with sum_o on the right. Constraints another row's implies
are left out, and bytes are divided by the gcd of the entries' bytes: both
keep the model exact. Large graphs whose options all cover consecutive units
start from the dynamic programme's plan where it beats greedy's, others from
greedy's. `min_peak` minimises a variable M above
every row and every chosen replay instead: the smallest budget any plan meets.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from solvers import arrays, dp, greedy
from solvers.arrays import Arrays
from planner.core.plan import Status
from solvers.base import Solution
from solvers.problem import Problem

NS_PER_MS = 1_000_000  # objective unit: costs in ms are rounded to whole nanoseconds
NUM_WORKERS = 2
HINT_SHARE = 0.5  # of the time limit, at most, for the starting plan
DP_HINT_UNITS = 60  # larger graphs start from the dynamic programme's plan
HINT_STATES = (128, dp.MAX_STATES)  # its fronts: small ones first, then dp's own while time is left


@dataclass(frozen=True)
class _Replay:
    """Options whose replays are checked together at one row (or, with extra entries, alone)."""

    row: int  # -1: no row holds the back tick
    extra: np.ndarray  # entries freeing bytes at the tick but not through the whole row
    options: tuple[int, ...]


@dataclass
class _Memory:
    """The part of the model `solve` and `min_peak` share."""

    model: cp_model.CpModel
    y: list[cp_model.IntVar]  # y[o] = 1: option o is chosen
    freed: dict[int, cp_model.IntVar]  # F_k: bytes / scale that the chosen options free through row k
    scale: int  # bytes per unit of F

    def at_back(self, arr: Arrays, replay: _Replay) -> cp_model.LinearExpr:
        """Bytes / scale freed at the replays' back tick."""
        base = self.freed[replay.row] if replay.row >= 0 else 0
        terms = [self.y[int(o)] for o in arr.entry_option[replay.extra]]
        return base + cp_model.LinearExpr.weighted_sum(terms, (arr.entry_bytes[replay.extra] // self.scale).tolist())


def solve(problem: Problem, time_limit_s: float = 10.0) -> Solution:
    start = time.perf_counter()
    # data
    arr = arrays.of(problem)
    row_need = arr.row_peak - problem.budget_bytes
    replay_need = arr.option_replay_need - problem.budget_bytes
    rows, replays = _constraints(arr, row_need, replay_need)
    hint, hint_peak = _starting_plan(problem, arr, problem.budget_bytes, start + HINT_SHARE * time_limit_s)
    # variables (y, F) and constraints: units, then rows, then replays
    mem = _memory(problem, arr, rows, replays)
    for k in rows.tolist():
        mem.model.add(mem.freed[k] >= _ceil_div(int(row_need[k]), mem.scale))
    held = arrays.least_at(arr, arr.option_back[[r.options[0] for r in replays]]).tolist()
    for r, least in zip(replays, held):  # at_back - least >= sum_o (need_o - least) y_o: none chosen, no need
        least //= mem.scale
        needs = [_ceil_div(int(replay_need[o]), mem.scale) - least for o in r.options]
        chosen = cp_model.LinearExpr.weighted_sum([mem.y[o] for o in r.options], needs)
        mem.model.add(mem.at_back(arr, r) - least >= chosen)
    _host(mem, problem, arr)
    # objective
    cost = [round(c * NS_PER_MS) for c in arr.option_cost_ms]
    mem.model.minimize(cp_model.LinearExpr.weighted_sum(mem.y, cost))
    # hint
    _hint(mem, arr, hint)
    # solve
    solver = _solver(time_limit_s - (time.perf_counter() - start))
    status = solver.solve(mem.model)
    solve_s = time.perf_counter() - start
    # read back
    if status == cp_model.OPTIMAL:
        return Solution(_chosen(solver, mem, arr, problem.budget_bytes), Status.OPTIMAL, 0.0, solve_s)
    if status == cp_model.FEASIBLE:
        gap = _gap(solver.objective_value, solver.best_objective_bound)
        return Solution(_chosen(solver, mem, arr, problem.budget_bytes), Status.TIME_LIMIT, gap, solve_s)
    if status == cp_model.INFEASIBLE:
        return Solution((), Status.INFEASIBLE, 0.0, solve_s)
    if status == cp_model.UNKNOWN and hint_peak <= problem.budget_bytes:
        gap = _gap(sum(cost[o] for o in hint), solver.best_objective_bound)
        return Solution(hint, Status.TIME_LIMIT, gap, solve_s)
    if status == cp_model.UNKNOWN:
        return Solution((), Status.INFEASIBLE, 0.0, solve_s)
    raise RuntimeError(f"CP-SAT returned {solver.status_name(status)} on the planning model: {mem.model.validate()}")


def min_peak(problem: Problem, time_limit_s: float = 10.0) -> tuple[int, tuple[int, ...]]:
    """The smallest peak in bytes of any plan, and such a plan: the smallest budget a plan can meet.

    Proven minimal when CP-SAT finishes within the time limit; otherwise the best plan found.
    """
    start = time.perf_counter()
    # data: no plan peaks below `lower`, so only what can rise above it is constrained
    arr = arrays.of(problem)
    lower = int(np.max(arr.row_peak - arrays.freed_range(arr)[1]))
    rows, replays = _constraints(arr, arr.row_peak - lower, arr.option_replay_need - lower)
    hint, hint_peak = greedy.plan(problem, arr, lower, start + HINT_SHARE * time_limit_s)
    # variables: y, F and M, the peak in bytes
    mem = _memory(problem, arr, rows, replays)
    least = arrays.freed_range(arr)[0]
    top = max(int((arr.row_peak - least).max()), int((arr.option_replay_need - arrays.least_at(arr, arr.option_back)).max(initial=0)))
    peak = mem.model.new_int_var(lower, top, "peak")
    # constraints: M above every row and every chosen replay
    for k in rows.tolist():
        mem.model.add(peak + mem.scale * mem.freed[k] >= int(arr.row_peak[k]))
    held = arrays.least_at(arr, arr.option_back[[r.options[0] for r in replays]]).tolist()
    for r, least in zip(replays, held):  # M + at_back - least >= sum_o (replay_o - least) y_o, in bytes
        needs = [int(arr.option_replay_need[o]) - least for o in r.options]
        chosen = cp_model.LinearExpr.weighted_sum([mem.y[o] for o in r.options], needs)
        mem.model.add(peak + mem.scale * mem.at_back(arr, r) - least >= chosen)
    _host(mem, problem, arr)
    # objective
    mem.model.minimize(peak)
    # hint
    _hint(mem, arr, hint)
    mem.model.add_hint(peak, hint_peak)
    # solve
    solver = _solver(time_limit_s - (time.perf_counter() - start))
    status = solver.solve(mem.model)
    # read back
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        chosen = tuple(o for o, y in enumerate(mem.y) if solver.value(y))
        return arrays.peak_bytes(arr, chosen), chosen
    if status == cp_model.UNKNOWN:
        return hint_peak, hint
    raise RuntimeError(f"CP-SAT returned {solver.status_name(status)} on the min-peak model: {mem.model.validate()}")


def _host(mem: _Memory, problem: Problem, arr: Arrays) -> None:
    """sum_o host_o y_o <= host budget, in bytes."""
    if problem.host_bound:
        held = cp_model.LinearExpr.weighted_sum(mem.y, [int(b) for b in arr.option_host])
        mem.model.add(held <= problem.host_budget_bytes)


def _starting_plan(problem: Problem, arr: Arrays, budget_bytes: int, deadline: float) -> tuple[tuple[int, ...], int]:
    """Greedy's plan or, on large graphs whose options all cover consecutive units, the dynamic
    programme's (small fronts, then larger ones, each given up at the deadline) when it is cheaper.
    Small graphs need no help."""
    found = None
    if problem.n_units > DP_HINT_UNITS and arr.option_is_interval.all() and not problem.host_bound:
        plans = (dp.plan(problem, arr, deadline, states) for states in HINT_STATES)
        found = min((p for p in plans if p is not None), key=problem.overhead_ms, default=None)
    chosen, peak = greedy.plan(problem, arr, budget_bytes)
    if found is not None and (peak > budget_bytes or problem.overhead_ms(found) < problem.overhead_ms(chosen)):
        return found, arrays.peak_bytes(arr, found)
    return chosen, peak


# ---------------------------------------------------------------- which constraints the model needs


def _constraints(arr: Arrays, row_need: np.ndarray, replay_need: np.ndarray) -> tuple[np.ndarray, list[_Replay]]:
    """Rows and replay groups that some plan could push over their need (with held bytes, rows with
    need <= 0 too) and that no row constraint implies."""
    rows = np.flatnonzero(row_need > arrays.freed_range(arr)[0])
    options = np.flatnonzero(replay_need > arrays.least_at(arr, arr.option_back))
    ticks = arr.option_back[options]
    at = arr.row_of_tick(ticks)
    extra = _inside_row(arr, ticks, at)
    shared: dict[tuple[int, int], list[int]] = {}
    alone = []
    for i, o in enumerate(options.tolist()):
        if len(extra[i]) or at[i] < 0:
            alone.append(_Replay(int(at[i]), extra[i], (o,)))
        else:
            shared.setdefault((int(at[i]), int(arr.option_last_unit[o])), []).append(o)
    groups = [_Replay(k, np.zeros(0, dtype=np.int64), tuple(m)) for (k, _), m in shared.items()]
    # a row constraint or a group's largest need, in order of row (rows first at a row)
    at_row = np.concatenate([rows, [g.row for g in groups]]).astype(np.int64)
    need = np.concatenate([row_need[rows], [max(replay_need[list(g.options)]) for g in groups]]).astype(np.int64)
    is_row = np.arange(len(at_row)) < len(rows)
    order = np.lexsort((~is_row, at_row))
    implied = np.zeros(len(at_row), dtype=bool)
    implied[order] = _implied(arr, at_row[order], need[order], is_row[order])
    kept_groups = [g for g, gone in zip(groups, implied[len(rows) :]) if not gone]
    return rows[~implied[: len(rows)]], kept_groups + alone


def _implied(arr: Arrays, rows: np.ndarray, need: np.ndarray, is_row: np.ndarray) -> np.ndarray:
    """Which constraints F_{rows[i]} >= need[i] a row constraint (is_row) implies; sorted by row.

    Row j implies the constraint at row k when need_k <= need_j and every plan frees at least as much
    through k as through j: every entry covering j covers k. For j < k that holds when no entry covering
    j ends before k (the least last row of j's entries is >= k); for j > k when none starts after k.
    Between rows, ties go to the earlier one, so of equal rows one stays. Held (negative) bytes: those
    at j only lower F_j; those at k must be held at j too (for j < k, all start at or before j; for
    j > k, all end at or after j). Only the strongest earlier (later) row is tried.
    """
    freeing, held = arr.entry_bytes > 0, arr.entry_bytes < 0
    lo, hi = arr.entry_row_lo[freeing], arr.entry_row_hi[freeing]
    h_lo, h_hi = arr.entry_row_lo[held], arr.entry_row_hi[held]
    inf = np.iinfo(np.int64).max // 4
    least_hi = -arrays.max_covering(rows, lo, hi, -hi, none=-inf)  # inf where nothing covers the row
    most_lo = arrays.max_covering(rows, lo, hi, lo, none=-inf)
    held_from = arrays.max_covering(rows, h_lo, h_hi, h_lo, none=-inf)  # latest start of a hold at the row
    held_to = -arrays.max_covering(rows, h_lo, h_hi, -h_hi, none=-inf)  # earliest end of one
    implied = np.zeros(len(rows), dtype=bool)
    # forward: earlier rows j with least_hi_j >= k and j >= held_from_k; backward (negated): later rows
    # with most_lo_j <= k and j <= held_to_k
    for order, sign, reach, holds, strict in (
        (range(len(rows)), 1, least_hi, held_from, False),
        (range(len(rows) - 1, -1, -1), -1, -most_lo, -held_to, True),
    ):
        heap: list[tuple[int, int, int]] = []  # (-need, reach, sign * row) of the rows seen so far
        for i in order:
            k = sign * int(rows[i])
            while heap and heap[0][1] < k:
                heapq.heappop(heap)
            if heap and heap[0][2] >= holds[i]:
                top = -heap[0][0]
                implied[i] |= top > need[i] or (top == need[i] and not (strict and is_row[i]))
            if is_row[i]:
                heapq.heappush(heap, (-int(need[i]), int(reach[i]), k))
    return implied


def _inside_row(arr: Arrays, ticks: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
    """Per tick: the entries that free bytes at the tick but not through all of its row (all that free
    bytes at the tick when no row holds it): dead inside the row before the tick, or back inside it at or
    after the tick."""
    first = np.where(rows >= 0, arr.row_first[np.maximum(rows, 0)], np.iinfo(np.int64).min)
    last = np.where(rows >= 0, arr.row_last[np.maximum(rows, 0)], np.iinfo(np.int64).min)
    by_death = np.argsort(arr.entry_death, kind="stable")
    by_back = np.argsort(arr.entry_back, kind="stable")
    deaths, backs = arr.entry_death[by_death], arr.entry_back[by_back]
    d_lo, d_hi = np.searchsorted(deaths, first, "left"), np.searchsorted(deaths, ticks, "left")
    b_lo, b_hi = np.searchsorted(backs, ticks, "left"), np.searchsorted(backs, last, "left")
    none = np.zeros(0, dtype=np.int64)
    out = []
    for i in range(len(ticks)):
        parts = [none]
        if d_lo[i] < d_hi[i]:
            died = by_death[d_lo[i] : d_hi[i]]
            parts.append(died[arr.entry_back[died] >= ticks[i]])
        if b_lo[i] < b_hi[i]:
            back = by_back[b_lo[i] : b_hi[i]]
            parts.append(back[arr.entry_death[back] < first[i]])
        out.append(np.concatenate(parts))
    return out


# ---------------------------------------------------------------- variables, hint, solver


def _memory(problem: Problem, arr: Arrays, rows: np.ndarray, replays: list[_Replay]) -> _Memory:
    """y per option, at most one option per unit, and F at the constrained rows."""
    model = cp_model.CpModel()
    y = [model.new_bool_var(f"y{o}") for o in range(arr.n_options)]
    by_unit: dict[int, list[int]] = {}
    for o, option in enumerate(problem.options):
        for u in option.units:
            by_unit.setdefault(u, []).append(o)
    for options in by_unit.values():
        if len(options) > 1:
            model.add_at_most_one([y[o] for o in options])
    scale = int(np.gcd.reduce(arr.entry_bytes)) if len(arr.entry_bytes) else 1
    needed = np.unique(np.concatenate([rows, [r.row for r in replays if r.row >= 0]])).astype(np.int64)
    return _Memory(model, y, _freed_rows(model, y, arr, needed, scale), scale)


def _freed_rows(
    model: cp_model.CpModel, y: list[cp_model.IntVar], arr: Arrays, needed: np.ndarray, scale: int
) -> dict[int, cp_model.IntVar]:
    """F at each needed row: the previous needed row's F, plus the entries starting, minus those ending."""
    lo, hi = arr.entry_row_lo, arr.entry_row_hi
    first = np.searchsorted(needed, lo, side="left")  # first needed row an entry covers
    last = np.searchsorted(needed, hi, side="right") - 1  # last needed row it covers
    live = (lo <= hi) & (first <= last)
    opt, nbytes = arr.entry_option[live], arr.entry_bytes[live] // scale
    starts = _sum_terms(first[live], opt, nbytes)
    ends = _sum_terms(last[live] + 1, opt, nbytes)
    least, most = (bound // scale for bound in arrays.freed_range(arr))
    freed: dict[int, cp_model.IntVar] = {}
    previous: cp_model.IntVar | int = 0
    for i, k in enumerate(needed.tolist()):
        plus, minus = starts.get(i, {}), ends.get(i, {})
        terms = {o: plus.get(o, 0) - minus.get(o, 0) for o in plus.keys() | minus.keys()}
        change = cp_model.LinearExpr.weighted_sum([y[o] for o in terms], list(terms.values()))
        f = model.new_int_var(int(least[k]), int(most[k]), f"F{k}")
        model.add(f == previous + change)
        freed[k] = previous = f
    return freed


def _sum_terms(at: np.ndarray, option: np.ndarray, nbytes: np.ndarray) -> dict[int, dict[int, int]]:
    """{position: {option: summed bytes}} over entries."""
    if len(at) == 0:
        return {}
    key = at * (int(option.max(initial=0)) + 1) + option
    order = np.argsort(key, kind="stable")
    key, nbytes = key[order], nbytes[order]
    first = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
    total = np.add.reduceat(nbytes, first)
    out: dict[int, dict[int, int]] = {}
    span = int(option.max(initial=0)) + 1
    for k, b in zip(key[first].tolist(), total.tolist()):
        out.setdefault(k // span, {})[k % span] = b
    return out


def _hint(mem: _Memory, arr: Arrays, chosen: tuple[int, ...]) -> None:
    """A complete starting point: the plan's y and the F they give."""
    picked = set(chosen)
    for o, y in enumerate(mem.y):
        mem.model.add_hint(y, o in picked)
    freed = arrays.freed_rows(arr, chosen) // mem.scale
    for k, f in mem.freed.items():
        mem.model.add_hint(f, int(freed[k]))


def _solver(time_limit_s: float) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(time_limit_s, 0.01)
    solver.parameters.num_workers = NUM_WORKERS
    solver.parameters.cp_model_probing_level = 0  # probing thousands of options costs more than it finds
    solver.parameters.symmetry_level = 0
    return solver


def _chosen(solver: cp_model.CpSolver, mem: _Memory, arr: Arrays, budget_bytes: int) -> tuple[int, ...]:
    chosen = tuple(o for o, y in enumerate(mem.y) if solver.value(y))
    peak = arrays.peak_bytes(arr, chosen)
    if peak > budget_bytes:
        raise RuntimeError(f"the ILP's plan peaks at {peak} bytes over the budget of {budget_bytes}: a modelling bug")
    return chosen


def _gap(objective: float, bound: float) -> float:
    return max(0.0, (objective - bound) / objective) if objective > 0 else 0.0


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
