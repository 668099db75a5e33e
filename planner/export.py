"""A profiled graph as plain data, written to JSON or YAML without ever leaving a half-written file.

    data = graph_to_dict(graph, simulate(graph))
    write(data, "resnet.yaml")          # or "resnet.json"

Sizes are in bytes, times in ms, moments in ticks (see `planner.core.graph`). Blocks, the bulk of a
profile, are stored as one list per block under `blocks.rows`, in the order `blocks.columns` names.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import asdict, fields
from enum import Enum
from pathlib import Path
from typing import IO, Any

import yaml

from planner.core.graph import Block, ProfiledGraph
from planner.core.simulator import Simulation

SUFFIXES = (".json", ".yaml", ".yml")
BLOCK_COLUMNS = tuple(f.name for f in fields(Block))


def graph_to_dict(graph: ProfiledGraph, sim: Simulation | None = None) -> dict[str, Any]:
    """Everything in `graph` as dicts, lists, strings, numbers, booleans and None.

    With `sim`, a "simulation" entry holds the predicted peak (bytes), the tick it happens
    at, its breakdown by category, the step time and the extra time of a plan (ms).
    """
    data: dict[str, Any] = {
        "model": graph.model,
        "fingerprint": graph.fingerprint,
        "device": graph.device,
        "step_ms": graph.step_ms,
        "measured_times": graph.measured_times,
        "first_step_extra_bytes": graph.first_step_extra_bytes,
        "phases": {phase.value: list(ticks) for phase, ticks in graph.phases.items()},
        "fixed": asdict(graph.fixed),
        "units": [_plain(asdict(u)) for u in graph.units],
        "edges": [list(e) for e in graph.edges],
        "blocks": {"columns": list(BLOCK_COLUMNS), "rows": [_block_row(b) for b in graph.blocks]},
        "other": asdict(graph.other),
        "calibration": _plain(asdict(graph.calibration)),
        "forwards": graph.forwards,
        "compiled": graph.compiled,
    }
    if sim is not None:
        data["simulation"] = {
            "peak_bytes": sim.peak_bytes,
            "peak_tick": sim.peak_tick,
            "peak_breakdown": sim.breakdown(),
            "step_ms": sim.step_ms,
            "extra_ms": sim.extra_ms,
        }
    return data


def _block_row(b: Block) -> list[Any]:
    return [_plain(getattr(b, name)) for name in BLOCK_COLUMNS]


def _plain(obj: Any) -> Any:
    """`obj` with enums as their values, tuples and sets as lists, and mapping keys as strings."""
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, dict):
        return {str(_plain(k)): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(_plain(v) for v in obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def write(data: dict[str, Any], path: str | Path) -> Path:
    """Write `data` as JSON (.json) or YAML (.yaml, .yml), chosen by the suffix; returns the path.

    The file appears complete or not at all: it is written next to its final place and then
    renamed over it. ValueError for another suffix or a folder that does not exist.
    """
    path = Path(path)
    check_suffix(path, SUFFIXES)
    if path.suffix.lower() == ".json":
        text = json.dumps(data, indent=1) + "\n"
    else:  # leaf lists (block rows, edges) on one line each
        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)
    with atomic_open(path) as f:
        f.write(text.encode())
    return path


def check_suffix(path: str | Path, suffixes: tuple[str, ...]) -> None:
    """ValueError naming the accepted suffixes when `path` has none of them (case-insensitive)."""
    if Path(path).suffix.lower() not in suffixes:
        raise ValueError(f"cannot write {str(path)!r}: the file name must end in {', '.join(suffixes)}")


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary file that replaces `path` only once the block finishes without error.

    The data goes to a new file in the same folder (so the rename stays on one file system),
    which is flushed to disk and then renamed over `path`; on error it is removed.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {str(path)!r}: folder {str(path.parent)!r} does not exist")
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "xb") as f:  # "x": a new file, with the usual permissions
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
