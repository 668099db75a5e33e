"""Memory over one training step, and a comparison of GPUs, as PNGs.

    plot_timeline("step.png", [("no plan", simulate(graph)), ("plan", simulate(graph, plan.choices))], graph,
                  budget_bytes=parse_bytes("6GiB"))

The first simulation is drawn as areas stacked by category (fixed memory at the bottom), every
further one as a line of its total, each against its own ticks. Dashed lines mark where the
forward, backward and optimizer phases begin.

    plot_comparison("gpus.png", compare("gpt", ["a100-40gb", "rtx4090"]), title="gpt (full), batch 8")

draws, per GPU, its usable memory against the step's peak (unplanned, and with a plan), and the
throughput where the step fits.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any

from planner.export import atomic_open, check_suffix
from planner.core.graph import FIXED_CATEGORIES, Category, Phase, ProfiledGraph
from planner.core.sizes import format_bytes
from planner.core.simulator import Simulation

if TYPE_CHECKING:  # compare imports torch; a plot needs only the results' fields
    from planner.compare import GpuResult

MIB, GIB = 1024**2, 1024**3
STACK_ORDER = (*FIXED_CATEGORIES, Category.GRADIENTS, Category.ACTIVATIONS, Category.TRANSIENTS)
COLORS = {
    Category.PARAMETERS: "#4c72b0",
    Category.BUFFERS: "#64b5cd",
    Category.INPUTS: "#8172b3",
    Category.OPTIMIZER: "#937860",
    Category.COMMUNICATION: "#8c8c8c",
    Category.WORKSPACE: "#b0b0b0",
    Category.GRADIENTS: "#55a868",
    Category.ACTIVATIONS: "#dd8452",
    Category.TRANSIENTS: "#ccb974",
}
LINE_COLORS = ("black", "#c44e52", "#1f77b4", "#2ca02c", "#9467bd")
VERDICT_COLORS = {"fits": "#55a868", "fits with a plan": "#dd8452"}  # anything else does not fit
NO_FIT_COLOR = "#c44e52"


def plot_timeline(
    path: str | Path,
    series: list[tuple[str, Simulation]],
    graph: ProfiledGraph,
    budget_bytes: int | None = None,
) -> Path:
    """Write a PNG of memory (MiB or GiB) over the step's ticks to `path` and return the path.

    `series` holds (label, simulation) pairs, at least one; `budget_bytes` draws a red
    horizontal line. ValueError for an empty series or a name not ending in .png.
    """
    path = Path(path)
    check_suffix(path, (".png",))
    if not series:
        raise ValueError("plot_timeline needs at least one (label, simulation) pair")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 5.5), layout="constrained")
    try:
        _draw(ax, series, graph, budget_bytes)
        with atomic_open(path) as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)
    return path


def _draw(ax: Any, series: list[tuple[str, Simulation]], graph: ProfiledGraph, budget_bytes: int | None) -> None:
    peak = max([sim.peak_bytes for _, sim in series] + [budget_bytes or 0])
    scale, unit = (GIB, "GiB") if peak >= GIB else (MIB, "MiB")
    label, first = series[0]
    stacked = _stack(ax, first, scale)
    _mark_peak(ax, first, scale)
    for (name, sim), color in zip(series[1:], itertools.cycle(LINE_COLORS)):
        totals = [sim.timeline.total(i) / scale for i in range(len(sim.timeline.ticks))]
        ax.step(sim.timeline.ticks, totals, where="post", color=color, lw=1.6,
                label=f"{name} (peak {format_bytes(sim.peak_bytes)})")  # fmt: skip
    if budget_bytes is not None:
        ax.axhline(budget_bytes / scale, color="red", lw=1.8, label=f"budget {format_bytes(budget_bytes)}")
    ax.set_ylim(0, peak / scale * 1.12)
    ax.set_xlim(0, max([graph.end_tick] + [sim.timeline.ticks[-1] for _, sim in series]))
    _phases(ax, graph)
    ax.set_xlabel("tick (allocations, frees and operator calls, in order)")
    ax.set_ylabel(f"memory ({unit})")
    ax.set_title(f"{graph.model}: memory over one training step on {graph.device}")
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, stacked, title=f"{label}, by category")


def _legend(ax: Any, stacked: int, title: str) -> None:
    """Outside the axes on the right: the stacked areas top first, as they are stacked, then the lines."""
    handles, labels = ax.get_legend_handles_labels()  # in drawing order: areas first
    order = list(range(stacked))[::-1] + list(range(stacked, len(handles)))
    ax.legend([handles[i] for i in order], [labels[i] for i in order], title=title, title_fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False, alignment="left")  # fmt: skip


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from err
    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    return plt


def _stack(ax: Any, sim: Simulation, scale: float) -> int:
    """Areas stacked in STACK_ORDER, skipping categories that stay empty; returns how many were drawn."""
    ticks = sim.timeline.ticks
    base, drawn = [0.0] * len(ticks), 0
    for category in STACK_ORDER:
        values = sim.timeline.bytes_by_category.get(category)
        if values is None or not any(values):
            continue
        top = [b + v / scale for b, v in zip(base, values)]
        ax.fill_between(ticks, base, top, step="post", color=COLORS[category], lw=0, label=category.value)
        base, drawn = top, drawn + 1
    return drawn


def _mark_peak(ax: Any, sim: Simulation, scale: float) -> None:
    y = sim.peak_bytes / scale
    ax.plot([sim.peak_tick], [y], marker="v", color="black", ms=6, zorder=5)
    ax.annotate(f"peak {format_bytes(sim.peak_bytes)}", (sim.peak_tick, y), xytext=(0, 8),
                textcoords="offset points", ha="center", fontsize=9, zorder=6,
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85})  # fmt: skip


def _phases(ax: Any, graph: ProfiledGraph) -> None:
    """A dashed vertical line and a label at the start of each phase."""
    top = ax.get_ylim()[1]
    for phase in Phase:
        if phase not in graph.phases:
            continue
        start = graph.phases[phase][0]
        ax.axvline(start, color="grey", ls="--", lw=1)
        ax.text(start, top * 0.985, f" {phase.value}", va="top", ha="left", fontsize=9, color="dimgrey")


def plot_comparison(path: str | Path, results: list[GpuResult], title: str = "") -> Path:
    """Write a PNG comparing GPUs to `path` and return the path.

    Left, one row per GPU: its usable memory (grey), the unplanned peak (outline) and the peak
    the step would run at (green: fits, orange: with a plan, red: the least memory it needs).
    Right: samples per second where the step fits. ValueError for no results or a name not
    ending in .png.
    """
    path = Path(path)
    check_suffix(path, (".png",))
    if not results:
        raise ValueError("plot_comparison needs at least one GPU result")
    plt = _pyplot()
    fig, (mem, speed) = plt.subplots(1, 2, figsize=(12, 1.2 + 0.45 * len(results)), layout="constrained", sharey=True)
    try:
        _memory_bars(mem, results)
        _throughput_bars(speed, results)
        fig.suptitle(title or "GPU comparison")
        with atomic_open(path) as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)
    return path


def _memory_bars(ax: Any, results: list[GpuResult]) -> None:
    rows = list(range(len(results)))[::-1]  # the first GPU on top
    top = max(max(r.usable_bytes, r.unplanned_peak_bytes, r.needed_bytes or 0) for r in results)
    scale, unit = (GIB, "GiB") if top >= GIB else (MIB, "MiB")
    ax.barh(rows, [r.usable_bytes / scale for r in results], height=0.8, color="#dddddd", label="usable memory")
    peaks = [(r.peak_bytes or r.needed_bytes or 0) / scale for r in results]
    colors = [VERDICT_COLORS.get(r.verdict, NO_FIT_COLOR) for r in results]
    ax.barh(rows, peaks, height=0.45, color=colors, label="peak as run")
    ax.barh(rows, [r.unplanned_peak_bytes / scale for r in results], height=0.6, fill=False, edgecolor="black",
            lw=1, label="unplanned peak")  # fmt: skip
    ax.set_yticks(rows, [r.gpu for r in results])
    ax.set_xlabel(f"memory ({unit})")
    ax.grid(axis="x", alpha=0.3)
    _comparison_legend(ax)


def _comparison_legend(ax: Any) -> None:
    """Above the memory axes: the grey and outlined bars, then what each color of peak means."""
    from matplotlib.patches import Patch

    usable, _, unplanned = ax.get_legend_handles_labels()[0]
    kinds = (("fits", VERDICT_COLORS["fits"]), ("with a plan", VERDICT_COLORS["fits with a plan"]),
             ("does not fit", NO_FIT_COLOR))  # fmt: skip
    handles = [usable, unplanned, *(Patch(color=color, label=label) for label, color in kinds)]
    labels = ["usable memory", "unplanned peak", *(label for label, _ in kinds)]
    ax.legend(handles, labels, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=3, fontsize=8, frameon=False)


def _throughput_bars(ax: Any, results: list[GpuResult]) -> None:
    rows = list(range(len(results)))[::-1]
    speeds = [r.samples_per_s or 0.0 for r in results]
    colors = [VERDICT_COLORS.get(r.verdict, NO_FIT_COLOR) for r in results]
    ax.barh(rows, speeds, height=0.6, color=colors)
    for row, r in zip(rows, results):
        label = f" {r.samples_per_s:,.1f}" if r.samples_per_s else f" {r.verdict}"
        ax.text(r.samples_per_s or 0.0, row, label, va="center", fontsize=8)
    ax.set_xlim(0, max(speeds + [1.0]) * 1.25)
    ax.set_xlabel("throughput (samples/s, estimated)")
    ax.grid(axis="x", alpha=0.3)
