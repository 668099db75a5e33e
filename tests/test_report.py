"""Sizes for people, terminal reports, export to JSON and YAML, and the memory timeline plot.

Run: ``python -m pytest tests/test_report.py -q``
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from torch import nn

import planner
from planner.export import atomic_open, graph_to_dict, write
from planner.core.graph import ProfiledGraph
from planner.measurement import Measurement
from planner.plot import plot_timeline
from planner.core.sizes import format_bytes, parse_bytes
from planner.report import peak_panel, units_table
from planner.core.simulator import Simulation
from planner.step import paired_ms, paired_ratio

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def graph() -> ProfiledGraph:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    optimizer = torch.optim.Adam(model.parameters())
    return planner.profile(model, x, loss_fn=lambda out: nn.functional.cross_entropy(out, y), optimizer=optimizer)


@pytest.fixture(scope="module")
def sim(graph: ProfiledGraph) -> Simulation:
    return planner.simulate(graph)


def render(renderable, width: int = 120) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("123456", 123456),
        ("6GiB", 6 * 1024**3),
        ("6gib", 6 * 1024**3),
        ("6000MB", 6_000_000_000),
        ("1.5 GB", 1_500_000_000),
        ("1.5gb", 1_500_000_000),
        ("512 KiB", 512 * 1024),
        ("2TB", 2 * 1000**4),
        ("100B", 100),
        ("  7 mib ", 7 * 1024**2),
        (".5KiB", 512),
    ],
)
def test_parse_bytes_accepts(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "GiB", "6 G", "1e9", "6 GiBs", "1.5.2GB", "nan", "inf", "60%", "6 XB"])
def test_parse_bytes_rejects_malformed_and_names_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match="cannot read .* as a size; expected .*KiB") as err:
        parse_bytes(text)
    assert "GiB" in str(err.value) and "MB" in str(err.value)


@pytest.mark.parametrize("text", ["0", "0GiB", "-1GB", "-5", "0.4"])
def test_parse_bytes_rejects_zero_and_negative(text: str) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        parse_bytes(text)


def test_parse_bytes_rejects_non_text() -> None:
    with pytest.raises(ValueError, match="cannot read"):
        parse_bytes(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (int(12.3 * 1024**2), "12.3 MiB"),
        (300 * 1024**2, "300 MiB"),
        (1024**3 - 1, "1.00 GiB"),
        (3 * 1024**3 // 2, "1.50 GiB"),
        (-2048, "-2.00 KiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize("text", ["1.50 GiB", "12.3 MiB", "300 MiB", "512 B"])
def test_format_bytes_reads_back(text: str) -> None:
    n = parse_bytes(text)
    assert format_bytes(n) == text


# ---------------------------------------------------------------------------------------------- reports


def test_units_table_has_a_row_per_unit_and_a_total(graph: ProfiledGraph) -> None:
    text = render(units_table(graph))
    for unit in graph.units:
        assert unit.key in text
    assert "total" in text and "saved" in text and "GFLOP" in text
    assert format_bytes(sum(u.saved_bytes for u in graph.units)) in text


def test_peak_panel_shows_breakdown_with_shares(sim: Simulation) -> None:
    text = render(peak_panel(sim))
    assert "predicted peak" in text and format_bytes(sim.peak_bytes) in text
    assert "activations" in text and "parameters" in text and "%" in text
    assert "measured" not in text


def test_peak_panel_with_measurement_shows_relative_error(sim: Simulation) -> None:
    measured = Measurement("cpu", peak_bytes=round(sim.peak_bytes / 1.1), reserved_bytes=None, step_ms=1.0, steps=3)
    text = render(peak_panel(sim, measured))
    assert "measured peak" in text and format_bytes(measured.peak_bytes) in text
    assert "+10.0%" in text


def test_peak_panel_shows_reserved_bytes_when_measured(sim: Simulation) -> None:
    measured = Measurement("cuda:0", sim.peak_bytes, reserved_bytes=2 * sim.peak_bytes, step_ms=1.0, steps=3)
    text = render(peak_panel(sim, measured))
    assert "reserved" in text and format_bytes(2 * sim.peak_bytes) in text and "+0.0%" in text


# ---------------------------------------------------------------------------------------------- export


def test_graph_to_dict_is_plain_and_complete(graph: ProfiledGraph, sim: Simulation) -> None:
    data = graph_to_dict(graph, sim)
    assert json.loads(json.dumps(data)) == data
    assert {"model", "units", "edges", "fixed", "phases", "step_ms", "measured_times", "blocks"} <= data.keys()
    assert len(data["units"]) == len(graph.units)
    assert data["units"][0]["ops"] and {"name", "flops", "ms"} <= data["units"][0]["ops"][0].keys()
    assert data["phases"].keys() == {"forward", "backward", "optimizer"}
    assert len(data["blocks"]["rows"]) == len(graph.blocks)
    assert all(len(row) == len(data["blocks"]["columns"]) for row in data["blocks"]["rows"])
    assert data["simulation"]["peak_bytes"] == sim.peak_bytes
    assert sum(data["simulation"]["peak_breakdown"].values()) == sim.peak_bytes
    assert "simulation" not in graph_to_dict(graph)


LOADERS = [(".json", json.loads), (".yaml", yaml.safe_load), (".yml", yaml.safe_load)]


@pytest.mark.parametrize(("suffix", "load"), LOADERS)
def test_write_round_trips(tmp_path: Path, graph: ProfiledGraph, sim: Simulation, suffix: str, load) -> None:
    data = graph_to_dict(graph, sim)
    path = write(data, tmp_path / f"graph{suffix}")
    assert load(path.read_text()) == data
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


@pytest.mark.parametrize("name", ["graph.txt", "graph", "graph.json.bak"])
def test_write_rejects_unknown_suffix(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match=r"\.json, \.yaml, \.yml"):
        write({"a": 1}, tmp_path / name)
    assert not any(tmp_path.iterdir())


def test_write_rejects_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        write({"a": 1}, tmp_path / "missing" / "graph.json")


def test_atomic_open_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "graph.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(path) as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["graph.json"]


# ---------------------------------------------------------------------------------------------- plot


def test_plot_writes_png(tmp_path: Path, graph: ProfiledGraph, sim: Simulation) -> None:
    other = planner.simulate(graph)
    series = [("profiled", sim), ("again", other)]
    path = plot_timeline(tmp_path / "step.png", series, graph, budget_bytes=sim.peak_bytes)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["step.png"]


def test_plot_rejects_other_suffixes_and_empty_series(tmp_path: Path, graph: ProfiledGraph, sim: Simulation) -> None:
    with pytest.raises(ValueError, match=r"\.png"):
        plot_timeline(tmp_path / "step.pdf", [("profiled", sim)], graph)
    with pytest.raises(ValueError, match="at least one"):
        plot_timeline(tmp_path / "step.png", [], graph)


def test_a_step_time_ratio_sees_one_pace_per_pair():
    # the machine slows by half after the second pair; each planned step costs 1.1 to 1.3 times its neighbour
    before = [600.0, 600.0, 900.0, 900.0, 900.0]
    after = [660.0, 780.0, 1080.0, 990.0, 1170.0]
    assert paired_ratio(before, after) == pytest.approx(1.2)  # a ratio of the two medians says 1.1
    assert paired_ms(before, after) == (900.0, pytest.approx(1080.0))  # the planned time reported
    with pytest.raises(ValueError):
        paired_ratio(before, after[1:])
