"""Synthetic training steps of any length, built straight into a `Problem` (no torch, no profile):
the problems the solvers are tested and benchmarked on.

    problem = training_step(1_000, skips=False, seed=0)                   # as `bench.solver_scaling` times
    problem = training_step(6, skips=True, seed=3, max_plans=1500)        # small enough for a brute force

Each unit saves a few groups of bytes in its forward: its own (dead at the end
of its forward), some shared with the next unit (dead at the end of the next
unit's forward, released only by a region holding both), some outputs of
expensive operators (kept saved by the save-ops variant of a recompute).
Backward runs in reverse unit order and frees each unit's groups at its end,
while gradients pile up until the optimizer step; each unit also has a
transient in forward and a larger one in backward. The options are those
`build_problem` offers: offload each unit (back one unit ahead of its
backward, copy time hidden behind the next unit's compute where it can be),
and recompute runs of up to `max_segment_units` units (16) along segment links, in full and keeping
expensive outputs; a replay peaks at what it saves again plus a forward
transient; a region holds its input (made by the unit before it) a
little longer, until its backward is over (negative freed bytes). With `skips`, one link in every 3 to 6 is a skip (a
residual join): no region spans it, and a group of the unit before it stays
alive until a later unit reads it, so its death lies past its region.

For tests, `max_plans` drops options at random until at most that many sets of
compatible options remain; `aligned` False cuts the rows at only some of the
ticks where an entry starts or stops; `scrambled` draws every option's deaths,
backs and freed bytes (some negative) and the memory curve at random, so that
nothing but the formula of `Problem.peak_bytes` holds.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from planner.core.actions import Action, Choice, Kept
from solvers.problem import MAX_SEGMENT_UNITS, Freed, Option, Problem, Row

W = 6  # ticks per unit in each phase
HOST_BYTES_PER_MS = 24e6  # PCIe-class copies, bytes per ms


def training_step(
    n_units: int,
    *,
    skips: bool,
    seed: int = 0,
    budget_share: float = 0.5,
    max_segment_units: int = MAX_SEGMENT_UNITS,
    max_plans: int | None = None,
    aligned: bool = True,
    scrambled: bool = False,
) -> Problem:
    """A step of `n_units` units whose budget is `budget_share` of the way from the least peak any option
    set could reach down to (a bound) up to the unplanned peak (below 0: no plan fits); regions span
    at most `max_segment_units` units."""
    rng = np.random.default_rng(seed)
    extra = np.random.default_rng([seed, 1])  # for what tests ask for, so that the rest stays as it was
    units = _units(rng, n_units, skips)
    fwd_end = W * np.arange(n_units) + W - 1
    bwd_start = W * n_units + W * (n_units - 1 - np.arange(n_units)) + 1
    end_tick = 2 * W * n_units + W
    options = []
    for u in range(n_units):
        options += _options_at(u, units, fwd_end, bwd_start, max_segment_units)
    if max_plans is not None:
        options = _thin(extra, n_units, options, max_plans)
    curve = _curve(rng, units, bwd_start, end_tick)
    if scrambled:
        options = [_scrambled(extra, o, end_tick) for o in options]
        curve = curve.min() + extra.integers(0, curve.max() - curve.min() + 1, size=curve.size)
    rows = _rows(options, curve, end_tick, None if aligned else extra)
    options = [replace(o, base_bytes=int(curve[o.back])) for o in options]
    unplanned = max(r.peak_bytes for r in rows)
    lowest = _lowest_bound(options, rows)
    budget = int(lowest + budget_share * (unplanned - lowest))
    chain = not any(u["skip_after"] for u in units[:-1])
    return Problem(n_units, tuple(options), rows, budget, unplanned, float(sum(u["ms"] * 3 for u in units)), chain)


def _units(rng: np.random.Generator, n: int, skips: bool) -> list[dict]:
    width = rng.choice([1, 2, 4], size=n, p=[0.5, 0.3, 0.2]) * 2**20  # bytes of a typical activation
    units = []
    next_skip = int(rng.integers(3, 7))
    for u in range(n):
        own = [int(width[u] * rng.uniform(0.5, 1.5)) for _ in range(int(rng.integers(1, 4)))]
        expensive = int(width[u] * rng.uniform(0.5, 2.0)) if rng.random() < 0.5 else 0
        skip_after = skips and u == next_skip
        if skip_after:
            next_skip += int(rng.integers(3, 7))
        shared = int(width[u] * rng.uniform(0.3, 1.0)) if u + 1 < n and not skip_after and rng.random() < 0.3 else 0
        ms = (sum(own) + expensive + shared) / 2**20 * rng.uniform(0.005, 0.03)
        units.append(
            {
                "own": own,
                "expensive": expensive,
                "expensive_ms": ms * 0.6 if expensive else 0.0,
                "shared": shared,
                "skip_after": skip_after,
                "skip_reach": int(rng.integers(2, 5)) if skip_after else 0,  # the join reads it this many units later
                "ms": ms,
            }
        )
    return units


def _options_at(u: int, units: list[dict], fwd_end: np.ndarray, bwd_start: np.ndarray, max_units: int) -> list[Option]:
    n = len(units)
    options = []
    off = _released(u, u, units, fwd_end, offload=True, save=False)
    copy_ms = sum(off.values()) / HOST_BYTES_PER_MS
    nxt = units[u + 1] if u + 1 < n else {"ms": 0.0}
    back = int(bwd_start[u + 1]) if u + 1 < n else W * n
    cost = max(0.0, copy_ms - nxt["ms"]) + max(0.0, copy_ms - 2 * nxt["ms"])
    options.append(_option(Action.OFFLOAD, (u,), off, back, sum(off.values()), cost, frozenset()))
    end = u
    while True:
        region = tuple(range(u, end + 1))
        ms = sum(units[i]["ms"] for i in region)
        transient = max(max(units[i]["own"]) for i in region)  # the replayed forward's own transient
        allocated = sum(sum(units[i]["own"]) + units[i]["expensive"] + units[i]["shared"] for i in region) + transient
        full = _released(u, end, units, fwd_end, offload=False, save=False)
        held = _held(u, end, units, bwd_start)
        options.append(_option(Action.RECOMPUTE, region, full, int(bwd_start[end]), allocated, ms, frozenset(), held))
        kept = sum(units[i]["expensive"] for i in region)
        if kept:
            saved = _released(u, end, units, fwd_end, offload=False, save=True)
            ms_saved = ms - sum(units[i]["expensive_ms"] for i in region)
            options.append(
                _option(Action.RECOMPUTE, region, saved, int(bwd_start[end]), allocated - kept, ms_saved, frozenset(Kept(i, "aten.mm") for i in region), held)
            )
        if end + 1 - u >= max_units or end + 1 >= n or units[end]["skip_after"]:
            return [o for o in options if o.freed]
        end += 1


def _released(first: int, last: int, units: list[dict], fwd_end: np.ndarray, offload: bool, save: bool) -> dict[int, int]:
    """{death tick: bytes} of the groups that leave the device when units first..last are offloaded or recomputed."""
    freed: dict[int, int] = {}

    def add(tick: int, nbytes: int) -> None:
        freed[tick] = freed.get(tick, 0) + nbytes

    for i in range(first, last + 1):
        unit = units[i]
        death = int(fwd_end[min(i + unit["skip_reach"], len(units) - 1)])  # a skip's input lives until the join
        for b in unit["own"]:
            add(death, b)
        if unit["expensive"] and not save:
            add(death, unit["expensive"])
        if unit["shared"] and not offload and i + 1 <= last:
            add(int(fwd_end[i + 1]), unit["shared"])
    return freed


def _held(first: int, last: int, units: list[dict], bwd_start: np.ndarray) -> tuple[Freed, ...]:
    """The region's input, made by the unit before it, stays until the region's backward is over
    instead of leaving when the backward of the region's first unit starts."""
    if first == 0:
        return ()
    nbytes = max(units[first - 1]["own"])
    return (Freed(-nbytes, int(bwd_start[first]), int(bwd_start[first]) + W - 1),)


