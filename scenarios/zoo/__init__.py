"""The model zoo: small plain-PyTorch model families that the scenarios name.

Every factory takes keyword arguments with defaults and returns an ``nn.Module``; every model
also constructs under ``with torch.device("meta"):``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from scenarios.zoo.gpt import gpt
from scenarios.zoo.resnet import resnet
from scenarios.zoo.rnn import lstm_cell_lm, lstm_lm
from scenarios.zoo.unet import unet
from scenarios.zoo.vgg import vgg

ZOO: dict[str, Callable[..., nn.Module]] = {
    "vgg": vgg,
    "resnet": resnet,
    "unet": unet,
    "lstm_cell_lm": lstm_cell_lm,
    "lstm_lm": lstm_lm,
    "gpt": gpt,
}


def build_model(name: str, **args: object) -> nn.Module:
    """Build the zoo model ``name`` with factory keyword ``args``; ValueError for an unknown name."""
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {', '.join(sorted(ZOO))}")
    return ZOO[name](**args)


__all__ = ["ZOO", "build_model"]
