"""Profiling cost and prediction error on every zoo scenario.

    python -m bench.profile_overhead

For each scenario: the median time of a real training step (5 steps after a
warm-up), the time `planner.profile` takes, their ratio (the target is at most
5), and the predicted peak against the measured one. Last, the time to profile
the 7B-parameter GPT at batch 8 without allocating it.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import planner
from planner.scenario import list_scenarios, load_scenario

OUT = Path(__file__).with_name("profile_overhead.json")


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def scenario_row(name: str) -> dict:
    w = load_scenario(name).build()
    step = {"loss_fn": w.loss_closure(), "optimizer": w.optimizer, "autocast_dtype": w.autocast_dtype}
    w.step()  # warm-up: optimizer state, allocator, lazy imports
    step_s = statistics.median(seconds(w.step) for _ in range(5))
    graph = None

    def run_profile() -> None:
        nonlocal graph
        graph = planner.profile(w.model, w.batch, **step)

    profile_s = seconds(run_profile)
    predicted = planner.simulate(graph).peak_bytes
    measured = planner.measure(w.model, w.batch, steps=1, **step).peak_bytes
    return {
        "scenario": name,
        "units": len(graph.units),
        "step_s": step_s,
        "profile_s": profile_s,
        "ratio": profile_s / step_s,
        "predicted_bytes": predicted,
        "measured_bytes": measured,
        "error_pct": 100.0 * (predicted - measured) / measured,
    }


def big_model_row(device: str) -> dict:
    w = load_scenario("gpt7b").build("full", device=device)
    start = time.perf_counter()
    graph = planner.profile(w.model, w.batch, loss_fn=w.loss_closure(), optimizer=w.optimizer, autocast_dtype=w.autocast_dtype)
    return {
        "device": device,
        "parameters": sum(p.numel() for p in w.model.parameters()),
        "profile_s": time.perf_counter() - start,
        "predicted_bytes": planner.simulate(graph).peak_bytes,
    }


def main() -> None:
    rows = [scenario_row(name) for name in list_scenarios() if name != "gpt7b"]
    print("| scenario | units | step | profile | profile / step | predicted peak | measured peak | error |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['scenario']} | {r['units']} | {r['step_s'] * 1e3:.0f} ms | {r['profile_s'] * 1e3:.0f} ms | "
            f"{r['ratio']:.1f} | {r['predicted_bytes'] / 2**20:.2f} MiB | {r['measured_bytes'] / 2**20:.2f} MiB | "
            f"{r['error_pct']:+.2f}% |"
        )
    big = [big_model_row(device) for device in ("meta", "fake")]
    for b in big:
        print(
            f"\ngpt7b full ({b['parameters'] / 1e9:.1f}B parameters, batch 8 x 2048) on {b['device']}: "
            f"profiled in {b['profile_s']:.1f} s, predicted peak {b['predicted_bytes'] / 2**30:.1f} GiB"
        )
    OUT.write_text(json.dumps({"scenarios": rows, "gpt7b": big}, indent=2))


if __name__ == "__main__":
    main()
