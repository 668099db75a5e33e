"""A plan under torch.compile: each recomputed unit call as one checkpoint that Dynamo traces.

When Dynamo traces a unit's forward, the handle's bookkeeping (call counts, open regions, the
replay of recorded calls) would be specialised into the graph; instead, each unit that the plan
recomputes runs through `torch.utils.checkpoint.checkpoint`, which Dynamo turns into a region of
the joint graph whose values AOTAutograd's partitioner recomputes in backward, keeping saved the
outputs of the operator calls the plan names (a selective-checkpoint policy, as in eager). The
partitioner saves the values that pass between two checkpointed calls, so a compiled step follows
plans whose regions are single units, and offload (saved-tensor hooks, host copies) does not trace:
`planner.plan` makes such plans for a compiled step's profile (`profile(..., compiled=True)`). A
plan of another kind raises NotCompilable where Dynamo reaches a unit it cannot follow.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils import checkpoint as ckpt

from planner.core.actions import Action, Kept, keeps
from planner.core.plan import Plan


class NotCompilable(ValueError):
    """The plan cannot run under torch.compile as it is; the message says what to plan instead."""


class Unit(NamedTuple):
    """What a unit module's calls do under compile: `recompute` or not, and the operator calls its
    recompute keeps saved (`Kept` with no unit)."""

    recompute: bool
    save_ops: frozenset[Kept] = frozenset()


def static_choices(plan: Plan) -> dict[str, Unit | NotCompilable]:
    """For each module the plan names, what all its calls do under compile, or the NotCompilable to
    raise when Dynamo reaches it (its calls differ, it offloads, or its region spans several units)."""
    chosen = {u: choice for choice in plan.choices for u in choice.units}
    by_module: dict[str, set[Unit | str]] = {}
    for u, key in enumerate(plan.units):
        choice = chosen.get(u)
        if choice is None:
            what: Unit | str = Unit(False)
        elif choice.action is Action.OFFLOAD:
            what = "offloads"
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


def compiled_call(unit: Unit | NotCompilable | None, forward: Callable, args: tuple, kwargs: dict):
    """One unit call while Dynamo traces it, as `unit` (None: a module the plan does not name) says."""
    if isinstance(unit, NotCompilable):
        _refuse(unit)
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
