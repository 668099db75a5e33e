"""Training scenarios: a model, an example batch, a loss, a precision and an optimizer, from YAML.

A scenario file looks like this (only ``model`` and ``inputs`` are required)::

    name: resnet                      # defaults to the file's stem
    model: resnet                     # a zoo name, or "package.module:factory" for a user's model
    args: {depth: 18, width: 16, num_classes: 10}   # keyword arguments of the factory
    batch_size: 8                     # default 1
    inputs:                           # positional inputs of forward; "B" in a shape is the batch size
      - {shape: [B, 3, 32, 32], dtype: float32}
    kwargs:                           # optional keyword inputs of forward: name -> tensor spec
      attention_mask: {shape: [B, 64], dtype: bool}
    target: {shape: [B], dtype: int64, high: 10}
    loss: cross_entropy               # cross_entropy | lm_cross_entropy | mse | "package.module:function"
    precision: float32                # float32 | bfloat16 | float16
    optimizer: {name: adamw, lr: 1.0e-3}   # sgd | adam | adamw, plus keyword arguments of the torch optimizer
    budget: "60%"                     # optional: a share of the GPU ("60%") or a size ("12GiB", bytes as an integer)
    gpus: [a100-40gb, rtx4090]        # optional: GPU catalog names to compare
    world_size: 2                     # optional: data-parallel ranks (default 1); batch_size is per rank
    sharding: fsdp                    # optional: ddp (replicated, the default) or fsdp (FSDP2, sharded)
    full:                             # optional full-size variant
      args: {depth: 50, width: 64, num_classes: 1000}
      batch_size: 256
      inputs: [{shape: [B, 3, 224, 224], dtype: float32}]

Tensor specs: ``shape`` (integers and ``"B"``), ``dtype`` (default float32), for integer dtypes
``high`` (exclusive, required) and ``low`` (default 0), and ``fill`` for a constant tensor.
Float tensors are standard normal, integer tensors uniform in [low, high), bool tensors True.
``target`` is needed by the built-in losses; a custom loss is called as ``fn(output, target)``.
``lm_cross_entropy`` flattens logits [B, T, V] against targets [B, T]. ``bfloat16`` and
``float16`` mean autocast; parameters stay float32. The ``full`` variant overrides ``batch_size``,
``inputs``, ``kwargs`` and ``target`` and updates ``args`` key by key. A "package.module:name"
must be importable (on ``sys.path``).

Usage::

    scenario = load_scenario("resnet")          # built-in, or a path to a .yaml file
    workload = scenario.build("small", device="cpu", seed=0)
    loss = workload.step()                      # one training step, as a user would run it
"""

from planner.scenario.build import FAKE, OptimizerSpec, Scenario, ScenarioError, TensorSpec, Variant, cross_entropy, lm_cross_entropy, mse
from planner.scenario.parse import list_scenarios, load_scenario, parse_scenario, scenario_dir

__all__ = [
    "FAKE", "OptimizerSpec", "Scenario", "ScenarioError", "TensorSpec", "Variant",
    "cross_entropy", "list_scenarios", "lm_cross_entropy", "load_scenario", "mse", "parse_scenario", "scenario_dir",
]  # fmt: skip
