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
from torch.utils import checkpoint as ckpt

from planner.core.actions import Action, Choice, Kept
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
    (n1, r1, o1, _), (n2, r2, o2, policy_ms) = _mechanism_point(device, 1, repeats), _mechanism_point(device, 6, repeats, True)
    region_slope, offload_slope = max(0.0, (r2 - r1) / (n2 - n1)), max(0.0, (o2 - o1) / (n2 - n1))
    return Mechanism(max(0.0, r1 - region_slope * n1), region_slope, max(0.0, o1 - offload_slope * n1), offload_slope,
                     max(0.0, policy_ms))


def _mechanism_point(device: str, layers: int, repeats: int, selective: bool = False) -> tuple[int, float, float, float]:
    """(storages the first unit saves, region ms beyond its forward, offload ms, and with `selective`
    ms per operator call of a selective-checkpoint policy, else 0) for units of `layers` layers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(
            *(nn.Sequential(*(m for _ in range(layers) for m in (nn.Linear(64, 64), nn.GELU()))) for _ in range(2))
        ).to(device)
        x = torch.randn(16, 64, device=device)

    def step() -> None:
        model(x).sum().backward()
        model.zero_grad(set_to_none=True)

    def handle(choice: Choice) -> Handle:
        plan = Plan(
            model=type(model).__name__,
            fingerprint=fingerprint(model),
            units=("0#0", "1#0"),
            choices=(choice,),
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
    recompute, offload = handle(Choice(Action.RECOMPUTE, (0,))), handle(Choice(Action.OFFLOAD, (0,)))
    diffs: dict[Handle, list[float]] = {recompute: [], offload: []}
    if selective:  # a policy that keeps nothing
        diffs[handle(Choice(Action.RECOMPUTE, (0,), frozenset({Kept(0, "no operator")})))] = []
    forward = []
    for _ in range(repeats + 1):
        forward.append(timed_ms(lambda: model[0](x), x.device))
        for h, times in diffs.items():
            plain = timed_ms(step, x.device)
            h.install()
            times.append(timed_ms(step, x.device) - plain)
            h.remove()
    region = statistics.median(diffs[recompute][1:]) - statistics.median(forward[1:])
    policy = statistics.median(list(diffs.values())[-1][1:]) - statistics.median(diffs[recompute][1:])
    ops_ms = policy / _forward_ops(model[0], x) if selective else 0.0
    return len(saved - skip), region, statistics.median(diffs[offload][1:]), ops_ms


def _forward_ops(module: nn.Module, x: torch.Tensor) -> int:
    """The operator calls of the module's forward, as a selective-checkpoint policy sees them."""
    calls = []

    def policy(ctx, func, *args, **kwargs):
        calls.append(ctx.is_recompute)
        return ckpt.CheckpointPolicy.PREFER_RECOMPUTE

    context = functools.partial(ckpt.create_selective_checkpoint_contexts, policy)
    ckpt.checkpoint(module, x, use_reentrant=False, context_fn=context)
    return max(1, calls.count(False))


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
