"""A plan under torch.compile: each recomputed unit call as one checkpoint that Dynamo traces.

When Dynamo traces a unit's forward, the handle's bookkeeping (call counts, open regions, the
replay of recorded calls) would be specialised into the graph; instead, each unit that the plan
recomputes runs through `torch.utils.checkpoint.checkpoint`, which Dynamo turns into a region of
the joint graph whose values AOTAutograd's partitioner recomputes in backward, keeping saved the
outputs of the operator calls the plan names (a selective-checkpoint policy, as in eager). The
partitioner saves the values that pass between two checkpointed calls, so a compiled step follows
plans whose regions are single units: `planner.plan` makes such plans for a compiled step's profile
(`profile(..., compiled=True)`), and a region of several units raises NotCompilable where Dynamo
reaches it. Offload (saved-tensor hooks, host copies) does not trace: an offloaded unit's calls run
eagerly, a graph break around each, and the rest of the step compiles; where they draw random numbers,
only if compiled code draws them as eager code does (`first_eager_call`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils import checkpoint as ckpt

from planner.core.actions import Action, Kept, keeps
from planner.core.plan import Plan
from planner.torch_internals import TorchDispatchMode, compiled_draws_as_eager, draws_random


class NotCompilable(ValueError):
    """The plan cannot run under torch.compile as it is; the message says what to plan instead."""


class Unit(NamedTuple):
    """What a unit module's calls do under compile: `recompute` or not, the operator calls its
    recompute keeps saved (`Kept` with no unit), or `offload` (eagerly)."""

    recompute: bool
    save_ops: frozenset[Kept] = frozenset()
    offload: bool = False


def static_choices(plan: Plan) -> dict[str, Unit | NotCompilable]:
    """For each module the plan names, what all its calls do under compile, or the NotCompilable to
    raise when Dynamo reaches it (its calls differ, or its region spans several units)."""
    chosen = {u: choice for choice in plan.choices for u in choice.units}
    by_module: dict[str, set[Unit | str]] = {}
    for u, key in enumerate(plan.units):
        choice = chosen.get(u)
        if choice is None:
            what: Unit | str = Unit(False)
        elif choice.action is Action.OFFLOAD:
            what = Unit(False, offload=True)
        elif len(choice.units) > 1:
            what = "is recomputed in a region of several units"
        else:
            what = Unit(True, frozenset(k._replace(unit=None) for k in choice.save_ops))
        by_module.setdefault(key.rsplit("#", 1)[0], set()).add(what)
    return {name: _one(name, whats) for name, whats in by_module.items()}


def _one(name: str, whats: set[Unit | str]) -> Unit | NotCompilable:
    if len(whats) == 1 and isinstance(unit := next(iter(whats)), Unit):
        return unit
    why = next((w for w in whats if isinstance(w, str)), "is treated differently in different calls")
    return NotCompilable(f"under torch.compile, the plan cannot be followed where {name} {why}: make the plan for "
                         "the compiled step (planner.profile(..., compiled=True), planner train --compile)")


def compiled_call(unit: Unit | NotCompilable | None, forward: Callable, args: tuple, kwargs: dict, offload: Callable):
    """One unit call while Dynamo traces it, as `unit` (None: a module the plan does not name) says;
    `offload(forward, args, kwargs)` runs an offloaded one, outside the trace."""
    if isinstance(unit, NotCompilable):
        _refuse(unit)
    if unit is not None and unit.offload:
        return offload(forward, args, kwargs)
    if unit is None or not unit.recompute:
        return forward(*args, **kwargs)
    if not unit.save_ops:  # (Dynamo takes a context_fn made where it traces, not one read from outside)
        return ckpt.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    context_fn = functools.partial(_selective, unit.save_ops)
    return ckpt.checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


@torch.compiler.disable
def _refuse(error: NotCompilable) -> None:
    """Raise `error` outside the trace: an exception Dynamo meets while tracing makes it fall back to
    running the frame eagerly instead of reaching the user."""
    raise error


def _selective(save_ops: frozenset[Kept]):
    """Selective-checkpoint contexts keeping `save_ops` saved (calls counted per operator in the unit's
    forward, which the trace runs once); a module-level function under a partial, as Dynamo wants a
    checkpoint's `context_fn`."""
    calls: dict[tuple[bool, str], int] = {}

    def policy(ctx, func, *args, **kwargs):
        key = (ctx.is_recompute, str(func.overloadpacket))
        call = calls[key] = calls.get(key, -1) + 1
        if keeps(save_ops, None, key[1], call):
            return ckpt.CheckpointPolicy.MUST_SAVE
        return ckpt.CheckpointPolicy.PREFER_RECOMPUTE

    return ckpt.create_selective_checkpoint_contexts(policy)


def first_eager_call(name: str, run: Callable[[], object]):
    """`run()`, the first eager call of an offloaded unit in a compiled model, or NotCompilable where it drew
    random numbers (a dropout's mask) that the compiled step would draw from a generator of its own."""
    if compiled_draws_as_eager():
        return run()
    with _Draws() as draws:
        output = run()
    if draws.drew:
        raise NotCompilable(f"under torch.compile, {name} is offloaded and runs eagerly, and it draws random numbers, "
                            "which compiled code draws from a generator of its own: the step would train otherwise "
                            "than without the plan; set torch._inductor.config.fallback_random = True before compiling, "
                            "or make the plan for the compiled step (planner.profile(..., compiled=True))")
    return output


class _Draws(TorchDispatchMode):
    """Notes whether an operator call under it draws random numbers."""

    drew = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.drew = self.drew or draws_random(func, args, kwargs)
        return func(*args, **kwargs)
