"""Worker: torch.compile under activation_memory_budget values, memory from the process high-water mark.

    MALLOC_MMAP_THRESHOLD_=65536 python -m bench.baselines_compile resnet 0.5,0.1

Run by bench.baselines in a subprocess (the malloc setting must be in the environment before the
process starts, so that freed tensor memory goes back to the system and the high-water mark follows
live memory). Compiled code is invisible to the planner's storage tracker, so every method here,
eager included, is measured the same way: before a step the high-water mark is reset to the current
resident size (writing "5" to /proc/self/clear_refs), and the step's peak is VmHWM minus that
resident size, in bytes. Prints one JSON object per line as soon as each method is done.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from planner.scenario import load_scenario
from planner.step import train_step

STEPS = 5


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _step_peak_bytes(step) -> int:
    """Peak resident growth during one call of `step`, in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before_kib = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before_kib) * 1024


def _run(model, work, label: str, budget: float | None) -> dict:
    """Warm up (compiling, when `model` is compiled), time STEPS steps, then measure one step's peak."""
    loss_fn = work.loss_closure()

    def step() -> None:
        train_step(model, work.batch, loss_fn, work.optimizer, work.autocast_dtype)

    began = time.perf_counter()
    step()
    warmup_s = time.perf_counter() - began
    times_ms = []
    for _ in range(STEPS):
        start = time.perf_counter()
        step()
        times_ms.append((time.perf_counter() - start) * 1e3)
    peak = _step_peak_bytes(step)
    return {"label": label, "budget": budget, "step_ms": statistics.median(times_ms),
            "rss_peak_bytes": peak, "warmup_s": warmup_s}


def main() -> None:
    name, values = sys.argv[1], [float(v) for v in sys.argv[2].split(",")]
    torch.set_num_threads(torch.get_num_threads())
    work = load_scenario(name).build("small", "cpu")
    print(json.dumps(_run(work.model, work, "eager", None)), flush=True)
    for value in values:
        torch._dynamo.reset()
        with torch._functorch.config.patch(activation_memory_budget=value):
            compiled = torch.compile(work.model)
            print(json.dumps(_run(compiled, work, "compile", value)), flush=True)


if __name__ == "__main__":
    main()
