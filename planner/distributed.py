"""Plans for data-parallel (DDP) and sharded (FSDP2) training, one process per rank.

    planner train gpt --world-size 2 --sharding fsdp --budget 60% --batch-size 16
    planner plan resnet --world-size 2 --sharding ddp --budget 85% --out plan.yaml

    results = launch(fn, world_size=2, timeout_s=300, args=(job,))   # fn(rank, world_size, job) on every rank

Each rank wraps the same model in the engine (`wrap`: DistributedDataParallel,
or `fully_shard` on each unit that owns parameters and then on the root), so
the profile of the wrapped model on a rank sees the engine's own memory as it
runs: gradient buckets, all-gather and reduce-scatter buffers, gathered
parameters. What the engine holds between steps (DDP's buckets) is measured
while wrapping and added as fixed memory. One rank solves for the per-rank
budget (`plan_ranks`), every rank applies the same plan. `per_rank_fixed` and
`estimate_rank_graph` estimate a rank's memory from a one-process profile,
without running the engine.

Ranks talk over gloo on 127.0.0.1 on a CPU and over NCCL, one GPU per rank,
on CUDA. The scenario's batch size is per rank; each rank draws its own batch.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from planner.core.graph import Category, FixedMemory, ProfiledGraph
from planner.measurement import Measurement, measure
from planner.profiling import profile, unit_names
from planner.core.simulator import simulate
from planner.step import Batch, device_of
from planner.tracking import StorageTracker, storage_key

SHARDINGS = ("ddp", "fsdp")
HOST = "127.0.0.1"
RESULT_GRACE_S = 2.0  # how long a rank that exited may take to deliver its last message


class RankFailed(RuntimeError):
    """A rank died without reporting an error (a crash or a signal), or its error could not be sent."""


class RemoteTraceback(Exception):
    """The traceback of an error raised on a rank; set as the `__cause__` of the error re-raised here."""


def check_sharding(sharding: str) -> str:
    if sharding not in SHARDINGS:
        raise ValueError(f"unknown sharding {sharding!r}; valid: {', '.join(SHARDINGS)}")
    return sharding


# ------------------------------------------------------------------------------------------------ launching


def launch(fn: Callable, world_size: int, timeout_s: float = 600.0, args: Sequence = (), backend: str | None = None):
    """Run `fn(rank, world_size, *args)` in `world_size` new processes joined in one process group.

    Returns the ranks' return values, in rank order (they must pickle; `fn` must be importable by
    name). The process group meets at a store this process holds on a free port of 127.0.0.1;
    `backend` defaults to NCCL when there is a GPU per rank, else gloo. When a rank fails, the
    others are killed and the first error is raised here, with its rank's traceback text as its
    `__cause__` (a rank that died without a word, by a crash or a signal, is a RankFailed); when
    `timeout_s` passes first, TimeoutError. No process outlives the call.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world size must be a positive integer, got {world_size!r}")
    backend = backend or ("nccl" if torch.cuda.device_count() >= world_size else "gloo")
    store = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s))
    ctx = torch.multiprocessing.get_context("spawn")
    messages = ctx.Queue()
    setup = (world_size, store.port, backend, timeout_s)
    procs = [ctx.Process(target=_rank_main, args=(r, setup, fn, tuple(args), messages)) for r in range(world_size)]
    try:
        for p in procs:
            p.start()
        return _Ranks(procs, messages).collect(time.monotonic() + timeout_s, timeout_s)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            if p.pid is not None:
                p.join(timeout=10)
        messages.close()
        messages.cancel_join_thread()
        del store


