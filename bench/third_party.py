"""`planner.auto` with no units named, on models the project did not write (tests/third_party.py: the
models the tests plan, and more).

    python -m bench.third_party                   # writes bench/third_party.json

Per model (two of them also under bfloat16 autocast, as a mixed-precision loop trains them): the
predicted and measured peak of the unplanned step, then `planner.auto` at fixed
memory (parameters, gradients, optimizer state, buffers, the batch) + 50% of the measured
activations, and the planned step's predicted and measured peak and overhead. Peaks are measured
on the loop as a user writes it, by live storages in this process and by the rise of the
high-water mark in a fresh process started with MALLOC_MMAP_THRESHOLD_=65536, with every layer run
where a model skips layers at random (LayerDrop: the step a plan is made for); overhead is the
median ratio of 7 planned steps, each to an unplanned one taken just before it; then two steps under
the plan are compared bit for bit (losses, gradients, parameters and buffers) with two steps of the
same model built again without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import planner
from planner.core.graph import Category
from planner.measurement import high_water_mark
from planner.step import every_layer_runs, preserved
from planner.step import paired_ratio, timed_ms
from planner.tracking import StorageTracker, tensors_in
from planner.core.plan import Plan
from tests.third_party import LOSSES, MODELS, more

STEPS = 7
AUTOCAST = {"llama, bf16 autocast": ("llama", torch.bfloat16), "t5, bf16 autocast": ("t5", torch.bfloat16)}
ALL = {**MODELS, **more(), **{name: MODELS[model] for name, (model, _) in AUTOCAST.items()}}


def build(name: str):
    """The model, its batch, an optimizer, its loss (None: its own) and the dtype its loop autocasts to."""
    torch.manual_seed(0)
    model, batch = ALL[name]()
    dtype = AUTOCAST[name][1] if name in AUTOCAST else None
    return model, batch, torch.optim.AdamW(model.parameters(), lr=1e-3), LOSSES.get(name), dtype


def forward_loss(model, batch, loss_fn, dtype):
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        output = model(**batch) if isinstance(batch, dict) else model(*batch)
        return output.loss if loss_fn is None else loss_fn(output)


def user_step(model, batch, optimizer, loss_fn, dtype=None) -> None:
    loss = forward_loss(model, batch, loss_fn, dtype)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def peaks(model, batch, optimizer, loss_fn, dtype=None) -> tuple[int, int | None]:
    """(live storages, rise of the high-water mark) of a steady-state step, with what existed before it."""
    with preserved(model, optimizer), every_layer_runs(model):
        # the warm-up runs under a tracker too, as the measured step will (see planner.measurement._warm_up)
        with StorageTracker("cpu") as warm:
            user_step(model, batch, optimizer, loss_fn, dtype)
        warm.stop_tracking()
        existing = [*model.parameters(), *model.buffers(), *tensors_in(optimizer.state), *tensors_in(batch)]
        before = sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in existing}.values())
        tracker = StorageTracker("cpu", existing)
        with high_water_mark() as rise, tracker:
            user_step(model, batch, optimizer, loss_fn, dtype)
        tracker.stop_tracking()
    return before + tracker.peak_bytes, None if rise() is None else before + rise()


def overhead(model, batch, optimizer, loss_fn, dtype, handle) -> float:
    plain, planned = [], []

    def step() -> None:
        user_step(model, batch, optimizer, loss_fn, dtype)

    with preserved(model, optimizer):
        step()
        for _ in range(STEPS):
            handle.remove()
            plain.append(timed_ms(step, torch.device("cpu")))
            handle.install()
            planned.append(timed_ms(step, torch.device("cpu")))
    return paired_ratio(plain, planned) - 1


def trained(model, batch, optimizer, loss_fn, dtype, steps: int = 2) -> list[torch.Tensor]:
    """Losses, gradients and the state after `steps` steps of the user's loop, from the same seeds."""
    torch.manual_seed(1)
    np.random.seed(1)
    out = []
    for _ in range(steps):
        loss = forward_loss(model, batch, loss_fn, dtype)
        loss.backward()
        out += [loss.detach(), *(p.grad.clone() for p in model.parameters() if p.grad is not None)]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return out + [t.clone() for t in model.state_dict().values()]


