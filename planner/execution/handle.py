"""Apply a plan to an unchanged model.

    handle = planner.apply(model, plan)   # training code stays as it was
    ...
    handle.remove()                       # the model runs as before

Each unit module gets an instance-level `forward` that looks up what the plan says for this call
(the n-th call of the module in the current step, whose forwards are `plan.forwards`) and runs it:
recomputed as part of a region (`planner.execution.recompute`), offloaded
(`planner.execution.offload`), or as it is. Parameters, buffers, state_dict keys and the module
tree are untouched.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

from planner.core.actions import Action, Choice
from planner.core.plan import Plan
from planner.execution.compiled import compiled_call, first_eager_call, static_choices
from planner.execution.offload import Offloader
from planner.execution.recompute import Regions
from planner.step import layer_drop
from planner.torch_internals import forget_compiled_code, original, side_effects_once_under_checkpoint
from planner.units import buffers_of, fingerprint

log = logging.getLogger(__name__)


class PlanMismatch(ValueError):
    """The plan was made for another model, or names units this model does not have."""


def apply(model: nn.Module, plan: Plan) -> Handle:
    """Make `model` run under `plan` until `remove()` is called on the returned handle. `model` may be
    what `torch.compile` returned, or be compiled afterwards: a compiled model follows the plan too
    (`planner.execution.compiled`)."""
    model = original(model)
    check_plan(model, plan)
    handle = Handle(model, plan)
    handle.install()
    # Dynamo's guards tell a unit's forward with a plan from one without, not one plan from another
    forget_compiled_code()
    return handle


def check_plan(model: nn.Module, plan: Plan) -> None:
    modules = dict(model.named_modules())
    missing = sorted({key.rsplit("#", 1)[0] for key in plan.units} - modules.keys())
    if type(model).__name__ != plan.model or fingerprint(model) != plan.fingerprint or missing:
        detail = f"; units it names that this model lacks: {', '.join(missing)}" if missing else ""
        raise PlanMismatch(
            f"the plan was made for a {plan.model} (fingerprint {plan.fingerprint}), and this model is a "
            f"{type(model).__name__} (fingerprint {fingerprint(model)}){detail}: profile this model and make a new plan"
        )


class Handle:
    """Installs the plan on a model; `remove()` (or leaving a `with` block) takes it off.

    `measured` is `planner.auto`'s measurement of a planned step (None until one is made).
    """

    def __init__(self, model: nn.Module, plan: Plan) -> None:
        self.model = model
        self.plan = plan
        self.modules = dict(model.named_modules())
        self.actions: dict[tuple[str, int], tuple[Choice, int]] = {}  # (name, call) -> choice, position
        for choice in plan.choices:
            for position, u in enumerate(choice.units):
                name, call = plan.units[u].rsplit("#", 1)
                self.actions[(name, int(call))] = (choice, position)
        self.names = sorted({key.rsplit("#", 1)[0] for key in plan.units})
        self.static = static_choices(plan)
        self.calls: dict[str, int] = {}
        self.forwards = 0  # forwards with gradients so far: a step has plan.forwards of them
        self.depth = 0  # unit calls in flight: calls inside them run as they are
        self.regions = Regions(self._nested, plan.units)
        self.offload = Offloader()
        self.seen: set[tuple[str, int]] = set()
        self.measured = None
        self._hooks: list = []
        self._config = contextlib.ExitStack()
        self._own: dict[str, Callable] = {}  # a unit's instance-level forward before the plan's (torch.compile's)
        self.eager: set[str] = set()  # offloaded units that ran eagerly in a compiled model

    # Installation.
    def install(self) -> None:
        self._own = {name: vars(self.modules[name])["forward"] for name in self.names if "forward" in vars(self.modules[name])}
        for name in self.names:
            module = self.modules[name]
            module.forward = self._forward(name, module.forward)
        self._hooks = [
            self.model.register_forward_pre_hook(self._begin),
            self.model.register_forward_hook(self._end, always_call=True),
        ]
        self._config.enter_context(side_effects_once_under_checkpoint())  # no graph break per compiled unit

    def remove(self) -> None:
        for name in self.names:
            self.modules[name].__dict__.pop("forward", None)
            if name in self._own:
                self.modules[name].forward = self._own[name]
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._config.close()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _begin(self, module, args) -> None:
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return
        if self.forwards % self.plan.forwards == 0:  # a new step: unit calls count from 0
            self.calls = dict.fromkeys(self.names, 0)
            self.seen = set()
        self.forwards += 1
        self.offload.start()

    def _end(self, module, args, output) -> None:
        if torch.compiler.is_compiling():
            return
        if self.regions.open is not None:
            last = self.plan.units[self.regions.open.choice.units[-1]]
            self.regions.close()
            raise PlanMismatch(f"a recompute region of the plan did not run to its end: {last}")
        if torch.is_grad_enabled() and self.forwards % self.plan.forwards == 0:
            missing = sorted(f"{n}#{c}" for n, c in self.actions.keys() - self.seen)
            if missing and not (module.training and layer_drop(module)):  # (LayerDrop skips calls at random)
                raise PlanMismatch(f"the plan names unit calls that did not run in this forward: {', '.join(missing[:8])}")

    # Running one unit call.
    @contextlib.contextmanager
    def _nested(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def _forward(self, name: str, forward: Callable) -> Callable:
        @functools.wraps(forward)
        def run(*args, **kwargs):
            if torch.compiler.is_compiling():
                return compiled_call(self.static.get(name), forward, args, kwargs, functools.partial(self._eager, name))
            if self.depth or not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            call = self.calls.get(name, 0)
            self.calls[name] = call + 1
            with self._nested():
                waiting, self.offload.waiting = self.offload.waiting, None
                output = self._run(name, call, forward, args, kwargs)
                self.offload.prefetch_on_grad(waiting, output)
                return output

        return run

    def _run(self, name: str, call: int, forward: Callable, args: tuple, kwargs: dict):
        action = self.actions.get((name, call))
        if action is None:
            return forward(*args, **kwargs)
        self.seen.add((name, call))
        choice, position = action
        if choice.action is Action.OFFLOAD:
            return self.offload.run(forward, args, kwargs, self.modules[name])
        return self.regions.run(choice, position, functools.partial(self._buffers, choice), forward, args, kwargs)

    @torch.compiler.disable
    def _eager(self, name: str, forward: Callable, args: tuple, kwargs: dict):
        """An offloaded call of a compiled model, run eagerly: saved-tensor hooks and host copies do not trace."""
        run = functools.partial(self.offload.run, forward, args, kwargs, self.modules[name])
        if name in self.eager:
            return run()
        output = first_eager_call(name, run)
        self.eager.add(name)
        log.warning("under torch.compile, %s is offloaded and runs eagerly, with a graph break around it", name)
        return output

    def _buffers(self, choice: Choice) -> list[torch.Tensor]:
        """The buffers of the modules of `choice`'s units, each once."""
        return buffers_of([self.modules[self.plan.units[u].rsplit("#", 1)[0]] for u in choice.units])
