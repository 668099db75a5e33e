"""Greedy: add the option that lowers the peak most per millisecond until the plan fits.

    repeat:  o* = argmax_{o compatible with C}  (peak(C) - peak(C + o)) / cost_o ;  C <- C + o*
    until    peak(C) <= budget   (FEASIBLE)   or no option lowers the peak (INFEASIBLE)

When no option lowers the peak (several rows share it), the one freeing the
most bytes per millisecond at the rows that hold the peak is added instead;
when none is left, an option may replace the chosen ones it overlaps (a
longer region instead of two short ones), if that lowers the peak.
On large graphs a round adds, with the best option, the next best compatible
ones scoring at least half as well while their estimated gains add up to
less than the excess over the budget (one per BATCH_UNITS units at most).
peak(C + o) is estimated in O(1) per option from the rows' memory with range
maxima (chosen replays move with the row that holds them, exact when rows are
cut at every entry's ends, as `build_problem` cuts them); the plan's own peak
is always exact, and the returned plan is checked against it. No optimality
claim: the status is FEASIBLE or INFEASIBLE.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from solvers import arrays
from solvers.arrays import Arrays
from planner.core.plan import Status
from solvers.base import Solution
from solvers.problem import Problem

NONE = np.iinfo(np.int64).min // 4  # below any memory
BATCH_UNITS = 50  # a round adds up to one option per this many units
SWAP_CANDIDATES = 200  # options tried as replacements when no compatible one helps


def solve(problem: Problem, time_limit_s: float = 10.0) -> Solution:
    start = time.perf_counter()
    arr = arrays.of(problem)
    chosen, peak = plan(problem, arr, problem.budget_bytes, start + time_limit_s)
    solve_s = time.perf_counter() - start
    if peak > problem.budget_bytes:
        return Solution((), Status.INFEASIBLE, solve_s=solve_s)
    return Solution(chosen, Status.FEASIBLE, solve_s=solve_s)


def plan(problem: Problem, arr: Arrays, target_bytes: int, deadline: float = float("inf")) -> tuple[tuple[int, ...], int]:
    """Greedy options until the peak is at most `target_bytes`; where nothing more helps (or the
    options chosen come round again: one lowered the rows but raised a replay's peak), the plan of
    the lowest peak seen. The plan and its exact peak."""
    state = _State.of(problem, arr)
    seen: set[tuple[int, ...]] = set()
    lowest = ((), state.peak())
    while state.peak() > target_bytes and time.perf_counter() < deadline:
        batch = state.best(target_bytes)
        if not batch:
            batch = _swap(problem, arr, state)
            if batch is None:
                break
            state = _State.of(problem, arr)
        for o in batch:
            state.add(o)
        chosen = tuple(sorted(state.chosen))
        if chosen in seen:
            break
        seen.add(chosen)
        if state.peak() < lowest[1]:
            lowest = (chosen, state.peak())
    chosen, peak = (tuple(sorted(state.chosen)), state.peak()) if state.peak() <= target_bytes else lowest
    assert peak == arrays.peak_bytes(arr, chosen), "greedy's running peak disagrees with the evaluator"
    return chosen, peak


def _swap(problem: Problem, arr: Arrays, state: _State) -> list[int] | None:
    """When no compatible option lowers the peak: the plan where one more option replaces the chosen
    ones it overlaps, lowering the peak most per ms added (of SWAP_CANDIDATES freeing most per ms)."""
    peak, chosen = state.peak(), set(state.chosen)
    cand = np.flatnonzero(~state.usable & (arr.option_freeing > 0))
    cand = cand[~np.isin(cand, state.chosen)]
    ratio = arr.option_freeing[cand] / np.maximum(arr.option_cost_ms[cand], 1e-12)
    best, best_score = None, 0.0
    for o in cand[np.argsort(-ratio, kind="stable")[:SWAP_CANDIDATES]].tolist():
        units = set(state.option_units[o])
        kept = [c for c in chosen if not units & set(state.option_units[c])]
        if problem.host_budget_bytes is not None and problem.host_bytes([*kept, o]) > problem.host_budget_bytes:
            continue
        gain = peak - arrays.peak_bytes(arr, [*kept, o])
        added = arr.option_cost_ms[o] - sum(arr.option_cost_ms[c] for c in chosen if c not in kept)
        score = gain / max(added, 1e-12)
        if gain > 0 and score > best_score:
            best, best_score = [*kept, o], score
    return best


@dataclass
class _Static:
    """Per option: the rows its entries cover, fully freed and partly freed ones; rows as in `solvers.arrays`."""

    lo: np.ndarray  # first row some entry covers
    hi: np.ndarray  # last row some entry covers
    full_lo: np.ndarray  # first row every freeing entry covers (and no held one): it frees its freeing bytes there
    full_hi: np.ndarray  # last such row; full_lo > full_hi where there is none
    part_option: np.ndarray  # options with partial rows
    part_start: np.ndarray  # where each of them starts among the (row, bytes) pairs
    part_row: np.ndarray  # partial (row, bytes) pairs, grouped by option
    part_bytes: np.ndarray
    by_back: np.ndarray  # options in order of back tick
    backs: np.ndarray  # their back ticks, sorted
    tick_row: np.ndarray  # row holding each option's back tick, -1 if none
    self_freed: np.ndarray  # bytes an option frees at its own back tick


def _static(arr: Arrays) -> _Static:
    n, rows = arr.n_options, len(arr.row_first)
    e_lo, e_hi, opt = arr.entry_row_lo, arr.entry_row_hi, arr.entry_option
    nonempty = e_lo <= e_hi
    lo, hi = np.full(n, rows), np.full(n, -1)
    np.minimum.at(lo, opt[nonempty], e_lo[nonempty])
    np.maximum.at(hi, opt[nonempty], e_hi[nonempty])
    # full rows: covered by every freeing entry and no held one (held rows are listed as partial below)
    freeing = arr.entry_bytes > 0
    full_lo, full_hi = np.full(n, -1), np.full(n, rows)
    np.maximum.at(full_lo, opt[freeing], e_lo[freeing])
    np.minimum.at(full_hi, opt[freeing], e_hi[freeing])
    freeing_lo, freeing_hi = np.full(n, rows), np.full(n, -1)  # the rows some freeing entry covers
    np.minimum.at(freeing_lo, opt[freeing & nonempty], e_lo[freeing & nonempty])
    np.maximum.at(freeing_hi, opt[freeing & nonempty], e_hi[freeing & nonempty])
    has_full = full_lo <= full_hi
    # partial rows: [freeing_lo, full_lo) and (full_hi, freeing_hi] when some row is full, else all of [freeing_lo, freeing_hi]; held rows
    held = (arr.entry_bytes < 0) & nonempty
    seg_lo = np.concatenate([freeing_lo, np.where(has_full, full_hi + 1, freeing_hi + 1), e_lo[held]])
    seg_hi = np.concatenate([np.where(has_full, full_lo - 1, freeing_hi), freeing_hi, e_hi[held]])
    seg_opt = np.concatenate([np.arange(n), np.arange(n), opt[held]])
    length = np.maximum(seg_hi - seg_lo + 1, 0)
    order = np.argsort(seg_opt, kind="stable")
    seg_lo, length, seg_opt = seg_lo[order], length[order], seg_opt[order]
    part_option = np.repeat(seg_opt, length)
    offsets = np.repeat(np.cumsum(length) - length, length)
    part_row = np.repeat(seg_lo, length) + np.arange(len(part_option)) - offsets
    part_bytes = arrays.row_cover(arr).at(part_option, part_row)
    part_options, part_start = np.unique(part_option, return_index=True)
    by_back = np.argsort(arr.option_back, kind="stable")
    return _Static(
        lo=lo,
        hi=hi,
        full_lo=full_lo,
        full_hi=full_hi,
        part_option=part_options,
        part_start=part_start,
        part_row=part_row,
        part_bytes=part_bytes,
        by_back=by_back,
        backs=arr.option_back[by_back],
        tick_row=arr.row_of_tick(arr.option_back),
        self_freed=arrays.tick_cover(arr).at(np.arange(n), arr.option_back),
    )


@dataclass
class _State:
    arr: Arrays
    static: _Static
    mem: np.ndarray  # bytes per row with the chosen options
    freed_back: np.ndarray  # per option: bytes the chosen options free at its back tick
    usable: np.ndarray  # per option: compatible with the chosen ones, frees something
    chosen: list[int]
    option_units: list[tuple[int, ...]]
    unit_options: dict[int, np.ndarray]  # per unit: the options using it
    batch_max: int  # options added per round
    host_left: float  # host memory the chosen offloads leave (inf: no bound)

    @classmethod
    def of(cls, problem: Problem, arr: Arrays) -> _State:
        static = _static(arr)
        unit_options: dict[int, list[int]] = {}
        for o, option in enumerate(problem.options):
            for u in option.units:
                unit_options.setdefault(u, []).append(o)
        host_left = float("inf") if problem.host_budget_bytes is None else float(problem.host_budget_bytes)
        return cls(
            arr=arr,
            static=static,
            mem=arr.row_peak.copy(),
            freed_back=np.zeros(arr.n_options, dtype=np.int64),
            usable=(arr.option_freeing > 0) & (arr.option_host <= host_left),
            chosen=[],
            option_units=[option.units for option in problem.options],
            unit_options={u: np.array(v) for u, v in unit_options.items()},
            batch_max=max(1, problem.n_units // BATCH_UNITS),
            host_left=host_left,
        )

    def replays(self) -> np.ndarray:
        c = np.array(self.chosen, dtype=np.int64)
        return self.arr.option_replay_need[c] - self.freed_back[c]

    def peak(self) -> int:
        replays = self.replays()
        return int(max(self.mem.max(), replays.max() if len(replays) else NONE))

    def best(self, target_bytes: int) -> list[int]:
        """Options to add next: the best and, on large graphs, the next best compatible ones scoring at
        least half as well, while their estimated gains add up to less than the way left to the target;
        none when nothing lowers the peak or frees bytes where it is."""
        s, arr = self.static, self.arr
        c = np.array(self.chosen, dtype=np.int64)
        eff, loose = self.mem.copy(), NONE
        if len(c):
            rows, values = s.tick_row[c], self.replays()
            np.maximum.at(eff, rows[rows >= 0], values[rows >= 0])
            loose = int(values[rows < 0].max()) if (rows < 0).any() else NONE
        peak = max(int(eff.max()), loose)
        cand = np.flatnonzero(self.usable)
        if len(cand) == 0:
            return []
        est = _estimate(eff, s, arr, cand, self.freed_back)
        est = np.maximum(est, loose)
        gain = peak - est
        cost = arr.option_cost_ms[cand]
        if (gain > 0).any():
            score = np.where(gain > 0, gain / np.maximum(cost, 1e-12), -np.inf)
            return self._batch(cand, score, gain, peak - target_bytes)
        one = self._at_peak(eff, peak, cand, cost) if loose < peak else None
        return [] if one is None else [one]

    def _batch(self, cand: np.ndarray, score: np.ndarray, gain: np.ndarray, excess: int) -> list[int]:
        order = np.argsort(-score, kind="stable")
        good = np.count_nonzero(score >= score[order[0]] / 2)
        batch, used, total, host = [], set(), 0, 0
        for i in order[:good].tolist():
            units = set(self.option_units[cand[i]])
            held = int(self.arr.option_host[cand[i]])
            if units & used or host + held > self.host_left:
                continue
            if batch and (total + gain[i] > excess or len(batch) >= self.batch_max):
                break
            batch.append(int(cand[i]))
            used |= units
            total += int(gain[i])
            host += held
        return batch

    def _at_peak(self, eff: np.ndarray, peak: int, cand: np.ndarray, cost: np.ndarray) -> int | None:
        """The option freeing most bytes per ms through rows at the peak (several rows hold it)."""
        s = self.static
        at_peak = np.concatenate([[0], np.cumsum(eff == peak)])
        full_lo, full_hi = s.full_lo[cand], s.full_hi[cand]
        count = np.where(full_lo <= full_hi, at_peak[np.clip(full_hi + 1, 0, len(eff))] - at_peak[np.clip(full_lo, 0, len(eff))], 0)
        if not (count > 0).any():
            return None
        score = count * self.arr.option_freeing[cand] / np.maximum(cost, 1e-12)
        return int(cand[np.argmax(score)])

    def add(self, o: int) -> None:
        arr = self.arr
        span = arr.entries(o)
        for lo, hi, b in zip(arr.entry_row_lo[span], arr.entry_row_hi[span], arr.entry_bytes[span]):
            if lo <= hi:
                self.mem[lo : hi + 1] -= b
        # options whose back tick falls in (death, back] of one of o's entries: o frees those bytes there
        s = self.static
        diff = np.zeros(arr.n_options + 1, dtype=np.int64)
        np.add.at(diff, np.searchsorted(s.backs, arr.entry_death[span], side="right"), arr.entry_bytes[span])
        np.add.at(diff, np.searchsorted(s.backs, arr.entry_back[span], side="right"), -arr.entry_bytes[span])
        self.freed_back[s.by_back] += np.cumsum(diff[:-1])
        self.chosen.append(o)
        for u in self.option_units[o]:
            self.usable[self.unit_options[u]] = False
        self.host_left -= int(arr.option_host[o])
        self.usable &= arr.option_host <= self.host_left


def _estimate(eff: np.ndarray, s: _Static, arr: Arrays, cand: np.ndarray, freed_back: np.ndarray) -> np.ndarray:
    """Estimated peak with each candidate added."""
    rows = len(eff)
    prefix = np.maximum.accumulate(eff)
    suffix = np.maximum.accumulate(eff[::-1])[::-1]
    lo, hi, full_lo, full_hi = s.lo[cand], s.hi[cand], s.full_lo[cand], s.full_hi[cand]
    covered = lo <= hi
    left = np.where(covered & (lo > 0), prefix[np.clip(lo - 1, 0, rows - 1)], NONE)
    right = np.where(covered & (hi < rows - 1), suffix[np.clip(hi + 1, 0, rows - 1)], NONE)
    outside = np.where(covered, np.maximum(left, right), prefix[-1])
    has_full = full_lo <= full_hi
    full = np.full(len(cand), NONE, dtype=np.int64)
    full[has_full] = _range_max(eff, full_lo[has_full], full_hi[has_full]) - arr.option_freeing[cand[has_full]]
    partial = np.full(arr.n_options, NONE, dtype=np.int64)
    if len(s.part_option):
        partial[s.part_option] = np.maximum.reduceat(eff[s.part_row] - s.part_bytes, s.part_start)
    own = arr.option_replay_need[cand] - freed_back[cand] - s.self_freed[cand]
    return np.maximum.reduce([outside, full, partial[cand], own])


def _range_max(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """max(values[lo[i]:hi[i] + 1]) for each i, with a sparse table."""
    table = [values]
    while (1 << len(table)) <= len(values):
        prev, half = table[-1], 1 << (len(table) - 1)
        table.append(np.maximum(prev[:-half], prev[half:]))
    level = np.floor(np.log2(hi - lo + 1)).astype(np.int64)
    out = np.empty(len(lo), dtype=values.dtype)
    for j in np.unique(level):
        m = level == j
        out[m] = np.maximum(table[j][lo[m]], table[j][hi[m] - (1 << j) + 1])
    return out
