"""Dynamic programming along a chain, in the spirit of Rotor (Beaumont et al. 2019).

On a chain every option covers consecutive units, so a plan cuts the units
into steps, each keeping unit a or taking an option [a..b]. Scanning left to
right, a state at boundary a (units < a decided) is

    (cost_ms, S, V):  S = freeing bytes of the chosen options (held bytes left out),
                      V = the freed sums of the few constraints tracked on their own,

and a step adds cost_o and freeing_o to S. For each memory constraint (a row
k, or the replay of option o when o is chosen; see `solvers.chain`)

    B = the largest first unit of an option with bytes there (options starting after B change nothing),
    E = the smallest last unit of an option that frees there other than exactly its freeing bytes,

so the options decided before the step covering B free exactly S there when
B <= E (so on a training step's chain, where bytes die at the end of their
unit's forward or the next one's and come back in reverse order): the check
is S_before >= need - freed_o there, a threshold per step. Otherwise the
constraint's own sum is tracked in V from the step covering E. A state
dominates another with no more cost, no less S and no less of every V; S is
capped above every later threshold. The Pareto front at each boundary is
therefore exact for any entries, held (negative) bytes included: with no
thinning the plan is OPTIMAL, and INFEASIBLE means no plan fits.

Time is O(units * options per unit * front). A front above MAX_STATES (per
group of states sharing V's pattern) is thinned to the state of least cost
plus a lower bound on the cost still to pay in each of MAX_STATES bands of S
(the bound: every later unit takes a convex mix of its options' per-unit
shares, enough to reach the largest later row need); the plan is then
FEASIBLE (TIME_LIMIT once past the time limit, when fronts shrink to
LATE_STATES), and INFEASIBLE only says this search found none. Every plan is
checked against the exact peak before it is returned.

Example. Three units and one row that needs 7 bytes freed, where every option
frees exactly its freeing bytes: A = [0] (4 bytes, 1 ms), C = [1] (3 bytes,
2 ms), B = [1..2] (6 bytes, 3 ms). The row is checked on the step covering
unit 2, so that step needs S before it >= 7 - what the step frees:

    boundary 0: (0 ms, S 0)
    boundary 1: keep 0 -> (0, 0); A -> (1, 4)
    boundary 2: keep 1 -> (0, 0), (1, 4); C -> (2, 3), (3, 7)   front: (0, 0), (1, 4), (3, 7)
    boundary 3: B from boundary 1 needs S >= 1: (1, 4) -> (4, 10);
                keep 2 from boundary 2 needs S >= 7: (3, 7) -> (3, 7)

The cheapest state at boundary 3 costs 3 ms: the plan is {A, C}.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import chain
from typing import NamedTuple

import numpy as np

from solvers import arrays
from solvers.arrays import Arrays
from planner.core.plan import Status
from solvers.base import Solution
from solvers.chain import BIG, KEEP, Model, Reach, model_of
from solvers.problem import Problem

MAX_STATES = 512  # per key and boundary, before the front is thinned
LATE_STATES = 64  # per boundary once the time limit has passed


class _States:
    """Every kept state: its cost, its S and the step that made it (parent state, option; KEEP for a
    kept unit), in arrays that grow; a state is its index."""

    def __init__(self) -> None:
        self.cost, self.s = np.zeros(1 << 12), np.zeros(1 << 12, dtype=np.int64)
        self.parent, self.option = np.zeros(1 << 12, dtype=np.int64), np.zeros(1 << 12, dtype=np.int64)
        self.count = 0

    def add(self, cost: np.ndarray, s: np.ndarray, parent: np.ndarray, option: np.ndarray) -> int:
        """Appends states; the index of the first."""
        first, end = self.count, self.count + len(cost)
        if end > len(self.cost):
            size = max(2 * len(self.cost), end)
            self.cost, self.s, self.parent, self.option = (
                np.concatenate([a[:first], np.zeros(size - first, dtype=a.dtype)])
                for a in (self.cost, self.s, self.parent, self.option)
            )
        self.cost[first:end], self.s[first:end], self.parent[first:end], self.option[first:end] = cost, s, parent, option
        self.count = end
        return first

    def plan(self, state: int) -> tuple[int, ...]:
        chosen = []
        while state >= 0:
            if self.option[state] != KEEP:
                chosen.append(int(self.option[state]))
            state = int(self.parent[state])
        return tuple(sorted(chosen))


class _Part(NamedTuple):
    """States first..last (exclusive) of a group at some boundary, each with one step applied."""

    first: int
    last: int
    cost: float  # the step's ms
    s: int  # the step's freeing bytes
    option: int  # the step's option, KEEP for a kept unit


@dataclass
class _Group:
    """States at a boundary with one key (V - S per live item, BIG once satisfied), sorted by cost and
    by S: states first, first + 1, ... (cost and s are views of them)."""

    key: tuple[int, ...]
    first: int
    cost: np.ndarray  # ms
    s: np.ndarray  # bytes


def solve(problem: Problem, time_limit_s: float = 10.0) -> Solution:
    start = time.perf_counter()
    if not problem.chain:
        raise ValueError("the dp solver needs a chain (problem.chain is False); use the 'ilp' solver for this graph")
    if problem.host_bound:
        raise ValueError("the dp solver does not bound host memory, which this problem's offloads may exceed; use 'ilp'")
    arr = arrays.of(problem)
    if not arr.option_is_interval.all():
        raise ValueError("the dp solver needs options over consecutive units; use the 'ilp' solver")
    chosen, thinned, late = _search(problem, arr, start + time_limit_s)
    solve_s = time.perf_counter() - start
    if chosen is None:
        return Solution((), Status.INFEASIBLE, solve_s=solve_s)
    status = Status.TIME_LIMIT if late else Status.FEASIBLE if thinned else Status.OPTIMAL
    return Solution(chosen, status, solve_s=solve_s)


def plan(problem: Problem, arr: Arrays, deadline: float, max_states: int = MAX_STATES) -> tuple[int, ...] | None:
    """This solver's plan for any problem whose options cover consecutive units, chain or not (a starting
    point for other solvers); None when it finds none within budget or is not done by the deadline."""
    return _search(problem, arr, deadline, give_up=True, max_states=max_states)[0]


def _search(
    problem: Problem, arr: Arrays, deadline: float, give_up: bool = False, max_states: int = MAX_STATES
) -> tuple[tuple[int, ...] | None, bool, bool]:
    """The cheapest plan found, whether a front was thinned, whether the deadline passed (past it, the
    search goes on with small fronts, or stops with no plan if `give_up`)."""
    model = model_of(problem, arr)
    if model is None:
        return None, False, False
    groups, states, thinned, late = _run(model, deadline, give_up, max_states)
    if not groups:
        return None, thinned, late
    best = min(groups, key=lambda g: g.cost[0])
    chosen = states.plan(best.first)
    peak = arrays.peak_bytes(arr, chosen)
    if peak > problem.budget_bytes or not problem.compatible(chosen):
        raise RuntimeError(f"dp's plan peaks at {peak} bytes over the budget of {problem.budget_bytes}: a bug")
    return chosen, thinned, late


# ---------------------------------------------------------------- the items and the steps


# ---------------------------------------------------------------- the scan


def _run(
    model: Model, deadline: float, give_up: bool = False, max_states: int = MAX_STATES
) -> tuple[list[_Group], _States, bool, bool]:
    """Pareto fronts boundary by boundary; the last one's groups, the states, whether thinned or late.

    A step from the states of a group at boundary a lands at the boundary after it as a `_Part` under
    the key it leaves."""
    n = model.n_units
    pending: list[dict] = [{} for _ in range(n + 1)]
    states = _States()
    root = states.add(np.zeros(1), np.zeros(1, dtype=np.int64), np.full(1, -1), np.full(1, KEEP))
    pending[0][()] = [_Part(root, root + 1, 0.0, 0, KEEP)]
    thinned = late = False
    groups: list[_Group] = []
    reaches = model.reaches()
    for a in range(n + 1):
        if not pending[a]:
            groups = []
            continue
        late = late or time.perf_counter() > deadline
        if late and give_up:
            return [], states, thinned, late
        groups, cut = _front(pending[a], states, model, a, LATE_STATES if late else max_states)
        thinned |= cut
        pending[a] = {}
        if a < n:
            for group in groups:
                _expand(a, group, reaches[a], model.steps[a].threshold, pending)
    return groups, states, thinned, late


def _front(children: dict, states: _States, model: Model, a: int, max_states: int) -> tuple[list[_Group], bool]:
    """Per key, the non-dominated states (no more cost and no less S); states with unmet tracked items
    are also dropped when a state with none dominates them. Thinned to max_states per key."""
    groups, cut = [], False
    for key, parts in children.items():
        lo, hi, step_cost, step_s, step_option = np.fromiter(chain(*parts), float, 5 * len(parts)).reshape(-1, 5).T  # _Part fields
        length = (hi - lo).astype(np.int64)
        part = np.repeat(np.arange(len(parts)), length)  # of each new state
        parent = np.arange(int(length.sum())) + np.repeat(lo.astype(np.int64) - (np.cumsum(length) - length), length)
        cost = states.cost[parent] + step_cost[part]
        s = states.s[parent] + step_s.astype(np.int64)[part]
        if all(k >= BIG for k in key):
            s = np.minimum(s, model.cap[a])
        keep = _pareto(cost, s)
        if len(keep) > max_states:
            keep, cut = _thin(cost, s, keep, max_states, model.bound(a, model.row_cap[a] - s[keep])), True
        groups.append((key, cost[keep], s[keep], parent[keep], step_option.astype(np.int64)[part[keep]]))
    free = [g for g in groups if all(k >= BIG for k in g[0])]
    out = []
    for key, cost, s, parent, option in groups:
        if free and free[0][0] != key:
            keep = ~_dominated(free[0][1], free[0][2], cost, np.minimum(s, model.cap[a]))
            cost, s, parent, option = cost[keep], s[keep], parent[keep], option[keep]
        if len(cost):
            out.append(_Group(key, states.add(cost, s, parent, option), cost, s))
    return out, cut


def _pareto(cost: np.ndarray, s: np.ndarray, bands: int = 2048) -> np.ndarray:
    """Indices of the states no other state beats (no more cost and more S, or less cost and as much
    S; of equal states, one), in order of cost.

    Most states are beaten; those beaten by a state in a higher band of S go first, without sorting."""
    if len(cost) > 2 * bands:
        low = s.min()
        band = (s - low) >> max(int(s.max() - low).bit_length() - bands.bit_length() + 1, 0)  # < bands
        least = np.full(bands + 1, np.inf)
        np.minimum.at(least, band, cost)
        above = np.minimum.accumulate(least[::-1])[::-1][1:][band]  # least cost of a state with more S
        candidates = np.flatnonzero(above > cost)
        order = candidates[np.argsort(cost[candidates], kind="stable")]  # parts arrive sorted: runs for timsort
    else:
        order = np.argsort(cost, kind="stable")
    best = np.maximum.accumulate(s[order])
    front = order[np.concatenate([[True], s[order][1:] > best[:-1]])]  # S rising
    return front[np.concatenate([cost[front][1:] != cost[front][:-1], [True]])]  # of equal cost, the most S


def _dominated(free_cost: np.ndarray, free_s: np.ndarray, cost: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Whether a free state (sorted by cost, S rising) has no more cost and no less S than each state."""
    j = np.searchsorted(free_cost, cost, side="right") - 1
    return (j >= 0) & (free_s[np.maximum(j, 0)] >= s)


