"""What recomputing or offloading units does to a profiled step.

A `Choice` recomputes a run of consecutive units as one checkpointed region
(optionally keeping the outputs of some expensive operators saved), or
offloads one unit's saved tensors to host memory. Its `Effect` says which
blocks of the trace leave the device, from which tick until which tick, what
is allocated again when they come back (the *replay*), and the extra time.

A block leaves the device when every unit that saved it is inside the
region (or is the offloaded unit) and the region allocated it; it goes at
its *death*: the end of the last unit that saved or read it in forward. A
recomputed region comes back when backward first needs a tensor saved in it
(non-reentrant checkpoint replays its forward then, up to the last tensor
the region saved; under torch.compile, its whole forward); an offloaded
unit comes back one unit ahead of its backward (prefetch).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from planner.core.costmodel import Roofline
from planner.core.graph import Block, Category, Phase, ProfiledGraph

class Action(str, Enum):
    KEEP = "keep"
    RECOMPUTE = "recompute"
    OFFLOAD = "offload"


class Kept(NamedTuple):
    """Operator calls whose outputs a recomputed region keeps saved: in unit `unit`'s forward, the
    call of operator `op` after `call` others of it (`Op.call`), or with `call` None every call."""

    unit: int
    op: str
    call: int | None = None

    def __str__(self) -> str:
        """As in a plan file's unit entry: `aten.mm#2`, or `aten.mm` for every call."""
        return self.op if self.call is None else f"{self.op}#{self.call}"

    @classmethod
    def parse(cls, unit: int, text: str) -> Kept:
        match = re.fullmatch(r"([^#]+)(?:#(\d+))?", text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"expected an operator, or an operator and its call ('aten.mm#2'), got {text!r}")
        return cls(unit, match[1], None if match[2] is None else int(match[2]))


def keeps(save_ops: frozenset[Kept], unit: int | None, op: str, call: int) -> bool:
    """Whether `save_ops` keeps the outputs of that call of `op` in `unit`'s forward."""
    return bool(save_ops) and ((unit, op, call) in save_ops or (unit, op, None) in save_ops)  # tuples: as Kept


@dataclass(frozen=True)
class Choice:
    """Recompute `units` (consecutive indices) as one region, or offload one unit."""

    action: Action
    units: tuple[int, ...]
    save_ops: frozenset[Kept] = frozenset()  # recompute only: operator calls whose outputs stay saved


@dataclass(frozen=True)
class Release:
    """A block off the device for ticks in (death, back]: it is gone after `death` and back at `back`.

    As a hold (`Effect.held`) it is instead on the device longer, from `death` until `back`; with
    `in_replay`, until the replay at `back` frees it (an event of `Effect.replay`)."""

    block: int
    death: int
    back: int
    in_replay: bool = False


@dataclass(frozen=True)
class Effect:
    """What a choice changes: released blocks, the replay at `replay_tick`, extra time in ms.

    `held` are blocks a recomputed region reads from outside, which its checkpoint
    keeps alive from their first free (`death`) until its backward is over (`back`), and
    outputs of operators it keeps saved, which the selective checkpoint's cache keeps alive
    until its replay takes them or, where the replay stops before their operator, until
    its backward is over.
    A replay first copies the buffers of its units' modules (`snapshot_bytes`) and
    puts them back when it is over, so that batch-norm statistics are updated once.
    """

    releases: tuple[Release, ...]
    held: tuple[Release, ...]
    replay_tick: int
    replay: tuple[tuple[int, int], ...]  # (block index, +bytes allocated or -bytes freed), in order
    extra_ms: float
    snapshot_bytes: int = 0
    host_bytes: int = 0  # an offload's copies in host memory


