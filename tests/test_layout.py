"""The shape of the code: a core that runs without torch, and no import circles."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("planner", "solvers", "scenarios")

WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # any import of torch fails
import solvers, solvers.ilp, solvers.dp, solvers.greedy, solvers.all, solvers.sqrt, solvers.none
from planner.core import actions, batchscale, costmodel, gpus, graph, plan, simulator, sizes
from planner.core.graph import Block, Category, FixedMemory, Phase, ProfiledGraph, Unit
from planner.core.plan import Plan, Status

# a step of two units: each saves a 100-byte block in forward that its backward frees; gradients at the end
blocks = (
    Block(bytes=100, category=Category.ACTIVATIONS, phase=Phase.FORWARD, alloc=1, free=14, owner=0, savers=frozenset({0}), last_use=3),
    Block(bytes=100, category=Category.ACTIVATIONS, phase=Phase.FORWARD, alloc=5, free=11, owner=1, savers=frozenset({1}), last_use=7),
    Block(bytes=50, category=Category.GRADIENTS, phase=Phase.BACKWARD, alloc=12, free=None),
)
units = tuple(
    Unit(index=i, name=f"layer{i}", call=0, kind="Linear", fwd_ms=1.0, bwd_ms=2.0, fwd_flops=0, bwd_flops=0,
         saved_bytes=100, input_bytes=10, output_bytes=10, fwd_start=4 * i, fwd_end=4 * i + 3,
         grad_tick=12 - 3 * i, bwd_start=13 - 3 * i, bwd_end=14 - 3 * i, direct_from=i - 1 if i else None)
    for i in range(2)
)
step = ProfiledGraph(model="Toy", fingerprint="0", device="meta", units=units, edges=((0, 1),),
                     fixed=FixedMemory(parameters=1000, buffers=0, inputs=0, optimizer=0), blocks=blocks,
                     phases={Phase.FORWARD: (1, 8), Phase.BACKWARD: (9, 14), Phase.OPTIMIZER: (15, 15)},
                     step_ms=6.0, measured_times=False)
unplanned = simulator.simulate(step).peak_bytes
problem = solvers.build_problem(step, unplanned - 50)
for name in solvers.SOLVERS:
    solution = solvers.get_solver(name)(problem, 5.0)
chosen = solvers.get_solver("ilp")(problem, 5.0)
assert chosen.status is Status.OPTIMAL, chosen
assert problem.peak_bytes(chosen.chosen) <= unplanned - 50 < unplanned
assert simulator.simulate(step, [problem.options[o].choice for o in chosen.chosen]).peak_bytes == problem.peak_bytes(chosen.chosen)
print("ok", unplanned, problem.peak_bytes(chosen.chosen))
"""


def test_the_core_and_every_solver_run_without_torch():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in it (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules and m != name}


def test_no_import_circles():
    modules = project_modules()
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_node(name)
        graph.add_edges_from((name, other) for other in imports_of(name, path, modules))
    circles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not circles, circles
