"""What the recorder saw, frozen into a `ProfiledGraph`."""

from __future__ import annotations

import torch
from torch import nn

from planner.core.graph import Block, Calibration, Category, FixedMemory, Op, Phase, ProfiledGraph, Unit, Work
from planner.profiling.recorder import Recorder, RecordedBlock, RecordedUnit
from planner.units import fingerprint

def freeze(
    model: nn.Module,
    device: torch.device,
    rec: Recorder,
    fixed_sizes: dict[Category, int],
    grads: list[RecordedBlock],
    opt_state: list[RecordedBlock],
    first_step_bytes: int,
    calibration: Calibration,
) -> ProfiledGraph:
    """Freezes what the recorder saw; optimizer state first allocated in this step counts as fixed."""
    grad_ids = {id(b) for b in grads}
    new_state_ids = {id(b) for b in opt_state}
    recorded = [b for b in rec.blocks if id(b) not in new_state_ids]
    index = {id(b): i for i, b in enumerate(recorded)}  # id of a recorded block -> its index in the graph
    blocks = []
    for b in recorded:
        if id(b) in grad_ids:
            category = Category.GRADIENTS
        elif b.phase is Phase.FORWARD and (b.free is None or b.free > rec.span_end(b.alloc)):
            category = Category.ACTIVATIONS  # outlives the forward that made it
        else:
            category = Category.TRANSIENTS
        blocks.append(
            Block(
                bytes=b.bytes,
                category=category,
                phase=b.phase,
                alloc=b.alloc,
                free=b.free,
                owner=b.owner,
                savers=frozenset(b.savers),
                last_use=b.last_use,
                made_from=tuple(index[id(m)] for m in b.made_from if id(m) in index),
                op=b.op,
                op_call=b.op_call,
                mutated=b.mutated,
                writers=tuple(b.writers),
                read_then_written=b.read_then_written,
                unit_output=b.unit_output,
                in_state=b.in_state,
                scratch=b.scratch,
            )
        )
    fixed = FixedMemory(
        parameters=fixed_sizes[Category.PARAMETERS],
        buffers=fixed_sizes[Category.BUFFERS],
        inputs=fixed_sizes[Category.INPUTS],
        optimizer=fixed_sizes[Category.OPTIMIZER],
        workspace=fixed_sizes.get(Category.WORKSPACE, 0),
    )
    return ProfiledGraph(
        model=type(model).__name__,
        fingerprint=fingerprint(model),
        device=str(device),
        units=tuple(_freeze_unit(i, u, rec.blocks, index) for i, u in enumerate(rec.units)),
        edges=tuple(sorted((p, v) for v, u in enumerate(rec.units) for p in u.preds if p < v)),
        fixed=fixed,
        blocks=tuple(blocks),
        phases=rec.phases,
        forwards=max(rec.forwards, 1),
        step_ms=rec.other_ms + sum(u.fwd_ms + u.bwd_ms for u in rec.units),
        measured_times=not rec.estimated_times,
        first_step_extra_bytes=first_step_bytes,
        other=Work(rec.other_ms, rec.other_flops, rec.other_bytes),
        calibration=calibration,
    )


def _freeze_unit(index: int, u: RecordedUnit, blocks: list[RecordedBlock], block_index: dict[int, int]) -> Unit:
    saved = sum(b.bytes for b in blocks if b.owner == index and b.phase is Phase.FORWARD and b.savers)
    ops = tuple(
        Op(o.name, o.flops, o.ms, sum(b.bytes for b in o.blocks), sum(b.bytes for b in o.blocks if b.savers),
           o.bytes_moved, o.random, o.call)
        for o in u.ops
    )
    return Unit(
        index=index,
        name=u.name,
        call=u.call,
        kind=u.kind,
        fwd_ms=u.fwd_ms,
        bwd_ms=u.bwd_ms,
        fwd_flops=u.fwd_flops,
        bwd_flops=u.bwd_flops,
        saved_bytes=saved,
        input_bytes=u.input_bytes,
        output_bytes=u.output_bytes,
        fwd_start=u.fwd_start,
        fwd_end=u.fwd_end,
        bwd_start=u.bwd_start,
        ops=ops,
        direct_from=u.direct_from,
        side_from=u.side_from,
        writes_state=u.writes_state,
        mutates_inputs=u.mutates_inputs,
        grad_tick=u.grad_tick,
        bwd_end=u.bwd_end,
        bwd_bytes=u.bwd_bytes,
        inputs=tuple(block_index[id(b)] for b in u.inputs if id(b) in block_index),
        buffer_bytes=u.buffer_bytes,
        replayable=u.replayable,
    )
