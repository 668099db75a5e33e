"""Terminal reports of a profiled step, readable at a glance, and byte sizes for people.

    console.print(units_table(graph))
    console.print(peak_panel(simulate(graph), measure(...)))
"""

from __future__ import annotations

import collections

from typing import TYPE_CHECKING

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from planner.core.graph import Category, ProfiledGraph
from planner.core.sizes import format_bytes
from planner.core.simulator import Simulation

if TYPE_CHECKING:  # measurement imports torch; a report needs only its fields
    from planner.measurement import Measurement
    from planner.compare import GpuResult
    from planner.core.plan import Plan

# Relative errors of a prediction up to these shares read as good, then as fair; beyond, as poor.
_GOOD_ERROR, _FAIR_ERROR = 0.05, 0.15


# ------------------------------------------------------------------------------------------------ units


def units_table(graph: ProfiledGraph) -> Table:
    """One row per unit: key, kind, saved-for-backward, input and output bytes, times and GFLOPs; a total row.

    Times are in ms; GFLOP counts forward and backward together. The caption says when
    times were estimated from FLOPs rather than measured.
    """
    source = "measured" if graph.measured_times else "estimated from FLOPs"
    table = Table(
        title=f"{graph.model}: {len(graph.units)} units on {graph.device}",
        caption=f"saved: bytes kept for backward; times {source}",
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        show_footer=True,
        header_style="bold",
        footer_style="bold",
    )
    totals = _unit_totals(graph)
    table.add_column("unit", footer="total", no_wrap=True, min_width=8)
    table.add_column("kind", style="dim", footer="", overflow="ellipsis", no_wrap=True, max_width=12)
    numbers = {"justify": "right", "no_wrap": True}
    for header, footer in zip(("saved", "input", "output"), totals[:3]):
        table.add_column(header, footer=format_bytes(footer), **numbers)
    table.add_column("fwd ms", footer=f"{totals[3]:.2f}", **numbers)
    table.add_column("bwd ms", footer=f"{totals[4]:.2f}", **numbers)
    table.add_column("GFLOP", footer=_gflop(totals[5]), **numbers)
    for u in graph.units:
        table.add_row(
            u.key,
            u.kind,
            format_bytes(u.saved_bytes),
            format_bytes(u.input_bytes),
            format_bytes(u.output_bytes),
            f"{u.fwd_ms:.2f}",
            f"{u.bwd_ms:.2f}",
            _gflop((u.fwd_flops + u.bwd_flops) / 1e9),
        )
    return table


def _gflop(gflop: float) -> str:
    return f"{gflop:.0f}" if gflop >= 100 else f"{gflop:.3g}"


def _unit_totals(graph: ProfiledGraph) -> tuple[int, int, int, float, float, float]:
    """Sums over the units: saved, input, output bytes, forward and backward ms, GFLOP."""
    us = graph.units
    return (
        sum(u.saved_bytes for u in us),
        sum(u.input_bytes for u in us),
        sum(u.output_bytes for u in us),
        sum(u.fwd_ms for u in us),
        sum(u.bwd_ms for u in us),
        sum(u.fwd_flops + u.bwd_flops for u in us) / 1e9,
    )


# ------------------------------------------------------------------------------------------------ peak


def peak_panel(sim: Simulation, measurement: Measurement | None = None) -> Panel:
    """The predicted peak and its breakdown by category; with a measurement, the measured peak and the error."""
    parts: list = [_breakdown_table(sim)]
    if measurement is not None:
        parts.append(_measurement_table(sim, measurement))
    return Panel(Group(*parts), title="peak memory of one training step", title_align="left", expand=False)


def _breakdown_table(sim: Simulation) -> Table:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column(justify="right")
    table.add_column()
    table.add_row("predicted peak", Text(format_bytes(sim.peak_bytes), style="bold cyan"), "", "")
    for category in Category:
        size = sim.peak_breakdown.get(category, 0)
        if size == 0:
            continue
        share = size / sim.peak_bytes
        table.add_row(f"  {category.value}", format_bytes(size), f"{share:6.1%}", Text(_bar(share), style="cyan"))
    return table


def _measurement_table(sim: Simulation, m: Measurement) -> Table:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column()
    error = (sim.peak_bytes - m.peak_bytes) / m.peak_bytes
    error = 0.0 if round(error, 3) == 0 else error  # no "-0.0%"
    table.add_row("measured peak", Text(format_bytes(m.peak_bytes), style="bold"), f"on {m.device}")
    if m.reserved_bytes is not None:
        table.add_row("reserved peak", format_bytes(m.reserved_bytes), "held by the caching allocator")
    table.add_row("error", Text(f"{error:+.1%}", style=_error_style(error)), "predicted vs measured")
    table.add_row("step time", f"{m.step_ms:.1f} ms", f"median of {m.steps} steps")
    return table


def _error_style(error: float) -> str:
    if abs(error) <= _GOOD_ERROR:
        return "bold green"
    return "bold yellow" if abs(error) <= _FAIR_ERROR else "bold red"


def _bar(share: float, width: int = 20) -> str:
    """A horizontal bar of `share` (0..1) in eighths of a character."""
    eighths = round(max(0.0, min(1.0, share)) * width * 8)
    full, rest = divmod(eighths, 8)
    return "█" * full + ("" if rest == 0 else " ▏▎▍▌▋▊▉"[rest])


