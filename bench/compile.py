"""Plans under torch.compile against torch.compile's own memory knob, measured side by side on the CPU.

    python -m bench.compile                       # writes bench/compile.json and bench/compile_{gpt,gpt2,llama}.png
    python -m bench.compile --models gpt --steps 5

Per model (the zoo's GPT; GPT-2 and LLaMA from small Hugging Face configs, as in tests/third_party.py;
AdamW), in one process: the compiled step without a plan; with
`torch._functorch.config.activation_memory_budget` at 0.8, 0.5, 0.2 and 0.0 (compile's knob, a share
of what the partitioner saves); and the compiled step under the planner's plans (`profile(...,
compiled=True)`, then `hold`, which checks one planned step and plans again where it is over), at
six budgets from the smallest peak any plan reaches to the unplanned peak and at the peak the knob
measures at 0.5. Peaks: the most c10's CPU allocator holds during a steady step (compiled kernels
allocate outside the dispatcher, so live-storage tracking cannot see them), with the parameters,
gradients and optimizer state; for the step without a plan, the knob at 0.5 and the planner at
the knob's peak, also the rise of the process's high-water mark in a fresh process started with
MALLOC_MMAP_THRESHOLD_=65536 (in this one, the memory compiling left in the C library's heap hides
part of the step's). Step time: the median ratio of --steps steps, each to a compiled step
without a plan in the same turn (a knob setting is compiled with a backend of its own, so that
both stay compiled); at the knob's peak at 0.5, the planned step, the knob's at 0.5 and the unplanned
one in the same turns, three times as many. The process runs with the C library told to keep the memory
it is given back (`KEEP_FREED`, as in bench.hf_checkpointing and as CUDA's caching allocator keeps it),
so that page faults taken at moments that differ between two forms of the step do not decide their times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import planner
from bench.baselines_report import tradeoff_plot
from bench.hf_checkpointing import KEEP_FREED
from planner.planning import BudgetExceeded, InfeasibleBudget, hold
from planner.scenario import load_scenario
from planner.step import TrainingStep, paired_ratio, timed_ms
from tests.third_party import MODELS

KNOB = (0.8, 0.5, 0.2, 0.0)
SHARES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # of the way from the smallest planned peak to the unplanned one


def build(name: str):
    torch.manual_seed(0)
    if name == "gpt":
        w = load_scenario("gpt").build("small", device="cpu", seed=0)
        return w.model, w.batch, w.loss_closure()
    model, batch = MODELS[name]()
    return model, batch, None


def measured(compiled, batch, loss_fn, optimizer, steps: int) -> tuple[int, float]:
    """(allocator peak, median step ms) of the compiled step as it is now."""
    m = planner.measure(compiled, batch, loss_fn=loss_fn, optimizer=optimizer, steps=steps, warmup=2)
    return m.peak_bytes, m.step_ms


def with_knob(budget: float):
    """Inductor with `activation_memory_budget` at `budget` while it partitions: a backend of its own,
    which Dynamo's guards tell apart from the default one, so that both compiled steps stay cached."""
    from torch._inductor.compile_fx import compile_fx

    def backend(graph, example_inputs):
        with torch._functorch.config.patch(activation_memory_budget=budget):
            return compile_fx(graph, example_inputs)

    return backend


def in_turns(plain, others, steps: int) -> list[float]:
    """Per form of `others`, the median ratio of its time to that of `plain()` in the same turn, less 1
    (`paired_ratio`); steps taken in turns after two of each untimed (Dynamo compiles each form again
    after a plan was applied)."""
    forms = (plain, *others)
    for _ in range(2):
        for step in forms:
            step()
    times: list[list[float]] = [[] for _ in forms]
    for _ in range(steps):
        for step, ms in zip(forms, times):
            ms.append(timed_ms(step, torch.device("cpu")))
    return [paired_ratio(times[0], ms) - 1 for ms in times[1:]]


