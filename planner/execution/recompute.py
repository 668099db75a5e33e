"""Recompute: a run of units checkpointed as one region through PyTorch's non-reentrant checkpoint.

The region opens when its first unit is called and closes when its last one returns; in between,
the units run as they do without a plan, under the checkpoint's saved-tensor hooks, and each call
is recorded: its forward, its arguments, and which of them are the previous unit's outputs. When
backward first needs a tensor saved in the region, the checkpoint replays it: the recorded calls
again, each fed the replayed outputs of the one before and the recorded arguments otherwise. The
buffers of the region's modules (batch-norm statistics) are copied before a replay and put back
after it, so that a step updates them once. Operators the plan keeps saved are kept by a
selective-checkpoint policy; one that keeps a region's random draws keeps all of them (a dropout's
mask, with the calls that made and wrote it), so that its replay draws none.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import checkpoint as ckpt

from planner.core.actions import Choice, keeps
from planner.torch_internals import checkpoint_generator, outside_checkpoint_modes, tree_flatten, tree_unflatten
from planner.tracking import Positions


class ReplayFailed(RuntimeError):
    """A region's replay did not do what its forward did (it raised, or ran other operators than the
    forward, which a selective checkpoint refuses): its units' forwards depend on state that backward
    changes. `units` are their indices."""

    def __init__(self, message: str, units: tuple[int, ...]) -> None:
        super().__init__(message)
        self.units = units


@dataclass
class _Call:
    """One unit call in a region: its forward, its argument leaves (None where `link` is set), and
    for each leaf the position of the previous call's output leaf it is (None for other arguments)."""

    forward: Callable
    leaves: list
    spec: Any
    links: list[int | None]


@dataclass
class _Region:
    """One checkpointed run of units during one forward."""

    choice: Choice
    buffers: list[torch.Tensor]  # of its units' modules, put back after a replay
    calls: list[_Call] = field(default_factory=list)
    last_outputs: Positions = field(default_factory=Positions)  # of the leaves of the last output
    generator: Iterator | None = None
    position: int = 0  # of the unit call running now, in the region's forward or in its replay


class Regions:
    """The recompute regions of a plan as they run: at most one is open at a time.

    `nested()` is a context in which the unit calls a replay makes run as they are, `keys` the plan's
    unit keys; `watch`, when set, is told when a replay starts (with its choice) and ends (with None).
    """

    def __init__(self, nested: Callable[[], contextlib.AbstractContextManager], keys: tuple[str, ...]) -> None:
        self.nested = nested
        self.keys = keys  # of the plan's units, for messages
        self.open: _Region | None = None
        self.watch: Callable[[Choice | None], None] | None = None

    def run(self, choice: Choice, position: int, buffers: Callable[[], list[torch.Tensor]], forward: Callable, args: tuple, kwargs: dict):
        """The unit call at `position` in `choice`'s region; the first opens it (with the region's
        module buffers from `buffers()`), the last closes it."""
        if position == 0:
            self.open = _Region(choice, buffers())
            self.open.generator = checkpoint_generator(functools.partial(self._replay, self.open), _context_fn(self.open), *args, **kwargs)
            next(self.open.generator)
        region = self.open
        leaves, spec = tree_flatten((args, kwargs))
        links = [region.last_outputs.of(leaf) for leaf in leaves]
        region.calls.append(_Call(forward, [None if link is not None else leaf for leaf, link in zip(leaves, links)], spec, links))
        region.position = position
        try:
            output = forward(*args, **kwargs)
        except BaseException:
            self.close()
            raise
        region.last_outputs = Positions(tree_flatten(output)[0])
        if position == len(choice.units) - 1:
            self.close()
        return output

    def close(self) -> None:
        region, self.open = self.open, None
        if region is not None and region.generator is not None:
            next(region.generator, None)
            region.generator = None  # the generator refers to the region: no cycle may outlive the step

    def _replay(self, region: _Region, *args, **kwargs) -> None:
        """Run the region's forward again from its first inputs; its units' buffers are left as they were."""
        with outside_checkpoint_modes(), torch.no_grad():
            snapshot = [b.clone() for b in region.buffers]
        if self.watch is not None:
            self.watch(region.choice)
        try:
            self._run_calls(region, args, kwargs)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:  # not the checkpoint's own signal that the replay may stop early
            units = ", ".join(self.keys[u] for u in region.choice.units)
            raise ReplayFailed(
                f"the replay of {units} in backward failed where its forward had run ({err}): it depends on state "
                "that backward changes; make a plan that does not recompute it", region.choice.units) from err
        finally:
            if self.watch is not None:
                self.watch(None)
            with outside_checkpoint_modes(), torch.no_grad():
                for buffer, value in zip(region.buffers, snapshot):
                    # through `.data`: putting the values back is no change autograd must see; bumping the
                    # buffer's version would fail the backward of a call of the module outside the region
                    # (batch norm saves its running statistics)
                    buffer.data.copy_(value)

    def _run_calls(self, region: _Region, args: tuple, kwargs: dict) -> None:
        """The region's unit calls again, each fed the outputs of the one before."""
        with self.nested():
            region.position = 0
            output = region.calls[0].forward(*args, **kwargs)
            for region.position, call in enumerate(region.calls[1:], 1):
                previous = tree_flatten(output)[0]
                leaves = [previous[link] if link is not None else leaf for leaf, link in zip(call.leaves, call.links)]
                call_args, call_kwargs = tree_unflatten(leaves, call.spec)
                output = call.forward(*call_args, **call_kwargs)


def _context_fn(region: _Region):
    """No policy, or a selective-checkpoint policy keeping the outputs of the region's `save_ops` saved.

    It tells an operator call by its unit's position in the region and the calls of the same operator
    before it in that unit's forward, counted apart in the forward and in the replay, which run the
    same calls in the same order."""
    choice = region.choice
    if not choice.save_ops:
        return ckpt.noop_context_fn
    calls: dict[tuple[bool, int, str], int] = {}  # (in the replay, unit position, operator) -> calls so far

    def policy(ctx, func, *args, **kwargs):
        key = (ctx.is_recompute, region.position, str(func.overloadpacket))
        call = calls[key] = calls.get(key, -1) + 1
        if keeps(choice.save_ops, choice.units[region.position], key[2], call):
            return ckpt.CheckpointPolicy.MUST_SAVE
        return ckpt.CheckpointPolicy.PREFER_RECOMPUTE

    # a kept call that writes in place (a dropout's `bernoulli_`) writes into an output kept before it;
    # the plan keeps every call that writes it, so the replay takes each from the cache and runs none
    mutation = any(k.op.endswith("_") for k in choice.save_ops)
    return functools.partial(ckpt.create_selective_checkpoint_contexts, policy, allow_cache_entry_mutation=mutation)
