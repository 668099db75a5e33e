"""Every `planner` command in the README's code blocks runs as written, in order (GPU-only ones are
marked `# on a GPU` and left out)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from planner.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for line in "\n".join(blocks).splitlines():
        if "# on a GPU" in line:
            continue
        for part in line.split("&&"):
            part = part.split(" #")[0].strip()
            if part.startswith("planner "):
                commands.append(part)
    return commands


def test_the_readme_has_commands_to_run():
    assert len(readme_commands()) >= 8


def test_every_command_of_the_readme_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    for command in readme_commands():
        assert main(shlex.split(command)[1:]) == 0, command
