"""From a profiled graph and a budget to a plan.

    plan = planner.plan(graph, "60%")                 # 60% of the unplanned peak
    plan = planner.plan(graph, "6GiB", solver="ilp")

The solver's choices are checked by the simulator, which gives the plan's
predicted peak and overhead.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from planner.core.costmodel import Roofline
from planner.core.gpus import roofline_for
from planner.core.graph import ProfiledGraph
from planner.core.plan import Plan, Status
from planner.core.simulator import simulate
from planner.core.sizes import format_bytes, parse_budget, size_bytes
from planner.distributed.collective import agreed_union, agreed_units, on_worst_rank, worst_peak
from planner.execution import ReplayFailed, apply
from planner.measurement import measure, replays_left_behind
from planner.profiling import profile, unit_names
from planner.torch_internals import is_compiled, original
from solvers import Solution, auto_solver, build_problem, get_solver
from solvers.ilp import min_peak
from solvers.problem import Problem

log = logging.getLogger(__name__)
SEARCHING = ("ilp", "dp", "greedy")  # solvers that search for a plan (the others are fixed baselines)


class InfeasibleBudget(ValueError):
    """No plan fits the budget; `smallest_bytes` is the least budget that any plan fits."""

    def __init__(self, message: str, smallest_bytes: int) -> None:
        super().__init__(message)
        self.smallest_bytes = smallest_bytes

    def __reduce__(self):  # it travels between processes (one rank solves for all)
        return type(self), (str(self), self.smallest_bytes)


def plan(
    graph: ProfiledGraph,
    budget: int | float | str,
    solver: str = "auto",
    roofline: Roofline | None = None,
    time_limit_s: float = 10.0,
    *,
    offload: bool | None = None,
    margin_bytes: int = 0,
    host_memory: int | str | None = None,
) -> Plan:
    """The least-overhead plan whose peak fits `budget`; raises InfeasibleBudget when none does.

    `offload` allows offloading to host memory; by default it is allowed unless the step ran on a
    CPU, whose host memory is the device's (an offload there frees nothing; allow it to test the
    mechanics). `margin_bytes` are kept free under the budget (what a measured step showed beyond
    the prediction). `host_memory` (bytes or a size such as "64GiB") bounds the host memory the
    offloads hold at once (default: no bound). A graph of a compiled step (`profile(...,
    compiled=True)`) is planned with regions of one unit and no offload.
    """
    roofline = roofline or roofline_for(graph)
    unplanned = simulate(graph, roofline=roofline).peak_bytes
    budget_bytes = parse_budget(budget, unplanned)
    if offload and graph.compiled:
        raise ValueError("a plan for a compiled step's profile does not offload (an offloaded unit runs eagerly, "
                         "outside the compiled code the profile measured): plan it with offload=False")
    if offload is None:
        offload = not graph.device.startswith("cpu") and not graph.compiled
    host_bytes = None if host_memory is None else size_bytes(host_memory)
    # Under torch.compile the partitioner saves what passes between two checkpointed calls: a region
    # of several units holds what its units hold as regions of their own (planner.execution.compiled).
    # Where layers are skipped at random, a region of one unit is skipped whole.
    segments = {"max_segment_units": 1} if graph.compiled or graph.drops_layers else {}
    problem = build_problem(graph, budget_bytes - margin_bytes, roofline, offload=offload, host_budget_bytes=host_bytes,
                            **segments)
    name = auto_solver(problem) if solver == "auto" else solver
    solution = get_solver(name)(problem, time_limit_s)
    if solution.status is Status.INFEASIBLE and name in SEARCHING:  # its search found none: the least peak may fit
        smallest, chosen = min_peak(problem, time_limit_s)
        if smallest <= problem.budget_bytes:
            log.warning("solver %s found no plan within %g s; taking the plan of the least peak", name, time_limit_s)
            name, solution = f"{name}, then the least peak", Solution(chosen, Status.FEASIBLE)
    if solution.status is Status.INFEASIBLE:
        raise _infeasible(graph, problem, name, time_limit_s, margin_bytes)
    choices = tuple(problem.options[o].choice for o in solution.chosen)
    sim = simulate(graph, choices, roofline)
    assert sim.peak_bytes <= problem.peak_bytes(solution.chosen), "the problem and the simulator disagree"
    assert sim.host_bytes == problem.host_bytes(solution.chosen), "the problem and the simulator disagree"
    return Plan(
        model=graph.model,
        fingerprint=graph.fingerprint,
        units=tuple(u.key for u in graph.units),
        choices=choices,
        budget_bytes=budget_bytes,
        solver=name,
        status=solution.status,
        gap=solution.gap,
        solve_s=solution.solve_s,
        predicted_peak_bytes=sim.peak_bytes,
        predicted_overhead_ms=sim.extra_ms,
        step_ms=graph.step_ms,
        unplanned_peak_bytes=unplanned,
        forwards=graph.forwards,
        margin_bytes=margin_bytes,
        predicted_host_bytes=sim.host_bytes,
        compiled=graph.compiled,
    )


def _infeasible(graph: ProfiledGraph, problem: Problem, solver: str, time_limit_s: float, margin_bytes: int) -> InfeasibleBudget:
    smallest, _ = min_peak(problem, time_limit_s)
    smallest += margin_bytes
    budget = format_bytes(problem.budget_bytes + margin_bytes)
    if smallest > problem.budget_bytes + margin_bytes:
        kept = f", {format_bytes(margin_bytes)} of it kept free for what the measured step showed" if margin_bytes else ""
        return InfeasibleBudget(
            f"no plan fits a budget of {budget}{kept}: the smallest peak any plan reaches is {format_bytes(smallest)} "
            f"(unplanned: {format_bytes(problem.unplanned_peak_bytes)}); give a budget of at least "
            f"{smallest} bytes ({format_bytes(smallest)}){_stateful(graph)}",
            smallest,
        )
    return InfeasibleBudget(
        f"solver '{solver}' found no plan under {budget}, though the ilp solver can reach {format_bytes(smallest)}; "
        "use --solver ilp",
        smallest,
    )


def _stateful(graph: ProfiledGraph) -> str:
    """A note on units no plan recomputes because they store tensors into an object they are given."""
    units = [u.key for u in graph.units if u.writes_state]
    if not units:
        return ""
    shown = ", ".join(units[:3]) + (f" and {len(units) - 3} more" if len(units) > 3 else "")
    return (
        f". {shown} store tensors into an object passed to them (a key/value cache): a replay would store them "
        "again, so no plan recomputes them. For a Hugging Face model, set model.config.use_cache = False (or pass "
        "use_cache=False), as its own gradient checkpointing does, and plan again"
    )


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Write the plan file (YAML, or JSON by the suffix), whole or not at all."""
    from planner.export import write

    return write(plan.to_dict(), path)


