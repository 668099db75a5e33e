"""GPU catalog, retiming, profiling without allocating, and the comparison of GPUs.

Run: ``python -m pytest tests/test_compare.py -q``
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import planner
from planner.cli import main
from planner.compare import compare
from planner.core.costmodel import REFERENCE, retime
from planner.core.gpus import GPU, find_gpus, load_catalog
from planner.core.graph import Category
from planner.planning import InfeasibleBudget, plan
from planner.scenario import OptimizerSpec, load_scenario
from planner.core.simulator import simulate
from solvers import build_problem

MIB, GIB = 1024**2, 1024**3
BUILTIN = {
    "v100-16gb", "v100-32gb", "t4", "a10g", "l4", "rtx3090", "rtx4090", "a100-40gb", "a100-80gb", "h100-80gb", "h200",
}  # fmt: skip
TINY_YAML = """\
tiny:
  description: a made-up GPU for tests
  memory_bytes: 64MiB
  usable_bytes: 48MiB
  fp32_flops_per_s: 10.0e+12
  tf32_flops_per_s: 20.0e+12
  fp16_flops_per_s: 40.0e+12
  bf16_flops_per_s: 40.0e+12
  memory_bytes_per_s: 500.0e+9
  host_link: PCIe 4.0 x16
  host_bytes_per_s: 25.0e+9
  source: made up
