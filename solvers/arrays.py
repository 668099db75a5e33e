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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from solvers.problem import Problem


@dataclass(frozen=True)
class Arrays:
    row_first: np.ndarray  # [R] tick, sorted
    row_last: np.ndarray  # [R] tick
    row_peak: np.ndarray  # [R] bytes, unplanned
    entry_option: np.ndarray  # [E] option index, sorted; entries with bytes > 0 and death < back only
    entry_bytes: np.ndarray  # [E]
    entry_death: np.ndarray  # [E] tick
    entry_back: np.ndarray  # [E] tick
    entry_row_lo: np.ndarray  # [E] first row covered
    entry_row_hi: np.ndarray  # [E] last row covered
    option_start: np.ndarray  # [O + 1] entries of option o are entry_start[o]:entry_start[o + 1]
    option_total: np.ndarray  # [O] bytes of all its entries
    option_back: np.ndarray  # [O] tick of the replay
    option_replay_need: np.ndarray  # [O] base_bytes + replay_peak_bytes
    option_cost_ms: np.ndarray  # [O]
    option_first_unit: np.ndarray  # [O]
    option_last_unit: np.ndarray  # [O]
    option_is_interval: np.ndarray  # [O] bool: its units are first..last, each once

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
    kept = [
        (o, f.bytes, f.death, f.back)
        for o, opt in enumerate(problem.options)
        for f in opt.freed
        if f.bytes > 0 and f.death < f.back
    ]
    entry = np.array(kept, dtype=np.int64).reshape(-1, 4)
    n = len(problem.options)
    option, nbytes, death, back = entry.T
    units = [opt.units for opt in problem.options]
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
        option_back=np.array([opt.back for opt in problem.options], dtype=np.int64),
        option_replay_need=np.array(
            [opt.base_bytes + opt.replay_peak_bytes for opt in problem.options], dtype=np.int64
        ),
        option_cost_ms=np.array([opt.cost_ms for opt in problem.options], dtype=np.float64),
        option_first_unit=np.array([min(u) if u else -1 for u in units], dtype=np.int64),
        option_last_unit=np.array([max(u) if u else -1 for u in units], dtype=np.int64),
        option_is_interval=np.array(
            [bool(u) and sorted(u) == list(range(min(u), max(u) + 1)) for u in units], dtype=bool
        ),
    )


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
    e = chosen_entries(arr, chosen)
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
        """Bytes options[i] frees at x[i] (arrays of one shape)."""
        base = np.asarray(options, dtype=np.int64) * self.span
        x = np.clip(x, 0, self.span - 1)
        first_lo = np.searchsorted(self.lo_keys, base, side="left")
        first_hi = np.searchsorted(self.hi_keys, base, side="left")
        upto = self.lo_cum[np.searchsorted(self.lo_keys, base + x, side="right")] - self.lo_cum[first_lo]
        gone = self.hi_cum[np.searchsorted(self.hi_keys, base + x - 1, side="right")] - self.hi_cum[first_hi]
        return upto - gone


def row_cover(arr: Arrays) -> Cover:
    """Bytes freed through row k: entries covering rows entry_row_lo..entry_row_hi."""
    return Cover.of(arr.entry_option, arr.entry_row_lo, arr.entry_row_hi, arr.entry_bytes)


def tick_cover(arr: Arrays) -> Cover:
    """Bytes freed at tick t: entries with death < t <= back."""
    return Cover.of(arr.entry_option, arr.entry_death + 1, arr.entry_back, arr.entry_bytes)
