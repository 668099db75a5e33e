"""Writes bench.baselines results: a markdown table per scenario, results.json and a trade-off plot per scenario."""

from __future__ import annotations

import json
from pathlib import Path


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f}"


def _rows_md(scenario: dict) -> list[str]:
    ref_ms, unplanned = scenario["reference_step_ms"], scenario["unplanned_bytes"]
    lines = [
        f"### {scenario['scenario']}",
        "",
        f"{scenario['units']} units, chain: {scenario['chain']}; unplanned peak {_mib(unplanned)} MiB, smallest "
        f"feasible {_mib(scenario['smallest_bytes'])} MiB; no-checkpointing step {ref_ms:.0f} ms (median of the "
        f"unplanned steps timed in turns with the methods, from {scenario['reference_step_ms_range'][0]:.0f} to "
        f"{scenario['reference_step_ms_range'][1]:.0f} ms); {scenario['seconds']:.0f} s to run.",
        "",
        "| method | budget MiB (%) | measured peak MiB (%) | step time × | predicted peak MiB | predicted overhead | held | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in scenario["rows"]:
        budget = "—" if r["budget_bytes"] is None else f"{_mib(r['budget_bytes'])} ({100 * r['budget_bytes'] / unplanned:.0f}%)"
        peak = "—" if r["peak_bytes"] is None else f"{_mib(r['peak_bytes'])} ({100 * r['peak_bytes'] / unplanned:.0f}%)"
        rel = "—" if r["step_ms"] is None else f"{r['step_ms'] / ref_ms:.2f}"
        over = "—" if r["predicted_overhead_ms"] is None else f"{100 * r['predicted_overhead_ms'] / scenario['profiled_step_ms']:+.0f}%"
        held = "—" if r["budget_bytes"] is None or r["peak_bytes"] is None else (
            "yes" if r["peak_bytes"] <= r["budget_bytes"] else "**no**")
        lines.append(f"| {r['method']} | {budget} | {peak} | {rel} | {_mib(r['predicted_peak_bytes'])} | {over} | "
                     f"{held} | {r['note']} |")
    return lines + [""] + _head_to_head(scenario)


BASELINES = ("checkpoint every unit", "checkpoint_sequential", "torch.compile")
MATCHED = "planner (auto) at a baseline's peak"


def head_to_head(scenario: dict) -> list[tuple[dict, dict | None]]:
    """Each baseline that ran, with the planner's row at a budget of the baseline's measured peak, or of
    the smallest feasible one where that is higher by less than 1% (None further below, or at the
    unplanned peak)."""
    rows = scenario["rows"]
    planner = {r["budget_bytes"]: r for r in rows if r["method"] == MATCHED and r["peak_bytes"] is not None}
    return [(r, planner.get(max(r["peak_bytes"], scenario["smallest_bytes"]))) for r in rows
            if r["method"].startswith(BASELINES) and r["peak_bytes"] is not None and r["step_ms"] is not None]


def _head_to_head(scenario: dict) -> list[str]:
    pairs = head_to_head(scenario)
    if not pairs:
        return []
    ref_ms = scenario["reference_step_ms"]
    lines = ["| baseline | its peak MiB | its step × | planner at that budget: peak MiB | step × | planner on or below |",
             "|---|---|---|---|---|---|"]
    for b, p in pairs:
        if p is None:
            why = "below the smallest feasible peak" if b["peak_bytes"] < scenario["smallest_bytes"] else "no saving"
            lines.append(f"| {b['method']} | {_mib(b['peak_bytes'])} | {b['step_ms'] / ref_ms:.2f} | — | — | n/a ({why}) |")
            continue
        ok = p["step_ms"] <= b["step_ms"] and p["peak_bytes"] <= b["peak_bytes"]
        lines.append(f"| {b['method']} | {_mib(b['peak_bytes'])} | {b['step_ms'] / ref_ms:.2f} | {_mib(p['peak_bytes'])} | "
                     f"{p['step_ms'] / ref_ms:.2f} | {'yes' if ok else '**no**'} |")
    return lines + [""]


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Baselines: the planner against what a user would otherwise pick",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m['nproc']} CPUs, {m['cpu']}; torch {m['torch']}, Python {m['python']}. Each method: the peak "
        "of one step after a warm-up (live tensor storages; torch.compile rows from the process high-water mark), "
        f"and {report['steps']} timed steps, each after an unplanned one: step time × is the median ratio of each "
        "method step to the unplanned step just before it (torch.compile: compiled over eager in its own process). "
        "Predicted overhead is relative to the step time of the profile. Held: measured peak <= budget.",
        "",
    ]
    for scenario in report["scenarios"]:
        lines += _rows_md(scenario)
    if report.get("skipped"):
        lines.append(f"Skipped (time limit): {', '.join(report['skipped'])}")
    if "seconds" in report:
        lines.append(f"Total: {report['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def plot(scenario: dict, path: Path) -> None:
    ref_ms = scenario["reference_step_ms"]
    methods: dict[str, list[tuple[float, float]]] = {}
    for r in scenario["rows"]:
        if r["peak_bytes"] is not None and r["step_ms"] is not None:
            methods.setdefault(r["method"], []).append((r["peak_bytes"] / 2**20, r["step_ms"] / ref_ms))
    tradeoff_plot(methods, f"{scenario['scenario']} (small): overhead against peak", "measured peak (MiB)", path)


def tradeoff_plot(methods: dict[str, list[tuple[float, float]]], title: str, xlabel: str, path: Path) -> None:
    """Step time against peak: each method's (peak MiB, step time ×) points, joined where it has several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    markers = "os^vD<>pXh*"
    for i, (method, points) in enumerate(methods.items()):
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=markers[i % len(markers)],
                linestyle="-" if len(points) > 1 else "none", label=method)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("step time relative to no checkpointing")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: dict, out: Path) -> None:
    out.write_text(markdown(report))
    out.with_name("results.json").write_text(json.dumps(report, indent=1) + "\n")
    for scenario in report["scenarios"]:
        plot(scenario, out.with_name(f"tradeoff_{scenario['scenario']}.png"))