"""


def tiny_gpu(usable_bytes: int, name: str = "tiny") -> GPU:
    """A made-up GPU with little memory, so that small scenarios need a plan or do not fit."""
    return GPU(name, "made up", usable_bytes + 16 * MIB, usable_bytes, 10e12, 20e12, 40e12, 40e12, 500e9,
               "PCIe 4.0 x16", 25e9, "made up")  # fmt: skip


def profile_of(workload):
    w = workload
    return planner.profile(w.model, w.batch, w.loss_closure(), w.optimizer, autocast_dtype=w.autocast_dtype)


def fake_profile(scenario, batch_size=None):
    return profile_of(scenario.build("small", device="fake", batch_size=batch_size))


# ------------------------------------------------------------------------------------------ catalog


def test_builtin_catalog_has_every_field_and_a_source() -> None:
    catalog = load_catalog()
    assert BUILTIN <= catalog.keys()
    for gpu in catalog.values():
        assert gpu.source and gpu.description and gpu.host_link and gpu.device_names
        assert 0 < gpu.usable_bytes < gpu.memory_bytes
        rates = (gpu.fp32_flops_per_s, gpu.tf32_flops_per_s, gpu.fp16_flops_per_s, gpu.bf16_flops_per_s)
        assert all(r > 1e12 for r in rates) and gpu.memory_bytes_per_s > 1e11 and gpu.host_bytes_per_s > 1e9
        assert gpu.tf32_flops_per_s >= gpu.fp32_flops_per_s
        assert gpu.roofline("bfloat16").flops_per_s == gpu.bf16_flops_per_s
        assert gpu.roofline(None).flops_per_s == gpu.fp32_flops_per_s


def test_unknown_gpu_names_close_matches() -> None:
    with pytest.raises(ValueError, match="unknown GPU 'a100'; did you mean a100-40gb or a100-80gb") as err:
        find_gpus("rtx4090,a100", load_catalog())
    assert "valid names: v100-16gb" in str(err.value)
    with pytest.raises(ValueError, match="did you mean h100-80gb"):
        compare("resnet", ["h100"], variant="small")
    assert [g.name for g in find_gpus("A100-40GB, t4", load_catalog())] == ["a100-40gb", "t4"]


def test_user_catalog_adds_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(TINY_YAML + TINY_YAML.replace("tiny:", "t4:").replace("48MiB", "40MiB"))
    catalog = load_catalog(path)
    assert catalog["tiny"].usable_bytes == 48 * MIB and catalog["tiny"].device_names == ()
    assert catalog["t4"].usable_bytes == 40 * MIB  # replaced by name
    assert catalog["h200"] == load_catalog()["h200"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (("  source: made up\n", ""), "source"),
        (("10.0e+12", "fast"), "fp32_flops_per_s"),
        (("64MiB", "-1"), "memory_bytes"),
        (("48MiB", "96MiB"), "usable_bytes"),
        (("  source: made up\n", "  source: made up\n  colour: green\n"), "colour"),
    ],
)
def test_malformed_entry_names_file_gpu_and_field(tmp_path: Path, change: tuple[str, str], field: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(TINY_YAML.replace(*change))
    with pytest.raises(ValueError, match=rf"broken\.yaml: GPU 'tiny': .*'{field}'"):
        load_catalog(path)


# ------------------------------------------------------------------------------------------ cost model


def test_retime_changes_times_not_memory_and_copies() -> None:
    graph = fake_profile(load_scenario("resnet"))
    before = dataclasses.replace(graph)
    catalog = load_catalog()
    slow, fast = (retime(graph, catalog[n].roofline("float32")) for n in ("t4", "h100-80gb"))
    assert graph == before and graph.units[3].fwd_ms == before.units[3].fwd_ms  # the input is untouched
    assert slow.step_ms > fast.step_ms > 0 and slow.step_ms != graph.step_ms
    for timed in (slow, fast):
        assert not timed.measured_times
        assert timed.blocks == graph.blocks and timed.fixed == graph.fixed
        assert [u.saved_bytes for u in timed.units] == [u.saved_bytes for u in graph.units]
        assert timed.step_ms == pytest.approx(timed.other.ms + sum(u.fwd_ms + u.bwd_ms for u in timed.units))
        assert simulate(timed).peak_bytes == simulate(graph).peak_bytes
    on_h100 = dataclasses.replace(graph.calibration, device_name="NVIDIA H100 80GB HBM3")
    measured = dataclasses.replace(graph, measured_times=True, calibration=on_h100)
    assert retime(measured, catalog["h100-80gb"].roofline()) is measured  # profiled on that GPU: times kept
    assert retime(measured, catalog["a100-40gb"].roofline()).step_ms != measured.step_ms




def test_problems_of_one_step_on_several_gpus_are_those_built_on_each_alone() -> None:
    """What a choice frees is worked out once for the step's copies with other times; each GPU's
    problem is still the one a fresh profile gives, times and all."""
    graph = fake_profile(load_scenario("gpt"))
    catalog = load_catalog()
    for name in ("t4", "h100-80gb", "l4"):
        roofline = catalog[name].roofline("float32")
        shared = build_problem(retime(graph, roofline), 0, roofline)
        alone = build_problem(retime(dataclasses.replace(graph), roofline), 0, roofline)
        assert shared == alone and len({o.cost_ms for o in alone.options}) > len(alone.options) // 2
    assert graph.memory_effects and not dataclasses.replace(graph).memory_effects
# ------------------------------------------------------------------------------------------ fake tensors


@pytest.mark.parametrize("name", ["resnet", "gpt"])
def test_fake_profile_matches_the_real_cpu_peak_and_estimates_times(name: str) -> None:
    scenario = load_scenario(name)
    w = scenario.build()
    real, meta, fake = profile_of(w), profile_of(scenario.build(device="meta")), fake_profile(scenario)
    assert real.measured_times and not fake.measured_times
    assert fake.step_ms == pytest.approx(meta.step_ms)  # FLOP-based, the same operators as on meta
    assert [u.saved_bytes for u in fake.units] == [u.saved_bytes for u in real.units]
    # Adam-style optimizers keep one 4-byte step counter per parameter, made by torch.tensor(), which
    # real tensors create outside the dispatcher; fake ones do not.
    counters = 4 * len(list(w.model.parameters())) if scenario.optimizer.name.startswith("adam") else 0
    real = dataclasses.replace(real, blocks=tuple(dataclasses.replace(b, bytes=0) if b.scratch else b for b in real.blocks))
    assert 0 <= simulate(fake).peak_bytes - simulate(real).peak_bytes <= counters  # fake kernels take no scratch


def test_bf16_halves_activations_on_fake_tensors() -> None:
    scenario = load_scenario("resnet")
    graphs = {p: fake_profile(dataclasses.replace(scenario, precision=p), 32) for p in ("float32", "bfloat16")}
    acts = {p: sum(b.bytes for b in g.blocks if b.category is Category.ACTIVATIONS) for p, g in graphs.items()}
    assert 0.45 < acts["bfloat16"] / acts["float32"] < 0.65


# ------------------------------------------------------------------------------------------ compare


def test_compare_fits_plans_and_ranks() -> None:
    gpus = [tiny_gpu(14 * MIB, "small"), *find_gpus("t4,h100-80gb", load_catalog())]
    small, t4, h100 = compare("resnet", gpus, variant="small")
    assert not small.fits_unplanned and small.fits and small.verdict == "fits with a plan"
    assert small.peak_bytes <= small.usable_bytes < small.unplanned_peak_bytes and 0 < small.overhead <= 0.10
    assert small.plan is not None and small.to_dict()["plan"]["units"]
    assert t4.fits_unplanned and t4.peak_bytes == t4.unplanned_peak_bytes and t4.overhead == 0.0
    assert h100.samples_per_s > t4.samples_per_s > 0 and h100.batch_size == 8
    json.dumps([r.to_dict() for r in (small, t4, h100)])  # plain data


def test_max_batch_fits_and_one_more_does_not() -> None:
    scenario, gpu = load_scenario("resnet"), tiny_gpu(40 * MIB)
    (result,) = compare(scenario, [gpu], variant="small", max_batch=True)
    best = result.max_batch
    assert best > scenario.small.batch_size and result.max_batch_samples_per_s > 0

    def fits(batch_size: int) -> bool:  # checked here from scratch
        roofline = gpu.roofline(scenario.precision)
        graph = retime(fake_profile(scenario, batch_size), roofline)
        if simulate(graph).peak_bytes <= gpu.usable_bytes:
            return True
        try:
            chosen = plan(graph, gpu.usable_bytes, roofline=roofline, time_limit_s=5.0, offload=True,
                          host_memory=gpu.memory_bytes)  # fmt: skip
        except InfeasibleBudget:
            return False
        return chosen.predicted_overhead_ms <= 0.10 * graph.step_ms

    assert fits(best) and not fits(best + 1)


def test_offloads_stay_within_the_host_memory() -> None:
    gpu = tiny_gpu(14 * MIB)
    results = [compare("resnet", [gpu], variant="small", max_overhead=1.0, host_memory=h)[0] for h in (None, 2 * MIB, 0)]
    assert [r.host_bytes for r in results] == [gpu.memory_bytes, 2 * MIB, 0]
    assert all(r.fits and r.peak_bytes <= gpu.usable_bytes for r in results)
    assert all(0 <= r.offloaded_bytes <= r.host_bytes for r in results)
    assert all(r.plan.predicted_host_bytes == r.offloaded_bytes for r in results)
    assert results[0].offloaded_bytes > 2 * MIB and results[2].offloaded_bytes == 0  # the bound is what stops it
    assert results[0].overhead <= results[1].overhead <= results[2].overhead


def test_a_model_that_fits_no_gpu_says_what_it_needs() -> None:
    results = compare("gpt", [tiny_gpu(4 * MIB, "a"), tiny_gpu(6 * MIB, "b")], variant="small")
    assert all(not r.fits and r.verdict == "too large" and r.peak_bytes is None for r in results)
    needed = {r.needed_bytes for r in results}
    assert len(needed) == 1 and needed.pop() > 6 * MIB  # the smallest plannable peak, whatever the GPU


def test_optimizer_and_precision_change_the_answer() -> None:
    base = load_scenario("resnet")
    gpus = [tiny_gpu(GIB)]
    variants = {
        "adamw": dataclasses.replace(base, optimizer=OptimizerSpec("adamw", {"lr": 1e-3})),
        "sgd": base,
        "bf16": dataclasses.replace(base, precision="bfloat16"),
    }
    peaks = {k: compare(s, gpus, variant="small", batch_size=32)[0].unplanned_peak_bytes for k, s in variants.items()}
    assert peaks["adamw"] > peaks["sgd"]  # two state tensors per parameter against one
    assert peaks["bf16"] < peaks["sgd"]


def test_cli_compare_table_export_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    catalog, export, plot = tmp_path / "gpus.yaml", tmp_path / "out.json", tmp_path / "out.png"
    catalog.write_text(TINY_YAML)
    argv = ["compare", "resnet", "--variant", "small", "--gpus", "tiny,t4", "--catalog", str(catalog),
            "--max-overhead", "5%", "--host-memory", "3MiB", "--export", str(export), "--plot", str(plot)]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "t4" in out and "samples" in out and "usable" in out and "3.00 MiB" in out
    data = json.loads(export.read_text())
    assert data["max_overhead"] == 0.05 and [r["gpu"] for r in data["results"]] == ["tiny", "t4"]
    assert all(r["host_bytes"] == 3 * MIB for r in data["results"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_profile_on_fake_tensors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "gpt7b", "--device", "fake"]) == 0  # bfloat16: autocast runs on fake CPU tensors
    assert "estimated from FLOPs" in capsys.readouterr().out
    assert main(["profile", "gpt7b", "--device", "fake", "--measure"]) == 2


def test_cli_compare_unknown_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", "resnet", "--variant", "small", "--gpus", "rtx4080"]) == 2
    assert "did you mean rtx4090" in capsys.readouterr().err


def test_reference_roofline_is_unchanged() -> None:
    assert REFERENCE.op_ms(150 * 10**12, 0) == pytest.approx(1000 / 0.6)  # one second of math, at 60%
    assert REFERENCE.op_ms(0, 15 * 10**11) == pytest.approx(1000 / 0.6)
