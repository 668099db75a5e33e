"""A user's own data-parallel script, as `torchrun --nproc-per-node 2 tests/torchrun_auto.py OUT` runs it:
FSDP2 around each block of a small GPT-2, `planner.auto`, then two steps; each rank writes its plan
and its measured peak to OUT/rank<r>.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import planner
from tests.third_party import gpt2


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model, _ = gpt2()  # the same weights on every rank
    torch.manual_seed(1 + rank)
    _, batch = gpt2()  # a batch of the rank's own
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    handle = planner.auto(model, batch, "70%", optimizer=optimizer)
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    record = {"plan": handle.plan.to_dict(), "measured": handle.measured.peak_bytes}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    handle.remove()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
