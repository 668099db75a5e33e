"""The planning problem: options, the memory they free and when, and a budget.

Every option is a `Choice` (recompute a region, offload a unit) with what it
frees: groups of bytes off the device for ticks in (death, back], a replay
at tick `back` that allocates again on top of what is alive then, and its
extra time. The step's ticks are cut into *rows*, stretches in which no
option starts or stops freeing anything, so the memory of a plan in row k is
the unplanned peak of that row minus what the chosen options free there:

    peak(C) = max( max_k  row_peak[k] - sum_{o in C} freed[o, k],
                   max_{o in C}  base[o] - sum_{o' in C} freed_at[o', back_o] + replay_peak[o] )

Options that share a unit exclude each other. This is the same step the
simulator replays, stated per row, so `peak_bytes` equals the simulator's
peak for any set of options, but one: where two chosen regions read the same
block from outside (an attention mask every layer reads), each holds it until
its own backward here, and the simulator holds it once. There `peak_bytes` is
above the simulator's peak: the solvers keep a bound, the plan predicts the
simulator's peak.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from planner.core.actions import Action, Choice, Effect, Kept, Semantics, replay_peak
from planner.core.costmodel import Roofline
from planner.core.gpus import roofline_for
from planner.core.graph import EXPENSIVE_OPS, Phase, ProfiledGraph
from planner.core.simulator import simulate

MAX_SEGMENT_UNITS = 16
# of a region's recompute time that its kept operator calls save: the points of its front (fewer for a
# region of several units, whose options are many)
FRONT_SHARES = {1: (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), 2: (0.25, 0.5, 0.75)}  # by units: 1, several


@dataclass(frozen=True)
class Freed:
    """`bytes` off the device for ticks in (death, back]; negative bytes stay on it longer."""

    bytes: int
    death: int
    back: int


@dataclass(frozen=True)
class Option:
    choice: Choice
    freed: tuple[Freed, ...]
    back: int  # tick of the replay
    base_bytes: int  # unplanned memory at tick `back`
    replay_peak_bytes: int
    cost_ms: float
    host_bytes: int = 0  # offload: what it holds in host memory

    @property
    def units(self) -> tuple[int, ...]:
        return self.choice.units


@dataclass(frozen=True)
class Row:
    """Ticks first..last, with the unplanned peak among them."""

    first: int
    last: int
    peak_bytes: int


@dataclass(frozen=True)
class Problem:
    """Options, rows and a budget in bytes, for a graph of `n_units` units; times in ms."""

    n_units: int
    options: tuple[Option, ...]
    rows: tuple[Row, ...]
    budget_bytes: int
    unplanned_peak_bytes: int
    step_ms: float
    chain: bool  # the units form one chain along which regions may span
    host_budget_bytes: int | None = None  # host memory offloads may hold at once (None: no bound)

    def freed_at(self, chosen: Iterable[int], first: int, last: int) -> int:
        """Bytes the chosen options free through all of ticks first..last."""
        return sum(
            f.bytes for o in chosen for f in self.options[o].freed if f.death < first and last <= f.back
        )

    def peak_bytes(self, chosen: Sequence[int]) -> int:
        """Peak of the step with the chosen options (indices into `options`)."""
        peak = max(r.peak_bytes - self.freed_at(chosen, r.first, r.last) for r in self.rows)
        for o in chosen:
            opt = self.options[o]
            peak = max(peak, opt.base_bytes - self.freed_at(chosen, opt.back, opt.back) + opt.replay_peak_bytes)
        return peak

    def overhead_ms(self, chosen: Sequence[int]) -> float:
        return sum(self.options[o].cost_ms for o in chosen)

    def host_bytes(self, chosen: Sequence[int]) -> int:
        """Host memory the chosen offloads hold, all of them at once (they are out by the end of forward)."""
        return sum(self.options[o].host_bytes for o in chosen)

    @property
    def host_bound(self) -> bool:
        """Whether the host budget rules out some set of offloads."""
        return self.host_budget_bytes is not None and sum(o.host_bytes for o in self.options) > self.host_budget_bytes

    def compatible(self, chosen: Sequence[int]) -> bool:
        """No unit is in two chosen options."""
        units = [u for o in chosen for u in self.options[o].units]
        return len(units) == len(set(units))

    def with_budget(self, budget_bytes: int) -> Problem:
        return replace(self, budget_bytes=budget_bytes)


def build_problem(
    graph: ProfiledGraph,
    budget_bytes: int,
    roofline: Roofline | None = None,
    max_segment_units: int = MAX_SEGMENT_UNITS,
    offload: bool = True,
    host_budget_bytes: int | None = None,
) -> Problem:
    """Every useful option on the graph, and the rows of its step (`roofline` as in `simulate`);
    with `offload` False, no option offloads; `host_budget_bytes` bounds what offloads hold at once."""
    semantics = Semantics(graph, roofline or roofline_for(graph))
    sim = simulate(graph)
    ticks = [int(t) for t in sim.timeline.ticks]
    totals = [sim.timeline.total(i) for i in range(len(ticks))]
    options = []
    for choice in candidate_choices(graph, max_segment_units, offload):
        if choice not in graph.memory_effects:
            graph.memory_effects[choice] = _untimed_option(graph, semantics.effect(choice), choice, ticks, totals)
        if graph.memory_effects[choice] is not None:
            option, storages = graph.memory_effects[choice]
            options.append(replace(option, cost_ms=semantics.extra_ms(choice, storages, option.host_bytes)))
    rows = _rows(ticks, totals, options)
    chain = len(graph.segment_links()) == len(graph.units) - 1
    return Problem(len(graph.units), tuple(options), rows, budget_bytes, sim.peak_bytes, graph.step_ms, chain,
                   host_budget_bytes)  # fmt: skip


def _untimed_option(graph: ProfiledGraph, effect: Effect | None, choice: Choice, ticks: list[int],
                    totals: list[int]) -> tuple[Option, int] | None:  # fmt: skip
    """The option of a choice with `effect` (None: no option), costing nothing, and the storages it frees."""
    if effect is None:
        return None
    freed: dict[tuple[int, int], int] = defaultdict(int)  # (death, back) -> bytes
    for r in effect.releases:
        freed[r.death, r.back] += graph.blocks[r.block].bytes
    for r in effect.held:  # alive longer, from the tick of its own free on: negative freed bytes
        freed[r.death - 1, r.back] -= graph.blocks[r.block].bytes
    option = Option(
        choice=choice,
        freed=tuple(Freed(b, d, back) for (d, back), b in sorted(freed.items()) if b),
        back=effect.replay_tick,
        base_bytes=totals[bisect.bisect_right(ticks, effect.replay_tick) - 1],
        replay_peak_bytes=replay_peak(effect),
        cost_ms=0.0,
        host_bytes=effect.host_bytes,
    )
    return option, len(effect.releases)


def candidate_choices(graph: ProfiledGraph, max_segment_units: int, offload: bool = True) -> list[Choice]:
    """Offload each unit (if `offload`); recompute each run of up to `max_segment_units` units along
    segment links, in full and keeping saved the outputs of some of its operator calls (`kept_sets`).
    Under torch.compile a region keeps its outputs saved too (`region_outputs`)."""
    links = graph.segment_links()
    written = {(b.owner, b.op, b.op_call) for b in graph.blocks if b.mutated}
    draws = random_draws(graph)
    outputs = region_outputs(graph, written) if graph.compiled else {}
    choices = []
    for u in range(len(graph.units)):
        if offload:
            choices.append(Choice(Action.OFFLOAD, (u,)))
        end = u
        while True:
            units = tuple(range(u, end + 1))
            always = frozenset().union(*(outputs.get(v, ()) for v in units))
            choices.append(Choice(Action.RECOMPUTE, units, always))
            choices.extend(Choice(Action.RECOMPUTE, units, always | calls)
                           for calls in kept_sets(graph, units, written, draws) if not calls <= always)
            if end + 1 - u >= max_segment_units or (end, end + 1) not in links or graph.units[end + 1].side_from >= u:
                break
            end += 1
    return choices


def region_outputs(graph: ProfiledGraph, written: set[tuple[int, str, int]]) -> dict[int, frozenset[Kept]]:
    """Per unit, the calls that made what its forward returns (not written later, not random).

    Under torch.compile a region that keeps them saved is replayed only for its own backward: without
    them, the partitioner may take a value computed from a region's output (a decoder's memory from the
    last encoder layer, through a norm) as cheapest to recompute from the region's inputs, which are
    saved anyway, replay the region early in backward and hold its values from then on."""
    excluded = written | {(u.index, op.name, op.call) for u in graph.units for op in u.ops if op.random}
    outputs: dict[int, set[Kept]] = defaultdict(set)
    for b in graph.blocks:
        call = (b.owner, b.op, b.op_call)
        if b.unit_output and b.owner is not None and b.phase is Phase.FORWARD and call not in excluded:
            outputs[b.owner].add(Kept(*call))
    return {u: frozenset(calls) for u, calls in outputs.items()}


def random_draws(graph: ProfiledGraph) -> dict[int, frozenset[Kept]]:
    """Per unit whose forward draws random numbers: the calls that keep its draws saved, its calls that
    draw and those that made or wrote what they wrote into (a dropout's mask: `empty_like`,
    `bernoulli_`, `div_`); empty where that cannot be (an operator read a mask before it was final)."""
    draws = {u.index: {Kept(u.index, op.name, op.call) for op in u.ops if op.random} for u in graph.units}
    draws = {u: calls for u, calls in draws.items() if calls}
    for b in graph.blocks:
        calls = draws.get(b.owner)
        if calls and b.mutated and calls & {Kept(*w) for w in b.writers}:
            if b.read_then_written or any(w[0] != b.owner for w in b.writers):
                calls.clear()
            else:
                calls |= {Kept(b.owner, b.op, b.op_call), *(Kept(*w) for w in b.writers)}
    return {u: frozenset(calls) for u, calls in draws.items()}


def kept_sets(graph: ProfiledGraph, units: tuple[int, ...], written: set[tuple[int, str, int]],
              draws: dict[int, frozenset[Kept]] | None = None) -> list[frozenset[Kept]]:
    """Operator calls a region of `units` may keep saved: its expensive operators' calls; and points of
    its front of (bytes kept, recompute time saved): the calls whose outputs autograd saved (in a region
    of one unit, and expensive calls whose outputs it did not save, as a query projection that rotary
    embeddings read) taken in order of time saved per byte they hold, until they save a tenth, two
    tenths, ... of all their time (a quarter, half and three quarters in a region of several units,
    whose options are many). In a region of several units and under torch.compile (where compiled code
    fuses the others, and what the partitioner saves around one kept is its own choice), the front is
    of expensive operators' calls only. Calls that draw random numbers are kept all together
    (`random_draws`, in eager only) or not at all: a replay that drew some of them would draw from
    another place in the stream. An output written later is kept only so."""
    ops = {(u, op.name, op.call): op for u in units for op in graph.units[u].ops}
    items = [  # (calls, time they save, bytes they hold)
        (frozenset({Kept(*key)}), op.ms, op.out_bytes)
        for key, op in ops.items()
        if op.out_bytes and op.ms > 0 and not op.random and key not in written
        and (op.saved_bytes or len(units) == 1 and op.name in EXPENSIVE_OPS)
    ]
    sets = {frozenset(k for calls, _, _ in items for k in calls if k.op in EXPENSIVE_OPS)}
    if len(units) > 1 or graph.compiled:
        items = [item for item in items if next(iter(item[0])).op in EXPENSIVE_OPS]
    draws = draws if draws is not None else random_draws(graph)
    region_draws = [draws[u] for u in units if u in draws]
    if region_draws and all(region_draws) and not graph.compiled:
        calls = frozenset().union(*region_draws)
        items.append((calls, sum(ops[k].ms for k in calls), sum(ops[k].out_bytes for k in calls)))
    items.sort(key=lambda item: -item[1] / max(item[2], 1))
    total_ms, ms, prefix = sum(item[1] for item in items), 0.0, set()
    shares = iter(FRONT_SHARES[min(len(units), 2)])
    share = next(shares, None)
    for calls, call_ms, _ in items:
        prefix |= calls
        ms += call_ms
        while share is not None and ms >= share * total_ms:
            sets.add(frozenset(prefix))
            share = next(shares, None)
    return [s for s in sets if s]


def _rows(ticks: list[int], totals: list[int], options: list[Option]) -> tuple[Row, ...]:
    """Cut the step where any option starts or stops freeing; each row keeps its unplanned peak."""
    cuts = {0, ticks[-1] + 1}
    for o in options:
        for f in o.freed:
            cuts |= {f.death + 1, f.back + 1}
    cuts = sorted(c for c in cuts if c <= ticks[-1] + 1)
    rows = []
    for first, nxt in zip(cuts, cuts[1:]):
        lo = bisect.bisect_right(ticks, first) - 1  # the state at `first`
        hi = bisect.bisect_right(ticks, nxt - 1)
        rows.append(Row(first, nxt - 1, max(totals[max(lo, 0) : max(hi, lo + 1)])))
    return tuple(rows)
