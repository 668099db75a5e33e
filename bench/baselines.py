"""The planner against the checkpointing a user would otherwise pick, measured side by side on the CPU.

    python -m bench.baselines --quick                     # 2 scenarios, 2 budgets, no torch.compile (~3 min)
    python -m bench.baselines                             # every zoo scenario (small), budgets down to the smallest
    python -m bench.baselines --scenarios gpt,vgg --out bench/RESULTS.md

Per scenario (small variant), in one process: no checkpointing (the reference), torch.utils.checkpoint
around every unit (in full, and selective with a fixed save list: every matmul's output, or
torchtitan's list), checkpoint_sequential in sqrt(n) segments where the model (or its main
nn.Sequential body) is sequential, the planner's "all" and "sqrt" baselines, and the planner's ilp,
greedy and dp (chains only) solvers at budgets from 100% of the unplanned peak down to the smallest
feasible peak + 2%. torch.compile with activation_memory_budget runs in a subprocess (see
bench.baselines_compile). Every method's peak is measured by planner.measure (one warm-up step, then the peak
of one more), and its step time as the median ratio of 7 steps, each to an unplanned step taken
just before it. Writes RESULTS.md, results.json and
tradeoff_<scenario>.png next to --out.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import planner
from bench import baselines_compile_runner, baselines_report
from bench.selective import SELECTIVE, selective
from planner.planning import InfeasibleBudget
from planner.scenario import list_scenarios, load_scenario
from planner.step import paired_ratio, timed_ms
from solvers import build_problem
from solvers.ilp import min_peak

STEPS = 7  # method steps, each after an unplanned one
QUICK_SCENARIOS = ("resnet", "vgg")
ORDER = ("vgg", "resnet", "lstm", "gpt", "unet", "lstm_cell")  # cheapest first; lstm_cell (slowest step) last
COMPILE_BUDGETS = (0.5, 0.1)
SOLVERS = ("ilp", "greedy", "dp")
MATCHED = "planner (auto) at a baseline's peak"
SAME_AS_REFERENCE = "no checkpointing"  # note of rows whose plan keeps everything: the reference's numbers


@dataclass(frozen=True)
class Row:
    """One measured method; bytes and ms, `budget_bytes` None where the method takes no budget."""

    method: str
    budget_bytes: int | None
    peak_bytes: int | None
    step_ms: float | None
    predicted_peak_bytes: int | None = None
    predicted_overhead_ms: float | None = None
    note: str = ""


@contextmanager
def checkpoint_every_unit(model: nn.Module, graph, kind: str | None = None) -> Iterator[None]:
    """torch.utils.checkpoint around each unit's module (outermost ones, not in-place ones), selective
    with a fixed save list of `bench.selective` where `kind` names one.

    In-place activations (`inplace=True`) are switched off meanwhile, as checkpointing's docs advise:
    an in-place op on a checkpointed region's input breaks its recomputation.
    """
    names = {u.name for u in graph.units if u.name and not u.mutates_inputs}
    names = {n for n in names if not any(n.startswith(o + ".") for o in names)}
    modules = dict(model.named_modules())
    for n in names:
        modules[n].forward = _checkpointed(modules[n].forward, kind)
    try:
        with no_inplace(model):
            yield
    finally:
        for n in names:
            del modules[n].forward  # the instance attribute; the class's forward shows again


@contextmanager
def no_inplace(model: nn.Module) -> Iterator[None]:
    """Modules with `inplace=True` run out of place meanwhile."""
    inplace = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in inplace:
        m.inplace = False
    try:
        yield
    finally:
        for m in inplace:
            m.inplace = True


def _checkpointed(orig, kind: str | None = None):
    context = {"context_fn": selective(kind)} if kind else {}

    def forward(*args, **kwargs):
        return checkpoint(orig, *args, use_reentrant=False, **context, **kwargs)

    return forward


def sequential_body(model: nn.Module) -> tuple[str, nn.Sequential] | None:
    """The model itself when it is an nn.Sequential, else its largest nn.Sequential child (>= 4 layers)."""
    if isinstance(model, nn.Sequential):
        return "", model
    children = [(n, m) for n, m in model.named_children() if isinstance(m, nn.Sequential) and len(m) >= 4]
    return max(children, key=lambda c: len(c[1]), default=None)


@contextmanager
def checkpoint_sqrt_segments(body: nn.Sequential) -> Iterator[None]:
    """checkpoint_sequential over `body` in round(sqrt(n)) segments."""
    segments = max(1, round(math.sqrt(len(body))))
    body.forward = lambda x: checkpoint_sequential(body, segments, x, use_reentrant=False)
    try:
        with no_inplace(body):
            yield
    finally:
        del body.forward


class Scenario:
    """One built workload with its profile; measures methods against it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.work = load_scenario(name).build("small", "cpu")
        w = self.work
        self.graph = planner.profile(w.model, w.batch, loss_fn=w.loss_closure(), optimizer=w.optimizer,
                                     autocast_dtype=w.autocast_dtype)
        self.unplanned_bytes = planner.simulate(self.graph).peak_bytes
        self.smallest_bytes = int(min_peak(build_problem(self.graph, 0), 10.0)[0])
        self.chain = build_problem(self.graph, 0).chain
        self.reference_ms: list[float] = []  # every unplanned step timed in turn with a method's

    def measure(self):
        w = self.work
        return planner.measure(w.model, w.batch, loss_fn=w.loss_closure(), optimizer=w.optimizer,
                               autocast_dtype=w.autocast_dtype, steps=1, warmup=1)

    def timed_step(self) -> float:
        return timed_ms(self.work.step, self.work.device)

    def measure_under(self, method) -> tuple[int, float]:
        """Peak under `method` (a function returning a fresh context), and its step time as a ratio:
        the median ratio of STEPS method steps, each to the unplanned step taken just before it."""
        with method():
            peak = self.measure().peak_bytes
        plain, under = [], []
        for _ in range(STEPS):
            plain.append(self.timed_step())
            with method():
                under.append(self.timed_step())
        self.reference_ms += plain
        return peak, paired_ratio(plain, under)

    def measured_row(self, method: str, context, note: str) -> Row:
        """Measure under `context` (a function returning a fresh one); a method that fails to run is a
        row with its error."""
        try:
            peak, ratio = self.measure_under(context)
        except RuntimeError as e:
            return Row(method, None, None, None, note=f"n/a ({str(e).splitlines()[0][:120]})")
        return Row(method, None, peak, ratio, note=note)

    def budgets(self, quick: bool) -> list[int]:
        """100% of the unplanned peak, then 90%, 80%, ... above the smallest, and the smallest."""
        low = self.smallest_bytes
        if quick:
            return [self.unplanned_bytes, low]
        shares = [s / 10 for s in range(9, 0, -1) if s / 10 * self.unplanned_bytes > low * 1.05]
        return [self.unplanned_bytes] + [int(s * self.unplanned_bytes) for s in shares] + [low]