def _option(action, units, freed, back, allocated, cost, save_ops, held=()) -> Option:
    entries = tuple(Freed(b, d, back) for d, b in sorted(freed.items()) if d < back) + tuple(held)
    host = allocated if action is Action.OFFLOAD else 0  # an offload's copies wait in host memory
    return Option(Choice(action, units, save_ops), entries, back, 0, allocated, cost, host)


def _curve(rng: np.random.Generator, units: list[dict], bwd_start: np.ndarray, end_tick: int) -> np.ndarray:
    """Unplanned bytes alive at each tick."""
    delta = np.zeros(end_tick + 2, dtype=np.int64)
    total = 0
    for u, unit in enumerate(units):
        saved = sum(unit["own"]) + unit["expensive"] + unit["shared"]
        total += saved
        delta[W * u + 1] += saved
        delta[bwd_start[u] + W - 1] -= saved  # freed at the end of its backward
        grad = saved // 4
        delta[bwd_start[u] + 2] += grad  # parameter gradients until the optimizer step
        delta[end_tick - 1] -= grad
    curve = np.cumsum(delta)[: end_tick + 1] + total // 3  # parameters and optimizer state
    for u, unit in enumerate(units):
        width = max(unit["own"])
        curve[W * u + 3] += width  # a forward transient
        curve[bwd_start[u] + 3] += 2 * width  # a backward transient (input gradients)
    return curve


