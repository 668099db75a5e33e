"""The `planner` command.

    planner scenarios
    planner profile gpt --measure --export gpt.yaml --plot gpt.png
    planner profile resnet --variant full --device fake
    planner profile my_scenario.yaml --units "layer*.*" --batch-size 16
    planner compare gpt --gpus a100-40gb,rtx4090,t4 --max-batch --export gpus.json --plot gpus.png
    planner train gpt --world-size 2 --sharding fsdp --budget 60% --batch-size 16

A command is one `cmd_*` function taking the parsed arguments and a console and returning the
exit status, plus one block in `build_parser`. Mistakes in what the user asked for (a
ValueError, such as a ScenarioError) print one line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from planner.core.graph import ProfiledGraph
from planner.core.simulator import Simulation
from planner.export import SUFFIXES, check_suffix

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

    p = commands.add_parser("plan", help="choose what to keep, recompute or offload under a memory budget")
    _add_workload_arguments(p)
    _add_plan_arguments(p)
    p.add_argument("--out", metavar="FILE", help="write the plan to FILE (.yaml, .yml or .json)")
    p.add_argument("--plot", metavar="FILE.png", help="draw memory over the step, unplanned and planned")
    _add_parallel_arguments(p)
    p.set_defaults(run=cmd_plan)

    p = commands.add_parser("train", help="train the scenario's model for some steps under a plan and measure it")
    _add_workload_arguments(p)
    _add_plan_arguments(p, required=False)
    p.add_argument("--plan", metavar="FILE", help="a plan file made by `planner plan --out` (instead of --budget)")
    p.add_argument("--steps", type=_positive_int, default=5, metavar="N", help="training steps (default: 5)")
    _add_parallel_arguments(p)
    p.set_defaults(run=cmd_train)

    p = commands.add_parser("compare", help="which GPUs can train a scenario, with or without a plan, and how fast")
    p.add_argument("scenario", metavar="SCENARIO", help="a built-in scenario name or a path to a YAML file")
    p.add_argument("--gpus", metavar="A,B,...", help="catalog names (default: the scenario's gpus, else all)")
    p.add_argument("--variant", choices=("small", "full"), help="model size (default: full where the scenario has it)")
    p.add_argument("--world-size", type=_positive_int, metavar="N",
                   help="GPUs training together (default: the scenario's); above 1, the table also says the fewest "
                   "GPUs of each kind, up to N, that train it without and with a plan")  # fmt: skip
    p.add_argument("--sharding", choices=("ddp", "fsdp"), help="replicated (ddp) or sharded (fsdp) (default: the scenario's, else ddp)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--batch", type=_positive_int, metavar="B", help="batch size (default: the scenario's)")
    size.add_argument("--max-batch", action="store_true", help="also find the largest batch size that fits")
    p.add_argument("--max-overhead", type=_share, default=0.10, metavar="P",
                   help="the most extra time a plan may add, such as 10%% or 0.1 (default: 10%%)")  # fmt: skip
    p.add_argument("--tf32", action="store_true", help="float32 matrix products run as TF32 on GPUs that have it")
    p.add_argument("--host-memory", type=_size, metavar="SIZE",
                   help="pinned host memory each GPU's offloads may hold, such as 64GiB (default: as much as "
                   "the GPU has; 0: no offload)")  # fmt: skip
    p.add_argument("--catalog", metavar="FILE", help="a YAML file of GPUs adding to or replacing the built-in ones")
    p.add_argument("--solver", default="auto", help="the solver plans are made with (default: auto)")
    p.add_argument("--export", metavar="FILE", help="write the results to FILE (.json, .yaml or .yml)")
    p.add_argument("--plot", metavar="FILE.png", help="draw memory and throughput per GPU to a PNG")
    p.set_defaults(run=cmd_compare)

    p = commands.add_parser("scenarios", help="list the built-in scenarios")
    p.set_defaults(run=cmd_scenarios)
    return parser


def _add_workload_arguments(p: argparse.ArgumentParser) -> None:
    """SCENARIO and how to build it, shared by every command that runs a model."""
    p.add_argument("scenario", metavar="SCENARIO", help="a built-in scenario name or a path to a YAML file")
    p.add_argument("--variant", choices=("small", "full"), default="small", help="model size (default: small)")
    p.add_argument(
        "--device",
        choices=("cpu", "meta", "fake", "cuda"),
        default="cpu",
        help="where the step runs; meta and fake allocate nothing and estimate times from FLOPs, and fake "
        "also runs the CPU's autocast and fused kernels (default: cpu)",
    )
    p.add_argument("--batch-size", type=_positive_int, metavar="N", help="override the scenario's batch size")


def _add_plan_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--budget",
        required=required,
        metavar="B",
        help="memory budget: a size (6GiB, 6000MB, bytes) or a share of the unplanned peak (60%%)",
    )
    p.add_argument("--solver", default="auto", help="ilp, dp, greedy, none, all or sqrt (default: auto)")
    p.add_argument("--time-limit", type=float, default=10.0, metavar="S", help="solver time limit in seconds")
    p.add_argument(
        "--offload",
        action="store_true",
        default=None,
        help="allow offloading to host memory on --device cpu too, where the host is the device and it frees "
        "nothing (to try the mechanics); elsewhere it is allowed anyway",
    )
    p.add_argument("--host-memory", type=_size, metavar="SIZE",
                   help="the most host memory offloads may hold, such as 64GiB (default: no bound; 0: no "
                   "offload)")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="plan (and train) the step under torch.compile: regions of one unit, no offload")  # fmt: skip


def _add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--world-size",
        type=_positive_int,
        metavar="N",
        help="data-parallel ranks, one process each; the budget and batch size are per rank (default: the scenario's)",
    )
    p.add_argument(
        "--sharding",
        choices=("ddp", "fsdp"),
        help="replicated (DistributedDataParallel) or sharded (FSDP2) parameters (default: the scenario's, else ddp)",
    )
    p.add_argument("--timeout", type=float, default=1800.0, metavar="S", help="stop every rank after S seconds")


def _share(text: str) -> float:
    """A share from "10%" or "0.1"."""
    number = text.strip().removesuffix("%")
    try:
        value = float(number) / (100 if text.strip().endswith("%") else 1)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a share such as 10% or 0.1, got {text!r}")
    return value


def _size(text: str) -> int:
    """A size such as 64GiB, or 0."""
    from planner.core.sizes import parse_bytes

    try:
        return 0 if text.strip() == "0" else parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


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

    if args.measure and args.device in ("meta", "fake"):
        raise ValueError(f"--measure runs the real step, which cannot run on --device {args.device}")
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


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    """Profile the scenario, solve for the budget, print the decisions and write the plan."""
    import planner
    from planner.report import plan_panel, plan_table

    for path, suffixes in ((args.out, (".yaml", ".yml", ".json")), (args.plot, (".png",))):
        if path is not None:
            check_suffix(path, suffixes)
    ranks = _parallel(args)
    if ranks is not None:
        from planner.distributed.jobs import plan_rank, run_job

        plan, graph = run_job(plan_rank, ranks[0], _rank_job(args, ranks[1]), args.timeout)[0]
    else:
        _, graph = _profiled(args)
        plan = planner.plan(graph, args.budget, **_solve(args))
    console.print(plan_table(plan, graph))
    console.print(plan_panel(plan))
    if args.out is not None:
        console.print(f"wrote the plan to {planner.save_plan(plan, args.out)}")
    if args.plot is not None:
        from planner.plot import plot_timeline

        series = [("unplanned", planner.simulate(graph)), ("planned", planner.simulate(graph, plan.choices))]
        console.print(f"wrote the memory timeline to {plot_timeline(args.plot, series, graph, plan.budget_bytes)}")
    return 0


def cmd_train(args: argparse.Namespace, console: Console) -> int:
    """Train under a plan (made now for --budget, or read from --plan) and compare with the prediction."""
    import planner
    from planner.planning import hold
    from planner.training import train_and_measure

    if (args.budget is None) == (args.plan is None):
        raise ValueError("give either --budget (plan now) or --plan FILE (a saved plan)")
    ranks = _parallel(args)
    if ranks is not None:
        from planner.distributed.jobs import run_job, train_rank
        from planner.training import rank_table

        reports = run_job(train_rank, ranks[0], _rank_job(args, ranks[1]), args.timeout)
        console.print(rank_table(reports, *ranks))
        return 0
    workload, graph = _profiled(args)
    if args.plan is not None:
        plan = planner.load_plan(args.plan)
    else:
        plan = planner.plan(graph, args.budget, **_solve(args))
    if args.compile:
        import torch

        workload = replace(workload, model=torch.compile(workload.model))
    step = {"loss_fn": workload.loss_closure(), "optimizer": workload.optimizer, "autocast_dtype": workload.autocast_dtype}
    with hold(workload.model, graph, plan, workload.batch, solve=_solve(args), **step) as checked:
        plan = checked.plan  # the first planned step held the budget, planned again if it had not
    report = train_and_measure(workload, plan, args.steps, console)
    console.print(report)
    return 0


def _solve(args: argparse.Namespace) -> dict:
    return {"solver": args.solver, "time_limit_s": args.time_limit, "offload": args.offload,
            "host_memory": args.host_memory}  # fmt: skip


def _parallel(args: argparse.Namespace) -> tuple[int, str] | None:
    """(world size, sharding) from the command line, else the scenario; None for one process."""
    from planner.scenario import load_scenario

    scenario = load_scenario(args.scenario)
    world_size = args.world_size or scenario.world_size
    sharding = args.sharding or scenario.sharding
    if world_size == 1 and sharding is None:
        return None
    if getattr(args, "compile", False):
        raise ValueError("--compile plans one process: leave out --world-size and --sharding")
    if args.device in ("meta", "fake"):
        raise ValueError(f"--world-size and --sharding run the real step on every rank, not on --device {args.device}")
    if args.device == "cuda" and _cuda_count() < world_size:
        raise ValueError(f"--world-size {world_size} on --device cuda needs {world_size} GPUs; {_cuda_count()} here")
    return world_size, sharding or "ddp"


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def _rank_job(args: argparse.Namespace, sharding: str):
    from planner.distributed.jobs import RankJob

    return RankJob(
        scenario=args.scenario,
        sharding=sharding,
        variant=args.variant,
        device=args.device,
        batch_size=args.batch_size,
        budget=args.budget,
        plan_path=getattr(args, "plan", None),
        solver=args.solver,
        time_limit_s=args.time_limit,
        offload=args.offload,
        host_memory=args.host_memory,
        steps=getattr(args, "steps", 1),
    )


def _profiled(args: argparse.Namespace):
    import planner

    workload = _build_workload(args)
    log.info("profiling %s (%s) on %s", args.scenario, args.variant, args.device)
    graph = planner.profile(
        workload.model,
        workload.batch,
        loss_fn=workload.loss_closure(),
        optimizer=workload.optimizer,
        autocast_dtype=workload.autocast_dtype,
        compiled=getattr(args, "compile", False),
    )
    return workload, graph


def _build_workload(args: argparse.Namespace) -> Workload:
    import torch

    from planner.scenario import load_scenario

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu or meta")
    scenario = load_scenario(args.scenario)
    log.info("building %s (%s) on %s", scenario.name, args.variant, args.device)
    return scenario.build(args.variant, device=args.device, batch_size=args.batch_size)


def _print_notes(console: Console, graph: ProfiledGraph) -> None:
    from planner.core.sizes import format_bytes

    if not graph.measured_times:
        console.print(
            "note: profiled without allocating (meta or fake tensors): times are estimated from FLOPs "
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


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    """Profile the scenario without allocating, then fit, plan and time it on each GPU."""
    from rich.progress import Progress

    from planner.compare import compare
    from planner.core.gpus import find_gpus, load_catalog
    from planner.core.sizes import format_bytes
    from planner.report import comparison_table
    from planner.scenario import load_scenario

    for path, suffixes in ((args.export, SUFFIXES), (args.plot, (".png",))):
        if path is not None:
            check_suffix(path, suffixes)
    scenario = load_scenario(args.scenario)
    catalog = load_catalog(args.catalog)
    gpus = find_gpus(args.gpus or list(scenario.gpus) or list(catalog), catalog)
    variant = args.variant or scenario.variants[-1]
    batch = args.batch or scenario.variant(variant).batch_size
    world_size = args.world_size or scenario.world_size
    sharding = args.sharding or scenario.sharding or "ddp"
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"{scenario.name} ({variant}) on {len(gpus)} GPUs", total=len(gpus))
        results = compare(
            scenario, gpus, variant=variant, batch_size=batch, max_batch=args.max_batch,
            max_overhead=args.max_overhead, solver=args.solver, tf32=args.tf32, host_memory=args.host_memory,
            world_size=world_size,
            sharding=sharding, cards=world_size > 1, on_gpu=lambda result: progress.advance(task),
        )  # fmt: skip
    precision = scenario.precision + (" (TF32)" if args.tf32 and scenario.precision == "float32" else "")
    ranks = f", {world_size} GPUs ({sharding}), batch per GPU" if world_size > 1 else ", batch"
    title = f"{scenario.name} ({variant}){ranks} {batch}, {precision}, {scenario.optimizer.name}"
    console.print(comparison_table(results, title, max_batch=args.max_batch))
    needed = [r.needed_bytes for r in results if r.needed_bytes is not None]
    if not any(r.fits for r in results):
        least = f": the smallest peak any plan reaches is {format_bytes(min(needed))}" if needed else ""
        console.print(f"fits none of these GPUs at batch {batch} within {args.max_overhead:.0%} overhead{least}",
                      style="bold red")  # fmt: skip
    console.print(
        "note: step times are estimated from FLOPs and bytes moved at each GPU's datasheet rates (see "
        f"planner/gpus.yaml); a plan may add at most {args.max_overhead:.0%} to the step",
        style="dim",
    )
    if args.export is not None:
        from planner.export import write

        data = {"scenario": scenario.name, "variant": variant, "batch_size": batch, "world_size": world_size,
                "precision": scenario.precision, "tf32": args.tf32, "max_overhead": args.max_overhead,
                "results": [r.to_dict() for r in results]}  # fmt: skip
        console.print(f"wrote the comparison to {write(data, args.export)}")
    if args.plot is not None:
        from planner.plot import plot_comparison

        console.print(f"wrote the comparison plot to {plot_comparison(args.plot, results, title)}")
    return 0


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
