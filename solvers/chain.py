"""A chain problem as the dynamic programme (`solvers.dp`) sees it: steps, thresholds, tracked items.

A plan on a chain cuts the units into steps, each keeping unit a or taking an
option [a..b]. Each memory constraint (an *item*: a row, or the replay of an
option) is checked on the step covering unit `check`: as a threshold on S, the
freeing bytes of the options chosen before that step, when every earlier
option frees exactly its freeing bytes there; or, when not, on its own freed
sum, tracked from the step covering unit `init`. Bytes, ms, rows and ticks as
in `solvers.arrays`.

Example. A row that needs 7 bytes freed, where options A = [0] (4 bytes) and
B = [1..2] (6 bytes) free exactly their freeing bytes, is checked on the step
covering its last freeing unit, 2: taking B there needs S >= 7 - 6 = 1 before
it, keeping unit 2 needs S >= 7 (the step's threshold, `Steps.threshold`). Had
A freed only 2 of its 4 bytes in that row (an entry of A ends inside it), S
would not tell what is freed there: the row would be tracked instead, its own
freed sum carried in V from the step covering A's unit on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from solvers import arrays
from solvers.arrays import Arrays, Cover
from solvers.problem import Problem

BIG = np.iinfo(np.int64).max // 4  # a tracked sum that no longer constrains anything
KEEP = -1  # the step that keeps a unit


@dataclass
class Item:
    """A constraint freed >= need checked on the step covering unit `check`, tracked in V after `init`."""

    need: int
    x: int  # row index (rows) or tick (replays): where the freed bytes are counted
    init: int
    check: int
    option: int = KEEP  # replays: only checked when this option is chosen
    cover: Cover | None = None
    rows: bool = True  # x is a row (else a tick)
    least: int = 0  # bytes every option holding some at x holds there together (<= 0): later steps add no less


@dataclass(frozen=True)
class Steps:
    """The steps from one boundary a, keeping unit a first: arrays over the steps."""

    option: np.ndarray  # KEEP, then the options whose first unit is a
    last: np.ndarray  # the last unit each covers
    cost: np.ndarray  # ms
    freeing: np.ndarray  # bytes (held bytes left out)
    threshold: np.ndarray  # the least S before the step that the constraints checked on it need


class Landing(NamedTuple):
    """Where one step from a boundary leads, and what it adds."""

    boundary: int  # the boundary after it
    cost: float  # ms
    freeing: int  # bytes added to S
    option: int  # KEEP for a kept unit


@dataclass
class Model:
    """Everything the scan needs."""

    n_units: int
    steps: list[Steps]  # per boundary a < n_units
    tracked: list[Item]
    live: list[list[int]]  # per boundary: the tracked items in V, in key order
    cap: np.ndarray  # per boundary: the most S any later check can use
    option_first: np.ndarray
    row_cap: np.ndarray  # per boundary: the most bytes a row checked later needs freed (S must reach it)
    bound: LowerBound

    def __post_init__(self) -> None:
        # per tracked item, as arrays: need, least, check unit, option (KEEP for rows), its first unit
        self.item_need = np.array([t.need for t in self.tracked], dtype=np.int64)
        self.item_least = np.array([t.least for t in self.tracked], dtype=np.int64)
        self.item_check = np.array([t.check for t in self.tracked], dtype=np.int64)
        self.item_init = np.array([t.init for t in self.tracked], dtype=np.int64)
        self.item_option = np.array([t.option for t in self.tracked], dtype=np.int64)
        self.item_first = np.where(self.item_option != KEEP, self.option_first[np.maximum(self.item_option, 0)], -1)

    def reaches(self) -> list[Reach]:
        """Per unit a, what the steps from boundary a read, check or carry of the tracked items: those with
        init <= the last unit of a step from a (or an earlier boundary's) and check >= a."""
        n, items = self.n_units, len(self.tracked)
        count = np.array([len(step.option) for step in self.steps])
        furthest = np.maximum.accumulate([int(step.last.max()) for step in self.steps])
        # pairs (boundary a, item i), by a then i
        lo = np.searchsorted(furthest, self.item_init)
        span = np.maximum(self.item_check - lo + 1, 0)
        pair_a = np.repeat(lo, span) + _ranks(span)
        pair_item = np.repeat(np.arange(items), span)
        order = np.argsort(pair_a, kind="stable")
        pair_a, pair_item = pair_a[order], pair_item[order]
        per_a = np.bincount(pair_a, minlength=n)
        # queries (pair, step of its boundary), [items, steps] per boundary
        step_first = np.cumsum(count) - count
        q_pair = np.repeat(np.arange(len(pair_a)), count[pair_a])
        q_step = step_first[pair_a[q_pair]] + _ranks(count[pair_a])
        q_a, q_item = pair_a[q_pair], pair_item[q_pair]
        opt, end, cost, total = (np.concatenate([getattr(s, f) for s in self.steps]) for f in ("option", "last", "cost", "freeing"))
        q_opt, q_end = opt[q_step], end[q_step]
        first, check, option = self.item_first[q_item], self.item_check[q_item], self.item_option[q_item]
        dropped = (option != KEEP) & (q_a <= first) & (first <= q_end) & (q_opt != option)
        checked = (q_a <= check) & (check <= q_end)
        carried = (self.item_init[q_item] <= q_end) & (q_end < check)  # live after the step
        read = (checked | carried) & (q_opt != KEEP)  # where the step's freed bytes are needed
        freed = np.zeros(len(q_step), dtype=np.int64)
        covers = {id(t.cover): t.cover for t in self.tracked}
        which = np.array([list(covers).index(id(t.cover)) for t in self.tracked], dtype=np.int64)
        x = np.array([t.x for t in self.tracked], dtype=np.int64)
        for c, cover in enumerate(covers.values()):
            mine = read & (which[q_item] == c)
            freed[mine] = cover.at(q_opt[mine], x[q_item[mine]])
        need = self.item_need[q_item] - freed
        kept = freed - total[q_step]
        # per step: the rows of the items live after it (at boundary end + 1), padded
        width = max(map(len, self.live))
        live = np.full((n + 1, width), -1)
        for b, ids in enumerate(self.live):
            live[b, : len(ids)] = ids
        after = live[end + 1]  # [all steps, width]
        step_a = np.repeat(np.arange(n), count)
        pair_first = np.cumsum(per_a) - per_a
        rows = np.searchsorted(pair_a * (items + 1) + pair_item, (step_a * (items + 1))[:, None] + after)
        padded = after < 0
        rows = np.where(padded, 0, rows - pair_first[step_a][:, None])
        live_count = (~padded).sum(axis=1)
        steps = list(map(Landing._make, zip((end + 1).tolist(), cost.tolist(), total.tolist(), opt.tolist())))
        out, q = [], 0
        for a in range(n):
            ids = pair_item[pair_first[a] : pair_first[a] + per_a[a]]
            t = slice(step_first[a], step_first[a] + count[a])
            shape, w = (len(ids), int(count[a])), int(live_count[t].max())
            block = slice(q, q + shape[0] * shape[1])
            q = block.stop
            out.append(Reach(
                key_rows=np.searchsorted(ids, self.live[a]),
                need=need[block].reshape(shape),
                kept=kept[block].reshape(shape),
                least=self.item_least[ids],
                dropped=dropped[block].reshape(shape),
                checked=checked[block].reshape(shape),
                live_rows=rows[t, :w],
                padded=padded[t, :w],
                live_count=live_count[t].tolist(),
                steps=steps[t],
            ))
        return out


def _ranks(length: np.ndarray) -> np.ndarray:
    """0, 1, ..., length[0] - 1, 0, 1, ..., length[1] - 1, ..."""
    return np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)