def identical(name: str, model, batch, optimizer, loss_fn, dtype, handle) -> bool:
    """Whether training under the plan is bit-identical to training the same model without it."""
    planned = trained(model, batch, optimizer, loss_fn, dtype)
    handle.remove()
    reference, _, reference_optimizer, _, _ = build(name)
    expected = trained(reference, batch, reference_optimizer, loss_fn, dtype)
    return len(planned) == len(expected) and all(torch.equal(a, b) for a, b in zip(planned, expected))


def measure(name: str, directory: Path) -> dict:
    model, batch, optimizer, loss_fn, dtype = build(name)
    step = {"loss_fn": loss_fn, "optimizer": optimizer, "autocast_dtype": dtype}
    graph = planner.profile(model, batch, **step)
    unplanned, _ = peaks(model, batch, optimizer, loss_fn, dtype)
    fixed = graph.fixed.total + sum(b.bytes for b in graph.blocks if b.category is Category.GRADIENTS)
    budget = int(fixed + 0.5 * (unplanned - fixed))
    row = {"model": name, "units": len(graph.units), "unplanned_predicted": planner.simulate(graph).peak_bytes,
           "unplanned": unplanned, "unplanned_hwm": hwm(name, None, directory), "fixed": fixed, "budget": budget}
    try:
        handle = planner.auto(model, batch, budget, **step)
    except ValueError as err:
        return {**row, "refused": str(err)}
    planned, _ = peaks(model, batch, optimizer, loss_fn, dtype)
    regions = sum(c.action.value == "recompute" for c in handle.plan.choices)
    return {**row, "planned_predicted": handle.plan.predicted_peak_bytes, "planned": planned,
            "planned_hwm": hwm(name, handle.plan, directory), "regions": regions,
            "overhead_predicted": handle.plan.overhead_pct / 100,
            "overhead": overhead(model, batch, optimizer, loss_fn, dtype, handle),
            "identical": identical(name, model, batch, optimizer, loss_fn, dtype, handle)}


def hwm(name: str, plan: Plan | None, directory: Path) -> int:
    """The step's peak by the high-water mark, in a fresh process (under `plan`, if any)."""
    path = directory / f"{name}.yaml"
    if plan is not None:
        planner.save_plan(plan, path)
    command = [sys.executable, "-m", "bench.third_party", name] + ([str(path)] if plan is not None else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    return int(subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.split()[-1])


def _one_hwm(name: str, plan_path: str | None) -> int:
    model, batch, optimizer, loss_fn, dtype = build(name)
    if plan_path is not None:
        planner.apply(model, planner.load_plan(plan_path))
    return peaks(model, batch, optimizer, loss_fn, dtype)[1]


def table(rows: list[dict]) -> str:
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    lines = [
        "| model | units | unplanned: predicted / live / high-water MiB | budget MiB | planned: predicted / live / high-water MiB | overhead predicted / measured | bit-identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        unplanned = f"{mib(r['unplanned_predicted'])} / {mib(r['unplanned'])} / {mib(r['unplanned_hwm'])}"
        if "refused" in r:
            planned, cost, same = f"refused: {r['refused'].split(';')[-1].strip()}", "", ""
        else:
            planned = f"{mib(r['planned_predicted'])} / {mib(r['planned'])} / {mib(r['planned_hwm'])}"
            cost = f"{100 * r['overhead_predicted']:+.0f}% / {100 * r['overhead']:+.0f}%"
            same = "yes" if r["identical"] else "no"
        lines.append(f"| {r['model']} | {r['units']} | {unplanned} | {mib(r['budget'])} | {planned} | {cost} | {same} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1:  # one high-water mark, in its own process
        print(_one_hwm(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
        return
    with tempfile.TemporaryDirectory() as directory:
        rows = [measure(name, Path(directory)) for name in ALL]
    Path("bench/third_party.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
