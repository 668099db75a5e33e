"""What every rank of `planner train --world-size N` and `planner plan --world-size N` runs.

    reports = run_job(train_rank, 2, RankJob("gpt", "fsdp", budget="60%"))

Each rank builds the scenario's model with the same weights and a batch of its own, wraps it in
the engine, profiles it, takes part in solving (one rank solves, `planning.plan_ranks`), and
trains and measures under the plan. The scenario's batch size is per rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from planner.core.graph import ProfiledGraph
from planner.core.simulator import simulate
from planner.distributed.collective import agreed_units
from planner.distributed.engines import check_sharding, measure_rank, profile_rank, wrap
from planner.distributed.launch import launch
from planner.execution import apply
from planner.planning import hold, load_plan, plan_ranks
from planner.profiling import unit_names
from planner.scenario import load_scenario
from planner.step import timed_in_turns, train_step


@dataclass(frozen=True)
class RankJob:
    """What every rank of `planner train` and `planner plan` runs, given the world size."""

    scenario: str  # a built-in name or a path
    sharding: str = "ddp"
    variant: str = "small"
    device: str = "cpu"  # "cpu", or "cuda" for one GPU per rank
    batch_size: int | None = None  # per rank; None: the scenario's
    budget: int | float | str | None = None  # per rank
    plan_path: str | None = None  # a saved plan, instead of solving for `budget`
    solver: str = "auto"
    time_limit_s: float = 10.0
    offload: bool | None = None  # as `planner.plan` takes it
    host_memory: int | None = None  # as `planner.plan` takes it
    steps: int = 5
    seed: int = 0


@dataclass(frozen=True)
class RankReport:
    """One rank's peaks in bytes, predicted from its own profile and measured, and step times in ms."""

    rank: int
    budget_bytes: int
    unplanned_predicted_bytes: int
    unplanned_measured_bytes: int
    predicted_bytes: int
    measured_bytes: int
    unplanned_step_ms: float
    step_ms: float
    plan: Any = None  # the plan, on rank 0 only


def run_job(fn: Callable, world_size: int, job: RankJob, timeout_s: float = 1800.0) -> list:
    """`launch(fn, world_size, timeout_s, (job,))` over NCCL for a CUDA job, over gloo otherwise."""
    return launch(fn, world_size, timeout_s, (job,), backend="nccl" if job.device == "cuda" else "gloo")


def rank_workload(job: RankJob, rank: int):
    """The job's workload on this rank, its model wrapped (collective): the same weights on every
    rank (from `job.seed`), a batch of the rank's own (from `job.seed + rank`)."""
    scenario = load_scenario(job.scenario)
    device = torch.device("cuda", torch.cuda.current_device()) if job.device == "cuda" else torch.device(job.device)
    if device.type == "meta":
        raise ValueError("data-parallel training runs the real step, which cannot run on the meta device")
    data = scenario.build(job.variant, device, seed=job.seed + rank, batch_size=job.batch_size)
    model = scenario.build_model(job.variant, device, seed=job.seed)
    names = unit_names(model, data.batch, data.loss_closure(), autocast_dtype=data.autocast_dtype)
    wrapped = wrap(model, check_sharding(job.sharding), agreed_units(names))
    optimizer = scenario.optimizer.build(wrapped.module.parameters())
    return replace(data, model=wrapped.module, optimizer=optimizer), wrapped


def _step_args(w) -> dict[str, Any]:
    return {"loss_fn": w.loss_closure(), "optimizer": w.optimizer, "autocast_dtype": w.autocast_dtype}


def _job_plan(job: RankJob, graph: ProfiledGraph):
    if job.plan_path is not None:
        return load_plan(job.plan_path)
    if job.budget is None:
        raise ValueError("give a budget or a plan file")
    return plan_ranks(graph, job.budget, **_solve(job))


def _solve(job: RankJob) -> dict[str, Any]:
    return {"solver": job.solver, "time_limit_s": job.time_limit_s, "offload": job.offload,
            "host_memory": job.host_memory}  # fmt: skip


def plan_rank(rank: int, world_size: int, job: RankJob):
    """Profile this rank under the engine and take part in solving; rank 0 returns (plan, its graph)."""
    w, wrapped = rank_workload(job, rank)
    graph = profile_rank(wrapped, w.batch, **_step_args(w))
    plan = _job_plan(job, graph)
    return (plan, graph) if rank == 0 else None


def train_rank(rank: int, world_size: int, job: RankJob) -> RankReport:
    """Profile, plan (checked on a first planned step, `planner.planning.hold`), measure the unplanned
    step, train `job.steps` steps under the plan, each after one without it (`timed_in_turns`), and
    measure it."""
    w, wrapped = rank_workload(job, rank)
    step = _step_args(w)
    graph = profile_rank(wrapped, w.batch, **step)
    with hold(wrapped.module, graph, _job_plan(job, graph), w.batch, solve=_solve(job), **step) as checked:
        plan = checked.plan
    unplanned = measure_rank(wrapped, w.batch, steps=0, **step)
    with apply(wrapped.module, plan) as handle:
        one = lambda: train_step(wrapped.module, w.batch, **step)
        unplanned_ms, planned_ms = timed_in_turns(handle, one, w.device, range(job.steps))
        planned = measure_rank(wrapped, w.batch, steps=1, warmup=0, **step)
    return RankReport(
        rank=rank,
        budget_bytes=plan.budget_bytes,
        unplanned_predicted_bytes=simulate(graph).peak_bytes,
        unplanned_measured_bytes=unplanned.peak_bytes,
        predicted_bytes=simulate(graph, plan.choices).peak_bytes,
        measured_bytes=planned.peak_bytes,
        unplanned_step_ms=unplanned_ms,
        step_ms=planned_ms,
        plan=plan if rank == 0 else None,
    )