class _Ranks:
    """The launched processes and their messages: ("done", rank, result) or ("error", rank, time, error, text)."""

    def __init__(self, procs: list, messages) -> None:
        self.procs = procs
        self.messages = messages
        self.results: dict[int, Any] = {}
        self.errors: dict[int, tuple] = {}

    def collect(self, deadline: float, timeout_s: float) -> list:
        while len(self.results) < len(self.procs):
            if self._receive(0.1) or self._silent():
                raise self._failure()
            if time.monotonic() > deadline:
                waiting = [r for r in range(len(self.procs)) if r not in self.results]
                raise TimeoutError(f"ranks {waiting} did not finish within {timeout_s:g} s; all ranks were stopped")
        return [self.results[r] for r in range(len(self.procs))]

    def _receive(self, timeout_s: float) -> bool:
        """Take one message if one comes within `timeout_s`; True if it reports an error."""
        try:
            kind, rank, *payload = self.messages.get(timeout=timeout_s)
        except queue.Empty:
            return False
        if kind == "error":
            self.errors[rank] = tuple(payload)
            return True
        self.results[rank] = pickle.loads(payload[0])
        return False

    def _silent(self) -> list[int]:
        """Ranks that exited without a result or an error (after a grace for messages in flight)."""
        exited = [r for r, p in enumerate(self.procs) if p.exitcode is not None and r not in self.results]
        if exited and not self.errors:
            self._drain()
        return [r for r in exited if r not in self.results and r not in self.errors]

    def _drain(self) -> None:
        """Gather the messages sent until every rank has reported or exited, for at most RESULT_GRACE_S."""
        end = time.monotonic() + RESULT_GRACE_S
        pending = lambda: [p for r, p in enumerate(self.procs) if r not in self.results and r not in self.errors]
        while time.monotonic() < end and any(p.exitcode is None for p in pending()):
            self._receive(0.05)
        while self._receive(0.05):  # errors already in the queue
            pass

    def _failure(self) -> BaseException:
        """The root cause: a rank that died silently, else the earliest error (later ones follow from it)."""
        self._drain()
        first = min(self.errors, key=lambda r: self.errors[r][0], default=None)
        err = None if first is None else _rank_error(first, len(self.procs), *self.errors[first][1:])
        done = self.results.keys() | self.errors.keys()
        silent = [r for r, p in enumerate(self.procs) if p.exitcode is not None and r not in done]
        if not silent:
            return err
        code = self.procs[silent[0]].exitcode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        failed = RankFailed(f"rank {silent[0]} of {len(self.procs)} {how} without reporting an error or a result")
        failed.__cause__ = err
        return failed


def _rank_error(rank: int, world_size: int, error: bytes | None, text: str) -> BaseException:
    header = f"rank {rank} of {world_size} failed"
    if error is None:
        return RankFailed(f"{header}:\n{text}")
    err = pickle.loads(error)
    err.add_note(f"(raised on rank {rank} of {world_size})")
    err.__cause__ = RemoteTraceback(f"{header}; its traceback:\n{text}")
    return err