class Semantics:
    """Computes effects of choices on one graph; shared by the simulator and the solvers."""

    def __init__(self, graph: ProfiledGraph, roofline: Roofline) -> None:
        self.graph = graph
        self.roofline = roofline
        self._fwd_ends = [u.fwd_end for u in graph.units]
        self._fwd_starts = [u.fwd_start for u in graph.units]
        later = [0.0]  # forward time of the units after each unit
        for u in reversed(graph.units[1:]):
            later.append(later[-1] + u.fwd_ms)
        self._later_fwd_ms = later[::-1]
        self._readers = graph.readers()  # block -> units that take it as an input
        self._made_into: dict[int, list[int]] = {}  # block -> the blocks made from it in forward
        for i, b in enumerate(graph.blocks):
            for j in b.made_from:
                self._made_into.setdefault(j, []).append(i)
        self._made: dict[int, list[int]] = {}  # unit -> the blocks its forward allocated, in order
        self._by_call: dict[tuple, list[int]] = {}  # (unit, op, call) and (unit, op, None) -> the blocks they made
        for i, b in enumerate(graph.blocks):
            if b.phase is Phase.FORWARD and b.owner is not None:
                self._made.setdefault(b.owner, []).append(i)
                for key in ((b.owner, b.op, b.op_call), (b.owner, b.op, None)):
                    self._by_call.setdefault(key, []).append(i)
        self._deaths: dict[int, int] = {}  # id of a block -> its death, once asked for
        self._saved_activations = {  # blocks a choice may release: saved in forward, freed in backward
            i
            for i, b in enumerate(graph.blocks)
            if b.phase is Phase.FORWARD and b.category is Category.ACTIVATIONS and b.savers and b.free is not None
            and not b.in_state
        }
        self._leaving = {  # block a choice may release -> (units that must all be in it, death, free, unit output)
            i: (graph.blocks[i].savers | self._readers.get(i, set()), self.death(graph.blocks[i]), graph.blocks[i].free,
                graph.blocks[i].unit_output)
            for i in self._saved_activations
            if graph.blocks[i].owner is not None
        }
        self._op_ticks: dict[int, list[int]] = {}  # unit -> when each of its forward's calls ran, in order
        for u in graph.units:
            tick, self._op_ticks[u.index] = u.fwd_start, []
            for op in u.ops:  # a call that made no block (a view) runs when the call before it did
                tick = min((graph.blocks[i].alloc for i in self._by_call.get((u.index, op.name, op.call), ())),
                           default=tick)
                self._op_ticks[u.index].append(tick)
        self._last_saved: dict[int, int] = {}  # unit -> the latest allocation tick of a block its forward saved
        for b in graph.blocks:
            if b.phase is Phase.FORWARD:
                for u in b.savers:
                    self._last_saved[u] = max(self._last_saved.get(u, -1), b.alloc)

    def death(self, block: Block) -> int:
        """The forward tick after which nothing in forward needs the block any more."""
        key = id(block)
        if key not in self._deaths:
            self._deaths[key] = self._death(block)
        return self._deaths[key]

    def _death(self, block: Block) -> int:
        last = max((block.owner, *block.savers))
        death = self.graph.units[last].fwd_end
        if block.last_use is not None:
            death = max(death, self._unit_end_at(block.last_use))
        return death

    def _unit_end_at(self, tick: int) -> int:
        i = bisect.bisect_right(self._fwd_starts, tick) - 1
        if i >= 0 and tick <= self._fwd_ends[i]:
            return self._fwd_ends[i]
        return tick

    def _releases(self, owned: list[int], units: set[int], kept: set[int], back: int, offload: bool) -> tuple[Release, ...]:
        """The blocks among `owned` that leave the device when `units` are recomputed or offloaded: saved
        activations that only these units saved or read, not kept by the region, dead before `back` and
        alive at it (an offload keeps the unit's outputs, which the next unit holds anyway)."""
        releases = []
        for i in owned:
            if i in kept or i not in self._leaving:
                continue
            need, death, free, output = self._leaving[i]
            if death < back < free and need <= units and not (offload and output):
                releases.append(Release(i, death, back))
        return tuple(releases)

    def _kept(self, save_ops: frozenset[Kept]) -> set[int]:
        """The blocks that operator calls in `save_ops` made in forward."""
        return {i for k in save_ops for i in self._by_call.get(k, ())}

    def _keepable(self, block: int, save_ops: frozenset[Kept]) -> bool:
        """Whether a selective checkpoint may keep the block saved: it is not written after it was made,
        or `save_ops` keeps every call that writes it, which nothing reads before the last."""
        b = self.graph.blocks[block]
        return not b.mutated or (not b.read_then_written and all(keeps(save_ops, *w) for w in b.writers))

    def effect(self, choice: Choice) -> Effect | None:
        """The choice's effect, or None when it frees nothing or cannot run.

        A region cannot start with a unit that writes into its inputs (replaying
        it would write again), nor keep saved an output that is later written
        unless it keeps every call that writes it too (the replay then runs none of them),
        nor hold a unit whose random numbers a replay cannot draw again, or that stores tensors
        into an object it was given (a replay would store them again).
        """
        units = set(choice.units)
        owned = self._owned(units)
        kept = self._kept(choice.save_ops)
        if self.graph.units[choice.units[0]].mutates_inputs or not all(self._keepable(i, choice.save_ops) for i in kept):
            return None
        if choice.action is Action.RECOMPUTE and not all(self.graph.units[u].replays_alike for u in units):
            return None
        starts = [self.graph.units[u].bwd_start for u in units if self.graph.units[u].bwd_start is not None]
        if not starts:
            return None
        back = min(starts) if choice.action is Action.RECOMPUTE else self._prefetch_tick(choice.units[0])
        releases = self._releases(owned, units, kept, back, choice.action is Action.OFFLOAD)
        if not releases:
            return None
        held: tuple[Release, ...] = ()
        if choice.action is Action.RECOMPUTE:
            held = self._held(units, back, kept)
            taken = [h.block for h in held if h.in_replay]
            replay = self._replay(owned, {r.block for r in releases}, kept, taken, self._replay_stop(units))
            modules = {self.graph.units[u].name: self.graph.units[u].buffer_bytes for u in units}
            snapshot = sum(modules.values())  # a module called twice in the region is copied once
        else:
            replay = tuple((r.block, self.graph.blocks[r.block].bytes) for r in releases)
            snapshot = 0
        host = sum(delta for _, delta in replay) if choice.action is Action.OFFLOAD else 0
        return Effect(releases, held, back, replay, self.extra_ms(choice, len(releases), host), snapshot, host)

    def extra_ms(self, choice: Choice, storages: int, host_bytes: int) -> float:
        """The time a choice adds where it frees `storages` storages: its replay, or the copies of the
        `host_bytes` an offload moves; and the executor's own cost."""
        if choice.action is Action.OFFLOAD:
            work_ms = self._offload_ms(choice.units[0], host_bytes)
        else:
            stop = self._replay_stop(choice.units)
            work_ms = sum(self._recompute_ms(u, choice.save_ops, stop) for u in choice.units)
        return self._fixed_ms(choice, storages) + work_ms

    def _held(self, units: set[int], back: int, kept: set[int]) -> tuple[Release, ...]:
        """Blocks the region's checkpoint keeps alive longer than the step without it: its inputs made
        outside it, until its backward is over; and the outputs of operators it keeps saved, which the
        selective checkpoint's cache holds from the first forward on, whoever else saved them.

        The replay takes a kept output out of the cache when it runs its operator, and from then on it
        lives as the replay's and its savers' (in the replay, until it is freed there). But a replay stops
        at the last tensor the region's forward saved, and autograd saves an operator's inputs before it
        runs it: where no tensor made at or after the operator was saved in the region, the replay never
        runs it, and its output stays cached until the checkpoint goes, when the region's backward is over.
        Under torch.compile only the kept outputs that the compiled step saves are held (`_saved_compiled`).
        """
        blocks = self.graph.blocks
        inputs = {i for u in units for i in self.graph.units[u].inputs if blocks[i].owner not in units}
        until = max([back] + [self.graph.units[u].bwd_end or back for u in units])
        last_saved = self._last_saved_in(units)
        ends = dict.fromkeys(inputs, (until, False))  # block -> (until when, whether its replay frees it)
        for i in kept:
            if not blocks[i].scratch and (not self.graph.compiled or self._saved_compiled(i, kept)):
                ends[i] = (back, True) if blocks[i].alloc <= last_saved else (until, False)
        return tuple(
            Release(i, blocks[i].free, end, in_replay)
            for i, (end, in_replay) in sorted(ends.items())
            if blocks[i].free is not None and blocks[i].free < end
        )

    def _saved_compiled(self, block: int, kept: set[int]) -> bool:
        """Whether a compiled step saves the output of a call its region keeps. The partitioner saves it
        only where backward needs it: not a unit's own output, which a region keeps so that no other
        unit's backward replays it (`solvers.problem.region_outputs`) and which is saved for the
        operators whose backward needs it, as in the step without the plan; nor one that only kept
        outputs are made from (a layer's last projection, whose sum with the residual stream it keeps)."""
        b = self.graph.blocks[block]
        return not b.unit_output and (bool(b.savers) or any(i not in kept for i in self._made_into.get(block, ())))

    def _last_saved_in(self, units: Iterable[int]) -> int:
        """The latest allocation tick of a block the region's forward saved, where its replay stops (-1: none)."""
        return max((self._last_saved.get(u, -1) for u in units), default=-1)

    def _replay_stop(self, units: Iterable[int]) -> int | None:
        """Where the region's replay stops: in eager, at the last tensor it saved, since the checkpoint
        stops it once every saved tensor is back; under torch.compile nowhere (None), since the
        partitioner recomputes what backward needs, wherever it is."""
        return None if self.graph.compiled else self._last_saved_in(units)

    def _owned(self, units: set[int]) -> list[int]:
        """The blocks the forwards of `units` allocated, in order."""
        return sorted(i for u in units for i in self._made.get(u, ()))

    def _prefetch_tick(self, unit: int) -> int:
        """When backward reaches the next unit's outputs, or first needs the unit's own tensors."""
        units = self.graph.units
        if unit + 1 < len(units) and units[unit + 1].grad_tick is not None:
            return min(units[unit + 1].grad_tick, units[unit].bwd_start)
        return units[unit].bwd_start

    def _replay(
        self, owned: list[int], released: set[int], kept: set[int], taken: list[int] = (), stop: int | None = None
    ) -> tuple[tuple[int, int], ...]:
        """The region's forward run again: its blocks allocated in order, all but the released ones freed.

        `taken` are kept outputs that only the cache held until now: the replay frees them when done
        with them (a transient where the first forward freed it, another at the replay's end). Nothing
        made after `stop` (`_replay_stop`) is made again."""
        events: list[tuple[int, int, int]] = []  # (order tick, block, delta)
        if stop is not None:
            owned = [i for i in owned if self.graph.blocks[i].alloc <= stop]
        end = max(self.graph.blocks[i].alloc for i in owned)
        for i in owned:
            b = self.graph.blocks[i]
            if i in kept and i not in released:
                continue  # kept from the first forward, not recomputed
            events.append((b.alloc, i, b.bytes))
            if i not in released:
                free = b.free if b.category is Category.TRANSIENTS and b.free is not None else end + 1
                events.append((min(free, end + 1), i, -b.bytes))
        for i in taken:
            b = self.graph.blocks[i]
            free = b.free if b.category is Category.TRANSIENTS else end + 1
            events.append((min(free, end + 1), i, -b.bytes))
        events.sort(key=lambda e: (e[0], e[2] < 0))
        return tuple((i, delta) for _, i, delta in events)

    def _recompute_ms(self, unit: int, save_ops: frozenset[Kept], stop: int | None) -> float:
        """The unit's forward as its region's replay runs it: less the calls it keeps and the calls after
        `stop` (`_replay_stop`). A LLaMA layer's replay stops at the input of its down projection: it
        never computes the projection nor its sum with the residual stream."""
        u = self.graph.units[unit]
        return u.fwd_ms - sum(op.ms for op, tick in zip(u.ops, self._op_ticks[unit])
                              if keeps(save_ops, unit, op.name, op.call) or stop is not None and tick > stop)

    def _offload_ms(self, unit: int, nbytes: int) -> float:
        """Copy time not hidden by compute: the copy out by the rest of the forward, the copy back
        (prefetched) by the next unit's backward."""
        copy = self.roofline.copy_ms(nbytes)
        if not self.roofline.copies_overlap:
            return 2 * copy
        nxt = self.graph.units[unit + 1] if unit + 1 < len(self.graph.units) else None
        return max(0.0, copy - self._later_fwd_ms[unit]) + max(0.0, copy - (nxt.bwd_ms if nxt else 0.0))

    def _fixed_ms(self, choice: Choice, storages: int) -> float:
        """The executor's own cost of a choice that frees `storages` storages (measured per device); none
        in a compiled step, where the checkpoints were traced away."""
        m = self.roofline.mechanism
        if m is None or self.graph.compiled:
            return 0.0
        if choice.action is Action.OFFLOAD:
            return m.offload_ms + m.offload_storage_ms * storages
        policy = m.selective_op_ms * sum(len(self.graph.units[u].ops) for u in choice.units) if choice.save_ops else 0.0
        return m.region_ms + m.region_storage_ms * storages + policy


def replay_peak(effect: Effect) -> int:
    """The most bytes a replay adds on top of what was alive when it began."""
    live = peak = effect.snapshot_bytes
    for _, delta in effect.replay:
        live += delta
        peak = max(peak, live)
    return peak
