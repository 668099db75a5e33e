"""Ranks on this machine, started by PyTorch's elastic launcher (the engine of `torchrun`).

    results = launch(fn, world_size=2, timeout_s=300, args=(job,))   # fn(rank, world_size, job) on every rank

Each rank joins the process group (gloo on a CPU, NCCL with a GPU per rank) and runs `fn`. When a
rank fails, the launcher stops the others at once and its error is raised here, with the rank's
traceback as its `__cause__`; a rank that dies without a word (a crash, a signal) is a
`RankFailed`; a run that passes `timeout_s` is stopped and raises TimeoutError. No process
outlives the call. To run a script of your own on several machines, use `torchrun` itself
(`torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:PORT train.py`), with `planner.auto`
in the script: every rank calls it and applies the same plan.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

HOST = "127.0.0.1"
TIMED_OUT = 124  # the exit status of a rank that ran past the timeout


class RankFailed(RuntimeError):
    """A rank died without reporting an error (a crash or a signal), or its error could not be sent."""


class RemoteTraceback(Exception):
    """The traceback of an error raised on a rank; set as the `__cause__` of the error re-raised here."""


def launch(fn: Callable, world_size: int, timeout_s: float = 600.0, args: Sequence = (), backend: str | None = None):
    """Run `fn(rank, world_size, *args)` in `world_size` new processes joined in one process group;
    returns their return values in rank order (they must pickle; `fn` must be importable by name)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world size must be a positive integer, got {world_size!r}")
    backend = backend or ("nccl" if torch.cuda.device_count() >= world_size else "gloo")
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world_size,
        run_id=f"planner-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"{HOST}:{_free_port()}",
        max_restarts=0,  # one failure stops every rank
        monitor_interval=0.1,
        start_method="spawn",
    )
    with tempfile.TemporaryDirectory() as errors, _quiet_launcher():
        try:
            results = elastic_launch(config, _rank_main)(fn, tuple(args), backend, timeout_s, errors)
        except ChildFailedError as failed:
            error = _failure(failed, Path(errors), world_size, timeout_s)
            error.__suppress_context__ = True  # the launcher's own error says less than the rank's
            raise error
    return [results[r] for r in range(world_size)]


@contextlib.contextmanager
def _quiet_launcher():
    """The launcher logs each failure with its traceback, which the error raised here carries."""
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable, args: tuple, backend: str, timeout_s: float, errors: str):
    """One rank: join the group, run `fn`; an error is written for the launcher before it is raised,
    and a rank still running at the timeout exits with TIMED_OUT."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    watchdog = threading.Timer(timeout_s, os._exit, (TIMED_OUT,))
    watchdog.daemon = True
    watchdog.start()
    try:
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        else:  # ranks share the CPU cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        return fn(rank, world_size, *args)
    except BaseException as err:
        record = (time.time(), _portable(err), traceback.format_exc())
        (Path(errors) / f"rank{rank}").write_bytes(pickle.dumps(record))
        raise
    finally:
        watchdog.cancel()
        if dist.is_initialized():
            dist.destroy_process_group()


def _failure(failed, errors: Path, world_size: int, timeout_s: float) -> BaseException:
    """The root cause: the rank the launcher saw fail first, where it said nothing (it timed out, or died
    silently); else the earliest error a rank reported (the others' follow from it)."""
    reported = {int(p.name[4:]): pickle.loads(p.read_bytes()) for p in errors.iterdir()}
    for rank, failure in sorted(failed.failures.items()):
        if rank in reported:
            continue
        if failure.exitcode == TIMED_OUT:
            return TimeoutError(f"rank {rank} did not finish within {timeout_s:g} s; all ranks were stopped")
        code = failure.exitcode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        return RankFailed(f"rank {rank} of {world_size} {how} without reporting an error or a result")
    rank = min(reported, key=lambda r: reported[r][0])
    return _rank_error(rank, world_size, *reported[rank][1:])


def _rank_error(rank: int, world_size: int, error: bytes | None, text: str) -> BaseException:
    header = f"rank {rank} of {world_size} failed"
    if error is None:
        return RankFailed(f"{header}:\n{text}")
    err = pickle.loads(error)
    err.add_note(f"(raised on rank {rank} of {world_size})")
    err.__cause__ = RemoteTraceback(f"{header}; its traceback:\n{text}")
    return err


def _portable(err: BaseException) -> bytes | None:
    """The error pickled; if it cannot travel, its closest built-in class with the same message."""
    for cls in type(err).__mro__:
        candidate = err if cls is type(err) else cls(str(err)) if cls.__module__ == "builtins" else None
        if candidate is None:
            continue
        with contextlib.suppress(Exception):
            data = pickle.dumps(candidate)
            pickle.loads(data)
            return data
    return None
