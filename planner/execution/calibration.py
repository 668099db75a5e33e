"""What the executor costs on a device, measured once per process when a profile's times are.

    graph.calibration.mechanism          # `mechanism(device)`: the fixed costs of a region and an offload
    graph.calibration.host_bytes_per_s   # `host_copy_bytes_per_s()`: a CPU's offload copy rate

Costing a plan measures nothing: it reads these from the profile.
"""

from __future__ import annotations

import functools
import statistics

import torch
from torch import nn

from planner.core.actions import Action, Choice
from planner.core.graph import Mechanism
from planner.core.plan import Plan, Status
from planner.execution.handle import Handle
from planner.execution.offload import Offloader, to_device, to_host
from planner.step import timed_ms
from planner.tracking import storage_key
from planner.units import fingerprint


@functools.cache
def mechanism(device: str, repeats: int = 21) -> Mechanism:
    """`Mechanism` measured once per process on small models whose first unit saves few storages or
    many: each plan in turn with the unplanned step, medians of the differences, fitted by a line."""
    points = [_mechanism_point(device, layers, repeats) for layers in (1, 6)]
    (n1, r1, o1), (n2, r2, o2) = points
    region_slope, offload_slope = max(0.0, (r2 - r1) / (n2 - n1)), max(0.0, (o2 - o1) / (n2 - n1))
    return Mechanism(max(0.0, r1 - region_slope * n1), region_slope, max(0.0, o1 - offload_slope * n1), offload_slope)


def _mechanism_point(device: str, layers: int, repeats: int) -> tuple[int, float, float]:
    """(storages the first unit saves, region ms beyond its forward, offload ms) for units of `layers` layers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(
            *(nn.Sequential(*(m for _ in range(layers) for m in (nn.Linear(64, 64), nn.GELU()))) for _ in range(2))
        ).to(device)
        x = torch.randn(16, 64, device=device)

    def step() -> None:
        model(x).sum().backward()
        model.zero_grad(set_to_none=True)

    def handle(action: Action) -> Handle:
        plan = Plan(
            model=type(model).__name__,
            fingerprint=fingerprint(model),
            units=("0#0", "1#0"),
            choices=(Choice(action, (0,)),),
            budget_bytes=0,
            solver="",
            status=Status.FEASIBLE,
            gap=0.0,
            solve_s=0.0,
            predicted_peak_bytes=0,
            predicted_overhead_ms=0.0,
            step_ms=0.0,
            unplanned_peak_bytes=0,
        )
        return Handle(model, plan)

    skip = {storage_key(t) for t in [x, *model.parameters()]}
    saved = set()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.add(storage_key(t)) or t, lambda t: t):
        model[0](x)
    recompute, offload = handle(Action.RECOMPUTE), handle(Action.OFFLOAD)
    diffs: dict[Handle, list[float]] = {recompute: [], offload: []}
    forward = []
    for _ in range(repeats + 1):
        forward.append(timed_ms(lambda: model[0](x), x.device))
        for h, times in diffs.items():
            plain = timed_ms(step, x.device)
            h.install()
            times.append(timed_ms(step, x.device) - plain)
            h.remove()
    region = statistics.median(diffs[recompute][1:]) - statistics.median(forward[1:])
    return len(saved - skip), region, statistics.median(diffs[offload][1:])


@functools.cache
def host_copy_bytes_per_s(nbytes: int = 32 << 20, repeats: int = 3, device: str = "cpu") -> float:
    """Bytes per second, each way, of offloading a storage of `nbytes` and bringing it back (median
    of `repeats` round trips after a warm-up), measured once per process. On a CPU, 32 MiB is large
    enough that what comes back lands on freshly mapped pages, whose faults cost more than the copy,
    as restores in a training step mostly do (the allocator gives large freed blocks back to the
    system)."""
    storage = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device).untyped_storage()
    owner = Offloader()
    times = [timed_ms(lambda: to_device(to_host(storage, owner), owner)[0], storage.device) for _ in range(repeats + 1)]
    return 2 * storage.nbytes() / statistics.median(times[1:]) * 1e3