@dataclass
class Reach:
    """The tracked items that the steps from boundary a read, check or carry (rows, in item order), and
    what does not depend on the states' key: arrays are [items, steps]."""

    key_rows: np.ndarray  # the row of each item in the key at a
    need: np.ndarray  # need - freed by the step: what the freed sum must reach before it
    kept: np.ndarray  # freed by the step - its freeing bytes: added to V - S
    least: np.ndarray  # [items]
    dropped: np.ndarray  # a replay whose option is not this step although it covers its first unit
    checked: np.ndarray  # checked on this step
    live_rows: np.ndarray  # [steps, W]: the rows of the items live after each step, padded with row 0
    padded: np.ndarray  # [steps, W]
    live_count: list[int]  # per step
    steps: list[Landing]  # per step


def model_of(problem: Problem, arr: Arrays) -> Model | None:
    """Items, thresholds and steps; None when some row needs freeing that no option does."""
    n = problem.n_units
    first, last = arr.option_first_unit, arr.option_last_unit
    rows_cover, tick_cover = arrays.row_cover(arr), arrays.tick_cover(arr)
    # rows that the budget constrains
    row_need = arr.row_peak - problem.budget_bytes
    held = arrays.freed_range(arr)[0]  # per row: bytes every option holding some there holds together
    rows = np.flatnonzero(row_need > held)  # held bytes may push a row over too
    row_b, row_e = _bounds(arr, arr.entry_row_lo, arr.entry_row_hi, rows)
    if (row_b < 0).any():
        return None
    row_init = np.minimum(row_e, row_b)
    # replays that the budget constrains, when their option is chosen
    replay_need = arr.option_replay_need - problem.budget_bytes
    reps = np.flatnonzero(replay_need > arrays.least_at(arr, arr.option_back))
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
        Item(int(row_need[k]), int(k), int(i), int(c), KEEP, rows_cover)
        for k, i, c in zip(rows[~reg], row_init[~reg], row_b[~reg])
    ] + [
        Item(int(replay_need[o]), int(t), int(i), int(c), int(o), tick_cover, rows=False)
        for o, t, i, c in zip(reps[~rreg], ticks[~rreg], rep_init[~rreg], rep_check[~rreg])
    ]
    live = _live(n, tracked)
    steps = _steps(n, arr, thr, keep_thr)
    least = np.zeros(len(tracked), dtype=np.int64)  # held bytes of every option holding some where counted
    is_row = np.array([item.rows for item in tracked], dtype=bool)
    x = np.array([item.x for item in tracked], dtype=np.int64)
    if len(tracked):
        least[is_row] = held[x[is_row]]
        least[~is_row] = arrays.least_at(arr, x[~is_row])
    cap = np.maximum(
        _cap(n, np.arange(n), np.array([step.threshold.max() for step in steps])),  # S above every later threshold
        _cap(n, np.array([i.init for i in tracked], dtype=np.int64), np.array([i.need for i in tracked]) - least),
    )
    for item, low in zip(tracked, least):
        item.least = int(low)
    row_cap = _cap(n, row_b, row_need[rows]).astype(np.float64)
    return Model(n, steps, tracked, live, cap, first, row_cap, LowerBound.of(arr, n))


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
    b = arrays.max_covering(queries, g_lo, groups % span, first[groups // span])
    # E: an option frees exactly its freeing bytes at x when all of them cover x (max lo <= x <= min hi)
    # and none of its held bytes do
    n = arr.n_options
    freeing, held = arr.entry_bytes > 0, arr.entry_bytes < 0
    all_lo, all_hi = np.full(n, np.iinfo(np.int64).min), np.full(n, np.iinfo(np.int64).max)
    np.maximum.at(all_lo, opt[freeing], lo[freeing])
    np.minimum.at(all_hi, opt[freeing], hi[freeing])
    has = arr.option_freeing > 0
    e = np.minimum(
        _min_where_above(all_lo[has], last[has], queries), _min_where_below(all_hi[has], last[has], queries)
    )
    holding = held & valid
    big = np.iinfo(np.int64).max // 4
    e = np.minimum(e, -arrays.max_covering(queries, lo[holding], hi[holding], -last[opt[holding]], none=-big))
    return b, e


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
    pair_item = np.repeat(lo, count) + _ranks(count)
    np.maximum.at(thr, pair_opt, need[pair_item] - cover.at(pair_opt, rows[pair_item]))


def _live(n: int, tracked: list[Item]) -> list[list[int]]:
    live: list[list[int]] = [[] for _ in range(n + 1)]
    for i, item in enumerate(tracked):
        for a in range(item.init + 1, item.check + 1):
            live[a].append(i)
    return live


def _cap(n: int, check: np.ndarray, need: np.ndarray) -> np.ndarray:
    """cap[a]: the largest need checked at unit a or later (S beyond it changes nothing)."""
    cap = np.zeros(n + 2, dtype=np.int64)
    np.maximum.at(cap, check, need)
    return np.maximum.accumulate(cap[::-1])[::-1][: n + 1]


def _steps(n: int, arr: Arrays, thr: np.ndarray, keep_thr: np.ndarray) -> list[Steps]:
    order = np.lexsort((arr.option_last_unit, arr.option_first_unit))
    starts = np.searchsorted(arr.option_first_unit[order], np.arange(n + 1))
    steps = []
    for a in range(n):
        o = order[starts[a] : starts[a + 1]]
        steps.append(
            Steps(
                option=np.concatenate([[KEEP], o]),
                last=np.concatenate([[a], arr.option_last_unit[o]]),
                cost=np.concatenate([[0.0], arr.option_cost_ms[o]]),
                freeing=np.concatenate([[0], arr.option_freeing[o]]),
                threshold=np.concatenate([[keep_thr[a]], thr[o]]),
            )
        )
    return steps


# ---------------------------------------------------------------- a lower bound on the cost still to pay


def _unit_shares(arr: Arrays, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each option split evenly over its units; per unit the concave hull of (ms, bytes) of its shares:
    bytes it frees at no cost, and the hull's segments (unit, bytes, ms) in order of falling bytes per ms."""
    first, length = arr.option_first_unit, arr.option_last_unit - arr.option_first_unit + 1
    o = np.flatnonzero(arr.option_freeing > 0)
    o = o[np.lexsort((-arr.option_freeing[o] / length[o], arr.option_cost_ms[o] / length[o]))]  # by share
    span = length[o]  # shares by ms, then by falling bytes; below, by unit (stably)
    unit = np.repeat(first[o], span) + _ranks(span)
    order = np.argsort(unit, kind="stable")
    unit = unit[order]
    nbytes = np.repeat(arr.option_freeing[o] / span, span)[order]
    ms = np.repeat(arr.option_cost_ms[o] / span, span)[order]
    # only shares freeing more than every cheaper share of their unit can be on its hull
    lifted = unit * (float(nbytes.max(initial=0.0)) + 1.0) + nbytes
    best_before = np.concatenate([[-1.0], np.maximum.accumulate(lifted)[:-1]])
    useful = (lifted > best_before) | (ms <= 0.0)
    unit, nbytes, ms = unit[useful], nbytes[useful], ms[useful]
    zero = ms <= 0.0
    free = np.zeros(n)
    np.maximum.at(free, unit[zero], nbytes[zero])
    # per unit, its free point (0, free) and its shares of some cost: bytes rise with ms
    heads = np.unique(unit[~zero])
    order = np.argsort(np.concatenate([heads, unit[~zero]]), kind="stable")
    unit = np.concatenate([heads, unit[~zero]])[order]
    nbytes = np.concatenate([free[heads], nbytes[~zero]])[order]
    ms = np.concatenate([np.zeros(len(heads)), ms[~zero]])[order]
    while True:  # drop every point on or below the chord of its neighbours until the hull is left
        inner = (unit[1:-1] == unit[:-2]) & (unit[1:-1] == unit[2:])
        below = inner & (
            (nbytes[1:-1] - nbytes[:-2]) * (ms[2:] - ms[:-2]) <= (nbytes[2:] - nbytes[:-2]) * (ms[1:-1] - ms[:-2])
        )
        if not below.any():
            break
        keep = np.concatenate([[True], ~below, [True]])
        unit, nbytes, ms = unit[keep], nbytes[keep], ms[keep]
    same = unit[1:] == unit[:-1]
    segments = (unit[1:][same], np.diff(nbytes)[same], np.diff(ms)[same])
    order = np.argsort(-(segments[1] / segments[2]), kind="stable")
    return free, *(column[order] for column in segments)


@dataclass
class LowerBound:
    """ms any plan still pays from boundary a to free `need` more bytes in all: every unit >= a takes
    a convex mix of its shares (a relaxation of choosing one option per unit)."""

    every: int
    tables: list[tuple[float, np.ndarray, np.ndarray]]  # per checkpoint: free bytes, cumulative bytes and ms

    @classmethod
    def of(cls, arr: Arrays, n: int, checkpoints: int = 256) -> LowerBound:
        free, unit, nbytes, ms = _unit_shares(arr, n)
        every = max(1, -(-n // checkpoints))
        tables = []
        for a in range(0, n + 1, every):
            m = unit >= a
            tables.append((float(free[a:].sum()), np.concatenate([[0.0], np.cumsum(nbytes[m])]),
                           np.concatenate([[0.0], np.cumsum(ms[m])])))
        return cls(every, tables)

    def __call__(self, a: int, need: np.ndarray) -> np.ndarray:
        free, nbytes, ms = self.tables[a // self.every]  # a checkpoint at or before a: more units, no more ms
        return np.interp(need - free, nbytes, ms, left=0.0, right=np.inf)  # bytes rise along the table
