"""The CUDA paths on a real GPU: measured peaks against predicted, numerics, offload overlap.

    python -m bench.cuda [--variant full] [--scenarios gpt resnet] [--steps 10] [--out cuda.json]

For each scenario, profiled on the device: the unplanned step predicted and measured
(`torch.cuda.max_memory_allocated` and `max_memory_reserved`; the profile's workspaces, what the
allocator holds outside the model), then plans at 80%, at 50% (or the smallest feasible budget)
and at that + 10%, and a plan that offloads every unit it can (copies on a side stream), each
trained with planned and unplanned steps in turns. Numerics, for the last budget's plan: losses
and gradients over 3 steps against the unplanned run's, with dropout on and off, beside PyTorch's
own checkpoint around the same units and the unplanned run against itself (the floor that
non-deterministic kernels set). Rows are written to `--out` after each scenario.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import torch

import planner
from planner.core.actions import Action
from planner.core.gpus import roofline_for
from planner.execution.calibration import host_copy_bytes_per_s
from planner.core.graph import Category
from planner.planning import InfeasibleBudget
from planner.scenario import list_scenarios, load_scenario
from planner.core.simulator import simulate
from planner.step import autocast
from planner.training import run_under_plan
from solvers import build_problem
from solvers.ilp import min_peak


def scenario_report(name: str, variant: str, device: str, steps: int, time_limit_s: float) -> dict:
    start = time.perf_counter()
    w = load_scenario(name).build(variant, device=device)
    graph = planner.profile(w.model, w.batch, loss_fn=w.loss_closure(), optimizer=w.optimizer, autocast_dtype=w.autocast_dtype)
    profile_s = time.perf_counter() - start
    unplanned = simulate(graph).peak_bytes
    measured = planner.measure(w.model, w.batch, loss_fn=w.loss_closure(), optimizer=w.optimizer, autocast_dtype=w.autocast_dtype)
    report = {
        "scenario": name,
        "variant": variant,
        "units": len(graph.units),
        "profile_s": profile_s,
        "device_name": graph.calibration.device_name,
        "predicted_unplanned_bytes": unplanned,
        "measured_unplanned_bytes": measured.peak_bytes,
        "reserved_unplanned_bytes": measured.reserved_bytes,
        "predicted_step_ms": graph.step_ms,
        "measured_step_ms": measured.step_ms,
        "fixed_bytes": graph.fixed.total,
        "workspace_bytes": graph.fixed.workspace,
        "largest_transients": [
            {"op": b.op, "phase": b.phase.value, "bytes": b.bytes}
            for b in sorted((b for b in graph.blocks if b.category is Category.TRANSIENTS), key=lambda b: -b.bytes)[:5]
        ],
        "host_copy_bytes_per_s": host_copy_bytes_per_s(64 << 20, device=device),
        "plans": [],
    }
    smallest = min_peak(build_problem(graph, 0), time_limit_s)[0]
    report["smallest_bytes"] = smallest
    try:
        tight, label = planner.plan(graph, "50%", time_limit_s=time_limit_s).budget_bytes, "50%"
    except InfeasibleBudget:
        tight, label = smallest, "smallest"
    budgets = ((int(0.8 * unplanned), "80%"), (tight, label), (int(tight * 1.1), f"{label} + 10%"))
    planned = [(what, planner.plan(graph, b, time_limit_s=time_limit_s)) for b, what in budgets if smallest <= b < unplanned]
    plans = [*planned, ("offload every unit", offload_all(graph))]
    rates = roofline_for(graph)
    bare = replace(rates, mechanism=None)  # what the plans would cost without the executor's own work
    report["mechanism"] = asdict(rates.mechanism)
    for what, plan in plans:
        base, under = run_under_plan(w, plan, steps)
        report["plans"].append(
            {
                "budget": what,
                "budget_bytes": plan.budget_bytes,
                "solver": plan.solver,
                "recomputed": sum(c.action is Action.RECOMPUTE for c in plan.choices),
                "offloaded": sum(c.action is Action.OFFLOAD for c in plan.choices),
                "predicted_peak_bytes": plan.predicted_peak_bytes,
                "measured_peak_bytes": under.peak_bytes,
                "reserved_bytes": under.reserved_bytes,
                "unplanned_measured_bytes": base.peak_bytes,
                "predicted_overhead_pct": plan.overhead_pct,
                "predicted_mechanism_ms": plan.predicted_overhead_ms - simulate(graph, plan.choices, bare).extra_ms,
                "measured_overhead_pct": 100.0 * (under.step_ms / base.step_ms - 1.0),
                "unplanned_ms": base.step_ms,
                "planned_ms": under.step_ms,
            }
        )
    report["numerics"] = numerics(name, variant, device, (planned or plans)[-1][1])
    report["seconds"] = time.perf_counter() - start
    return report


def offload_all(graph):
    """A plan that offloads every unit that has something to offload, costed by the device's rates."""
    problem = build_problem(graph, 0)
    choices = tuple(o.choice for o in problem.options if o.choice.action is Action.OFFLOAD)
    sim = simulate(graph, choices, roofline_for(graph))
    base = planner.plan(graph, "100%", solver="none")
    return replace(
        base, choices=choices, budget_bytes=sim.peak_bytes, solver="offload", predicted_peak_bytes=sim.peak_bytes, predicted_overhead_ms=sim.extra_ms
    )


