"""The profiled graph: what one training step of a model did, as plain frozen data.

Nothing here imports torch, so solvers can read a profile without it. Sizes are
in bytes, times in milliseconds, and moments of the step in *ticks*: every
allocation, free and operator call of the profiled step advances the clock by
one, so a tick orders everything that happened.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass, field, replace
from enum import Enum

import networkx as nx


class Category(str, Enum):
    """What a piece of device memory is for."""

    PARAMETERS = "parameters"
    BUFFERS = "buffers"
    INPUTS = "inputs"
    OPTIMIZER = "optimizer state"
    COMMUNICATION = "communication buffers"  # held by a data-parallel engine between steps
    WORKSPACE = "workspaces"  # CUDA libraries' workspaces and other device memory outside the model
    GRADIENTS = "gradients"
    ACTIVATIONS = "activations"
    TRANSIENTS = "transients"


FIXED_CATEGORIES = (
    Category.PARAMETERS,
    Category.BUFFERS,
    Category.INPUTS,
    Category.OPTIMIZER,
    Category.COMMUNICATION,
    Category.WORKSPACE,
)


class Phase(str, Enum):
    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"


# Operators with much compute per byte: worth keeping saved inside a recomputed unit, and what
# compiled code runs as eager code does (it fuses the others).
EXPENSIVE_OPS = frozenset(
    {
        "aten.mm",
        "aten.addmm",
        "aten.bmm",
        "aten.baddbmm",
        "aten.convolution",
        "aten._scaled_dot_product_flash_attention",
        "aten._scaled_dot_product_flash_attention_for_cpu",
        "aten._scaled_dot_product_efficient_attention",
        "aten._scaled_dot_product_cudnn_attention",
    }
)


@dataclass(frozen=True)
class Op:
    """One operator call inside a unit's forward.

    `out_bytes` counts the new storages the op allocated; `saved_bytes` those
    of them that autograd kept for backward.
    """

    name: str
    flops: int
    ms: float
    out_bytes: int
    saved_bytes: int
    bytes_moved: int = 0  # bytes its inputs and outputs span: its memory traffic
    random: bool = False  # draws random numbers (dropout inside fused attention)
    call: int = 0  # how many calls of the same operator came before it in the unit's forward


@dataclass(frozen=True)
class Unit:
    """One call of a module the planner may act on (a module called T times is T units)."""

    index: int
    name: str  # fully qualified module name ("" for the root)
    call: int  # 0 for the first call of that module in the step
    kind: str  # class name
    fwd_ms: float
    bwd_ms: float
    fwd_flops: int
    bwd_flops: int
    saved_bytes: int  # storages it allocated that autograd saved for backward, counted once
    input_bytes: int
    output_bytes: int
    fwd_start: int  # tick
    fwd_end: int  # tick
    bwd_start: int | None  # tick at which backward first used a tensor it saved
    ops: tuple[Op, ...] = ()
    direct_from: int | None = None  # the last unit before it, when it made some of this unit's tensor inputs
    side_from: int = -1  # the latest other unit that made some of them: a region spanning the link starts after it
    mutates_inputs: bool = False  # writes in place into a tensor it did not make
    grad_tick: int | None = None  # tick at which backward reached its outputs
    bwd_end: int | None = None  # tick of its last backward operator
    bwd_bytes: int = 0  # memory traffic of its backward operators
    inputs: tuple[int, ...] = ()  # blocks of its tensor inputs that the step made
    buffer_bytes: int = 0  # its module's buffers, which a replay copies and puts back (updated once)
    replayable: bool = True  # False when its forward draws random numbers that a replay cannot draw again
    writes_state: bool = False  # stores tensors into an object it was given (a key/value cache): a replay would again

    @property
    def replays_alike(self) -> bool:
        """Whether running its forward again in backward does what the first run did."""
        return self.replayable and not self.writes_state

    @property
    def key(self) -> str:
        """Stable identifier: `name#call`."""
        return f"{self.name or '<root>'}#{self.call}"

    def fused(self, share: float) -> Unit:
        """This unit with its forward's operators outside EXPENSIVE_OPS taking `share` of their time, as
        compiled code that fuses them runs them."""
        heavy = sum(op.ms for op in self.ops if op.name in EXPENSIVE_OPS)
        ops = tuple(op if op.name in EXPENSIVE_OPS else replace(op, ms=op.ms * share) for op in self.ops)
        return replace(self, ops=ops, fwd_ms=heavy + share * (self.fwd_ms - heavy))


@dataclass(frozen=True)
class Block:
    """One storage allocated during the step, and its life.

    `owner` is the unit whose forward (or backward) allocated it, `savers` the
    units whose forward saved it for backward (-1 stands for code outside every
    unit), `last_use` the last forward tick at which an operator read it (for a
    cast of a parameter that autocast caches, the end of the forward).
    """

    bytes: int
    category: Category
    phase: Phase
    alloc: int  # tick
    free: int | None  # tick; None: alive at the end of the step
    owner: int | None = None
    savers: frozenset[int] = frozenset()
    last_use: int | None = None
    made_from: tuple[int, ...] = ()  # the blocks that the forward operators that wrote it read
    op: str = ""  # the operator that allocated it
    op_call: int = 0  # that operator's call in the owner's forward (`Op.call`)
    mutated: bool = False  # written in place after it was made
    writers: tuple[tuple[int | None, str, int], ...] = ()  # the calls (unit, op, call) that wrote into it
    read_then_written: bool = False  # read by another operator before a write (a kept output has its last state)
    unit_output: bool = False  # returned by the unit that made it
    in_state: bool = False  # stored into an object a unit was given (a key/value cache): no plan frees it
    scratch: bool = False  # memory its operator took and gave back within the call (allocated and freed at once)


@dataclass(frozen=True)
class FixedMemory:
    """Memory alive through the whole steady-state step, in bytes.

    `communication` is what a data-parallel engine holds between steps apart
    from the others (DistributedDataParallel's gradient buckets); 0 on one device.
    `workspace` is what else the CUDA allocator holds through the step (cuBLAS
    workspaces, tensors outside the model); 0 off CUDA.
    """

    parameters: int
    buffers: int
    inputs: int
    optimizer: int
    communication: int = 0
    workspace: int = 0

    def by_category(self) -> dict[Category, int]:
        return {
            Category.PARAMETERS: self.parameters,
            Category.BUFFERS: self.buffers,
            Category.INPUTS: self.inputs,
            Category.OPTIMIZER: self.optimizer,
            Category.COMMUNICATION: self.communication,
            Category.WORKSPACE: self.workspace,
        }

    @property
    def total(self) -> int:
        return sum(self.by_category().values())


@dataclass(frozen=True)
class Work:
    """Operators outside every unit (the loss, the optimizer, glue between units): ms, FLOPs, bytes moved."""

    ms: float = 0.0
    flops: int = 0
    bytes_moved: int = 0


@dataclass(frozen=True)
class Mechanism:
    """What the executor costs on a device beyond the forward a region replays and the bytes an
    offload copies (hooks, checkpoint and copy bookkeeping): ms per choice, and per storage it frees;
    and for a region that keeps operator outputs saved, ms per operator call of its forward that the
    selective-checkpoint policy sees (in the forward and in the replay)."""

    region_ms: float
    region_storage_ms: float
    offload_ms: float
    offload_storage_ms: float
    selective_op_ms: float = 0.0

    def scaled(self, share: float) -> Mechanism:
        """These costs where only `share` of the host's extra work delays the step."""
        return Mechanism(*(share * ms for ms in astuple(self)))


@dataclass(frozen=True)
class Calibration:
    """What profiling measured of the device beside the step itself (nothing, for estimated times)."""

    device_name: str | None = None  # the CUDA device the times were measured on
    host_bytes_per_s: float | None = None  # a CPU's offload copy rate, each way
    host_busy: float = 1.0  # share of the step the host spends issuing work (below 1 where a GPU runs behind)
    mechanism: Mechanism | None = None  # the executor's own costs there


def _resave(blocks: list[Block], saved: list[int], total: int) -> None:
    """Blocks `saved` (in the order they are to be kept) as saved blocks holding `total` bytes together (see
    `ProfiledGraph.as_compiled`)."""
    left, kept = total, []
    for i in saved:
        if blocks[i].bytes <= left:
            kept.append(i)
            left -= blocks[i].bytes
    dropped = [i for i in saved if i not in kept]
    if left:
        i = dropped.pop() if dropped else kept[0]
        blocks[i] = replace(blocks[i], bytes=left if i not in kept else blocks[i].bytes + left)
    for i in dropped:
        b = blocks[i]
        blocks[i] = replace(b, savers=frozenset(), free=max(b.alloc, b.last_use or b.alloc) + 1)


def _stay_saved(blocks: list[Block], freed: list[int], frees: int) -> None:
    """Of `freed`, the saved blocks (largest first) that recomputing their unit alone frees in the model,
    those outside EXPENSIVE_OPS beyond the `frees` bytes it frees compiled, as saved outside every unit
    too (see `ProfiledGraph.as_compiled`)."""
    extra = sum(blocks[i].bytes for i in freed) - max(frees, 0)
    for i in freed:
        if 0 < blocks[i].bytes <= extra and blocks[i].op not in EXPENSIVE_OPS:
            blocks[i] = replace(blocks[i], savers=blocks[i].savers | {-1})
            extra -= blocks[i].bytes


@dataclass(frozen=True)
class ProfiledGraph:
    """A profiled training step: units, their data edges, fixed memory and the allocation trace.

    `phases` maps each phase to its (first tick, last tick). `measured_times`
    is False when times were estimated from FLOPs (profiling on the meta device).
    `other` is the work outside every unit; `calibration`, what profiling measured
    of the device for costing plans.
    """

    model: str
    fingerprint: str
    device: str
    units: tuple[Unit, ...]
    edges: tuple[tuple[int, int], ...]
    fixed: FixedMemory
    blocks: tuple[Block, ...]
    phases: dict[Phase, tuple[int, int]]
    step_ms: float  # all operators of the step, measured or estimated
    measured_times: bool
    first_step_extra_bytes: int = 0  # optimizer state the first step allocates
    other: Work = Work()
    calibration: Calibration = Calibration()
    forwards: int = 1  # forwards of the model with gradients in one step (micro-batches)
    compiled: bool = False  # the step runs under torch.compile: saved bytes are the compiled forward's
    drops_layers: bool = False  # the model skips layers at random (LayerDrop): profiled with every layer run
    # what each choice frees and replays, by sizes alone (solvers.problem): a copy with other times shares it
    memory_effects: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def retimed(self, **times) -> ProfiledGraph:
        """A copy with other times (`units`, `step_ms`, ...) and the same sizes and trace: what a
        choice frees is the same in both, and is worked out once for them."""
        copy = replace(self, **times)
        object.__setattr__(copy, "memory_effects", self.memory_effects)
        return copy

    @property
    def end_tick(self) -> int:
        return max(last for _, last in self.phases.values())

    def dag(self) -> nx.DiGraph:
        """The units as a networkx DAG, edges by tensor identity."""
        g = nx.DiGraph()
        g.add_nodes_from(u.index for u in self.units)
        g.add_edges_from(self.edges)
        return g

    def readers(self) -> dict[int, set[int]]:
        """Block -> the units that take it as an input."""
        read: dict[int, set[int]] = {}
        for u in self.units:
            for i in u.inputs:
                read.setdefault(i, set()).add(u.index)
        return read

    def chain_links(self) -> set[tuple[int, int]]:
        """Edges u->v where u feeds only v and v reads only from u."""
        g = self.dag()
        return {(u, v) for u, v in g.edges if g.out_degree(u) == 1 and g.in_degree(v) == 1}

    def segment_links(self) -> set[tuple[int, int]]:
        """Links u->u+1 where u+1 takes u's outputs themselves: a recompute region may span them when it
        starts after u+1's `side_from` (its other inputs are then held from before the region)."""
        return {(u.direct_from, u.index) for u in self.units if u.direct_from == u.index - 1}

    def is_chain(self) -> bool:
        """True when the units form one path with pure chain links."""
        n = len(self.units)
        return len(self.chain_links()) == n - 1 and all((i, i + 1) in set(self.edges) for i in range(n - 1))

    def as_compiled(
        self,
        saved_bytes: dict[int, int],
        forwards: Sequence[tuple[int, int]],
        speedup: tuple[float, float] = (1.0, 1.0),
        recomputed_bytes: dict[int, int] | None = None,
    ) -> ProfiledGraph:
        """This step as torch.compile runs it, where the forward of unit u saves `saved_bytes[u]` for
        backward (what the partitioner chose) instead of what the eager step saved, and the model's
        code outside every unit, during `forwards` (first and last tick of each forward of the model),
        `saved_bytes[-1]`. Each keeps the saved blocks that fit its total, those another unit saves or
        reads first, then expensive operators' outputs (compile recomputes neither), then the largest;
        one more cut to the rest, or its first grown by what is missing; the others live only until
        their last use in the forward, as values a compiled forward does not keep. A unit that saved nothing in eager
        (its output was saved as another's) keeps its largest block until its backward is over. Code
        outside the model (the loss, the optimizer) stays as it ran.

        `recomputed_bytes[u]` is what unit u's forward still saves where it is recomputed: where that
        is more than the blocks that recomputing u alone would leave saved, some of those it would free
        (largest first, outside EXPENSIVE_OPS) are marked as saved outside every unit too, so that no
        plan counts them as freed.

        `speedup` is the compiled forward's time and the compiled step's over the eager ones'. The step
        takes the second; in the forward, the operators of EXPENSIVE_OPS keep their eager times and the
        others, which compiled code fuses, share what is left of the units' forward time."""
        backward = self.phases[Phase.BACKWARD][0]
        groups: dict[int, list[int]] = {}
        for i, b in enumerate(self.blocks):
            if b.phase is Phase.FORWARD and b.savers and b.free is not None and b.free >= backward:
                owner = -1 if b.owner is None else b.owner
                if owner >= 0 or any(first <= b.alloc <= last for first, last in forwards):
                    groups.setdefault(owner, []).append(i)
        blocks = list(self.blocks)
        read = self.readers()

        def first(i: int) -> tuple[bool, bool, int]:  # what another unit needs too, what compile never recomputes
            b = blocks[i]
            return b.savers | read.get(i, set()) <= {b.owner}, b.op not in EXPENSIVE_OPS, -b.bytes

        for owner, nbytes in saved_bytes.items():
            saved = sorted(groups.get(owner, []), key=first)
            if not saved and owner >= 0 and nbytes:
                saved = self._made_by(owner)[:1]
                if saved:
                    end = self.units[owner].bwd_end or backward
                    blocks[saved[0]] = replace(blocks[saved[0]], savers=frozenset({owner}), free=end,
                                               category=Category.ACTIVATIONS)
            if saved:
                _resave(blocks, saved, nbytes)
        for u, nbytes in (recomputed_bytes or {}).items():
            if u >= 0:
                freed = [i for i, b in enumerate(blocks) if b.owner == u and b.savers == {u} and read.get(i, {u}) == {u}
                         and b.category is Category.ACTIVATIONS and b.phase is Phase.FORWARD]
                _stay_saved(blocks, sorted(freed, key=lambda i: -blocks[i].bytes), saved_bytes.get(u, 0) - nbytes)
        forward, step = speedup
        heavy = sum(op.ms for u in self.units for op in u.ops if op.name in EXPENSIVE_OPS)
        light = sum(u.fwd_ms for u in self.units) - heavy
        fused = min(1.0, max(0.0, (forward * (heavy + light) - heavy) / light)) if light > 0 else 1.0
        units = tuple(replace(u.fused(fused), saved_bytes=saved_bytes.get(u.index, u.saved_bytes)) for u in self.units)
        return replace(self, blocks=tuple(blocks), units=units, step_ms=self.step_ms * step, compiled=True)

    def _made_by(self, unit: int) -> list[int]:
        """The blocks the unit's forward made that live beyond it, largest first."""
        end = self.units[unit].fwd_end
        made = [i for i, b in enumerate(self.blocks)
                if b.owner == unit and b.phase is Phase.FORWARD and (b.free is None or b.free > end)]
        return sorted(made, key=lambda i: -self.blocks[i].bytes)

    def unit(self, key: str) -> Unit:
        for u in self.units:
            if u.key == key:
                return u
        raise KeyError(key)
