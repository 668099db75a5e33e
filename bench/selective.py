"""Per-block selective checkpointing with a fixed save list, as users write it with PyTorch's policies.

    checkpoint(block, x, use_reentrant=False, context_fn=selective("torchtitan's list"))

"every matmul": every matmul's (and convolution's) output saved, the rest recomputed. "torchtitan's list": as torchtitan's
selective checkpointing saves, the outputs of attention kernels and of every second matmul (the
first, third, ...), the rest recomputed.
"""

from __future__ import annotations

import torch
from torch.utils import checkpoint as ckpt

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.convolution.default}  # a convolution counts as a matmul
ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}
SELECTIVE = ("every matmul", "torchtitan's list")  # the kinds


def selective(kind: str):
    """A context function for `torch.utils.checkpoint`: a fresh selective-checkpoint policy per
    checkpointed call, saving every matmul's output, or the attention kernels' and every second
    matmul's (counted apart in the forward and in its recomputation)."""

    def context_fn():
        matmuls = {False: 0, True: 0}

        def policy(ctx, func, *args, **kwargs):
            if func in MATMULS:
                matmuls[ctx.is_recompute] += 1
                keep = kind == "every matmul" or matmuls[ctx.is_recompute] % 2 == 1
            else:
                keep = kind != "every matmul" and func in ATTENTION
            return ckpt.CheckpointPolicy.MUST_SAVE if keep else ckpt.CheckpointPolicy.PREFER_RECOMPUTE

        return ckpt.create_selective_checkpoint_contexts(policy)

    return context_fn
