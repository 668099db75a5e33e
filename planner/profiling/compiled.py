"""What a compiled step saves for backward, unit by unit.

Under torch.compile, AOTAutograd traces the forward and backward into one joint graph and its
partitioner chooses what the forward saves: fused operators' intermediates never exist, and cheap
ones are recomputed in backward, so a compiled step saves less than the eager step that `profile`
records. One step of the model compiled with a backend that partitions as inductor does (and runs
the graphs as they are) tells which values each forward graph hands its backward; each is credited,
by the module it was computed in (`nn_module_stack`), to a unit. A module called several times
shares its bytes among its calls. How much faster the compiled step runs than the eager one is
timed with the model compiled as torch.compile does by default.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from collections import Counter, defaultdict
from collections.abc import Sequence

import torch
from torch.utils import checkpoint

from planner.core.graph import Phase, Unit
from planner.step import TrainingStep, preserved
from planner.torch_internals import (
    forget_compiled_code,
    partitioning_backend,
    saved_for_backward,
    side_effects_once_under_checkpoint,
)

_ROOT = re.compile(r"^L\[[^\]]+\](\[\d+\])*")
_INDEX = re.compile(r"\[(\d+)\]")
_KEY = re.compile(r"\._modules\[['\"]([^'\"]+)['\"]\]|\[['\"]([^'\"]+)['\"]\]")


def compiled_saved_bytes(train: TrainingStep, units: Sequence[Unit]) -> tuple[dict[int, int], dict[int, int]]:
    """Bytes the compiled step's forward saves for backward, by unit index (-1: outside every unit):
    as it is, and where every unit is recomputed (a checkpoint each, keeping nothing), what each
    still saves (the values its replay takes that come from outside it, such as a mask it made for
    all layers). Runs two training steps of `train.model` compiled (its state is restored)."""
    modules = dict(train.model.named_modules())
    names = sorted({u.name for u in units}, key=len, reverse=True)
    saved = _saved_by_unit(train, names)
    with contextlib.ExitStack() as undo:
        undo.enter_context(side_effects_once_under_checkpoint())
        for name in names:
            module = modules[name]
            undo.callback(_put_back, module, vars(module).get("forward"))
            module.forward = functools.partial(checkpoint.checkpoint, module.forward, use_reentrant=False)
        recomputed = _saved_by_unit(train, names)
    calls = Counter(u.name for u in units)

    def per_call(by_name: dict[str | None, int]) -> dict[int, int]:
        return {u.index: by_name.get(u.name, 0) // calls[u.name] for u in units} | {-1: by_name.get(None, 0)}

    return per_call(saved), per_call(recomputed)


def _put_back(module: torch.nn.Module, forward) -> None:
    """The module's own `forward` again (None: its class's)."""
    if forward is None:
        vars(module).pop("forward", None)
    else:
        module.forward = forward


def _saved_by_unit(train: TrainingStep, names: list[str]) -> dict[str | None, int]:
    """What one compiled step saves for backward, by the unit (of `names`, longest first) that made it."""
    pairs: list[tuple[torch.fx.GraphModule, torch.fx.GraphModule]] = []
    compiled = torch.compile(train.model, backend=partitioning_backend(lambda fw, bw: pairs.append((fw, bw))))
    with preserved(train.model, train.optimizer):
        TrainingStep(compiled, train.batch, train.loss_fn, train.optimizer, train.autocast_dtype)()
    forget_compiled_code()  # what this backend compiled is not for the user's step
    by_name: dict[str | None, int] = defaultdict(int)
    for forward, backward in pairs:
        for node in saved_for_backward(forward, backward):
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor):
                by_name[_unit_of(node, names)] += value.untyped_storage().nbytes()
    return by_name


TIMED_STEPS = 5


def compiled_speedup(train: TrainingStep) -> tuple[float, float]:
    """The compiled forward's time and the compiled step's over the eager ones', each the least of
    TIMED_STEPS steps after two to warm up (and compile). Runs steps of `train.model` (its state is
    restored)."""
    model = torch.compile(train.model)
    compiled = TrainingStep(model, train.batch, train.loss_fn, train.optimizer, train.autocast_dtype)
    with preserved(train.model, train.optimizer):
        eager, fast = _phase_ms(train), _phase_ms(compiled)
    forget_compiled_code()  # the user's step compiles anew, with the plan
    return fast[0] / eager[0], fast[1] / eager[1]


def _phase_ms(train: TrainingStep, warmup: int = 2) -> tuple[float, float]:
    """The least ms of the forward (with the loss) and of the whole step."""
    sync = torch.cuda.synchronize if train.device.type == "cuda" else lambda: None
    marks: dict[Phase | None, float] = {}

    def mark(phase: Phase | None = None) -> None:
        sync()
        marks[phase] = time.perf_counter()

    forward, whole = [], []
    for i in range(warmup + TIMED_STEPS):
        train(mark)
        mark()
        if i >= warmup:
            forward.append(marks[Phase.BACKWARD] - marks[Phase.FORWARD])
            whole.append(marks[None] - marks[Phase.FORWARD])
    return min(forward), min(whole)


def _unit_of(node: torch.fx.Node, names: list[str]) -> str | None:
    """The unit (of `names`, longest first) whose module computed `node`, the innermost that is one,
    or None."""
    for source, _ in reversed(list((node.meta.get("nn_module_stack") or {}).values())):
        path = module_path(source)
        unit = next((n for n in names if n and (path == n or path.startswith(n + "."))), None)
        if unit is not None:
            return unit
    return None


def module_path(source: str) -> str:
    """A module's qualified name from Dynamo's source for it, whose root is the compiled module, as
    `L['self']` or an argument of a wrapper (`L['args'][0]`): `L['self'].h[0]._modules['attn']`,
    or `L['args'][0]._orig_mod.h[0].attn`, is `h.0.attn`."""
    path = _ROOT.sub("", source, count=1)
    path = _INDEX.sub(r".\1", _KEY.sub(lambda m: "." + (m[1] or m[2]), path)).strip(".")
    return path.removeprefix("_orig_mod").strip(".")
