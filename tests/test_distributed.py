"""Plans under DistributedDataParallel and FSDP2, two CPU ranks over gloo on 127.0.0.1.

Every rank gets the same gradients with the plan as without it, measures a peak within 5% of
its own prediction and under the budget, and the launcher never hangs nor leaves a process or
a port behind, whatever a rank does.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import planner
from planner.cli import main
from planner.distributed.engines import SHARDINGS, measure_rank, profile_rank
from planner.distributed.estimate import estimate_rank_graph
from planner.distributed.jobs import RankJob, rank_workload
from planner.distributed.launch import RankFailed, RemoteTraceback, launch
from planner.planning import InfeasibleBudget, plan_ranks
from planner.scenario import ScenarioError, load_scenario, parse_scenario
from planner.core.simulator import simulate

WORLD_SIZE = 2
CASES = [(name, sharding) for name in ("gpt", "resnet") for sharding in SHARDINGS]
BUDGET = "60%"  # of a rank's unplanned peak; where no plan fits it, the smallest that fits + 10%
STEPS = 2
# The estimate without the engine, against the rank's own profile. That profile is itself off by a
# gradient-sized buffer now and then (gpt-ddp once: 31.9 MB where it is 28.4 MB in other runs, and
# equal to the estimate), which a bound of 10% did not always cover.
ESTIMATE_TOLERANCE = 0.15


def step_args(w) -> dict:
    return {"loss_fn": w.loss_closure(), "optimizer": w.optimizer, "autocast_dtype": w.autocast_dtype}


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def port_is_free(port: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", int(port)))
        except OSError:
            return False
    return True


def train(job: RankJob, rank: int, plan=None) -> list[list[torch.Tensor]]:
    """This rank's gradients (its shards under FSDP2) at each of STEPS steps, under a plan or not."""
    w, wrapped = rank_workload(job, rank)
    torch.manual_seed(0)  # dropout
    grads = []
    with planner.apply(wrapped.module, plan) if plan is not None else contextlib.nullcontext():
        for _ in range(STEPS):
            w.loss_fn(wrapped.module(*w.inputs, **w.kwargs), w.target).backward()
            grads.append([local(p.grad).clone() for p in w.model.parameters()])
            w.optimizer.step()
            w.optimizer.zero_grad(set_to_none=True)
    return grads


def rank_plan(graph):
    try:
        return plan_ranks(graph, BUDGET)
    except InfeasibleBudget as err:  # every rank gets it
        return plan_ranks(graph, int(err.smallest_bytes * 1.1))


def check_cases(rank: int, world_size: int, cases: list) -> dict:
    """Each case on this rank: the plan's prediction and measurement, gradients, the estimate."""
    results = {"rank": rank, "port": os.environ["MASTER_PORT"]}
    for name, sharding in cases:
        job = RankJob(name, sharding)
        w, wrapped = rank_workload(job, rank)
        graph = profile_rank(wrapped, w.batch, **step_args(w))
        plan = rank_plan(graph)
        with planner.apply(wrapped.module, plan):
            measured = measure_rank(wrapped, w.batch, steps=1, **step_args(w)).peak_bytes
        reference, planned = train(job, rank), train(job, rank, plan)
        alone = load_scenario(name).build(seed=rank)  # the same model and batch in one process
        alone_graph = planner.profile(alone.model, alone.batch, **step_args(alone))
        estimate = estimate_rank_graph(alone_graph, world_size, sharding, alone.model)
        results[(name, sharding)] = {
            "budget": plan.budget_bytes,
            "choices": len(plan.choices),
            "predicted": simulate(graph, plan.choices).peak_bytes,
            "measured": measured,
            "same_grads": all(torch.equal(a, b) for ga, gb in zip(reference, planned) for a, b in zip(ga, gb)),
            "profiled_unplanned": simulate(graph).peak_bytes,
            "estimated_unplanned": simulate(estimate).peak_bytes,
        }
    return results


@pytest.fixture(scope="module")
def ranks() -> dict:
    """Every case on both ranks in one launch: case -> one result per rank."""
    per_rank = launch(check_cases, WORLD_SIZE, timeout_s=300, args=(CASES,))
    assert [r["rank"] for r in per_rank] == list(range(WORLD_SIZE))  # results come in rank order
    assert not multiprocessing.active_children() and port_is_free(per_rank[0]["port"])
    return {case: [r[case] for r in per_rank] for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(case))