def _rows(options: list[Option], curve: np.ndarray, end_tick: int, rng: np.random.Generator | None) -> tuple[Row, ...]:
    """Rows cut wherever an entry starts or stops, as `build_problem` cuts them (with `rng`, at some of those ticks)."""
    cuts = set()
    for o in options:
        for f in o.freed:
            cuts |= {f.death + 1, f.back + 1}
    if rng is not None:
        cuts = {c for c in sorted(cuts) if rng.random() < 0.5}
    cuts = np.array(sorted({0, end_tick + 1} | {c for c in cuts if 0 < c <= end_tick + 1}))
    peaks = np.maximum.reduceat(curve, cuts[:-1])
    return tuple(Row(int(a), int(b) - 1, int(p)) for a, b, p in zip(cuts[:-1], cuts[1:], peaks))


def _scrambled(rng: np.random.Generator, option: Option, end_tick: int) -> Option:
    """The option with random entries: freed from a random tick to a later one, some held (negative)."""
    entries = []
    for _ in range(int(rng.integers(1, 4))):
        death = int(rng.integers(0, end_tick - 1))
        nbytes = int(rng.integers(1, 40)) * 2**16 * (-1 if rng.random() < 0.15 else 1)
        entries.append(Freed(nbytes, death, int(rng.integers(death + 1, end_tick))))
    return replace(option, freed=tuple(entries), back=int(rng.integers(1, end_tick)))


def _thin(rng: np.random.Generator, n_units: int, options: list[Option], max_plans: int) -> list[Option]:
    """Options dropped at random until at most `max_plans` sets of compatible ones remain."""
    options = list(options)
    while count_plans(n_units, options) > max_plans:
        options.pop(int(rng.integers(len(options))))
    return options


def count_plans(n_units: int, options: list[Option]) -> int:
    """Sets of compatible options, for options over consecutive units."""
    by_first: dict[int, list[int]] = {}
    for o in options:
        by_first.setdefault(min(o.units), []).append(len(o.units))
    count = [0] * (n_units + 1)
    count[n_units] = 1
    for u in reversed(range(n_units)):
        count[u] = count[u + 1] + sum(count[u + length] for length in by_first.get(u, []))
    return count[0]


def _lowest_bound(options: list[Option], rows: tuple[Row, ...]) -> int:
    """No plan peaks below the rows' peaks minus all that any option frees there."""
    first = np.array([r.first for r in rows])
    last = np.array([r.last for r in rows])
    diff = np.zeros(len(rows) + 1, dtype=np.int64)
    for o in options:
        for f in o.freed:
            lo = np.searchsorted(first, f.death, side="right")
            hi = np.searchsorted(last, f.back, side="right") - 1
            if lo <= hi:
                diff[lo] += f.bytes
                diff[hi + 1] -= f.bytes
    freed = np.cumsum(diff[:-1])
    return int(np.max(np.array([r.peak_bytes for r in rows]) - freed))