def run_scenario(name: str, quick: bool, compile_note: str, log) -> dict:
    began = time.perf_counter()
    s = Scenario(name)
    log(f"{name}: {len(s.graph.units)} units, unplanned {s.unplanned_bytes / 2**20:.1f} MiB, "
        f"smallest {s.smallest_bytes / 2**20:.1f} MiB, chain={s.chain}")
    ref = s.measure()
    rows = [Row("no checkpointing", None, ref.peak_bytes, 1.0, s.unplanned_bytes, 0.0, SAME_AS_REFERENCE)]
    rows.append(s.measured_row("checkpoint every unit", lambda: checkpoint_every_unit(s.work.model, s.graph),
                               "inplace activations off"))
    for kind in SELECTIVE:
        rows.append(s.measured_row(f"checkpoint every unit, selective: {kind}",
                                   lambda kind=kind: checkpoint_every_unit(s.work.model, s.graph, kind),
                                   "inplace activations off"))
    body = sequential_body(s.work.model)
    if body is None:
        rows.append(Row("checkpoint_sequential sqrt(n)", None, None, None, note="n/a (not sequential)"))
    else:
        rows.append(s.measured_row("checkpoint_sequential sqrt(n)", lambda: checkpoint_sqrt_segments(body[1]),
                                   f"on {body[0] or 'the model'}, {len(body[1])} layers, inplace off"))
    if compile_note:
        rows += [Row(f"torch.compile, activation_memory_budget={b:g}", None, None, None, note=compile_note)
                 for b in COMPILE_BUDGETS]
    else:  # step time as a ratio, like the others: the reference is 1
        rows += baselines_compile_runner.compile_rows(name, COMPILE_BUDGETS, replace(ref, step_ms=1.0), Row, log)
    log(f"{name}: baselines done ({time.perf_counter() - began:.0f} s)")
    # the planner also at each baseline's measured peak, for the head-to-head comparison (at the smallest
    # feasible budget where a baseline is below it by less than 1%: the prediction errs high by a few bytes)
    peaks = [r.peak_bytes for r in rows[1:] if r.peak_bytes and 0.99 * s.smallest_bytes <= r.peak_bytes < s.unplanned_bytes]
    matched = sorted({max(p, s.smallest_bytes) for p in peaks})
    rows += planner_rows(s, quick, ref, log, matched)
    # step times were ratios to the unplanned steps taken in turn with them: scaled by all of those
    ref_ms = statistics.median(s.reference_ms)
    rows = [r if r.step_ms is None else replace(r, step_ms=r.step_ms * ref_ms) for r in rows]
    return {"scenario": name, "units": len(s.graph.units), "chain": s.chain,
            "unplanned_bytes": s.unplanned_bytes, "smallest_bytes": s.smallest_bytes,
            "profiled_step_ms": s.graph.step_ms, "reference_step_ms": ref_ms,
            "reference_step_ms_range": [min(s.reference_ms), max(s.reference_ms)],
            "seconds": time.perf_counter() - began,
            "rows": [asdict(r) for r in rows]}