def plan_table(plan: Plan, graph: ProfiledGraph) -> Table:
    """What the plan does with each unit, and what that costs and saves."""
    table = Table(title=f"{plan.model}: plan by {plan.solver} ({plan.status.value})", box=box.SIMPLE_HEAD)
    for column in ("unit", "kind", "action", "region", "saved", "fwd ms"):
        table.add_column(column, justify="left" if column in ("unit", "kind", "action") else "right")
    styles = {"keep": "dim", "recompute": "yellow", "offload": "cyan"}
    for (key, action, region, save_ops), unit in zip(plan.decisions(), graph.units):
        kept = collections.Counter(k.op.split(".")[-1] for k in save_ops)
        label = action.value + (" (keeps " + ", ".join(op + f" ×{n}" * (n > 1) for op, n in sorted(kept.items())) + ")"
                                if kept else "")
        table.add_row(
            key,
            unit.kind,
            Text(label, style=styles[action.value]),
            "" if region is None else str(region),
            format_bytes(unit.saved_bytes),
            f"{unit.fwd_ms:.2f}",
        )
    return table


def plan_panel(plan: Plan) -> Panel:
    """Predicted peak and overhead of the plan against the unplanned step and the budget."""
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column(style="dim")
    table.add_row("budget", format_bytes(plan.budget_bytes), "")
    table.add_row("unplanned peak", format_bytes(plan.unplanned_peak_bytes), "")
    share = plan.predicted_peak_bytes / plan.unplanned_peak_bytes if plan.unplanned_peak_bytes else 0.0
    table.add_row("planned peak", format_bytes(plan.predicted_peak_bytes), f"{share:.0%} of unplanned")
    table.add_row("overhead", f"{plan.predicted_overhead_ms:.2f} ms", f"+{plan.overhead_pct:.1f}% of {plan.step_ms:.1f} ms")
    if plan.predicted_host_bytes:
        table.add_row("offloaded", format_bytes(plan.predicted_host_bytes), "held in host memory")
    gap = "" if plan.gap == 0 else f", gap {plan.gap:.2%}"
    table.add_row("solved in", f"{plan.solve_s:.2f} s", f"{plan.solver}{gap}")
    return Panel(table, title="predicted step under the plan", expand=False)


def comparison_table(results: list[GpuResult], title: str = "", max_batch: bool = False) -> Table:
    """One row per GPU: usable memory, whether the step fits unplanned and with a plan, the peak it
    runs at (in red: the least memory any plan needs), the plan's overhead, what it offloads of the
    host memory allowed, step time (ms) and throughput (samples/s), and with `max_batch` the largest
    batch size that fits."""
    table = Table(title=title or None, box=box.SIMPLE_HEAD, header_style="bold", title_justify="left",
                  collapse_padding=True, pad_edge=False)  # fmt: skip
    table.add_column("GPU", no_wrap=True)
    headers = ["usable", "fits", "with\nplan", "peak", "over-\nhead", "offloaded\n/ host", "step\nms", "samples\n/s"]
    cards = any(r.world_size > 1 for r in results)
    extra = (["max\nbatch"] if max_batch else []) + (["cards\nneeded", "with\nplan"] if cards else [])
    for header in headers + extra:
        table.add_column(header, justify="right", no_wrap=True)
    for r in results:
        row = [
            r.gpu,
            format_bytes(r.usable_bytes),
            _yes_no(r.fits_unplanned),
            _yes_no(r.fits) if not r.fits_unplanned else Text("-", style="dim"),
            _peak_cell(r),
            "-" if r.overhead is None or r.fits_unplanned else f"{r.overhead:+.1%}",
            _host_cell(r),
            "-" if r.step_ms is None else f"{r.step_ms:,.1f}",
            Text("-", style="dim") if r.samples_per_s is None else Text(f"{r.samples_per_s:,.1f}", style="bold"),
        ]
        if max_batch:
            row.append("-" if r.max_batch is None else str(r.max_batch))
        if cards:
            row += [_count(r.cards_unplanned, r.world_size), _count(r.cards_planned, r.world_size)]
        table.add_row(*row)
    return table


def _host_cell(r: GpuResult) -> Text:
    offloaded = "-" if r.offloaded_bytes is None or r.fits_unplanned else format_bytes(r.offloaded_bytes)
    return Text(f"{offloaded} / {format_bytes(r.host_bytes)}", style="dim" if offloaded in ("-", "0 B") else "")


def _count(cards: int | None, most: int) -> Text:
    return Text(str(cards)) if cards is not None else Text(f"> {most}", style="red")


def _yes_no(value: bool) -> Text:
    return Text("yes", style="green") if value else Text("no", style="red")


def _peak_cell(r: GpuResult) -> Text:
    """The peak the step runs at (yellow: over the overhead limit); when nothing fits, the least a plan needs (red)."""
    if r.peak_bytes is not None:
        return Text(format_bytes(r.peak_bytes), style="" if r.fits else "yellow")
    if r.needed_bytes is not None:
        return Text(format_bytes(r.needed_bytes), style="red")
    return Text("-", style="dim")
