"""The referee: replays a profiled step's allocations, under a plan or not.

    sim = simulate(graph)                    # the unplanned step
    sim = simulate(graph, plan.choices)      # the same step under a plan

Memory at any moment is the fixed memory (parameters, buffers, inputs,
optimizer state) plus every block allocated and not yet freed. Under a plan,
released blocks leave at their death and come back in their replay (see
`planner.core.actions`), and a recomputed region's forward is replayed (up to
the last tensor it saved) at the moment backward first needs it. The peak is
the highest value over the step; time is the profiled step plus each choice's extra time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from planner.core.actions import Choice, Semantics
from planner.core.costmodel import Roofline
from planner.core.gpus import roofline_for
from planner.core.graph import FIXED_CATEGORIES, Category, ProfiledGraph


@dataclass(frozen=True)
class Timeline:
    """Bytes alive by category after each event; `ticks[i]` is when event i happened."""

    ticks: tuple[float, ...]
    bytes_by_category: dict[Category, tuple[int, ...]]

    def total(self, i: int) -> int:
        return sum(series[i] for series in self.bytes_by_category.values())


@dataclass(frozen=True)
class Simulation:
    """Predicted memory of one steady-state step, in bytes, and its time in ms; `host_bytes` is what
    the offloads hold in host memory (all of them, as if at once)."""

    peak_bytes: int
    peak_tick: float
    peak_breakdown: dict[Category, int]
    timeline: Timeline
    step_ms: float
    extra_ms: float = 0.0
    host_bytes: int = 0

    def breakdown(self) -> dict[str, int]:
        return {c.value: b for c, b in self.peak_breakdown.items()}


def simulate(graph: ProfiledGraph, choices: Iterable[Choice] = (), roofline: Roofline | None = None) -> Simulation:
    """Replay the step's blocks on top of its fixed memory, with `choices` applied and costed on
    `roofline` (default: `gpus.roofline_for(graph)`)."""
    choices = list(choices)
    if roofline is None and choices:
        roofline = roofline_for(graph)
    events, extra_ms, host_bytes = _events(graph, choices, roofline)
    events.sort(key=lambda e: e[0])
    live = {c: 0 for c in Category} | graph.fixed.by_category()
    total = sum(live[c] for c in FIXED_CATEGORIES)
    ticks, series = [0.0], {c: [live[c]] for c in Category}
    peak, peak_tick, peak_live = total, 0.0, dict(live)
    for (tick, *_), delta, category in events:
        live[category] += delta
        total += delta
        ticks.append(tick)
        for c in Category:
            series[c].append(live[c])
        if total > peak:
            peak, peak_tick, peak_live = total, tick, dict(live)
    return Simulation(
        peak_bytes=peak,
        peak_tick=peak_tick,
        peak_breakdown=peak_live,
        timeline=Timeline(tuple(ticks), {c: tuple(v) for c, v in series.items()}),
        step_ms=graph.step_ms + extra_ms,
        extra_ms=extra_ms,
        host_bytes=host_bytes,
    )


def _events(graph: ProfiledGraph, choices: list[Choice], roofline: Roofline | None) -> tuple[list, float, int]:
    """(sort key, bytes delta, category) for every allocation and free under the choices, their
    extra time and the bytes they offload.

    Keys order the original event at a tick first, then deaths at that tick,
    then any replay starting there. A block that several chosen regions read
    from outside (an attention mask every layer reads) is held once, until the
    backward of the last of them (`solvers.problem` counts it once per region,
    which keeps every choice's effect additive).
    """
    semantics = Semantics(graph, roofline)
    death: dict[int, int] = {}
    replays = []
    holds = []
    inputs: dict[int, tuple] = {}  # a block regions read from outside -> the key of its last region's backward
    extra_ms, host_bytes = 0.0, 0
    for n, choice in enumerate(choices):
        effect = semantics.effect(choice)
        if effect is None:
            continue
        extra_ms += effect.extra_ms
        host_bytes += effect.host_bytes
        death |= {r.block: r.death for r in effect.releases}
        for r in effect.held:  # alive again right after its free, until the region's backward is over
            if r.in_replay:  # (or until its replay frees it)
                holds.append(((r.death, 0, 1), graph.blocks[r.block].bytes, graph.blocks[r.block].category))
            else:
                inputs[r.block] = max(inputs.get(r.block, ()), (r.back, 3, n))
        replays += [((effect.replay_tick, 2, n, k), delta, graph.blocks[i].category) for k, (i, delta) in enumerate(effect.replay)]
        if effect.snapshot_bytes:  # the buffers' copy, alive while the replay runs
            end = len(effect.replay)
            replays += [((effect.replay_tick, 2, n, -1), effect.snapshot_bytes, Category.TRANSIENTS)]
            replays += [((effect.replay_tick, 2, n, end), -effect.snapshot_bytes, Category.TRANSIENTS)]
    for i, until in inputs.items():  # once, however many regions read it, until the last of them lets it go
        b = graph.blocks[i]
        holds += [((b.free, 0, 1), b.bytes, b.category), (until, -b.bytes, b.category)]
    events = []
    for i, b in enumerate(graph.blocks):
        events.append(((b.alloc, 0), b.bytes, b.category))
        if i in death:
            events.append(((death[i], 1), -b.bytes, b.category))
        if b.free is not None:
            events.append(((b.free, 0), -b.bytes, b.category))
    events += replays
    return events + holds, extra_ms, host_bytes
