"""A `Problem` as numpy arrays, and an exact, vectorised evaluator of a plan's peak.

`Problem.peak_bytes` states the memory model; `peak_bytes` here computes the
same number (tests check that they agree) in O((entries + rows) log) instead
of O(rows * entries), so solvers can check every plan they return on graphs
of thousands of units. Bytes are int64, times float64 (ms), ticks int64.

Rows are sorted by tick. Each freed entry covers a contiguous run of rows,
`[entry_row_lo, entry_row_hi]` (empty when lo > hi): the rows with
`death < first` (a suffix) and `last <= back` (a prefix).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter

import numpy as np

from solvers.problem import Problem

FIELDS = ("bytes", "death", "back")


@dataclass(frozen=True)
class Arrays:
    row_first: np.ndarray  # [R] tick, sorted
    row_last: np.ndarray  # [R] tick
    row_peak: np.ndarray  # [R] bytes, unplanned
    entry_option: np.ndarray  # [E] option index, sorted; entries with bytes != 0 and death < back only
    entry_bytes: np.ndarray  # [E]
    entry_death: np.ndarray  # [E] tick
    entry_back: np.ndarray  # [E] tick
    entry_row_lo: np.ndarray  # [E] first row covered
    entry_row_hi: np.ndarray  # [E] last row covered
    option_start: np.ndarray  # [O + 1] entries of option o are entry_start[o]:entry_start[o + 1]
    option_total: np.ndarray  # [O] bytes of all its entries
    option_freeing: np.ndarray  # [O] bytes of its freeing entries (held ones, negative, left out)
    option_back: np.ndarray  # [O] tick of the replay
    option_replay_need: np.ndarray  # [O] base_bytes + replay_peak_bytes
    option_cost_ms: np.ndarray  # [O]
    option_first_unit: np.ndarray  # [O]
    option_last_unit: np.ndarray  # [O]
    option_is_interval: np.ndarray  # [O] bool: its units are first..last, each once
    option_host: np.ndarray  # [O] bytes it holds in host memory (offloads)

    @property
    def n_options(self) -> int:
        return len(self.option_total)

    def entries(self, o: int) -> slice:
        return slice(int(self.option_start[o]), int(self.option_start[o + 1]))

    def row_of_tick(self, tick: np.ndarray) -> np.ndarray:
        """Index of the row holding each tick, -1 where no row does."""
        k = np.searchsorted(self.row_first, tick, side="right") - 1
        inside = (k >= 0) & (self.row_last[np.maximum(k, 0)] >= tick)
        return np.where(inside, k, -1)


def of(problem: Problem) -> Arrays:
    rows = sorted(problem.rows, key=lambda r: r.first)
    row_first = np.array([r.first for r in rows], dtype=np.int64)
    row_last = np.array([r.last for r in rows], dtype=np.int64)
    n = len(problem.options)
    count = np.fromiter((len(opt.freed) for opt in problem.options), dtype=np.int64, count=n)
    flat = list(itertools.chain.from_iterable(opt.freed for opt in problem.options))
    option = np.repeat(np.arange(n), count)
    nbytes, death, back = (np.fromiter(map(attrgetter(name), flat), np.int64, len(flat)) for name in FIELDS)
    kept = (nbytes != 0) & (death < back)  # the others never count
    option, nbytes, death, back = option[kept], nbytes[kept], death[kept], back[kept]
    first_unit, last_unit, is_interval = _unit_spans(problem)
    return Arrays(
        row_first=row_first,
        row_last=row_last,
        row_peak=np.array([r.peak_bytes for r in rows], dtype=np.int64),
        entry_option=option,
        entry_bytes=nbytes,
        entry_death=death,
        entry_back=back,
        entry_row_lo=np.searchsorted(row_first, death, side="right"),
        entry_row_hi=np.searchsorted(row_last, back, side="right") - 1,
        option_start=np.searchsorted(option, np.arange(n + 1)),
        option_total=_sum_by(option, nbytes, n),
        option_freeing=_sum_by(option, np.maximum(nbytes, 0), n),
        option_back=np.array([opt.back for opt in problem.options], dtype=np.int64),
        option_replay_need=np.array(
            [opt.base_bytes + opt.replay_peak_bytes for opt in problem.options], dtype=np.int64
        ),
        option_cost_ms=np.array([opt.cost_ms for opt in problem.options], dtype=np.float64),
        option_first_unit=first_unit,
        option_last_unit=last_unit,
        option_is_interval=is_interval,
        option_host=np.array([o.host_bytes for o in problem.options], dtype=np.int64).reshape(n),
    )


def _unit_spans(problem: Problem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per option: its first and last unit, and whether its units are first, first + 1, ..., last."""
    n = len(problem.options)
    units = [opt.units for opt in problem.options]
    count = np.fromiter(map(len, units), dtype=np.int64, count=n)
    flat = np.fromiter(itertools.chain.from_iterable(units), dtype=np.int64, count=int(count.sum()))
    owner = np.repeat(np.arange(n), count)
    starts = np.cumsum(count) - count
    first = np.full(n, -1, dtype=np.int64)
    last = np.full(n, -1, dtype=np.int64)
    has = count > 0
    first[has] = np.minimum.reduceat(flat, starts[has])
    last[has] = np.maximum.reduceat(flat, starts[has])
    steps_up = np.concatenate([[True], np.diff(flat) == 1])  # each unit follows the one before it
    steps_up[starts[has]] = True
    consecutive = np.ones(n, dtype=bool)
    np.logical_and.at(consecutive, owner, steps_up)
    return first, last, consecutive & has


