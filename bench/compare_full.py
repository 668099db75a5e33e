"""Full-size scenarios on every catalog GPU, planned without allocating, timed end to end.

    python -m bench.compare_full                  # ResNet-50 at batch 256, GPT-2 small, a 7B GPT
    python -m bench.compare_full --max-batch      # also the largest batch size per GPU (slower)

Each scenario is profiled once on fake tensors (nothing allocated), retimed for each GPU and
planned under its usable memory with at most 10% overhead. Prints one table per scenario and
the wall time of each, and writes everything to bench/compare_full.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console

from planner.compare import compare
from planner.core.gpus import load_catalog
from planner.core.sizes import format_bytes
from planner.report import comparison_table
from planner.scenario import load_scenario

SCENARIOS = ("resnet", "gpt", "gpt7b")
OUT = Path(__file__).with_name("compare_full.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-batch", action="store_true", help="also search the largest batch size per GPU")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to write the results (default: {OUT.name})")
    args = parser.parse_args()
    console = Console(highlight=False, width=120)
    gpus = list(load_catalog().values())
    report, start = {"gpus": [g.name for g in gpus], "max_batch": args.max_batch, "scenarios": {}}, time.perf_counter()
    for name in SCENARIOS:
        scenario = load_scenario(name)
        began = time.perf_counter()
        results = compare(scenario, gpus, variant="full", max_batch=args.max_batch)
        seconds = time.perf_counter() - began
        batch = scenario.variant("full").batch_size
        title = f"{name} (full), batch {batch}, {scenario.precision}, {scenario.optimizer.name}: {seconds:.1f} s"
        console.print(comparison_table(results, title, max_batch=args.max_batch))
        needed = [r.needed_bytes for r in results if r.needed_bytes is not None]
        if not any(r.fits for r in results) and needed:
            console.print(f"  fits no GPU: the smallest peak any plan reaches is {format_bytes(min(needed))}")
        report["scenarios"][name] = {"seconds": seconds, "batch_size": batch, "results": [r.to_dict() for r in results]}
    report["seconds"] = time.perf_counter() - start
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    seconds = report["seconds"]
    console.print(f"total {seconds:.1f} s for {len(SCENARIOS)} scenarios on {len(gpus)} GPUs; wrote {args.out}")


if __name__ == "__main__":
    main()
