"""Which GPUs can train a scenario, with or without a plan, and how fast.

    results = compare("gpt", ["a100-40gb", "rtx4090"])            # the scenario's full variant
    results = compare("resnet", None, max_batch=True)              # the scenario's GPUs, or every one
    for r in results:
        print(r.gpu, r.verdict, r.peak_bytes, r.samples_per_s, r.max_batch)

The step is profiled without allocating (fake tensors on the CPU, so the scenario's autocast and
the CPU's fused kernels apply), once per batch size, and each profile serves every GPU. For each
GPU the profile is retimed on the GPU's roofline (`costmodel.retime`); the step fits when its
peak is at most the GPU's usable memory, or when the least-overhead plan under that memory adds
at most `max_overhead` of the step's time.

With `max_batch`, the largest batch size that fits is searched for on profiles interpolated from
two real ones (`batchscale`: sizes are affine in the batch size), bracketed by the lines of the
unplanned peak and of the smallest peak any plan reaches, then checked on real profiles: the
answer fits, and one more sample does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from planner.core.batchscale import at_batch_size
from planner.core.costmodel import REFERENCE, Roofline, retime
from planner.core.gpus import GPU, find_gpus, load_catalog
from planner.core.graph import ProfiledGraph
from planner.core.plan import Plan
from planner.core.sizes import size_bytes
from planner.core.simulator import simulate
from planner.distributed.engines import check_sharding
from planner.distributed.estimate import estimate_rank_graph
from planner.planning import InfeasibleBudget, plan
from planner.profiling import profile
from planner.scenario import FAKE, Scenario, load_scenario
from solvers import build_problem
from solvers.ilp import min_peak

MAX_BATCH_LIMIT = 1 << 20  # the batch-size search stops here


@dataclass(frozen=True)
class GpuResult:
    """One GPU's answer: sizes in bytes, times in ms, `overhead` as a share of the unplanned step.

    `fits` means the step runs in `usable_bytes`, unplanned or with a plan that adds at most the
    overhead limit. `peak_bytes`, `overhead` and `step_ms` describe the step as it would run
    (unplanned when it fits so, else under the plan, also one over the limit; None when no plan
    fits the memory), `samples_per_s` its throughput when it fits. `needed_bytes` is the
    smallest peak any plan reaches, when that is more than the GPU has. `max_batch` is the
    largest batch size that fits (0: not even one sample), with its throughput.
    """

    gpu: str
    description: str
    memory_bytes: int
    usable_bytes: int
    batch_size: int
    unplanned_peak_bytes: int
    fits_unplanned: bool
    fits: bool
    verdict: str  # fits | fits with a plan | over the overhead limit | too large
    peak_bytes: int | None
    overhead: float | None
    step_ms: float | None
    samples_per_s: float | None
    needed_bytes: int | None = None
    max_batch: int | None = None
    max_batch_samples_per_s: float | None = None
    host_bytes: int = 0  # the host memory a plan's offloads may hold at once
    offloaded_bytes: int | None = None  # what the plan's offloads hold there (None: no plan)
    world_size: int = 1  # GPUs training it together (each with batch_size samples)
    cards_unplanned: int | None = None  # with `cards`: the fewest GPUs that train it unplanned (None: more)
    cards_planned: int | None = None  # ... and with a plan
    plan: Plan | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for an export: the fields, and the plan's solver and choices when there is one."""
        data = {k: v for k, v in asdict(self).items() if k != "plan"}
        if self.plan is not None:
            plan = self.plan.to_dict()
            data["plan"] = {key: plan[key] for key in ("solver", "status", "units")}
        return data


@dataclass(frozen=True)
class _Fit:
    """One GPU at one batch size (the fields of GpuResult that depend on the batch size)."""

    fits_unplanned: bool
    fits: bool
    verdict: str
    unplanned_peak_bytes: int
    peak_bytes: int | None = None
    overhead: float | None = None
    step_ms: float | None = None
    needed_bytes: int | None = None
    plan: Plan | None = None