def _sum_by(index: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Exact int64 sums of `values` grouped by `index` in [0, n)."""
    out = np.zeros(n, dtype=np.int64)
    np.add.at(out, index, values)
    return out


def chosen_entries(arr: Arrays, chosen: Sequence[int]) -> np.ndarray:
    """Indices of the entries of the chosen options."""
    if len(chosen) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(arr.option_start[o], arr.option_start[o + 1]) for o in chosen])


def freed_rows(arr: Arrays, chosen: Sequence[int]) -> np.ndarray:
    """Bytes the chosen options free through each row."""
    return _rows_sum(arr, chosen_entries(arr, chosen))


def freed_range(arr: Arrays) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the least and the most bytes any plan can free through it (held bytes count negative)."""
    e = np.arange(len(arr.entry_bytes))
    held = arr.entry_bytes < 0
    least = _rows_sum(arr, e[held])
    most = _rows_sum(arr, e[~held])
    return least, most


def least_at(arr: Arrays, ticks: np.ndarray) -> np.ndarray:
    """Per tick, the least bytes any plan can free there: every held byte, nothing freed."""
    held = arr.entry_bytes < 0
    deaths, backs = np.sort(arr.entry_death[held]), np.sort(arr.entry_back[held])
    nbytes = arr.entry_bytes[held]
    by_death = np.concatenate([[0], np.cumsum(nbytes[np.argsort(arr.entry_death[held], kind="stable")])])
    by_back = np.concatenate([[0], np.cumsum(nbytes[np.argsort(arr.entry_back[held], kind="stable")])])
    return by_death[np.searchsorted(deaths, ticks, side="left")] - by_back[np.searchsorted(backs, ticks, side="left")]


def _rows_sum(arr: Arrays, e: np.ndarray) -> np.ndarray:
    e = e[arr.entry_row_lo[e] <= arr.entry_row_hi[e]]
    diff = np.zeros(len(arr.row_first) + 1, dtype=np.int64)
    np.add.at(diff, arr.entry_row_lo[e], arr.entry_bytes[e])
    np.add.at(diff, arr.entry_row_hi[e] + 1, -arr.entry_bytes[e])
    return np.cumsum(diff[:-1])


def freed_at(arr: Arrays, chosen: Sequence[int], ticks: np.ndarray) -> np.ndarray:
    """Bytes the chosen options free at each tick: entries with death < tick <= back."""
    e = chosen_entries(arr, chosen)
    deaths, backs = np.sort(arr.entry_death[e]), np.sort(arr.entry_back[e])
    by_death = np.concatenate([[0], np.cumsum(arr.entry_bytes[e][np.argsort(arr.entry_death[e], kind="stable")])])
    by_back = np.concatenate([[0], np.cumsum(arr.entry_bytes[e][np.argsort(arr.entry_back[e], kind="stable")])])
    # every entry has death < back, so those gone back before the tick had died before it too
    return by_death[np.searchsorted(deaths, ticks, side="left")] - by_back[np.searchsorted(backs, ticks, side="left")]


def peak_bytes(arr: Arrays, chosen: Sequence[int]) -> int:
    """The same number as `Problem.peak_bytes(chosen)`."""
    peak = int(np.max(arr.row_peak - freed_rows(arr, chosen)))
    if len(chosen):
        o = np.asarray(chosen, dtype=np.int64)
        replays = arr.option_replay_need[o] - freed_at(arr, chosen, arr.option_back[o])
        peak = max(peak, int(replays.max()))
    return peak


@dataclass(frozen=True)
class Cover:
    """Bytes an option frees at a coordinate x, each entry covering `lo <= x <= hi` (rows or ticks).

    sum over its entries with lo <= x minus those with hi < x: exact because lo <= hi for every entry.
    """

    span: int
    lo_keys: np.ndarray
    lo_cum: np.ndarray
    hi_keys: np.ndarray
    hi_cum: np.ndarray

    @classmethod
    def of(cls, option: np.ndarray, lo: np.ndarray, hi: np.ndarray, nbytes: np.ndarray) -> Cover:
        keep = (lo <= hi) & (hi >= 0)
        option, lo, hi, nbytes = option[keep], np.maximum(lo[keep], 0), hi[keep], nbytes[keep]
        span = int(hi.max()) + 2 if len(hi) else 1
        tables = []
        for end in (lo, hi):
            keys = option * span + end
            order = np.argsort(keys, kind="stable")
            tables += [keys[order], np.concatenate([[0], np.cumsum(nbytes[order])])]
        return cls(span, *tables)

    def at(self, options: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Bytes options[i] frees at x[i] (arrays of one shape).

        Both tables sum the same entries of the options before options[i] first, which cancel."""
        key = np.asarray(options, dtype=np.int64) * self.span + np.clip(x, 0, self.span - 1)
        upto = self.lo_cum[np.searchsorted(self.lo_keys, key, side="right")]
        gone = self.hi_cum[np.searchsorted(self.hi_keys, key - 1, side="right")]
        return upto - gone


def row_cover(arr: Arrays) -> Cover:
    """Bytes freed through row k: entries covering rows entry_row_lo..entry_row_hi."""
    return Cover.of(arr.entry_option, arr.entry_row_lo, arr.entry_row_hi, arr.entry_bytes)


def tick_cover(arr: Arrays) -> Cover:
    """Bytes freed at tick t: entries with death < t <= back."""
    return Cover.of(arr.entry_option, arr.entry_death + 1, arr.entry_back, arr.entry_bytes)


def max_covering(queries: np.ndarray, lo: np.ndarray, hi: np.ndarray, key: np.ndarray, none: int = -1) -> np.ndarray:
    """For each query x, the largest key among intervals with lo <= x <= hi; `none` (below every key) if none.

    A segment tree over the sorted queries: each interval raises the O(log) nodes that tile its range of
    queries, all intervals at once level by level; a query's answer is the largest value on its root path.
    """
    order = np.argsort(queries, kind="stable")
    q = queries[order]
    size = 1 << max(1, int(len(q) - 1).bit_length())
    tree = np.full(2 * size, none, dtype=np.int64)
    left = np.searchsorted(q, lo, side="left") + size
    right = np.searchsorted(q, hi, side="right") + size  # exclusive
    value = key.astype(np.int64)
    while True:
        live = left < right
        if not live.any():
            break
        left, right, value = left[live], right[live], value[live]
        odd = (left & 1) == 1
        np.maximum.at(tree, left[odd], value[odd])
        left = left + odd
        odd = (right & 1) == 1
        np.maximum.at(tree, right[odd] - 1, value[odd])
        right = right - odd
        left, right = left >> 1, right >> 1
    best = tree.copy()
    for level in range(1, size.bit_length()):
        nodes = np.arange(1 << level, 1 << (level + 1))
        best[nodes] = np.maximum(best[nodes], best[nodes >> 1])
    out = np.empty(len(q), dtype=np.int64)
    out[order] = best[size : size + len(q)]
    return out
