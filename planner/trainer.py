"""Training under a plan with the Hugging Face Trainer: one call before `trainer.train()`.

    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    handle = planner.plan_trainer(trainer, "60%")     # profile, plan, apply, check one step
    trainer.train()                                   # the plan comes off when training ends

The step profiled is the Trainer's: the model's own loss on the first batch of its data loader,
with its mixed precision (`bf16` / `fp16`), and the optimizer it will use (made now, as
`trainer.train()` would make it: its state is fixed memory). With gradient accumulation, each
micro-batch's forward and backward run under the plan as profiled.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from planner.execution import Handle
from planner.planning import auto

log = logging.getLogger(__name__)


def plan_trainer(trainer: Any, budget: int | float | str, **options: Any) -> Handle:
    """`planner.auto` on the Trainer's model, first batch and optimizer (`options` are auto's); the
    handle is removed when training ends."""
    from transformers import TrainerCallback

    class RemoveAtEnd(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            handle.remove()

    if getattr(trainer.args, "activation_checkpointing", False) or getattr(trainer.args, "gradient_checkpointing", False):
        log.warning("activation_checkpointing=True: turned off, so that the plan decides what is recomputed")
        trainer.args.activation_checkpointing = trainer.args.gradient_checkpointing = False
    trainer.create_optimizer()
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v.to(trainer.args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    precision = torch.bfloat16 if trainer.args.bf16 else torch.float16 if trainer.args.fp16 else None
    handle = auto(trainer.model, batch, budget, optimizer=trainer.optimizer, autocast_dtype=precision, **options)
    trainer.add_callback(RemoveAtEnd())
    return handle
