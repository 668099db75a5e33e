"""Data-parallel engines around a model, as one rank sees them: DDP, or FSDP2 with a group per unit.

    wrapped = wrap(model, "fsdp", unit_names(model, batch))   # collective: every rank calls it
    graph = profile_rank(wrapped, batch, loss_fn, optimizer)

Each rank wraps the same model in the engine, so the profile of the wrapped model on a rank sees
the engine's own memory as it runs: gradient buckets, all-gather and reduce-scatter buffers,
gathered parameters. What the engine holds between steps (DDP's buckets) is measured while
wrapping and added as fixed memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from planner.core.graph import ProfiledGraph
from planner.measurement import Measurement, measure
from planner.profiling import profile
from planner.step import Batch, device_of
from planner.tracking import StorageTracker, storage_key

SHARDINGS = ("ddp", "fsdp")


def check_sharding(sharding: str) -> str:
    if sharding not in SHARDINGS:
        raise ValueError(f"unknown sharding {sharding!r}; valid: {', '.join(SHARDINGS)}")
    return sharding


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
    # the collectives of wrapping (DDP's broadcast of the weights) may let go of their buffers in the
    # backend's own threads after they returned: their frees are counted once every rank got here
    dist.barrier()
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
