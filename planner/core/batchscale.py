"""A profile at another batch size, from profiles at two batch sizes, without running the step.

    graph = at_batch_size(graph_8, 8, graph_16, 16, 100)    # None when the two differ in structure

Sizes, FLOPs and bytes moved of a training step are affine in the batch size (a tensor of shape
[B, ...] has B times the bytes of one sample; parameters and optimizer state do not change), so
the step at batch size B is a line through two profiles, as long as the two made the same
operators and storages in the same order. Batch size 1 often differs (a transpose of a single
sample is already contiguous, so no copy is made), so the two should be 2 or more. Times follow
the same line; `costmodel.retime` recomputes them from FLOPs and bytes anyway.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace
from typing import Any

from planner.core.graph import FixedMemory, ProfiledGraph

_QUANTITY_SUFFIXES = ("_bytes", "_ms", "_flops")
_QUANTITIES = frozenset({"bytes", "ms", "flops", "bytes_moved", "step_ms"})  # fields of Op, Block, ProfiledGraph


class _Mismatch(Exception):
    """The two profiles differ in something other than sizes and times."""


def at_batch_size(
    small: ProfiledGraph, small_batch: int, large: ProfiledGraph, large_batch: int, batch_size: int
) -> ProfiledGraph | None:
    """The profile at `batch_size` on the line through two profiles, or None if their structure differs."""
    if small_batch == large_batch:
        raise ValueError("two profiles at different batch sizes are needed")
    t = (batch_size - small_batch) / (large_batch - small_batch)
    try:
        return _lerp(small, large, t, quantity=False)
    except _Mismatch:
        return None


def _lerp(a: Any, b: Any, t: float, quantity: bool) -> Any:
    """`a + t (b - a)` for quantities (sizes rounded to whole bytes and counts), `a` where all else is equal."""
    if is_dataclass(a) and type(a) is type(b):
        every = isinstance(a, FixedMemory)  # all of its fields are bytes
        changes = {
            f.name: _lerp(getattr(a, f.name), getattr(b, f.name), t, every or _is_quantity(f.name))
            for f in fields(a)
        }
        return replace(a, **changes)
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return tuple(_lerp(x, y, t, quantity) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return {k: _lerp(a[k], b[k], t, quantity or _is_quantity(str(k))) for k in a}
    if quantity and _is_number(a) and _is_number(b):
        value = a + t * (b - a)
        return max(round(value), 0) if isinstance(a, int) else max(value, 0.0)
    if a != b:
        raise _Mismatch
    return a


def _is_quantity(name: str) -> bool:
    return name in _QUANTITIES or name.endswith(_QUANTITY_SUFFIXES)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
