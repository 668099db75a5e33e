"""Which modules are units when the user names none, from a survey of the whole module tree.

    names = survey_units(model, run_step, device, existing)   # run_step() runs one training step

The survey runs a step once with every module hooked and credits each module with the bytes
autograd saves of what it computes: `saved_bytes`, its submodules included (its largest call), and
`own_bytes`, of its own code outside them. `choose_units` then walks the tree from the root:

- the root, a container (Sequential, ModuleList, ModuleDict) and a module never called itself are
  opened: their children are looked at instead;
- a Hugging Face `GradientCheckpointingLayer` is a unit, unless it holds more than MAX_SHARE of the
  step's saved bytes and holds such layers itself (a Swin stage of Swin layers): then it is opened;
- a repeated block (one of two or more members of a container that share its class, or a module
  called more than once in the step) is a unit, unless it holds more than MAX_SHARE of the step's saved bytes and holds repeated blocks itself
  (a stage of blocks), in which case it is opened;
- any other module that holds more than MAX_SHARE is opened when its own code holds under half of
  what it holds (its children hold the most of it);
- every other module that ran is a unit.

So decoder layers, encoder layers and residual blocks become units, and so do the stems,
embeddings, norms and heads around them; a large part that is not a block is split until its
parts are small or its own code holds it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from planner.tracking import StorageTracker, storage_key

MAX_SHARE = 0.125  # of the step's saved bytes: a part above it is split where its children hold it
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass(frozen=True)
class ModuleShare:
    """One module of the tree and what autograd saved of its largest call, in bytes."""

    name: str  # fully qualified; "" for the root
    kind: str  # class name
    children: tuple[str, ...]
    container: bool
    declared_block: bool  # a Hugging Face GradientCheckpointingLayer
    calls: int  # calls with gradients enabled
    saved_bytes: int  # its submodules' included
    own_bytes: int  # of its own code, outside its submodules


def choose_units(tree: dict[str, ModuleShare], total_bytes: int) -> list[str]:
    """The unit names in module order, by the rule of this module's docstring; `tree` is keyed by
    name and holds the root (""); `total_bytes` is everything autograd saved in the step's forward."""
    units: list[str] = []
    limit = MAX_SHARE * total_bytes

    def visit(name: str, repeated: bool) -> None:
        m = tree[name]
        kinds = [tree[c].kind for c in m.children]
        if m.children and (name == "" or m.container or not m.calls or _split(tree, m, repeated, limit)):
            for child in m.children:
                visit(child, m.container and kinds.count(tree[child].kind) > 1)
        elif m.calls:
            units.append(name)

    visit("", False)
    return units or [""]


def _split(tree: dict[str, ModuleShare], m: ModuleShare, repeated: bool, limit: float) -> bool:
    if m.saved_bytes <= limit:
        return False
    if m.declared_block:
        return _holds_declared(tree, m)
    if repeated or m.calls > 1:
        return _holds_repeated(tree, m)
    return 2 * m.own_bytes < m.saved_bytes


def _holds_declared(tree: dict[str, ModuleShare], m: ModuleShare) -> bool:
    return any(tree[c].declared_block or _holds_declared(tree, tree[c]) for c in m.children)


def _holds_repeated(tree: dict[str, ModuleShare], m: ModuleShare) -> bool:
    kinds = [tree[c].kind for c in m.children]
    if m.container and len(kinds) > len(set(kinds)):
        return True
    return any(_holds_repeated(tree, tree[c]) for c in m.children)


def module_tree(model: nn.Module) -> dict[str, ModuleShare]:
    """The tree with no survey yet: every module once (a shared one under its first name)."""
    names = {id(m): n for n, m in model.named_modules()}
    tree = {}
    for name, module in model.named_modules():
        children = []
        for child in module.children():
            if names[id(child)] not in children and names[id(child)].startswith(f"{name}." if name else ""):
                children.append(names[id(child)])
        tree[name] = ModuleShare(
            name,
            type(module).__name__,
            tuple(children),
            isinstance(module, CONTAINERS),
            any(c.__name__ == "GradientCheckpointingLayer" for c in type(module).__mro__),
            0,
            0,
            0,
        )
    return tree


@dataclass
class _Made:
    """A storage the forward allocated: the module calls in flight then, its bytes, whether autograd saved it."""

    stack: tuple[int, ...]
    bytes: int
    saved: bool = False


class _Survey(StorageTracker):
    """Credits each storage the forward allocates to the module calls running then."""

    def __init__(self, device: torch.device, existing: list[torch.Tensor]) -> None:
        super().__init__(device, existing)
        self.stack: list[int] = []  # calls in flight, innermost last
        self.call_names: list[str] = []
        self.made: list[_Made] = []  # what the forward allocated
        # storage key -> its allocation, while the storage lives (a key is an object's id, which a later
        # storage may take once this one is gone)
        self.allocation: dict[int, _Made] = {}

    def on_alloc(self, key: int, nbytes: int) -> None:
        if key >= 0 and torch._C._current_graph_task_id() == -1:
            self.allocation[key] = made = _Made(tuple(self.stack), nbytes)
            self.made.append(made)

    def on_free(self, key: int) -> None:
        self.allocation.pop(key, None)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        made = self.allocation.get(storage_key(t))
        if made is not None and torch._C._current_graph_task_id() == -1:
            made.saved = True
        return t

    @contextlib.contextmanager
    def hooked(self, model: nn.Module) -> Iterator[None]:
        names = {id(m): n for n, m in model.named_modules()}

        def pre(module, args):
            if torch.is_grad_enabled():
                self.stack.append(len(self.call_names))
                self.call_names.append(names[id(module)])
            else:
                self.stack.append(-1)

        def post(module, args, output):
            self.stack.pop()

        handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post, always_call=True))]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                yield
        finally:
            for h in handles:
                h.remove()

    def shares(self, tree: dict[str, ModuleShare]) -> tuple[dict[str, ModuleShare], int]:
        """The tree with each module's calls and its largest call's bytes; and the total saved bytes."""
        saved_by_call = [0] * len(self.call_names)
        own_by_call = [0] * len(self.call_names)
        total = 0
        for made in self.made:
            if not made.saved:
                continue
            stack, nbytes = made.stack, made.bytes
            total += nbytes
            calls = [c for c in stack if c >= 0]
            for c in set(calls):
                saved_by_call[c] += nbytes
            if calls and stack[-1] >= 0:
                own_by_call[calls[-1]] += nbytes
        out = dict(tree)
        for c, name in enumerate(self.call_names):
            m = out[name]
            out[name] = ModuleShare(
                m.name, m.kind, m.children, m.container, m.declared_block, m.calls + 1,
                max(m.saved_bytes, saved_by_call[c]), max(m.own_bytes, own_by_call[c]),
            )
        return out, total


def survey(model: nn.Module, run: Callable[[], object], device: torch.device, existing: list[torch.Tensor]):
    """Run `run()` (one training step) with every module hooked; returns the tree with its shares
    and the total bytes its forward saved. `existing` are the storages alive before it (not counted);
    the caller restores what the run changes."""
    rec = _Survey(device, existing)
    with rec.hooked(model), rec:
        run()
    rec.stop_tracking()
    return rec.shares(module_tree(model))


def survey_units(model: nn.Module, run: Callable[[], object], device: torch.device, existing: list[torch.Tensor]) -> list[str]:
    """The units `choose_units` picks from a survey of `run()`."""
    return choose_units(*survey(model, run, device, existing))