def load_plan(path: str | Path) -> Plan:
    """Read a plan file back; a malformed file is a ValueError naming the field."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"plan file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path.name}: not a YAML or JSON file: {err}") from None
    return Plan.from_dict(data, source=path.name)


def plan_ranks(graph: ProfiledGraph, budget: int | float | str, **solve) -> Plan:
    """`plan(graph, budget, **solve)`, one plan for every rank under torch.distributed (collective):
    the rank with the highest unplanned peak solves for `budget` (per rank), the others take its
    plan, and its InfeasibleBudget is raised on every rank."""
    return on_worst_rank(simulate(graph).peak_bytes, lambda: plan(graph, budget, **solve))


class BudgetExceeded(ValueError):
    """The measured planned step stayed over the budget after planning again."""


MAX_REPLANS = 2  # plans made again when the checked step is over the budget
# The rise of the process's high-water mark is the step's own where the C library gives back what is
# freed (a process started with MALLOC_MMAP_THRESHOLD_ at 1 MiB or less: every tensor that size or
# larger is mapped on its own); otherwise it keeps and reuses freed memory as it likes, and the rise may
# count heap the steps before it left in pieces.
_MMAP_THRESHOLD = os.environ.get("MALLOC_MMAP_THRESHOLD_", "")
RETURNS_FREED_MEMORY = _MMAP_THRESHOLD.isdigit() and int(_MMAP_THRESHOLD) <= 1 << 20
# The heap of small allocations (smaller than the threshold) moves the high-water mark by up to 0.15 MiB
# from one step of the same plan to the next: the checked step keeps this much below the budget for it.
HEAP_SLACK_BYTES = 256 << 10
_HEAP = f" (the high-water mark's rise counted with {format_bytes(HEAP_SLACK_BYTES)} for the heap)"


def auto(
    model,
    example_batch=None,
    budget: int | float | str | None = None,
    loss_fn=None,
    optimizer=None,
    *,
    step=None,
    solver: str = "auto",
    units=None,
    autocast_dtype=None,
    offload: bool | None = None,
    host_memory: int | str | None = None,
    check: bool = True,
    time_limit_s: float = 10.0,
    compiled: bool | None = None,
):
    """Profile, plan and apply in one call; returns the handle (its `.plan` says what was chosen).

        handle = planner.auto(model, batch, "60%", loss_fn=loss_fn, optimizer=opt)
        handle = planner.auto(model, budget="6GiB", step=my_step, optimizer=opt)   # a step of your own
        handle = planner.auto(torch.compile(model), batch, "60%", optimizer=opt)    # a compiled step

    With `check` (the default), one planned step is measured before returning (see `hold`).
    `compiled` plans for the step under torch.compile (by default: when `model` is what
    `torch.compile` returned); the model may be compiled before or after. Under torch.distributed
    every rank calls it: one rank chooses the units and solves, and every rank applies the same plan.
    """
    if budget is None:
        raise ValueError("give a budget: bytes, a size like 6GiB or a share of the unplanned peak like 60%")
    compiled = is_compiled(model) if compiled is None else compiled
    _without_own_checkpointing(original(model))
    step_args = {"loss_fn": loss_fn, "optimizer": optimizer, "step": step, "autocast_dtype": autocast_dtype}
    names = agreed_units(unit_names(model, example_batch, units=units, **step_args))
    graph = profile(model, example_batch, units=names, compiled=compiled, **step_args)
    solve = {"solver": solver, "time_limit_s": time_limit_s, "offload": offload, "host_memory": host_memory}
    chosen = plan_ranks(graph, budget, **solve)
    if not check:
        return apply(model, chosen)
    if compiled and not is_compiled(model):  # the checked step runs as the user's compiled model will
        model = torch.compile(model)
    return hold(model, graph, chosen, example_batch, **step_args, solve=solve)


def _without_own_checkpointing(model) -> None:
    """A Hugging Face model that checkpoints its layers itself (`activation_checkpointing_enable()`,
    `gradient_checkpointing_enable()`) saves only their inputs, which leaves a plan nothing to choose:
    its checkpointing is turned off (with a warning), and the plan decides what is recomputed."""
    if not any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        return
    disable = getattr(model, "activation_checkpointing_disable", None) or getattr(model, "gradient_checkpointing_disable", None)
    if disable is not None:
        log.warning("the model checkpoints its layers itself (Hugging Face's activation checkpointing): turned off, "
                    "so that the plan decides what is recomputed")
        disable()


def hold(model, graph: ProfiledGraph, chosen: Plan, example_batch=None, *, solve: dict | None = None, **step_args):
    """Apply `chosen` (a plan for `graph`) and measure one planned step (the model, the optimizer and
    the random number generators are left as they were); returns the handle, `handle.measured` the
    measurement.

    The step's peak (on a CPU, live storages, and where the C library gives back what is freed the rise
    of the process's high-water mark, which sees what bypasses the dispatcher, with HEAP_SLACK_BYTES
    more; on CUDA, what the allocator reserves) is compared with the plan's budget. Where it is over, or
    a replay fails where its forward ran (`ReplayFailed`), a step with every unit recomputed on its own
    finds the units whose replays leave memory behind, and the plan is made again (`plan(graph, budget,
    **solve)`) without recomputing those or the failed ones, or, if there are none, with the excess kept
    free (a warning says so), up to MAX_REPLANS times; then BudgetExceeded. `step_args` are the step's
    `loss_fn`, `optimizer`, `step` and `autocast_dtype`, as `profile` takes them. Collective under
    torch.distributed.
    """
    solve = solve or {}
    for attempt in range(MAX_REPLANS + 1):
        handle = apply(model, chosen)
        failed, peak = _checked_step(handle, model, example_batch, **step_args)
        if not failed and peak <= chosen.budget_bytes:
            return handle
        handle.remove()
        over = (f"the planned step failed in the replay of {_keys(graph, failed)}" if failed else
                f"the planned step measured {format_bytes(peak)}{_HEAP if RETURNS_FREED_MEMORY else ''}, "
                f"over the budget of {format_bytes(chosen.budget_bytes)}")
        if attempt == MAX_REPLANS:
            break
        with apply(model, plan_ranks(graph, 2 * chosen.unplanned_peak_bytes, solver="all", offload=False)) as probe:
            left = agreed_union(replays_left_behind(probe, example_batch, **step_args))
        if left or failed:
            reasons = [f"replays of {_keys(graph, left)} left memory behind"] if left else []
            if failed:
                reasons.append(f"replays of {_keys(graph, failed)} did not do what their forward did")
            why = " and ".join(reasons)
            log.warning("%s: %s, so they are not recomputed; planning again", over, why)
            graph = replace(graph, units=tuple(replace(u, replayable=False) if u.index in left | failed else u
                                               for u in graph.units))
            margin = chosen.margin_bytes
        else:
            margin = chosen.margin_bytes + peak - chosen.predicted_peak_bytes
            why = f"it measured {format_bytes(peak - chosen.predicted_peak_bytes)} more than predicted"
            log.warning("%s (predicted %s); planning again with %s kept free", over,
                        format_bytes(chosen.predicted_peak_bytes), format_bytes(margin))
        try:
            chosen = plan_ranks(graph, chosen.budget_bytes, margin_bytes=margin, **solve)
        except InfeasibleBudget as err:
            raise InfeasibleBudget(f"{over}, and {why}: {err}", err.smallest_bytes) from None
    raise BudgetExceeded(f"{over}, after planning {MAX_REPLANS} more times; ask for a budget below "
                         f"{format_bytes(chosen.budget_bytes)}, so that the plan leaves more room, or allow more memory")


def _checked_step(handle, model, example_batch, **step_args) -> tuple[set[int], int]:
    """Measure one planned step (`handle.measured`): the units whose replays failed and the peak (live
    storages or the high-water mark's rise, or what the allocator reserved), over every rank (collective
    under torch.distributed)."""
    optimizer = step_args.get("optimizer")
    # the checked step is a steady one: the optimizer has its state, and a compiled step its code for the plan
    warmup = int(handle.plan.compiled or (optimizer is not None and not optimizer.state))
    failed, peak = set(), 0
    try:
        measured = handle.measured = measure(model, example_batch, steps=0, warmup=warmup, **step_args)
        process = measured.process_peak_bytes if RETURNS_FREED_MEMORY else None
        peak = max(measured.peak_bytes, measured.reserved_bytes or 0, process + HEAP_SLACK_BYTES if process else 0)
    except ReplayFailed as err:
        failed = set(err.units)
    return agreed_union(failed), worst_peak(peak)


def _keys(graph: ProfiledGraph, units: set[int]) -> str:
    return ", ".join(graph.units[u].key for u in sorted(units))
