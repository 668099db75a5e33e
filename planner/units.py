"""Which modules of a model are units, the parts a plan acts on."""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Sequence

import torch
from torch import nn

UnitSpec = Sequence[str | type[nn.Module]] | None


def select_units(model: nn.Module, spec: Sequence[str | type[nn.Module]]) -> list[str]:
    """Names of the modules that are units, outermost first in module order.

    `spec` lists module classes, class names or glob patterns over qualified
    names ("blocks.*", "*.attn"); a module matching any entry is a unit, and
    a match inside another match is not. (With no spec, `planner.profiling.survey`
    chooses the units.)
    """
    chosen: list[str] = []
    for name, module in model.named_modules():
        if any(name == c or name.startswith(c + ".") for c in chosen if c):
            continue
        if any(_matches(entry, name, module) for entry in spec):
            chosen.append(name)
    if not chosen:
        raise ValueError(
            f"no module of {type(model).__name__} matches units={list(spec)!r}; give module classes, "
            "class names or name patterns such as 'layer*.*'"
        )
    return chosen


def _matches(entry: str | type[nn.Module], name: str, module: nn.Module) -> bool:
    if isinstance(entry, type):
        return isinstance(module, entry)
    return type(module).__name__ == entry or fnmatch.fnmatchcase(name, entry)


def fingerprint(model: nn.Module) -> str:
    """A short hash of the module tree and parameter shapes and dtypes."""
    h = hashlib.sha256()
    for name, module in model.named_modules():
        h.update(f"{name}:{type(module).__name__};".encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return h.hexdigest()[:16]


def buffers_of(modules: Sequence[nn.Module]) -> list[torch.Tensor]:
    """The buffers of some modules and their submodules, each once."""
    return list({id(b): b for m in modules for b in m.buffers()}.values())
