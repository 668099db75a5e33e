"""Plans for data-parallel (DDP) and sharded (FSDP2) training, one process per rank.

    planner train gpt --world-size 2 --sharding fsdp --budget 60% --batch-size 16
    planner plan resnet --world-size 2 --sharding ddp --budget 85% --out plan.yaml

`launch` starts the ranks with PyTorch's elastic launcher; `engines` wraps the model in DDP or
FSDP2 and profiles and measures it as a rank sees it; `collective` holds what the ranks agree on
(units, the plan, the worst peak); `estimate` estimates a rank's memory from one process's
profile; `jobs` is what every rank of the command line runs. Ranks talk over gloo on 127.0.0.1 on
a CPU and over NCCL, one GPU per rank, on CUDA.
"""