def compare(
    scenario: str | Path | Scenario,
    gpus: str | list[str] | list[GPU] | None = None,
    *,
    variant: str | None = None,
    batch_size: int | None = None,
    max_batch: bool = False,
    max_overhead: float = 0.10,
    solver: str = "auto",
    world_size: int | None = None,
    sharding: str | None = None,
    cards: bool = False,
    tf32: bool = False,
    host_memory: int | str | None = None,
    catalog: str | Path | None = None,
    time_limit_s: float = 5.0,
    on_gpu: Callable[[GpuResult], None] = lambda result: None,
) -> list[GpuResult]:
    """One result per GPU, in the order given.

    `gpus` are catalog names (a list or "a,b,c") or GPU entries; None takes the scenario's
    `gpus`, else the whole catalog (built-in plus the file `catalog`). `variant` defaults to the
    scenario's full one where it has one, `batch_size` to the variant's. `max_overhead` is the most
    extra time a plan may add, as a share of the step. `world_size` GPUs (default: the scenario's)
    train data-parallel, each on `batch_size` samples, replicated (`sharding` "ddp": each also holds
    gradient buckets) or sharded ("fsdp": parameters, gradients and optimizer state divided among
    them), as `distributed.estimate_rank_graph` estimates; throughput scales with the world size (the
    collectives are not timed). With `cards`, each result also says the fewest GPUs of its kind,
    among 1, 2, 4, ... up to `world_size`, that train the step unplanned and with a plan. A float32 step runs its matrix products at the
    FP32 rate, or with `tf32` at the TF32 rate (as with `torch.backends.cuda.matmul.allow_tf32`).
    `host_memory` (bytes or a size such as "64GiB") is the pinned host memory each GPU's offloads may
    hold at once; by default as much as the GPU has.
    `on_gpu` is called with each result when it is ready.
    """
    scenario = scenario if isinstance(scenario, Scenario) else load_scenario(scenario)
    chosen = _gpus(scenario, gpus, catalog)
    variant = variant or scenario.variants[-1]
    world_size = scenario.world_size if world_size is None else world_size
    sharding = check_sharding(sharding or scenario.sharding or "ddp")
    if not 0 <= max_overhead < math.inf:
        raise ValueError(f"max_overhead must be a non-negative share such as 0.1, got {max_overhead!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    batch = scenario.variant(variant).batch_size if batch_size is None else batch_size
    profiles = _Profiles(scenario, variant, world_size, sharding, time_limit_s)
    results = []
    for gpu in chosen:
        roofline = gpu.roofline(scenario.precision, tf32)
        host = gpu.memory_bytes if host_memory is None else size_bytes(host_memory)
        gauge = _Gauge(profiles, roofline, gpu, max_overhead, solver, time_limit_s, host)
        fit = gauge.fit(batch)
        best = _max_batch(gauge, profiles, batch) if max_batch else None
        result = _result(gpu, batch, fit, world_size, best, gauge.fit(best) if best else None, host)
        if cards:
            result = replace(result, **_cards(profiles, gauge, batch))
        on_gpu(result)
        results.append(result)
    return results


def _cards(profiles: _Profiles, gauge: _Gauge, batch: int) -> dict[str, int | None]:
    """The fewest GPUs, among 1, 2, 4, ... up to the profiles' world size, that train the step
    unplanned and with a plan (None: not even that many). More GPUs never need more memory each, so
    each is a binary search; memory alone rules a count out where no plan reaches its GPU's memory."""
    counts = sorted({1 << k for k in range(profiles.world_size.bit_length()) if 1 << k <= profiles.world_size} | {profiles.world_size})

    def fits(count: int, planned: bool) -> bool:
        at = profiles.at(count)
        if at.unplanned_peak(batch) <= gauge.gpu.usable_bytes:
            return True
        if not planned or at.smallest_peak(batch) > gauge.gpu.usable_bytes:
            return False
        return gauge.on(at).fit(batch).fits

    return {"cards_unplanned": _fewest(counts, lambda c: fits(c, False)), "cards_planned": _fewest(counts, lambda c: fits(c, True))}


def _fewest(counts: list[int], fits: Callable[[int], bool]) -> int | None:
    """The first of `counts` that fits, for `fits` false and then true along them (None: none fits)."""
    lo, hi = 0, len(counts)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(counts[mid]):
            hi = mid
        else:
            lo = mid + 1
    return counts[lo] if lo < len(counts) else None


def _gpus(scenario: Scenario, gpus: str | list[str] | list[GPU] | None, catalog: str | Path | None) -> list[GPU]:
    if gpus is not None and not isinstance(gpus, str) and gpus and all(isinstance(g, GPU) for g in gpus):
        return list(gpus)
    table = load_catalog(catalog)
    names = gpus if gpus is not None else list(scenario.gpus) or list(table)
    return find_gpus(names, table)


class _Profiles:
    """Profiles by batch size, made once without allocating and shared by every GPU.

    `estimate` interpolates a profile from two reference ones (see `batchscale`) where their
    structure agrees, and profiles for real where it does not.
    """

    def __init__(self, scenario: Scenario, variant: str, world_size: int, sharding: str, time_limit_s: float,
                 one_rank: dict | None = None) -> None:  # fmt: skip
        self.scenario, self.variant, self.time_limit_s = scenario, variant, time_limit_s
        self.world_size, self.sharding = world_size, sharding
        self.one_rank = {} if one_rank is None else one_rank  # batch size -> (profile in one process, its model)
        self.graphs: dict[int, ProfiledGraph] = {}
        self.peaks: dict[int, int] = {}  # unplanned peak by batch size
        self.smallest: dict[int, int] = {}  # the smallest peak any plan reaches, where known
        self.references: tuple[int, int] | None = None
        self.others: dict[int, _Profiles] = {}

    def at(self, world_size: int) -> _Profiles:
        """The same profiles for another world size (the one-process profiles are shared), made once."""
        if world_size == self.world_size:
            return self
        if world_size not in self.others:
            self.others[world_size] = _Profiles(self.scenario, self.variant, world_size, self.sharding,
                                                self.time_limit_s, self.one_rank)  # fmt: skip
        return self.others[world_size]

    def graph(self, batch_size: int) -> ProfiledGraph:
        if batch_size not in self.graphs:
            if batch_size not in self.one_rank:
                w = self.scenario.build(self.variant, device=FAKE, batch_size=batch_size)
                graph = profile(w.model, w.batch, w.loss_closure(), w.optimizer, autocast_dtype=w.autocast_dtype)
                self.one_rank[batch_size] = (graph, w.model)
            graph, model = self.one_rank[batch_size]
            if self.world_size > 1:
                graph = estimate_rank_graph(graph, self.world_size, self.sharding, model)
            self.graphs[batch_size] = graph
            self.peaks[batch_size] = simulate(graph).peak_bytes
        return self.graphs[batch_size]

    def estimate(self, batch_size: int) -> ProfiledGraph:
        assert self.references is not None, "set the references first"
        (small, large), graph = self.references, None
        if batch_size not in self.graphs:
            graph = at_batch_size(self.graph(small), small, self.graph(large), large, batch_size)
        return graph if graph is not None else self.graph(batch_size)

    def unplanned_peak(self, batch_size: int) -> int:
        self.graph(batch_size)
        return self.peaks[batch_size]

    def smallest_peak(self, batch_size: int) -> int:
        """The smallest peak any plan reaches at this batch size, host memory unbounded (memory only:
        the same on every GPU)."""
        if batch_size not in self.smallest:
            problem = build_problem(self.graph(batch_size), 0, REFERENCE)
            self.smallest[batch_size] = min_peak(problem, self.time_limit_s)[0]
        return self.smallest[batch_size]

    def largest_under(self, usable_bytes: int, peak: Callable[[int], int]) -> int:
        """The largest batch size whose `peak` is at most `usable_bytes`, on the line through the references."""
        assert self.references is not None, "set the references first"
        small, large = self.references
        per_sample = (peak(large) - peak(small)) / (large - small)
        if per_sample <= 0:
            return MAX_BATCH_LIMIT
        fixed = peak(small) - per_sample * small
        return int(min(max((usable_bytes - fixed) // per_sample, 0), MAX_BATCH_LIMIT))


class _Gauge:
    """Whether the step fits one GPU, by batch size, on real or interpolated profiles (remembered)."""

    def __init__(self, profiles: _Profiles, roofline: Roofline, gpu: GPU, max_overhead: float, solver: str,
                 time_limit_s: float, host_bytes: int) -> None:  # fmt: skip
        self.profiles, self.roofline, self.gpu = profiles, roofline, gpu
        self.max_overhead, self.solver, self.time_limit_s = max_overhead, solver, time_limit_s
        self.host_bytes = host_bytes
        self.seen: dict[tuple[int, bool], _Fit] = {}
        self.smallest: dict[int, int] = {}  # the smallest peak a plan reaches within this host memory

    def on(self, profiles: _Profiles) -> _Gauge:
        """The same GPU and limits on other profiles."""
        return _Gauge(profiles, self.roofline, self.gpu, self.max_overhead, self.solver, self.time_limit_s,
                      self.host_bytes)  # fmt: skip

    def fit(self, batch_size: int, estimated: bool = False) -> _Fit:
        key = (batch_size, estimated and batch_size not in self.profiles.graphs)
        if key not in self.seen:
            graph = self.profiles.estimate(batch_size) if key[1] else self.profiles.graph(batch_size)
            self.seen[key] = self._fit(retime(graph, self.roofline), batch_size)
        return self.seen[key]

    def stretch(self, batch_size: int, below: int) -> tuple[int, float]:
        """The largest batch size under `below` at which the plan chosen for `batch_size` (on
        interpolated profiles) still fits, and its overhead there."""
        fit = self.fit(batch_size, estimated=True)
        lo, o_lo, hi = batch_size, _overhead(fit), below
        while fit.plan is not None and hi - lo > 1:
            mid = (lo + hi) // 2
            graph = retime(self.profiles.estimate(mid), self.roofline)
            sim = simulate(graph, fit.plan.choices, self.roofline)
            overhead = sim.extra_ms / graph.step_ms
            fits = sim.peak_bytes <= self.gpu.usable_bytes and sim.host_bytes <= self.host_bytes
            if fits and overhead <= self.max_overhead:
                lo, o_lo = mid, overhead
            else:
                hi = mid
        return lo, o_lo

    def _fit(self, graph: ProfiledGraph, batch_size: int) -> _Fit:
        usable = self.gpu.usable_bytes
        unplanned = simulate(graph).peak_bytes
        if unplanned <= usable:
            return _Fit(True, True, "fits", unplanned, unplanned, 0.0, graph.step_ms)
        smallest = self.smallest.get(batch_size, self.profiles.smallest.get(batch_size))
        if smallest is not None and smallest > usable:
            return _Fit(False, False, "too large", unplanned, needed_bytes=smallest)
        try:
            chosen = _least_overhead_plan(graph, usable, self.solver, self.roofline, self.time_limit_s, self.host_bytes)
        except InfeasibleBudget as err:
            self.smallest[batch_size] = err.smallest_bytes
            return _Fit(False, False, "too large", unplanned, needed_bytes=err.smallest_bytes)
        overhead = chosen.predicted_overhead_ms / graph.step_ms
        over = overhead > self.max_overhead
        fits = not over and chosen.predicted_peak_bytes <= usable  # a baseline's plan may not fit
        verdict = "fits with a plan" if fits else "over the overhead limit" if over else "too large"
        step_ms = graph.step_ms + chosen.predicted_overhead_ms
        return _Fit(False, fits, verdict, unplanned, chosen.predicted_peak_bytes, overhead, step_ms, plan=chosen)


def _least_overhead_plan(graph: ProfiledGraph, budget_bytes: int, solver: str, roofline: Roofline,
                         time_limit_s: float, host_bytes: int) -> Plan:  # fmt: skip
    """`planning.plan`, and the exact solver where another one found no plan though one exists."""
    solve = {"roofline": roofline, "time_limit_s": time_limit_s, "offload": True, "host_memory": host_bytes}
    try:
        return plan(graph, budget_bytes, solver=solver, **solve)
    except InfeasibleBudget as err:
        if err.smallest_bytes > budget_bytes or solver == "ilp":
            raise
    return plan(graph, budget_bytes, solver="ilp", **solve)


def _result(gpu: GPU, batch: int, fit: _Fit, world_size: int, best: int | None, best_fit: _Fit | None,
            host_bytes: int) -> GpuResult:  # fmt: skip
    return GpuResult(
        gpu=gpu.name,
        description=gpu.description,
        memory_bytes=gpu.memory_bytes,
        usable_bytes=gpu.usable_bytes,
        batch_size=batch,
        unplanned_peak_bytes=fit.unplanned_peak_bytes,
        fits_unplanned=fit.fits_unplanned,
        fits=fit.fits,
        verdict=fit.verdict,
        peak_bytes=fit.peak_bytes,
        overhead=fit.overhead,
        step_ms=fit.step_ms,
        samples_per_s=_throughput(batch, fit, world_size),
        needed_bytes=fit.needed_bytes,
        max_batch=best,
        max_batch_samples_per_s=_throughput(best, best_fit, world_size) if best_fit is not None else None,
        host_bytes=host_bytes,
        offloaded_bytes=None if fit.plan is None else fit.plan.predicted_host_bytes,
        world_size=world_size,
        plan=fit.plan,
    )


def _throughput(batch: int, fit: _Fit, world_size: int) -> float | None:
    """Samples per second of `world_size` GPUs when the step fits, else None."""
    return world_size * batch / (fit.step_ms / 1e3) if fit.fits and fit.step_ms else None


# ------------------------------------------------------------------------------------------ max batch


def _max_batch(gauge: _Gauge, profiles: _Profiles, start: int) -> int:
    """The largest batch size that fits the GPU (0: none), checked on real profiles.

    The answer lies between the last batch size whose unplanned peak fits and the first whose
    smallest plannable peak does not, both on lines through two reference profiles. Interpolated
    profiles narrow it down to one batch size; real ones confirm that it fits and one more does not.
    """
    small = max(start, 2)  # batch size 1 may run other kernels (no copy to make a sample contiguous)
    profiles.references = (small, 2 * small)
    usable = gauge.gpu.usable_bytes
    hi = min(profiles.largest_under(usable, profiles.smallest_peak) + 1, MAX_BATCH_LIMIT)
    lo = min(profiles.largest_under(usable, profiles.unplanned_peak), hi - 1)
    guess = _largest_fitting(lambda b: _overhead(gauge.fit(b, estimated=True)), gauge.stretch, gauge.max_overhead,
                             lo, hi)  # fmt: skip
    real = lambda b: _overhead(gauge.fit(b))  # noqa: E731
    return _largest_fitting(real, lambda b, below: (b, real(b)), gauge.max_overhead, guess, guess + 1)


def _overhead(fit: _Fit) -> float:
    """The plan's overhead (0 unplanned; infinite when no plan fits the memory)."""
    return math.inf if fit.overhead is None else fit.overhead


def _largest_fitting(
    overhead: Callable[[int], float],
    stretch: Callable[[int, int], tuple[int, float]],
    limit: float,
    lo: int,
    hi: int,
) -> int:
    """The largest n in [0, MAX_BATCH_LIMIT] with overhead(n) <= limit, for overhead non-decreasing in n.

    `lo` < `hi` are guesses: lo fits, hi does not (hi is taken on trust until the end). Where lo
    is wrong the bracket moves down, its steps doubling. Then the bracket shrinks: at the batch
    size where the line through the overheads at its ends reaches the limit (or halfway, while
    hi has no plan or one end has moved twice in a row); a batch size that fits moves lo as far
    as `stretch(n, hi)` says the same plan still fits. An end never probed is probed last.
    """
    step = 1
    while lo > 0 and overhead(lo) > limit:
        lo, hi, step = max(lo - step, 0), lo, step * 2
    (lo, o_lo), o_hi, sides = stretch(lo, hi) if lo else (0, 0.0), None, ""
    while True:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if o_hi is not None and o_lo < o_hi < math.inf and sides[-2:] not in ("ll", "hh"):
                mid = lo + int((limit - o_lo) / (o_hi - o_lo) * (hi - lo))
            mid = min(max(mid, lo + 1), hi - 1)
            if overhead(mid) <= limit:
                (lo, o_lo), sides = stretch(mid, hi), sides + "l"
            else:
                hi, o_hi, sides = mid, overhead(mid), sides + "h"
        if o_hi is not None or hi >= MAX_BATCH_LIMIT or overhead(hi) > limit:
            return lo
        (lo, o_lo), hi = stretch(hi, 2 * hi), min(2 * hi, MAX_BATCH_LIMIT)  # hi was a wrong guess