def test_plan_keeps_gradients_and_every_rank_under_budget(ranks, case):
    for rank, r in enumerate(ranks[case]):
        assert r["choices"] > 0, "the budget should need recompute or offload"
        assert r["same_grads"], f"rank {rank}: gradients differ under the plan"
        assert r["measured"] <= r["budget"], (rank, r)
        assert abs(r["measured"] - r["predicted"]) <= 0.05 * r["measured"], (rank, r)


@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(case))
def test_estimate_without_the_engine_is_close_to_the_rank_profile(ranks, case):
    for r in ranks[case]:
        profiled = r["profiled_unplanned"]
        assert abs(r["estimated_unplanned"] - profiled) <= ESTIMATE_TOLERANCE * profiled, r


def test_train_command_reports_every_rank(capsys):
    argv = ["train", "resnet", "--world-size", "2", "--sharding", "fsdp", "--budget", "70%", "--steps", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 ranks (fsdp)" in out and out.count("under") == 2
    assert not multiprocessing.active_children()


def test_a_budget_no_plan_fits_is_a_usage_error(capsys):
    assert main(["plan", "gpt", "--world-size", "2", "--sharding", "ddp", "--budget", "1%"]) == 2
    assert "no plan fits a budget" in capsys.readouterr().err
    assert not multiprocessing.active_children()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"world_size": 0}, "'world_size' must be a positive integer"),
        ({"world_size": "2"}, "'world_size' must be a positive integer"),
        ({"sharding": "zero3"}, "'sharding' must be one of ddp, fsdp"),
    ],
)
def test_scenario_world_size_and_sharding_are_checked(fields, message):
    path = load_scenario("resnet").path
    data = {
        "model": "resnet",
        "inputs": [{"shape": ["B", 3, 8, 8]}],
        "target": {"shape": ["B"], "dtype": "int64", "high": 3},
    }
    scenario = parse_scenario({**data, "world_size": 2, "sharding": "fsdp"}, path)
    assert (scenario.world_size, scenario.sharding) == (2, "fsdp")
    with pytest.raises(ScenarioError, match=message):
        parse_scenario({**data, **fields}, path)


def fail_on_last_rank(rank: int, world_size: int) -> int:
    if rank == world_size - 1:
        raise ValueError(f"no luck on rank {rank}")
    dist.barrier()  # would wait forever for the failed rank
    return rank


def die_on_last_rank(rank: int, world_size: int) -> None:
    if rank == world_size - 1:
        os._exit(3)
    dist.barrier()


def sleep(rank: int, world_size: int) -> None:
    time.sleep(600)


def test_a_failing_rank_raises_its_error_quickly():
    start = time.monotonic()
    with pytest.raises(ValueError, match="no luck on rank 1") as err:
        launch(fail_on_last_rank, WORLD_SIZE, timeout_s=120)
    assert time.monotonic() - start < 60
    assert isinstance(err.value.__cause__, RemoteTraceback)
    assert "fail_on_last_rank" in str(err.value.__cause__)  # the rank's own traceback
    assert not multiprocessing.active_children()


def test_a_rank_that_dies_silently_is_named():
    with pytest.raises(RankFailed, match="rank 1 of 2 exited with status 3"):
        launch(die_on_last_rank, WORLD_SIZE, timeout_s=120)
    assert not multiprocessing.active_children()


def test_a_hung_run_stops_at_the_timeout():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 5 s"):
        launch(sleep, WORLD_SIZE, timeout_s=5)
    assert time.monotonic() - start < 30
    assert not multiprocessing.active_children()


def test_auto_in_a_torchrun_script_applies_one_plan_on_every_rank(tmp_path):
    pytest.importorskip("transformers")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD_SIZE),
               "--master-addr", "127.0.0.1", "--master-port", str(port), "tests/torchrun_auto.py", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    assert records[0]["plan"] == records[1]["plan"]
    assert any(u["action"] != "keep" for u in records[0]["plan"]["units"])
    assert all(r["measured"] <= r["plan"]["budget_bytes"] for r in records)
