"""The `planner` command.

    planner scenarios
    planner profile gpt --measure --export gpt.yaml --plot gpt.png
    planner profile resnet --variant full --device meta
    planner profile my_scenario.yaml --units "layer*.*" --batch-size 16

A command is one `cmd_*` function taking the parsed arguments and a console and returning the
exit status, plus one block in `build_parser`. Mistakes in what the user asked for (a
ValueError, such as a ScenarioError) print one line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from planner.export import SUFFIXES, check_suffix
from planner.graph import ProfiledGraph
from planner.simulator import Simulation

if TYPE_CHECKING:
    from planner.workload import Workload

log = logging.getLogger(__name__)

USAGE_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]) and return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help, or a malformed command line (already reported by argparse)
        return exit.code if isinstance(exit.code, int) else USAGE_ERROR
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.run(args, Console(highlight=False))
    except ValueError as err:  # ScenarioError is one
        Console(stderr=True, highlight=False, soft_wrap=True).print(Text(f"error: {err}", style="red"))
        return USAGE_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="planner", description="A memory-aware training planner for PyTorch.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    p = commands.add_parser("profile", help="profile one training step of a scenario and predict its peak memory")
    _add_workload_arguments(p)
    p.add_argument("--units", nargs="+", metavar="PATTERN", help="module class names or name patterns ('layer*.*')")
    p.add_argument("--measure", action="store_true", help="also run the real step and compare its peak")
    p.add_argument("--export", metavar="FILE", help="write the profile to FILE (.json, .yaml or .yml)")
    p.add_argument("--plot", metavar="FILE.png", help="draw memory over the step to a PNG")
    p.set_defaults(run=cmd_profile)

    p = commands.add_parser("scenarios", help="list the built-in scenarios")
    p.set_defaults(run=cmd_scenarios)
    return parser


def _add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """SCENARIO and how to build it, shared by every command that runs a model."""
    p.add_argument("scenario", metavar="SCENARIO", help="a built-in scenario name or a path to a YAML file")
    p.add_argument("--variant", choices=("small", "full"), default="small", help="model size (default: small)")
    p.add_argument(
        "--device",
        choices=("cpu", "meta", "cuda"),
        default="cpu",
        help="where the step runs; meta allocates nothing and estimates times from FLOPs (default: cpu)",
    )
    p.add_argument("--batch-size", type=_positive_int, metavar="N", help="override the scenario's batch size")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# ------------------------------------------------------------------------------------------------ commands


def cmd_profile(args: argparse.Namespace, console: Console) -> int:
    """Profile the scenario's step, print its units and predicted peak, then measure, export and plot."""
    import planner
    from planner.report import peak_panel, units_table

    if args.measure and args.device == "meta":
        raise ValueError("--measure runs the real step, which cannot run on --device meta")
    if args.export is not None:
        check_suffix(args.export, SUFFIXES)
    if args.plot is not None:
        check_suffix(args.plot, (".png",))
    workload = _build_workload(args)
    batch = planner.Batch(workload.inputs, workload.kwargs)
    step = {"loss_fn": workload.loss_closure(), "optimizer": workload.optimizer}
    log.info("profiling %s (%s) on %s", args.scenario, args.variant, args.device)
    graph = planner.profile(workload.model, batch, units=args.units, autocast_dtype=workload.autocast_dtype, **step)
    sim = planner.simulate(graph)
    measurement = None
    if args.measure:
        log.info("measuring the real step")
        measurement = planner.measure(workload.model, batch, autocast_dtype=workload.autocast_dtype, **step)
    console.print(units_table(graph))
    console.print(peak_panel(sim, measurement))
    _print_notes(console, graph)
    _write_outputs(args, console, graph, sim)
    return 0


def _build_workload(args: argparse.Namespace) -> Workload:
    import torch

    from planner.scenario import load_scenario

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu or meta")
    scenario = load_scenario(args.scenario)
    log.info("building %s (%s) on %s", scenario.name, args.variant, args.device)
    return scenario.build(args.variant, device=args.device, batch_size=args.batch_size)


def _print_notes(console: Console, graph: ProfiledGraph) -> None:
    from planner.report import format_bytes

    if not graph.measured_times:
        console.print(
            "note: profiled on the meta device: nothing was allocated, and times are estimated from FLOPs "
            "and bytes moved on a reference GPU",
            style="yellow",
        )
    if graph.first_step_extra_bytes:
        console.print(
            f"note: the optimizer allocates its state ({format_bytes(graph.first_step_extra_bytes)}) lazily "
            "at the first step; the figures above are for the steady state",
            style="dim",
        )


def _write_outputs(args: argparse.Namespace, console: Console, graph: ProfiledGraph, sim: Simulation) -> None:
    if args.export is not None:
        from planner.export import graph_to_dict, write

        console.print(f"wrote the profile to {write(graph_to_dict(graph, sim), args.export)}")
    if args.plot is not None:
        from planner.plot import plot_timeline

        path = plot_timeline(args.plot, [("as profiled", sim)], graph)
        console.print(f"wrote the memory timeline to {path}")


def cmd_scenarios(args: argparse.Namespace, console: Console) -> int:
    """List the built-in scenarios: model, batch size, precision and optimizer, and what each shows."""
    from planner.scenario import list_scenarios, load_scenario

    table = Table(title="built-in scenarios", box=None, show_header=False, pad_edge=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for name in list_scenarios():
        s = load_scenario(name)
        batch = f"batch {s.small.batch_size}" + ("" if s.full is None else f" (full: {s.full.batch_size})")
        about = Text(f"{s.model}, {batch}, {s.precision}, {s.optimizer.name}")
        comment = _first_comment(s.path.read_text())
        if comment:
            about.append(f"\n{comment}", style="dim")
        table.add_row(name, about)
    console.print(table)
    return 0


def _first_comment(text: str) -> str:
    """The scenario file's opening comment line, without the '#'."""
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    return first.lstrip("#").strip() if first.startswith("#") else ""