def _rank_main(rank: int, setup: tuple, fn: Callable, args: tuple, messages) -> None:
    world_size, port, backend, timeout_s = setup
    os.environ.update(MASTER_ADDR=HOST, MASTER_PORT=str(port), WORLD_SIZE=str(world_size))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        else:  # ranks share the CPU cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(HOST, port, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        messages.put(("done", rank, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException as err:  # reported to the launching process, which re-raises it
        messages.put(("error", rank, time.time(), _portable(err), traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _portable(err: BaseException) -> bytes | None:
    """The error pickled; if it cannot travel, its closest built-in class with the same message."""
    for cls in type(err).__mro__:
        candidate = err if cls is type(err) else cls(str(err)) if cls.__module__ == "builtins" else None
        if candidate is None:
            continue
        with contextlib.suppress(Exception):
            data = pickle.dumps(candidate)
            pickle.loads(data)
            return data
    return None


# ------------------------------------------------------------------------------------------------ engines


@dataclass(frozen=True)
class Wrapped:
    """A model inside a data-parallel engine, as one rank sees it.

    `module` is what to train, profile, measure and apply plans to: the DDP wrapper, or the model
    itself under FSDP2. `units` are the unit names in `module`; `gathered_units` those whose
    parameters stay gathered from forward until backward is over (all under DDP; under FSDP2 the
    units left to the root's group). `held_bytes` are storages the engine allocated while wrapping,
    other than parameters and buffers, and holds between steps (DDP's gradient buckets).
    """

    module: nn.Module
    sharding: str
    units: tuple[str, ...]
    gathered_units: frozenset[str]
    held_bytes: int


def wrap(model: nn.Module, sharding: str, units: Sequence[str]) -> Wrapped:
    """Wrap `model` for the process group in DDP or FSDP2 (collective: every rank calls it), with
    the modules named `units` (`planner.profiling.unit_names`) as units.

    Under FSDP2 each unit that owns parameters no other unit shares gets its own `fully_shard`,
    then the root takes the rest (tied embeddings, units without a group of their own).
    """
    check_sharding(sharding)
    names = list(units)
    device = device_of(model, Batch())
    tracker = StorageTracker(device, [*model.parameters(), *model.buffers()])
    with tracker:
        if sharding == "ddp":
            module, own = _ddp(model, device), []
            names = [f"module.{n}" if n else "module" for n in names]
        else:
            own = sharded_units(model, names)
            module = _fsdp(model, own, device)
    kept = {storage_key(t) for t in [*module.parameters(), *module.buffers()]}
    held = sum(nbytes for key, nbytes in tracker.live.items() if key not in kept)
    tracker.stop_tracking()
    return Wrapped(module, sharding, tuple(names), frozenset(names) - set(own), held)


def _ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def _fsdp(model: nn.Module, own: list[str], device: torch.device) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    modules = dict(model.named_modules())
    for name in own:
        fully_shard(modules[name], mesh=mesh)
    return fully_shard(model, mesh=mesh)


def sharded_units(model: nn.Module, units: Sequence[str]) -> list[str]:
    """The units that get their own FSDP2 group: those owning parameters that no other unit uses."""
    modules = dict(model.named_modules())
    users: dict[int, set[str]] = {}
    for name in units:
        for p in modules[name].parameters():
            users.setdefault(id(p), set()).add(name)
    return [
        name
        for name in units
        if name and (params := list(modules[name].parameters())) and all(users[id(p)] == {name} for p in params)
    ]


# ------------------------------------------------------------------------------------------------ one rank


def rank_graph(graph: ProfiledGraph, wrapped: Wrapped) -> ProfiledGraph:
    """A rank's profile as the planner needs it: the engine's held memory as fixed memory, and
    recompute regions spanning only units whose parameters stay gathered.

    A region replays its units' forwards when backward first needs one of them; a unit that FSDP2
    resharded after its forward and has not gathered again by then could not run, so no region
    joins it to another unit.
    """
    fixed = replace(graph.fixed, communication=graph.fixed.communication + wrapped.held_bytes)
    gathered = wrapped.gathered_units
    units = tuple(
        u
        if u.direct_from is None or {u.name, graph.units[u.direct_from].name} <= gathered
        else replace(u, direct_from=None)
        for u in graph.units
    )
    return replace(graph, fixed=fixed, units=units)


def profile_rank(wrapped: Wrapped, batch: Any, loss_fn=None, optimizer=None, *, autocast_dtype=None) -> ProfiledGraph:
    """Profile one step of the wrapped model on this rank (collective); see `rank_graph`."""
    graph = profile(wrapped.module, batch, loss_fn, optimizer, units=list(wrapped.units), autocast_dtype=autocast_dtype)
    return rank_graph(graph, wrapped)


def measure_rank(wrapped: Wrapped, batch: Any, loss_fn=None, optimizer=None, **kwargs) -> Measurement:
    """`planner.measure` on this rank (collective), counting what the engine holds between steps.

    On a CPU the tracker sees only storages made during the step, so the engine's held bytes are
    added; CUDA's allocator statistics include them already.
    """
    m = measure(wrapped.module, batch, loss_fn, optimizer, **kwargs)
    return m if m.reserved_bytes is not None else replace(m, peak_bytes=m.peak_bytes + wrapped.held_bytes)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agreed_units(names: list[str]) -> list[str]:
    """Rank 0's unit names on every rank (collective under torch.distributed; `names` otherwise)."""
    if not _distributed():
        return names
    box = [names]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agreed_union(items: set) -> set:
    """Every rank's `items` together (collective under torch.distributed; `items` otherwise)."""
    if not _distributed():
        return items
    parts: list[set] = [set()] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return set().union(*parts)


def worst_peak(peak_bytes: int) -> int:
    """The highest of the ranks' peaks (collective under torch.distributed; `peak_bytes` otherwise)."""
    if not _distributed():
        return peak_bytes
    peaks: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(peaks, peak_bytes)
    return max(peaks)


def agreed_plan(graph: ProfiledGraph, budget: int | float | str, **solve: Any):
    """`planner.plan(graph, budget, **solve)`, one plan for every rank under torch.distributed
    (`plan_ranks`)."""
    from planner.planning import plan

    return plan_ranks(graph, budget, **solve) if _distributed() else plan(graph, budget, **solve)


def plan_ranks(graph: ProfiledGraph, budget: int | float | str, **solve: Any):
    """One plan for every rank (collective): the rank with the highest unplanned peak solves for
    `budget` (per rank) with `planner.plan(graph, budget, **solve)`, and the others take its plan.
    A ValueError of the solving rank (InfeasibleBudget) is raised on every rank."""
    from planner.planning import plan

    peaks: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(peaks, simulate(graph).peak_bytes)
    solver_rank = max(range(len(peaks)), key=lambda r: (peaks[r], -r))
    box: list[Any] = [None]
    if dist.get_rank() == solver_rank:
        try:
            box = [plan(graph, budget, **solve)]
        except ValueError as err:  # every rank raises it (InfeasibleBudget is one)
            box = [err]
    dist.broadcast_object_list(box, src=solver_rank)
    if isinstance(box[0], ValueError):
        raise box[0]
    return box[0]


# ------------------------------------------------------------------------------------------------ estimates


def per_rank_fixed(graph: ProfiledGraph, world_size: int, sharding: str, model: nn.Module) -> FixedMemory:
    """An estimate of a rank's fixed memory from a one-process profile, without running the engine.

    DDP keeps everything whole and adds gradient buckets as large as the gradients. FSDP2 divides
    parameters and optimizer state by the world size and gathers a unit's parameters for its forward
    and backward: counted here as the parameters of the root's group (gathered all step) plus twice
    the largest unit's (its gathered parameters and the all-gather buffer, or the next unit's
    prefetch). `model` is the unwrapped model the graph was profiled from (any device, meta too).
    """
    check_sharding(sharding)
    params = _unique_param_bytes(model.parameters())
    if sharding == "ddp":
        return replace(graph.fixed, communication=graph.fixed.communication + params)
    own = sharded_units(model, list(dict.fromkeys(u.name for u in graph.units)))
    modules = dict(model.named_modules())
    sizes = [_unique_param_bytes(modules[n].parameters()) for n in own]
    root = params - sum(sizes)
    return replace(
        graph.fixed,
        parameters=-(-graph.fixed.parameters // world_size),
        optimizer=-(-graph.fixed.optimizer // world_size),
        communication=graph.fixed.communication + root + 2 * max(sizes, default=0),
    )


def estimate_rank_graph(graph: ProfiledGraph, world_size: int, sharding: str, model: nn.Module) -> ProfiledGraph:
    """`graph` with a rank's estimated memory: `per_rank_fixed`, and under FSDP2 gradients kept
    sharded (divided by the world size). An estimate, within about 5% of the rank's own profile
    (`profile_rank`) on the zoo's models; that profile sees what the engine really allocates."""
    fixed = per_rank_fixed(graph, world_size, sharding, model)
    if sharding == "ddp":
        return replace(graph, fixed=fixed)
    blocks = tuple(
        replace(b, bytes=-(-b.bytes // world_size)) if b.category is Category.GRADIENTS else b for b in graph.blocks
    )
    return replace(graph, fixed=fixed, blocks=blocks)


def _unique_param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in params}.values())


# ------------------------------------------------------------------------------------------------ jobs


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
    from planner.scenario import load_scenario

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
    from planner.planning import load_plan

    if job.plan_path is not None:
        return load_plan(job.plan_path)
    if job.budget is None:
        raise ValueError("give a budget or a plan file")
    return plan_ranks(graph, job.budget, **_solve(job))


def _solve(job: RankJob) -> dict[str, Any]:
    return {"solver": job.solver, "time_limit_s": job.time_limit_s, "offload": job.offload}


def plan_rank(rank: int, world_size: int, job: RankJob):
    """Profile this rank under the engine and take part in solving; rank 0 returns (plan, its graph)."""
    w, wrapped = rank_workload(job, rank)
    graph = profile_rank(wrapped, w.batch, **_step_args(w))
    plan = _job_plan(job, graph)
    return (plan, graph) if rank == 0 else None


def train_rank(rank: int, world_size: int, job: RankJob) -> RankReport:
    """Profile, plan (checked on a first planned step, `planner.planning.hold`), measure the unplanned
    step, train `job.steps` steps under the plan and measure it."""
    from planner.execution import apply
    from planner.planning import hold
    from planner.step import train_step

    w, wrapped = rank_workload(job, rank)
    step = _step_args(w)
    graph = profile_rank(wrapped, w.batch, **step)
    with hold(wrapped.module, graph, _job_plan(job, graph), w.batch, solve=_solve(job), **step) as checked:
        plan = checked.plan
    unplanned = measure_rank(wrapped, w.batch, steps=job.steps, **step)
    with apply(wrapped.module, plan):
        times = []
        for _ in range(job.steps):
            start = time.perf_counter()
            train_step(wrapped.module, w.batch, **step)
            if w.device.type == "cuda":
                torch.cuda.synchronize(w.device)
            times.append((time.perf_counter() - start) * 1e3)
        planned = measure_rank(wrapped, w.batch, steps=1, warmup=0, **step)
    return RankReport(
        rank=rank,
        budget_bytes=plan.budget_bytes,
        unplanned_predicted_bytes=simulate(graph).peak_bytes,
        unplanned_measured_bytes=unplanned.peak_bytes,
        predicted_bytes=simulate(graph, plan.choices).peak_bytes,
        measured_bytes=planned.peak_bytes,
        unplanned_step_ms=unplanned.step_ms,
        step_ms=sorted(times)[len(times) // 2],
        plan=plan if rank == 0 else None,
    )
