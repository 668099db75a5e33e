"""Small synthetic `Problem`s built directly (no torch), and a brute force to check solvers against.

    problem = random_problem(random.Random(0), n_units=6, chain=True, structured=True)
    best = brute_force(problem)      # (overhead_ms, chosen) or None when no plan fits

Ticks: unit u runs forward in [W*u, W*u + W - 1] and backward in reverse unit
order after the forward ends; an optimizer phase closes the step. A
*structured* problem frees what a training step would: each unit has a few
groups of saved bytes that die at the end of its forward (or of the next
unit's, when the next unit reads them too), a recompute region brings its
groups back when the backward of its last unit starts, an offload one unit
earlier (prefetch), and a region may hold its input (negative bytes) until
its backward is over; its rows are cut wherever an entry starts or stops, as
`build_problem` cuts them, and their peaks come from the unplanned memory
curve. An *unstructured* problem draws deaths, backs, rows and peaks at
random, so that nothing but the formula of `Problem.peak_bytes` holds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from planner.core.actions import Action, Choice
from solvers.problem import Freed, Option, Problem, Row

W = 4  # ticks per unit and phase
MAX_PLANS = 1500  # options are dropped at random until a problem has at most this many plans


@dataclass(frozen=True)
class _Group:
    bytes: int
    unit: int
    shared: bool  # also read by the next unit: dies at its end, released only with it
    expensive: bool  # the output of an expensive operator: kept saved by the save-ops variant


def random_problem(
    rng: random.Random,
    n_units: int,
    *,
    chain: bool,
    structured: bool = True,
    aligned: bool = True,
    max_segment_units: int = 3,
    max_plans: int = MAX_PLANS,
) -> Problem:
    """A random problem; `chain` makes every link a segment link, `aligned` cuts rows at every entry's ends."""
    links = [chain or rng.random() < 0.5 for _ in range(n_units - 1)]  # links[u]: u -> u+1 is a segment link
    groups = _groups(rng, n_units)
    end_tick = 2 * W * n_units + W
    options = []
    for units, action, save in _choices(rng, n_units, links, max_segment_units):
        if structured:
            option = _structured_option(rng, n_units, groups, units, action, save)
        else:
            option = _random_option(rng, units, action, save, end_tick)
        if option is not None:
            options.append(option)
    options = _thin(rng, n_units, options, max_plans)
    curve = _memory_curve(rng, n_units, groups, end_tick, structured)
    cuts = _cuts(rng, options, end_tick, aligned)
    rows = tuple(Row(a, b - 1, max(curve[a:b])) for a, b in zip(cuts, cuts[1:]))
    if structured:
        options = [_with_base(o, curve) for o in options]
    unplanned = max(r.peak_bytes for r in rows)
    problem = Problem(n_units, tuple(options), rows, unplanned, unplanned, 10.0 * n_units, all(links))
    everything = range(len(options))  # frees the most, compatible or not: no plan peaks lower
    lowest = max(r.peak_bytes - problem.freed_at(everything, r.first, r.last) for r in rows)
    return problem.with_budget(lowest + int(rng.uniform(-0.1, 1.0) * (unplanned - lowest)))


def _groups(rng: random.Random, n_units: int) -> list[list[_Group]]:
    return [
        [
            _Group(rng.randrange(1, 40) * 64, u, shared=u + 1 < n_units and rng.random() < 0.3, expensive=rng.random() < 0.3)
            for _ in range(rng.randint(1, 3))
        ]
        for u in range(n_units)
    ]


def _choices(rng: random.Random, n_units: int, links: list[bool], max_len: int):
    """(units, action, keep expensive outputs) candidates, a random part of what build_problem offers."""
    for u in range(n_units):
        if rng.random() < 0.6:
            yield (u,), Action.OFFLOAD, False
        end = u
        while end - u < max_len:
            units = tuple(range(u, end + 1))
            if rng.random() < 0.7:
                yield units, Action.RECOMPUTE, False
            if rng.random() < 0.3:
                yield units, Action.RECOMPUTE, True
            if end + 1 >= n_units or not links[end]:
                break
            end += 1


def _bwd_start(n_units: int, u: int) -> int:
    return W * n_units + W * (n_units - 1 - u) + 1