def _thin(cost: np.ndarray, s: np.ndarray, keep: np.ndarray, max_states: int, to_go: np.ndarray) -> np.ndarray:
    """In each of max_states bands of S, the state with the least cost plus lower bound on the cost to go;
    and the one with the most S. `keep` is a front: S rises along it, so each band is a run."""
    sk = s[keep]
    band = (sk - sk[0]) * (max_states - 1) // max(int(sk[-1] - sk[0]), 1)
    value = cost[keep] + to_go
    starts = np.flatnonzero(np.concatenate([[True], band[1:] != band[:-1]]))
    least = np.repeat(np.minimum.reduceat(value, starts), np.diff(np.append(starts, len(value))))
    best = np.flatnonzero(value == least)
    chosen = best[np.concatenate([[True], band[best][1:] != band[best][:-1]])]  # the first least of each band
    if chosen[-1] != len(keep) - 1:
        chosen = np.append(chosen, len(keep) - 1)
    return keep[chosen]


def _expand(a: int, group: _Group, reach: Reach, thr: np.ndarray, pending: list[dict]) -> None:
    """Every step from boundary a applied to a group: checks as thresholds on S, tracked items carried,
    cut where a tracked item becomes met (one key per piece)."""
    steps = np.arange(len(thr))[:, None]
    lowest, kept, met_from = thr, np.full(reach.padded.shape, BIG), np.zeros(reach.padded.shape, dtype=np.int64)
    if len(reach.need):
        k = np.zeros(len(reach.need), dtype=np.int64)  # V - S; items not live at a start from S on this step
        k[reach.key_rows] = group.key
        on = (k < BIG)[:, None]
        dropped = reach.dropped | ~on
        needed = np.where(dropped, -BIG, reach.need - k[:, None])  # bytes, like S: no conversions in the searches
        lowest = np.maximum(thr, np.where(reach.checked & on, needed, -BIG).max(axis=0))
        rows = reach.live_rows
        live = rows, steps
        kept = np.where(dropped[live] | reach.padded, BIG, (reach.kept + k[:, None])[live])
        met_from = np.where(on[rows, 0], needed[live] - reach.least[rows], -BIG)  # met for good
    count = len(group.s)
    start = np.searchsorted(group.s, lowest, side="left")[:, None]
    met_at = np.minimum(np.maximum(np.searchsorted(group.s, met_from, side="left"), start), count)  # first state meeting each item
    cuts = np.sort(met_at, axis=1) if met_at.shape[1] > 1 else met_at  # within start..count already
    bounds = np.concatenate([start, cuts, np.full_like(start, count)], axis=1)
    lo, hi = bounds[:, :-1], bounds[:, 1:]
    keys = np.where((kept[:, None, :] >= BIG) | (lo[:, :, None] >= met_at[:, None, :]), BIG, kept[:, None, :])
    step, piece = np.nonzero(lo < hi)
    first = group.first
    for t, i, j, key in zip(step.tolist(), lo[step, piece].tolist(), hi[step, piece].tolist(), keys[step, piece].tolist()):
        landing = reach.steps[t]
        part = _Part(first + i, first + j, landing.cost, landing.freeing, landing.option)
        pending[landing.boundary].setdefault(tuple(key[: reach.live_count[t]]), []).append(part)
