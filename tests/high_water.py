"""Run by tests/test_executor.py in a process started with MALLOC_MMAP_THRESHOLD_=65536, so that freed
tensors go back to the system and the process's high-water mark follows live memory: a small CNN of
conv + batch-norm + ReLU + dropout blocks, one of them called twice (the second time with a keyword
argument), measured unplanned and under a recompute-only plan at fixed + 50% of its activations.
Prints one JSON object: the budget, and for each step its prediction, live-storage peak and
high-water peak."""

from __future__ import annotations

import json

import torch
from torch import nn

import planner


class Block(nn.Sequential):
    def __init__(self, channels: int) -> None:
        super().__init__(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                         nn.ReLU(), nn.Dropout(0.1))

    def forward(self, input):
        return super().forward(input)


class Net(nn.Module):
    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.first, self.shared, self.last = Block(channels), Block(channels), Block(channels)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))

    def forward(self, x):
        x = self.shared(self.first(self.stem(x)))
        return self.head(self.last(self.shared(input=x)))


def main() -> None:
    torch.manual_seed(0)
    model, x, y = Net(), torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = {"loss_fn": lambda out: nn.functional.cross_entropy(out, y), "optimizer": optimizer}
    graph = planner.profile(model, x, **step)
    unplanned = planner.measure(model, x, steps=0, **step)
    fixed = graph.fixed.total + sum(b.bytes for b in graph.blocks if b.category.value == "gradients")
    budget = int(fixed + 0.5 * (unplanned.peak_bytes - fixed))
    handle = planner.auto(model, x, budget, **step)
    planned = planner.measure(model, x, steps=0, **step)
    result = {"budget": budget, "recomputed": len(handle.plan.choices)}
    for name, predicted, measured in (("unplanned", planner.simulate(graph).peak_bytes, unplanned),
                                      ("planned", handle.plan.predicted_peak_bytes, planned)):
        result[name] = {"predicted": predicted, "live": measured.peak_bytes, "high_water": measured.process_peak_bytes}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
