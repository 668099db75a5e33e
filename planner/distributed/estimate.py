"""A rank's memory estimated from a one-process profile, without running the engine."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from planner.core.graph import Category, FixedMemory, ProfiledGraph
from planner.distributed.engines import check_sharding, sharded_units


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
