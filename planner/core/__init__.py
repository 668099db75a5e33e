"""The framework-free core: what a profiled step is, what a plan does to it, and what that costs.

Nothing here imports torch, so the solvers, and anyone reading a saved profile, need only this:
`graph` (the profiled step as frozen data), `actions` (what recompute and offload free, and when),
`simulator` (the referee: peak and time of a step under a plan), `costmodel` (rates and formulas),
`gpus` (the GPU catalog), `plan` (a plan and its status), `sizes` (bytes as people write and read
them) and `batchscale` (a profile at another batch size).
"""