def _structured_option(rng, n_units, groups, units, action, save) -> Option | None:
    inside = set(units)
    freed: dict[int, int] = {}
    region = [g for u in units for g in groups[u]]
    for g in region:
        if (g.shared and g.unit + 1 not in inside) or (save and g.expensive):
            continue
        if action is Action.OFFLOAD and g.shared:
            continue
        death = W * (g.unit + 1 + g.shared) - 1
        freed[death] = freed.get(death, 0) + g.bytes
    if not freed:
        return None
    last = max(units)
    if action is Action.RECOMPUTE:
        back = _bwd_start(n_units, last)
        replay = sum(g.bytes for g in region if not (save and g.expensive))
        cost = sum(rng.uniform(0.2, 3.0) for _ in units) * (0.5 if save else 1.0)
    else:
        back = _bwd_start(n_units, last + 1) if last + 1 < n_units else W * n_units
        replay = sum(freed.values())
        cost = rng.choice([0.0, rng.uniform(0.0, 2.0)])
    entries = tuple(Freed(b, d, back) for d, b in sorted(freed.items()))
    if action is Action.RECOMPUTE and min(units) > 0 and rng.random() < 0.5:
        # the region's input, made before it, is held until the region's backward is over
        held = -sum(g.bytes for g in groups[min(units) - 1])
        entries += (Freed(held, _bwd_start(n_units, last) + 1, _bwd_start(n_units, min(units)) + W - 1),)
    return Option(Choice(action, units, frozenset({"aten.mm"}) if save else frozenset()), entries, back, 0, replay, cost)


def _random_option(rng, units, action, save, end_tick) -> Option:
    entries = []
    for _ in range(rng.randint(1, 3)):
        death = rng.randrange(0, end_tick - 1)
        held = rng.random() < 0.15  # negative bytes: on the device longer
        entries.append(Freed(rng.randrange(1, 40) * 64 * (-1 if held else 1), death, rng.randrange(death + 1, end_tick)))
    back = rng.randrange(1, end_tick)
    choice = Choice(action, units, frozenset({"aten.mm"}) if save else frozenset())
    return Option(choice, tuple(entries), back, rng.randrange(0, 3000), rng.randrange(0, 1500), rng.uniform(0.0, 3.0))


def _memory_curve(rng, n_units, groups, end_tick, structured) -> list[int]:
    """Unplanned bytes alive at each tick."""
    fixed = rng.randrange(500, 2000)
    if not structured:
        return [fixed + rng.randrange(0, 4000) for _ in range(end_tick + 1)]
    delta = [0] * (end_tick + 2)
    for u, unit_groups in enumerate(groups):
        for g in unit_groups:
            delta[W * u + 1] += g.bytes  # allocated in its forward
            delta[_bwd_start(n_units, u) + W - 1] -= g.bytes  # freed at the end of its backward
        grad = rng.randrange(0, 400)
        delta[_bwd_start(n_units, u) + 2] += grad  # gradients accumulate through backward
        delta[end_tick] -= grad
    curve, live = [], fixed
    for t in range(end_tick + 1):
        live += delta[t]
        curve.append(live + (rng.randrange(0, 200) if t % W == 2 else 0))  # a transient inside each unit
    return curve


def _cuts(rng, options, end_tick, aligned) -> list[int]:
    ends = {t + 1 for o in options for f in o.freed for t in (f.death, f.back)}
    extra = {rng.randrange(1, end_tick + 1) for _ in range(3)}
    cuts = (ends | extra) if aligned else {t for t in ends | extra if rng.random() < 0.5}
    return sorted({0, end_tick + 1} | {t for t in cuts if 0 < t <= end_tick})


def _with_base(option: Option, curve: list[int]) -> Option:
    return Option(option.choice, option.freed, option.back, curve[option.back], option.replay_peak_bytes, option.cost_ms)


def _thin(rng, n_units, options, max_plans) -> list[Option]:
    options = list(options)
    while count_plans(n_units, options) > max_plans:
        options.pop(rng.randrange(len(options)))
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


def plans(problem: Problem) -> list[tuple[int, ...]]:
    """Every set of compatible options (any unit sets)."""
    out: list[tuple[int, ...]] = []

    def extend(start: int, chosen: tuple[int, ...], used: frozenset[int]) -> None:
        out.append(chosen)
        for o in range(start, len(problem.options)):
            units = frozenset(problem.options[o].units)
            if not units & used:
                extend(o + 1, (*chosen, o), used | units)

    extend(0, (), frozenset())
    return out


def brute_force(problem: Problem) -> tuple[float, tuple[int, ...]] | None:
    """The least overhead of a plan within budget, and one such plan; None when no plan fits."""
    for chosen in sorted(plans(problem), key=problem.overhead_ms):
        if problem.peak_bytes(chosen) <= problem.budget_bytes:
            return problem.overhead_ms(chosen), chosen
    return None


def brute_min_peak(problem: Problem) -> int:
    return min(problem.peak_bytes(chosen) for chosen in plans(problem))

