"""Dynamic programming along a chain: exact, in the spirit of Rotor (Beaumont et al. 2019).

On a chain every option covers consecutive units, so a plan cuts the units
into steps, each keeping one unit or taking one option [a..b]. Scanning left
to right, a state at boundary a (units < a decided) is

    (cost, S, V):  S = sum of all freed bytes of the chosen options,  V = a few tracked sums,

and a step from a to b + 1 adds cost_o and total_o to S. What makes it exact:
for each memory constraint ("item": a row k, or the replay of option o)

    B = the largest first unit of an option that frees bytes there (options starting after B add 0),
    E = the smallest last unit of an option that frees only part of its bytes there,

so every option ending before E frees all of its bytes there. When B <= E
(always on a training step's chain, where each unit's bytes die at the end of
its forward or the next unit's and come back in reverse order) the item is
checked on the step covering unit B as S_before + freed_o >= need: one
threshold on S per step. Otherwise the item's own freed sum is tracked in V
from the step covering E to the step covering B; a replay of o is only
checked when o is chosen, and o's compatible successors that free bytes at
its back tick keep it in V until then. A state dominates another with no more
cost, no less S and no less of every V (S and V are capped at what is still
needed), so keeping each boundary's Pareto front gives the optimum for any
freed entries, not only well-shaped ones. Time is O(n * options per unit *
front size); the front is capped at MAX_STATES, and only if a cap or the time
limit ever thinned it is the plan reported FEASIBLE / TIME_LIMIT instead of
OPTIMAL. Every plan is checked against the exact peak before it is returned.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

import numpy as np

from solvers import arrays
from solvers.arrays import Arrays, Cover
from solvers.base import Solution, Status
from solvers.problem import Problem

MAX_STATES = 4096  # per boundary, before the front is thinned
LATE_STATES = 64  # per boundary once the time limit has passed
BIG = np.iinfo(np.int64).max // 4  # a tracked sum that no longer constrains anything
KEEP = -1  # the step that keeps a unit


@dataclass
class _Item:
    """A constraint freed >= need checked on the step covering unit `check`, tracked in V after `init`."""

    need: int
    x: int  # row index (rows) or tick (replays): where the freed bytes are counted
    init: int
    check: int
    option: int = KEEP  # replays: only checked when this option is chosen
    cover: Cover | None = None


@dataclass
class _Model:
    n_units: int
    steps: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # per unit a: opt, end, cost, total, thr
    tracked: list[_Item]
    live: list[list[int]]  # per boundary: the tracked items in V, in column order
    checked_inside: list[list[int]]  # per unit: tracked items initialised and checked within one step covering it
    cap: np.ndarray  # per boundary: the most S any later check can use
    option_first: np.ndarray
    memo: dict[tuple[int, int], int] = field(default_factory=dict)

    def freed(self, o: int, i: int) -> int:
        """Bytes option o frees where tracked item i is counted."""
        if o == KEEP:
            return 0
        key = (o, i)
        if key not in self.memo:
            item = self.tracked[i]
            self.memo[key] = int(item.cover.at(np.array([o]), np.array([item.x]))[0])
        return self.memo[key]


@dataclass
class _Front:
    cost: np.ndarray  # ms
    s: np.ndarray  # bytes, capped
    v: np.ndarray  # [states, live items] bytes, BIG once satisfied
    parent: np.ndarray  # index in the previous boundary's front
    origin: np.ndarray  # boundary it came from
    option: np.ndarray  # option of the step, KEEP for a kept unit


def solve(problem: Problem, time_limit_s: float = 10.0) -> Solution:
    start = time.perf_counter()
    if not problem.chain:
        raise ValueError("the dp solver needs a chain (problem.chain is False); use the 'ilp' solver for this graph")
    arr = arrays.of(problem)
    if not arr.option_is_interval.all():
        raise ValueError("the dp solver needs options over consecutive units; use the 'ilp' solver")
    model = _model(problem, arr)
    if model is None:
        return Solution((), Status.INFEASIBLE, solve_s=time.perf_counter() - start)
    fronts, thinned, late = _run(model, start + time_limit_s)
    solve_s = time.perf_counter() - start
    last = fronts[problem.n_units]
    if last is None or len(last.cost) == 0:
        return Solution((), Status.INFEASIBLE, solve_s=solve_s)
    chosen = _read_back(fronts, problem.n_units, int(np.argmin(last.cost)))
    peak = arrays.peak_bytes(arr, chosen)
    if peak > problem.budget_bytes or not problem.compatible(chosen):
        raise RuntimeError(f"dp's plan peaks at {peak} bytes over the budget of {problem.budget_bytes}: a bug")
    status = Status.TIME_LIMIT if late else Status.FEASIBLE if thinned else Status.OPTIMAL
    return Solution(chosen, status, solve_s=solve_s)


# ---------------------------------------------------------------- the items and the steps


def _model(problem: Problem, arr: Arrays) -> _Model | None:
    """Items, thresholds and steps; None when some row needs freeing that no option does."""
    n = problem.n_units
    first, last = arr.option_first_unit, arr.option_last_unit
    rows_cover, tick_cover = arrays.row_cover(arr), arrays.tick_cover(arr)
    # rows that the budget constrains
    row_need = arr.row_peak - problem.budget_bytes
    rows = np.flatnonzero(row_need > 0)
    row_b, row_e = _bounds(arr, arr.entry_row_lo, arr.entry_row_hi, rows)
    if (row_b < 0).any():
        return None
    row_init = np.minimum(row_e, row_b)
    # replays that the budget constrains, when their option is chosen
    replay_need = arr.option_replay_need - problem.budget_bytes
    reps = np.flatnonzero(replay_need > 0)
    ticks = arr.option_back[reps]
    rep_b, rep_e = _bounds(arr, arr.entry_death + 1, arr.entry_back, ticks)
    rep_check = np.where(rep_b > last[reps], rep_b, first[reps])
    rep_init = np.minimum(rep_e, first[reps])
    # regular items become thresholds on S, the others are tracked
    thr = np.full(arr.n_options, np.iinfo(np.int64).min // 4, dtype=np.int64)
    reg = row_init == row_b
    _row_thresholds(thr, arr, rows_cover, rows[reg], row_need[rows[reg]], row_b[reg], first, last)
    rreg = rep_init == rep_check
    self_freed = tick_cover.at(reps[rreg], ticks[rreg])
    np.maximum.at(thr, reps[rreg], replay_need[reps[rreg]] - self_freed)
    keep_thr = np.full(n, np.iinfo(np.int64).min // 4, dtype=np.int64)
    np.maximum.at(keep_thr, row_b[reg], row_need[rows[reg]])
    tracked = [
        _Item(int(row_need[k]), int(k), int(i), int(c), KEEP, rows_cover)
        for k, i, c in zip(rows[~reg], row_init[~reg], row_b[~reg])
    ] + [
        _Item(int(replay_need[o]), int(t), int(i), int(c), int(o), tick_cover)
        for o, t, i, c in zip(reps[~rreg], ticks[~rreg], rep_init[~rreg], rep_check[~rreg])
    ]
    live, inside = _live(n, tracked)
    cap = _cap(n, np.concatenate([row_b, rep_check]), np.concatenate([row_need[rows], replay_need[reps]]))
    steps = _steps(n, arr, thr, keep_thr)
    return _Model(n, steps, tracked, live, inside, cap, first)


def _bounds(arr: Arrays, lo: np.ndarray, hi: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query x: B, the largest first unit of an option freeing bytes at x (-1 if none), and E, the
    smallest last unit of an option freeing only part of its bytes there (n_units if none).

    Entry e of an option frees its bytes at x when lo[e] <= x <= hi[e].
    """
    opt, first, last = arr.entry_option, arr.option_first_unit, arr.option_last_unit
    # B: sweep the sorted queries over each option's entries grouped by hi (nested, so one interval each)
    valid = lo <= hi
    span = int(hi.max(initial=0)) + 2
    groups, where = np.unique(opt[valid] * span + hi[valid], return_inverse=True)
    g_lo = np.full(len(groups), np.iinfo(np.int64).max)
    np.minimum.at(g_lo, where.ravel(), lo[valid])
    b = _max_covering(queries, g_lo, groups % span, first[groups // span])
    # E: an option frees all its bytes at x when max lo <= x <= min hi
    n = arr.n_options
    all_lo, all_hi = np.full(n, np.iinfo(np.int64).min), np.full(n, np.iinfo(np.int64).max)
    np.maximum.at(all_lo, opt, lo)
    np.minimum.at(all_hi, opt, hi)
    has = arr.option_total > 0
    e = np.minimum(
        _min_where_above(all_lo[has], last[has], queries), _min_where_below(all_hi[has], last[has], queries)
    )
    return b, e


def _max_covering(queries: np.ndarray, lo: np.ndarray, hi: np.ndarray, key: np.ndarray) -> np.ndarray:
    """For each query x, the largest key among intervals with lo <= x <= hi, -1 if none."""
    order_q = np.argsort(queries, kind="stable")
    order_i = np.argsort(lo, kind="stable")
    lo_s, hi_s, key_s = lo[order_i].tolist(), hi[order_i].tolist(), key[order_i].tolist()
    out = np.full(len(queries), -1, dtype=np.int64)
    heap: list[tuple[int, int]] = []
    i = 0
    for q in order_q.tolist():
        x = int(queries[q])
        while i < len(lo_s) and lo_s[i] <= x:
            heapq.heappush(heap, (-key_s[i], hi_s[i]))
            i += 1
        while heap and heap[0][1] < x:
            heapq.heappop(heap)
        if heap:
            out[q] = -heap[0][0]
    return out


def _min_where_above(threshold: np.ndarray, value: np.ndarray, x: np.ndarray) -> np.ndarray:
    """min value[j] over threshold[j] > x, per x (large if none)."""
    order = np.argsort(threshold, kind="stable")
    t, v = threshold[order], value[order]
    suffix = np.minimum.accumulate(np.concatenate([v, [np.iinfo(np.int64).max // 4]])[::-1])[::-1]
    return suffix[np.searchsorted(t, x, side="right")]


def _min_where_below(threshold: np.ndarray, value: np.ndarray, x: np.ndarray) -> np.ndarray:
    """min value[j] over threshold[j] < x, per x (large if none)."""
    order = np.argsort(threshold, kind="stable")
    t, v = threshold[order], value[order]
    prefix = np.minimum.accumulate(np.concatenate([[np.iinfo(np.int64).max // 4], v]))
    return prefix[np.searchsorted(t, x, side="left")]


def _row_thresholds(thr, arr, cover, rows, need, check, first, last) -> None:
    """thr[o] >= need_k - freed_o(k) for each regular row k checked on a unit that o covers."""
    order = np.argsort(check, kind="stable")
    rows, need, check = rows[order], need[order], check[order]
    lo = np.searchsorted(check, first, side="left")
    hi = np.searchsorted(check, last, side="right")
    count = np.maximum(hi - lo, 0)
    pair_opt = np.repeat(np.arange(arr.n_options), count)
    pair_item = np.repeat(lo, count) + np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    np.maximum.at(thr, pair_opt, need[pair_item] - cover.at(pair_opt, rows[pair_item]))


def _live(n: int, tracked: list[_Item]) -> tuple[list[list[int]], list[list[int]]]:
    live: list[list[int]] = [[] for _ in range(n + 1)]
    inside: list[list[int]] = [[] for _ in range(n)]
    for i, item in enumerate(tracked):
        for a in range(item.init + 1, item.check + 1):
            live[a].append(i)
        inside[item.check].append(i)
    return live, inside


def _cap(n: int, check: np.ndarray, need: np.ndarray) -> np.ndarray:
    """cap[a]: the largest need checked at unit a or later (S beyond it changes nothing)."""
    cap = np.zeros(n + 2, dtype=np.int64)
    np.maximum.at(cap, check, need)
    return np.maximum.accumulate(cap[::-1])[::-1][: n + 1]


def _steps(n: int, arr: Arrays, thr: np.ndarray, keep_thr: np.ndarray):
    order = np.lexsort((arr.option_last_unit, arr.option_first_unit))
    starts = np.searchsorted(arr.option_first_unit[order], np.arange(n + 1))
    steps = []
    for a in range(n):
        o = order[starts[a] : starts[a + 1]]
        steps.append(
            (
                np.concatenate([[KEEP], o]),
                np.concatenate([[a], arr.option_last_unit[o]]),
                np.concatenate([[0.0], arr.option_cost_ms[o]]),
                np.concatenate([[0], arr.option_total[o]]),
                np.concatenate([[keep_thr[a]], thr[o]]),
            )
        )
    return steps


# ---------------------------------------------------------------- the scan


def _run(model: _Model, deadline: float) -> tuple[list[_Front | None], bool, bool]:
    n = model.n_units
    pending: list[list[_Front]] = [[] for _ in range(n + 1)]
    fronts: list[_Front | None] = [None] * (n + 1)
    zero = np.zeros(1, dtype=np.int64)
    pending[0].append(_Front(np.zeros(1), zero, np.zeros((1, 0), dtype=np.int64), zero, zero, zero))
    thinned = late = False
    for a in range(n + 1):
        if not pending[a]:
            continue
        if not late and time.perf_counter() > deadline:
            late = True
        front, cut = _pareto(_concat(pending[a]), LATE_STATES if late else MAX_STATES)
        thinned |= cut
        pending[a] = []
        fronts[a] = front
        if a < n:
            for step in zip(*model.steps[a]):
                child = _step(model, a, front, *step)
                if child is not None:
                    pending[int(step[1]) + 1].append(child)
    return fronts, thinned, late


def _step(model: _Model, a: int, front: _Front, o, b, cost, total, thr) -> _Front | None:
    """The states after taking option o (or keeping unit a) over units a..b from every state of the front."""
    o, b = int(o), int(b)
    ok = front.s >= thr
    target = model.live[b + 1]
    here = {i: c for c, i in enumerate(model.live[a])}
    checks = [i for p in range(a, b + 1) for i in model.checked_inside[p] if i not in here]
    columns = {}
    for i in list(here) + [i for i in target if i not in here] + checks:
        item = model.tracked[i]
        value = front.v[:, here[i]] if i in here else front.s
        if item.option != KEEP and a <= model.option_first[item.option] <= b and o != item.option:
            value = np.full(len(front.s), BIG)  # its option is not chosen: no replay to check
        else:
            value = np.where(value >= BIG, BIG, value + model.freed(o, i))
        if a <= item.check <= b:
            ok &= value >= item.need
        else:
            columns[i] = np.where(value >= item.need, BIG, value)
    if not ok.any():
        return None
    idx = np.flatnonzero(ok)
    v = np.stack([columns[i][idx] for i in target], axis=1) if target else np.zeros((len(idx), 0), np.int64)
    return _Front(
        front.cost[idx] + cost,
        np.minimum(front.s[idx] + total, model.cap[b + 1]),
        v,
        idx,
        np.full(len(idx), a),
        np.full(len(idx), o),
    )


def _concat(parts: list[_Front]) -> _Front:
    return _Front(*(np.concatenate([getattr(p, f) for p in parts]) for f in _Front.__dataclass_fields__))


def _pareto(f: _Front, max_states: int) -> tuple[_Front, bool]:
    """The non-dominated states (less cost, more S, more of each V), thinned to max_states; whether it thinned."""
    if f.v.shape[1] == 0:
        keep = _pareto_1d(f.cost, f.s, np.arange(len(f.cost)))
    else:
        key = np.where(f.v >= BIG, BIG, f.v - f.s[:, None])  # V - S: in one group, more S means more V
        _, group = np.unique(key, axis=0, return_inverse=True)
        group = group.ravel()
        free = np.flatnonzero((f.v >= BIG).all(axis=1))
        base = _pareto_1d(f.cost, f.s, free)
        kept = [base]
        for g in np.unique(group[np.setdiff1d(np.arange(len(group)), free)]):
            members = _pareto_1d(f.cost, f.s, np.flatnonzero(group == g))
            kept.append(members[~_dominated_by(f, base, members)])
        keep = np.concatenate(kept)
    cut = len(keep) > max_states
    if cut:
        keep = _thin(f, keep, max_states)
    return _Front(*(getattr(f, name)[keep] for name in _Front.__dataclass_fields__)), cut


def _pareto_1d(cost: np.ndarray, s: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Indices among idx with no other of no more cost and no less S, in order of cost."""
    if len(idx) == 0:
        return idx
    order = idx[np.lexsort((-s[idx], cost[idx]))]
    best = np.maximum.accumulate(s[order])
    return order[np.concatenate([[True], s[order][1:] > best[:-1]])]


def _dominated_by(f: _Front, base: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Whether a state of `base` (sorted by cost, S rising) has no more cost and no less S than each member."""
    if len(base) == 0:
        return np.zeros(len(members), dtype=bool)
    j = np.searchsorted(f.cost[base], f.cost[members], side="right") - 1
    return (j >= 0) & (f.s[base][np.maximum(j, 0)] >= f.s[members])


def _thin(f: _Front, keep: np.ndarray, max_states: int) -> np.ndarray:
    """Keep the cheapest state in each of max_states bands of S, and the largest S."""
    s = f.s[keep]
    band = (s - s.min()) * (max_states - 1) // max(int(s.max() - s.min()), 1)
    order = np.lexsort((f.cost[keep], band))
    first = np.concatenate([[True], band[order][1:] != band[order][:-1]])
    return np.union1d(keep[order[first]], keep[[int(np.argmax(s))]])


def _read_back(fronts: list[_Front | None], n: int, index: int) -> tuple[int, ...]:
    chosen = []
    a = n
    while a > 0:
        f = fronts[a]
        if f.option[index] != KEEP:
            chosen.append(int(f.option[index]))
        a, index = int(f.origin[index]), int(f.parent[index])
    return tuple(sorted(chosen))
