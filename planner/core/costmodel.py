"""Operator times from FLOPs and bytes moved: a roofline with efficiency factors.

    roofline = load_catalog()["a100-80gb"].roofline("bfloat16")
    graph_on_a100 = retime(graph, roofline)     # same memory, times for that GPU

An operator takes the longer of its math at the device's FLOP rate and its
memory traffic at the device's bandwidth, each scaled by an efficiency: the
share of the datasheet figure that real training kernels sustain.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from planner.core.graph import Mechanism, ProfiledGraph, Unit

# Shares of the datasheet peaks that training kernels sustain, used for every catalog GPU.
# Large matrix products reach 70-80% of the dense tensor-core rate, convolutions, small or
# skinny products and attention less, so 0.6 is a step-wide average. Elementwise kernels and
# reductions stream at 70-90% of the memory bandwidth (STREAM-like copies reach about 90%).
MATH_EFFICIENCY = 0.6
MEMORY_EFFICIENCY = 0.7


@dataclass(frozen=True)
class Roofline:
    """A device's rates: FLOP/s for math, bytes/s for memory traffic and for host copies.

    `efficiency` and `memory_efficiency` are the shares of `flops_per_s` and `bytes_per_s`
    that kernels reach; `host_bytes_per_s` is already a sustained rate. `device_names` are
    the names CUDA reports for the device the rates describe (`torch.cuda.get_device_name`).
    """

    flops_per_s: float
    bytes_per_s: float
    host_bytes_per_s: float
    efficiency: float = 0.6  # share of peak FLOP/s a real kernel reaches
    memory_efficiency: float = 0.6  # share of peak memory bandwidth a real kernel reaches
    device_names: tuple[str, ...] = ()
    copies_overlap: bool = True  # host copies run beside compute (a GPU's side stream), not in its way
    mechanism: Mechanism | None = None  # what recompute and offload cost beyond the work, where measured

    def op_ms(self, flops: int, bytes_moved: int) -> float:
        """Time of one operator in ms: the slower of its math and its memory traffic."""
        seconds = max(
            flops / (self.flops_per_s * self.efficiency),
            bytes_moved / (self.bytes_per_s * self.memory_efficiency),
        )
        return seconds * 1e3

    def copy_ms(self, nbytes: int) -> float:
        """Time in ms to move `nbytes` between device and host memory."""
        return nbytes / self.host_bytes_per_s * 1e3


# A mid-range data-centre GPU (A100-class dense BF16/TF32, HBM2e, PCIe 4 x16),
# used for times when the profile was taken without running anything.
REFERENCE = Roofline(flops_per_s=150e12, bytes_per_s=1.5e12, host_bytes_per_s=24e9)


def retime(graph: ProfiledGraph, roofline: Roofline) -> ProfiledGraph:
    """A copy of `graph` with its times estimated on `roofline`; sizes and the trace are unchanged.

    Each forward operator takes `roofline.op_ms(flops, bytes_moved)`. A unit's backward is known
    only by its totals, so it is timed as the unit's forward operators again, each with its FLOPs
    and bytes scaled by the unit's backward-to-forward ratios of FLOPs and of bytes (backward runs
    the gradients of the same operators). Work outside every unit (loss, optimizer) takes `op_ms`
    of its totals. A profile measured on the device the roofline describes (its `device_name` is
    one of `roofline.device_names`) keeps its measured times and is returned as is.
    """
    if graph.measured_times and graph.calibration.device_name in roofline.device_names:
        return graph
    units = tuple(_retime_unit(u, roofline) for u in graph.units)
    other = replace(graph.other, ms=roofline.op_ms(graph.other.flops, graph.other.bytes_moved))
    return graph.retimed(
        units=units,
        step_ms=other.ms + sum(u.fwd_ms + u.bwd_ms for u in units),
        measured_times=False,
        other=other,
    )


def _retime_unit(unit: Unit, roofline: Roofline) -> Unit:
    ops = tuple(replace(op, ms=roofline.op_ms(op.flops, op.bytes_moved)) for op in unit.ops)
    return replace(unit, ops=ops, fwd_ms=sum(op.ms for op in ops), bwd_ms=_backward_ms(unit, roofline))


def _backward_ms(unit: Unit, roofline: Roofline) -> float:
    """The unit's forward operators with FLOPs and bytes scaled to the backward's totals; a total
    the forward has none of (an embedding's gradient FLOPs) is one more operator."""
    flops, moved = sum(op.flops for op in unit.ops), sum(op.bytes_moved for op in unit.ops)
    flops_ratio = unit.bwd_flops / flops if flops else 0.0
    bytes_ratio = unit.bwd_bytes / moved if moved else 0.0
    ms = sum(roofline.op_ms(op.flops * flops_ratio, op.bytes_moved * bytes_ratio) for op in unit.ops)
    return ms + roofline.op_ms(0 if flops else unit.bwd_flops, 0 if moved else unit.bwd_bytes)