def numerics(name: str, variant: str, device: str, plan) -> dict:
    """Largest differences over 3 steps against the unplanned run: the planned run, in training mode
    and with dropout off (eval mode), PyTorch's own checkpoint around the plan's recomputed units,
    and the unplanned run itself (the floor that non-deterministic kernels set); 0 is bit-identical."""
    def build():
        return load_scenario(name).build(variant, device=device)

    runs = {
        "planned": ({}, {"plan": plan}),
        "planned_dropout_off": ({"train": False}, {"plan": plan, "train": False}),
        "torch_checkpoint": ({}, {"plan": plan, "torch_checkpoint": True}),
        "unplanned_again": ({}, {}),
    }
    report = {}
    for what, (reference, compared) in runs.items():
        try:  # fails for plain checkpoints around units that a later unit writes into, cuDNN RNNs in eval mode
            report[what] = difference(run_steps(build(), 3, **reference), run_steps(build(), 3, **compared))
        except RuntimeError as error:
            report[what] = {"error": str(error)[:200]}
        gc.collect()
    return report


def run_steps(w, steps: int, plan=None, train: bool = True, torch_checkpoint: bool = False) -> dict[str, torch.Tensor]:
    """Losses, gradients and the final state of `steps` steps, by name, on the CPU."""
    torch.manual_seed(0)
    w.model.train(train)
    handle = None
    if plan is not None and torch_checkpoint:
        modules = dict(w.model.named_modules())
        for c in plan.choices:
            for u in c.units if c.action is Action.RECOMPUTE else ():
                m = modules[plan.units[u].rsplit("#", 1)[0]]
                m.forward = functools.partial(torch.utils.checkpoint.checkpoint, m.forward, use_reentrant=False)
    elif plan is not None:
        handle = planner.apply(w.model, plan)
    out = {}
    for step in range(steps):
        with autocast(w.device, w.autocast_dtype):
            loss = w.loss_fn(w.model(*w.inputs, **w.kwargs), w.target)
        loss.backward()
        out[f"loss {step}"] = loss.detach().float().cpu()
        out |= {f"grad {step} {n}": p.grad.detach().float().cpu() for n, p in w.model.named_parameters()}
        w.optimizer.step()
        w.optimizer.zero_grad(set_to_none=True)
    if handle is not None:
        handle.remove()
    return out | {f"state {k}": v.detach().float().cpu() for k, v in w.model.state_dict().items()}


def difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """Bit-identical or not; the largest difference relative to its tensor's largest value, and where."""
    rel = {k: ((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)).item() for k in a if a[k].numel()}
    worst = max(rel, key=rel.get)
    first = [k for k in rel if k.startswith(("loss 0", "grad 0"))]
    return {
        "identical": all(torch.equal(a[k], b[k]) for k in a),
        "max_relative": rel[worst],
        "worst": worst,
        "first_step_max_relative": max(rel[k] for k in first),
    }


def table(reports: list[dict]) -> str:
    mib = 2**20
    lines = [
        "| scenario | budget | plan | peak predicted | allocated | reserved | overhead predicted | measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        if "error" in r:
            lines.append(f"| {r['scenario']} ({r['variant']}) | error: {r['error']} |||||||")
            continue
        lines.append(
            f"| {r['scenario']} ({r['variant']}) | none | | {r['predicted_unplanned_bytes'] / mib:.1f} MiB | "
            f"{r['measured_unplanned_bytes'] / mib:.1f} MiB | {(r['reserved_unplanned_bytes'] or 0) / mib:.1f} MiB | | |"
        )
        for p in r["plans"]:
            lines.append(
                f"| | {p['budget']} | {p['recomputed']}R {p['offloaded']}O | {p['predicted_peak_bytes'] / mib:.1f} MiB | "
                f"{p['measured_peak_bytes'] / mib:.1f} MiB | {(p['reserved_bytes'] or 0) / mib:.1f} MiB | "
                f"{p['predicted_overhead_pct']:+.1f}% | {p['measured_overhead_pct']:+.1f}% |"
            )
        cells = [f"{k}: {_agreement(d)}" for k, d in r["numerics"].items()]
        lines.append(f"| | numerics (first step / 3 steps) | {'; '.join(cells)} |||||||")
    return "\n".join(lines)


def _agreement(d: dict) -> str:
    if "error" in d:
        return "failed"
    if d["identical"]:
        return "identical"
    return f"{d['first_step_max_relative']:.1e} / {d['max_relative']:.1e} ({d['worst']})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="full", choices=("small", "full"))
    parser.add_argument("--scenarios", nargs="*", default=[n for n in list_scenarios() if n != "gpt7b"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--time-limit", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("cuda.json"))
    args = parser.parse_args()
    reports = []
    for name in args.scenarios:
        try:
            reports.append(scenario_report(name, args.variant, args.device, args.steps, args.time_limit))
        except Exception as error:  # noqa: BLE001 - one scenario's failure is reported, the others still run
            traceback.print_exc()
            reports.append({"scenario": name, "variant": args.variant, "error": f"{type(error).__name__}: {error}"})
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device}
        args.out.write_text(json.dumps({"meta": meta, "reports": reports}, indent=2))
        print(table(reports[-1:]), flush=True)
    print(table(reports))


if __name__ == "__main__":
    main()