def run(name: str, steps: int, log, directory: Path) -> list[dict]:
    model, batch, loss_fn = build(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    compiled = torch.compile(model)
    step_args = {"loss_fn": loss_fn, "optimizer": optimizer}
    graph = planner.profile(model, batch, compiled=True, **step_args)

    def row(method: str, predicted: int | None = None, **extra) -> dict:
        peak, ms = measured(compiled, batch, loss_fn, optimizer, steps)
        log(f"{name}: {method}: {peak / 2**20:.2f} MiB, {ms:.0f} ms")
        return {"model": name, "method": method, "peak": peak, "step_ms": ms, "predicted": predicted, **extra}

    unplanned = row("compiled, no plan", planner.simulate(graph).peak_bytes, overhead=0.0,
                    hwm=high_water(name, directory))
    rows = [unplanned]
    plain = TrainingStep.of(compiled, batch, loss_fn, optimizer)
    for budget in KNOB:  # compiled with a backend of its own, timed in turns with the unplanned step
        knob = TrainingStep.of(torch.compile(model, backend=with_knob(budget)), batch, loss_fn, optimizer)
        peak, ms = measured(knob.model, batch, loss_fn, optimizer, steps)
        log(f"{name}: activation_memory_budget={budget:g}: {peak / 2**20:.2f} MiB, {ms:.0f} ms")
        rows.append({"model": name, "method": f"activation_memory_budget={budget:g}", "peak": peak, "step_ms": ms,
                     "predicted": None, "knob": budget, "overhead": in_turns(plain, [knob], steps)[0],
                     "hwm": high_water(name, directory, knob=budget) if budget == 0.5 else None})
    torch.compiler.reset()
    knob_half = next(r["peak"] for r in rows if r.get("knob") == 0.5)
    unplanned_bytes = unplanned["predicted"]
    smallest = smallest_peak(graph)
    budgets = [(f"planner, {share:.0%} of the way from its smallest peak",
                round(smallest + share * (unplanned_bytes - smallest))) for share in SHARES]
    budgets.append(("planner at activation_memory_budget=0.5's peak", knob_half))
    for label, budget in budgets:
        try:
            handle = hold(compiled, graph, planner.plan(graph, budget), batch, **step_args)
        except (InfeasibleBudget, BudgetExceeded) as err:
            log(f"{name}: {label}: {err}")
            rows.append({"model": name, "method": label, "budget": budget, "refused": str(err)})
            continue
        r = row(label, handle.plan.predicted_peak_bytes, budget=budget, plan=planner_summary(handle.plan))
        unplanned_step = lambda h=handle: (h.remove(), plain())
        planned_step = lambda h=handle: (h.install(), plain())
        if not label.startswith("planner at"):
            r["overhead"] = in_turns(unplanned_step, [planned_step], steps)[0]
        else:  # the knob's step at 0.5 taken in the same turns, three times as many
            knob = TrainingStep.of(torch.compile(model, backend=with_knob(0.5)), batch, loss_fn, optimizer)
            knob_step = lambda h=handle: (h.remove(), knob())
            r["overhead"], r["knob_overhead"] = in_turns(unplanned_step, [planned_step, knob_step], 3 * steps)
            planner.save_plan(handle.plan, directory / f"{name}.yaml")
            r["hwm"] = high_water(name, directory, plan=directory / f"{name}.yaml")
        handle.remove()
        rows.append(r)
    return rows


def high_water(name: str, directory: Path, knob: float | None = None, plan: Path | None = None) -> int:
    """The compiled step's peak by the process's high-water mark, in a fresh process started with
    MALLOC_MMAP_THRESHOLD_=65536 (so that freed tensors go back to the system): what existed before
    the step and the rise over it."""
    command = [sys.executable, "-m", "bench.compile", "--high-water", name]
    command += ["--knob", str(knob)] if knob is not None else []
    command += ["--plan", str(plan)] if plan is not None else []
    env = {k: v for k, v in os.environ.items() if k not in KEEP_FREED} | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    return int(subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.split()[-1])


def _one_high_water(name: str, knob: float | None, plan: str | None) -> int:
    model, batch, loss_fn = build(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if plan is not None:
        planner.apply(model, planner.load_plan(plan))
    with torch._functorch.config.patch(activation_memory_budget=1.0 if knob is None else knob):
        compiled = torch.compile(model)
        measurement = planner.measure(compiled, batch, loss_fn=loss_fn, optimizer=optimizer, steps=0, warmup=2)
    return measurement.process_peak_bytes


def smallest_peak(graph) -> int:
    """The smallest peak any plan of the compiled step reaches, in bytes."""
    try:
        planner.plan(graph, 1)
    except InfeasibleBudget as err:
        return err.smallest_bytes
    raise AssertionError("a budget of one byte was met")


def planner_summary(plan) -> str:
    regions = [c for c in plan.choices if c.action.value == "recompute"]
    kept = sum(len(c.save_ops) for c in regions)
    return f"{len(regions)} units recomputed" + (f", keeping {kept} operator calls" if kept else "")


def table(rows: list[dict]) -> str:
    mib = lambda b: f"{b / 2**20:.2f}"
    lines = ["| model | method | budget MiB | peak MiB (allocator / high-water) | predicted MiB | step time | plan |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = mib(r["budget"]) if r.get("budget") else ""
        if "refused" in r:
            reason = r["refused"]
            if "give a budget of at least" in reason:
                refused = f"refused: the checked step needs at least {reason.rsplit('(', 1)[-1].rstrip(')')}"
            else:  # over the budget after planning again
                refused = f"refused: {reason.split(';')[0]}"
            lines.append(f"| {r['model']} | {r['method']} | {budget} | {refused} | | | |")
            continue
        hwm = f" / {mib(r['hwm'])}" if r.get("hwm") else ""
        predicted = mib(r["predicted"]) if r["predicted"] else "—"
        plan = r.get("plan") or ""
        if "knob_overhead" in r:
            plan += f"; in the same turns, the knob at 0.5: {100 * r['knob_overhead']:+.0f}%"
        lines.append(f"| {r['model']} | {r['method']} | {budget} | {mib(r['peak'])}{hwm} | {predicted} | "
                     f"{100 * r['overhead']:+.0f}% | {plan} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt", "gpt2", "llama"], choices=["gpt", "gpt2", "llama"])
    parser.add_argument("--steps", type=int, default=11)
    parser.add_argument("--high-water", metavar="MODEL", help=argparse.SUPPRESS)  # one measurement, in its own process
    parser.add_argument("--knob", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.high_water:
        print(_one_high_water(args.high_water, args.knob, args.plan))
        return
    if any(os.environ.get(k) != v for k, v in KEEP_FREED.items()):  # the settings apply from a process's start
        os.execve(sys.executable, [sys.executable, "-m", "bench.compile", *sys.argv[1:]], os.environ | KEEP_FREED)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for name in args.models:
            rows += run(name, args.steps, lambda text: print(text, flush=True), Path(directory))
            Path("bench/compile.json").write_text(json.dumps(rows, indent=1))
            plot(name, [r for r in rows if r["model"] == name and "peak" in r])
    print(table(rows))


def plot(name: str, rows: list[dict]) -> None:
    points = lambda keep: [(r["peak"] / 2**20, 1 + r["overhead"]) for r in rows if keep(r["method"])]
    methods = {"no plan": points(lambda m: m == "compiled, no plan"),
               "activation_memory_budget": points(lambda m: m.startswith("activation")),
               "planner": points(lambda m: m.startswith("planner"))}
    path = Path(f"bench/compile_{name}.png")
    tradeoff_plot(methods, f"{name} under torch.compile", "peak MiB (c10's allocator)", path)


if __name__ == "__main__":
    main()