def planner_rows(s: Scenario, quick: bool, ref, log, matched: list[int]) -> list[Row]:
    """The planner's baselines (once, with no budget), its solvers at each budget, and its default solver
    at each budget in `matched` (the baselines' peaks); equal plans measured once."""
    measured: dict[tuple, tuple[float, int]] = {}
    rows = []
    jobs = [(f"planner: {b} (baseline)", b, None) for b in ("all", "sqrt")]
    solvers = [x for x in SOLVERS if x != "dp" or s.chain]
    jobs += [(f"planner: {x}", x, b) for b in s.budgets(quick) for x in solvers]
    jobs += [(MATCHED, "auto", b) for b in matched]
    for label, solver, budget in jobs:
        try:
            plan = planner.plan(s.graph, budget if budget is not None else 10 * s.unplanned_bytes, solver=solver)
        except InfeasibleBudget as e:
            rows.append(Row(label, budget, None, None, note=f"infeasible (smallest {e.smallest_bytes} B)"))
            continue
        key = plan.choices
        if key not in measured:
            if not plan.choices:
                measured[key] = (1.0, ref.peak_bytes)
            else:
                peak, ratio = s.measure_under(lambda: planner.apply(s.work.model, plan))
                measured[key] = (ratio, peak)
        ratio, peak = measured[key]
        same = SAME_AS_REFERENCE + "; " if not plan.choices else ""
        rows.append(Row(label, budget, peak, ratio, plan.predicted_peak_bytes, plan.predicted_overhead_ms,
                        note=f"{same}{plan.status.name.lower()}, solved in {plan.solve_s:.2f} s"))
        log(f"{s.name}: {label} @ {budget} -> {peak} B, x{ratio:.2f}")
    return rows


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "python": sys.version.split()[0]}


def _compile_skip_note(report: dict) -> str:
    """Non-empty once torch.compile has timed out on an earlier scenario: later ones are not tried."""
    for scenario in report["scenarios"]:
        for r in scenario["rows"]:
            if r["method"].startswith("torch.compile") and "did not compile" in r["note"]:
                return f"n/a (skipped: {scenario['scenario']} did not compile within the time limit)"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_SCENARIOS)}, 2 budgets, no compile")
    parser.add_argument("--scenarios", help="comma-separated scenario names (default: every zoo scenario)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"), help="markdown file to write")
    parser.add_argument("--deadline-min", type=float, default=14.0, help="skip scenarios not started by then")
    args = parser.parse_args()
    zoo = sorted((n for n in list_scenarios() if n != "gpt7b"), key=lambda n: (n not in ORDER, ORDER.index(n) if n in ORDER else 0, n))
    names = args.scenarios.split(",") if args.scenarios else (list(QUICK_SCENARIOS) if args.quick else zoo)
    unknown = sorted(set(names) - set(zoo))
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}; choose from {', '.join(zoo)}")
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {msg}", flush=True)

    report = {"command": "python -m bench.baselines " + shlex.join(sys.argv[1:]), "machine": machine(),
              "steps": STEPS, "scenarios": [], "skipped": []}
    for name in names:
        if time.perf_counter() - start > args.deadline_min * 60:
            report["skipped"].append(name)
            log(f"{name}: skipped (past the {args.deadline_min:g} min deadline)")
            continue
        compile_note = "skipped (--quick)" if args.quick else _compile_skip_note(report)
        report["scenarios"].append(run_scenario(name, args.quick, compile_note, log))
        baselines_report.write(report, args.out)  # after each scenario, so a cut-off run keeps what it did
    report["seconds"] = time.perf_counter() - start
    baselines_report.write(report, args.out)
    log(f"done; wrote {args.out}, {args.out.with_name('results.json')} and tradeoff_*.png")


if __name__ == "__main__":
    main()
