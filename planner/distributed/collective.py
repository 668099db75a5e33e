"""What every rank agrees on under torch.distributed; each is the identity in one process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist


def distributed() -> bool:
    """Whether this process is one of several ranks of an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agreed_units(names: list[str]) -> list[str]:
    """Rank 0's unit names on every rank (collective under torch.distributed; `names` otherwise)."""
    if not distributed():
        return names
    box = [names]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agreed_union(items: set) -> set:
    """Every rank's `items` together (collective under torch.distributed; `items` otherwise)."""
    if not distributed():
        return items
    parts: list[set] = [set()] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return set().union(*parts)


def worst_peak(peak_bytes: int) -> int:
    """The highest of the ranks' peaks (collective under torch.distributed; `peak_bytes` otherwise)."""
    if not distributed():
        return peak_bytes
    peaks: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(peaks, peak_bytes)
    return max(peaks)


def on_worst_rank(peak_bytes: int, solve: Callable[[], Any]) -> Any:
    """`solve()` on the rank with the highest `peak_bytes` (collective), its result on every rank; a
    ValueError it raises (InfeasibleBudget is one) is raised on every rank."""
    if not distributed():
        return solve()
    peaks: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(peaks, peak_bytes)
    solver_rank = max(range(len(peaks)), key=lambda r: (peaks[r], -r))
    box: list[Any] = [None]
    if dist.get_rank() == solver_rank:
        try:
            box = [solve()]
        except ValueError as err:
            box = [err]
    dist.broadcast_object_list(box, src=solver_rank)
    if isinstance(box[0], ValueError):
        raise box[0]
    return box[0]
