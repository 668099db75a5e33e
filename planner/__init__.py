"""A memory-aware training planner for PyTorch.

    graph = planner.profile(model, batch, loss_fn=..., optimizer=...)
    sim = planner.simulate(graph)          # predicted peak and timeline
    real = planner.measure(model, batch, loss_fn=..., optimizer=...)
    plan = planner.plan(graph, "60%")      # keep / recompute / offload per unit
    handle = planner.apply(model, plan)    # train as before; handle.remove() undoes it
    handle = planner.auto(model, batch, "60%", loss_fn=..., optimizer=...)   # all three at once
    handle = planner.plan_trainer(trainer, "60%")   # a Hugging Face Trainer, before trainer.train()

`planner.core` and the solvers import without torch; the rest is loaded on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "profile": "planner.profiling",
    "simulate": "planner.core.simulator",
    "measure": "planner.measurement",
    "load_scenario": "planner.scenario",
    "plan": "planner.planning",
    "auto": "planner.planning",
    "save_plan": "planner.planning",
    "load_plan": "planner.planning",
    "apply": "planner.execution",
    "plan_trainer": "planner.trainer",
    "compare": "planner.compare",
    "ProfiledGraph": "planner.core.graph",
    "Batch": "planner.step",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'planner' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
