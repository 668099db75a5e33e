"""The `planner` command line.

Run: ``python -m pytest tests/test_cli.py -q``
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from planner.cli import main
from planner.scenario import list_scenarios

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_profile_measure_export_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export, plot = tmp_path / "gpt.json", tmp_path / "gpt.png"
    argv = ["profile", "gpt", "--batch-size", "1", "--measure", "--export", str(export), "--plot", str(plot)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "blocks.0#0" in out and "total" in out
    assert "predicted peak" in out and "measured peak" in out and "error" in out
    data = json.loads(export.read_text())
    assert data["model"] == "GPT" and data["simulation"]["peak_bytes"] > 0
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_profile_yaml_export(tmp_path: Path) -> None:
    export = tmp_path / "lstm.yaml"
    assert main(["profile", "lstm", "--batch-size", "2", "--export", str(export)]) == 0
    assert export.read_text().startswith("model: LSTMLM")


def test_profile_on_meta_says_times_are_estimated(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "lstm", "--device", "meta"]) == 0
    out = capsys.readouterr().out
    assert "estimated from FLOPs" in out and "predicted peak" in out


def test_profile_accepts_a_scenario_file_and_unit_patterns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(
        "model: resnet\n"
        "args: {depth: 18, width: 4, num_classes: 10, small_input: true}\n"
        "batch_size: 2\n"
        "inputs: [{shape: [B, 3, 16, 16]}]\n"
        "target: {shape: [B], dtype: int64, high: 10}\n"
    )
    assert main(["profile", str(path), "--units", "layer*"]) == 0
    out = capsys.readouterr().out
    assert "layer1#0" in out and "layer4#0" in out and "conv1#0" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["profile", "no_such_scenario"], "unknown scenario 'no_such_scenario'"),
        (["profile", "missing/scenario.yaml"], "no such scenario file"),
        (["profile", "gpt", "--device", "meta", "--measure"], "--device meta"),
        (["profile", "gpt", "--export", "out.csv"], ".json, .yaml, .yml"),
        (["profile", "gpt", "--plot", "out.jpg"], ".png"),
        (["profile", "gpt", "--variant", "full", "--device", "meta", "--units", "nothing*"], "matches units"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err
    assert "Traceback" not in captured.err and captured.err.count("\n") == 1


def test_bad_command_line_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "gpt", "--batch-size", "0"]) == 2
    assert "positive integer" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert main([]) == 2


def test_scenarios_lists_built_ins(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scenarios"]) == 0
    out = capsys.readouterr().out
    for name in list_scenarios():
        assert name in out
    assert "bfloat16" in out and "adamw" in out and "batch 8" in out


def test_python_dash_m_planner_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "planner", "scenarios"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "resnet" in done.stdout


GPT2_SCENARIO = """\
model: transformers:GPT2LMHeadModel
config: {n_layer: 4, n_embd: 128, n_head: 4, n_positions: 256, vocab_size: 1000, bos_token_id: 0, eos_token_id: 0}
batch_size: 4
kwargs:
  input_ids: {shape: [B, 128], dtype: int64, high: 1000}
  labels: input_ids
"""


def test_a_transformers_scenario_profiles_plans_and_compares(tmp_path, capsys) -> None:
    pytest.importorskip("transformers")
    path = tmp_path / "gpt2.yaml"
    path.write_text(GPT2_SCENARIO)
    assert main(["profile", str(path)]) == 0
    assert main(["plan", str(path), "--budget", "50%"]) == 0
    assert main(["compare", str(path), "--gpus", "a100-40gb,rtx4090"]) == 0  # one variant: compared as it is
    out = capsys.readouterr().out
    assert "GPT2LMHeadModel" in out and "a100-40gb" in out and "rtx4090" in out
