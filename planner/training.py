"""Train under a plan and set what was measured beside what was predicted."""

from __future__ import annotations

from dataclasses import replace

from rich.console import Console
from rich.progress import track
from rich.table import Table

from planner.execution import apply
from planner.measurement import Measurement, measure
from planner.core.sizes import format_bytes
from planner.step import timed_in_turns, train_step
from planner.workload import Workload
from planner.core.plan import Plan


def train_and_measure(workload: Workload, plan: Plan, steps: int, console: Console | None = None) -> Table:
    """Train `steps` steps under the plan and set them beside the unplanned step (`run_under_plan`)."""
    return comparison_table(plan, *run_under_plan(workload, plan, steps, console))


def run_under_plan(
    workload: Workload, plan: Plan, steps: int, console: Console | None = None
) -> tuple[Measurement, Measurement]:
    """Train `steps` steps under the plan, each after one step without it; the unplanned and the
    planned measurements, their step times by `planner.step.timed_in_turns`.

    Both kinds of step train the model the same way (a plan does not change numerics); taking them
    in turns lets each pair see the machine in the same state. The peaks are measured last.
    """
    w = workload
    step_args = {"loss_fn": w.loss_closure(), "optimizer": w.optimizer, "autocast_dtype": w.autocast_dtype}
    unplanned = measure(w.model, w.batch, steps=1, **step_args)

    def step() -> None:
        train_step(w.model, w.batch, **step_args)

    handle = apply(w.model, plan)
    try:
        rounds = track(range(steps), description="training under the plan", console=console, transient=True)
        before_ms, after_ms = timed_in_turns(handle, step, w.device, rounds)
        planned = measure(w.model, w.batch, steps=1, warmup=0, **step_args)
    finally:
        handle.remove()
    return replace(unplanned, step_ms=before_ms, steps=steps), replace(planned, step_ms=after_ms, steps=steps)


def comparison_table(plan: Plan, unplanned: Measurement, planned: Measurement) -> Table:
    table = Table(title=f"{plan.model} under the plan ({plan.solver}), budget {format_bytes(plan.budget_bytes)}")
    for column in ("", "peak", "step time", "overhead"):
        table.add_column(column, justify="left" if not column else "right")
    predicted_ms = plan.step_ms + plan.predicted_overhead_ms
    table.add_row("predicted, unplanned", format_bytes(plan.unplanned_peak_bytes), f"{plan.step_ms:.1f} ms", "")
    table.add_row(
        "predicted, planned", format_bytes(plan.predicted_peak_bytes), f"{predicted_ms:.1f} ms", f"+{plan.overhead_pct:.1f}%"
    )
    table.add_row("measured, unplanned", _peak(unplanned), f"{unplanned.step_ms:.1f} ms", "")
    overhead = 100.0 * (planned.step_ms / unplanned.step_ms - 1.0)
    held = "[green]under budget[/]" if planned.peak_bytes <= plan.budget_bytes else "[red]over budget[/]"
    table.add_row("measured, planned", f"{_peak(planned)} {held}", f"{planned.step_ms:.1f} ms", f"{overhead:+.1f}%")
    return table


def _peak(m: Measurement) -> str:
    text = format_bytes(m.peak_bytes)
    return text if m.reserved_bytes is None else f"{text} (reserved {format_bytes(m.reserved_bytes)})"


def rank_table(reports: list, world_size: int, sharding: str) -> Table:
    """Each rank's peak under the plan, predicted from its own profile and measured, beside its
    measured unplanned peak (`planner.distributed.RankReport`s)."""
    plan = reports[0].plan
    table = Table(
        title=f"{plan.model}, {world_size} ranks ({sharding}), plan by {plan.solver}, "
        f"budget {format_bytes(plan.budget_bytes)} per rank"
    )
    for column in ("rank", "unplanned", "predicted", "measured", "error", "budget", "step time"):
        table.add_column(column, justify="right")
    for r in reports:
        table.add_row(
            str(r.rank),
            format_bytes(r.unplanned_measured_bytes),
            format_bytes(r.predicted_bytes),
            format_bytes(r.measured_bytes),
            f"{100.0 * (r.measured_bytes / r.predicted_bytes - 1.0):+.2f}%",
            "[green]under[/]" if r.measured_bytes <= r.budget_bytes else "[red]over[/]",
            f"{r.step_ms:.1f} ms",
        )
    return table
