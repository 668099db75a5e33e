"""The referee: replays a profiled step's allocations and reports its memory over time.

    sim = simulate(graph)
    sim.peak_bytes, sim.breakdown()

Memory at any tick is the fixed memory (parameters, buffers, inputs,
optimizer state) plus every block allocated and not yet freed. The peak is
the highest such value over the whole step.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.graph import FIXED_CATEGORIES, Block, Category, ProfiledGraph


@dataclass(frozen=True)
class Timeline:
    """Bytes alive by category after each event; `ticks[i]` is when event i happened."""

    ticks: tuple[int, ...]
    bytes_by_category: dict[Category, tuple[int, ...]]

    def total(self, i: int) -> int:
        return sum(series[i] for series in self.bytes_by_category.values())


@dataclass(frozen=True)
class Simulation:
    """Predicted memory of one steady-state step, in bytes, and its time in ms."""

    peak_bytes: int
    peak_tick: int
    peak_breakdown: dict[Category, int]
    timeline: Timeline
    step_ms: float

    def breakdown(self) -> dict[str, int]:
        return {c.value: b for c, b in self.peak_breakdown.items()}


def simulate(graph: ProfiledGraph, blocks: tuple[Block, ...] | None = None, step_ms: float | None = None) -> Simulation:
    """Replay `blocks` (default: the profiled ones) on top of the graph's fixed memory."""
    blocks = graph.blocks if blocks is None else blocks
    events = sorted(
        [(b.alloc, b.bytes, b.category) for b in blocks]
        + [(b.free, -b.bytes, b.category) for b in blocks if b.free is not None],
        key=lambda e: (e[0], e[1] < 0),
    )
    live = {c: 0 for c in Category} | graph.fixed.by_category()
    fixed = sum(live[c] for c in FIXED_CATEGORIES)
    ticks, series = [0], {c: [live[c]] for c in Category}
    peak, peak_tick, peak_live = fixed, 0, dict(live)
    total = fixed
    for tick, delta, category in events:
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
        step_ms=graph.step_ms if step_ms is None else step_ms,
    )
