"""Every private PyTorch interface the project uses, in one place, each called by keyword.

A torch release that moves or changes one of them is fixed here; each says what it relies on.
Checked on torch 2.4 to 2.14.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils import checkpoint as _checkpoint
from torch.utils import flop_counter as _flop_counter
from torch.utils import _pytree
from torch.utils import _python_dispatch

# A dispatch mode that sees every operator call (torch.utils._python_dispatch; public in spirit: the
# documented way to write one). `is_traceable_wrapper_subclass` tells a tensor subclass that wraps
# another (a DTensor around its local shard), whose memory is its inner tensor's.
TorchDispatchMode = _python_dispatch.TorchDispatchMode
is_wrapper_subclass = _python_dispatch.is_traceable_wrapper_subclass

# Flattening nested arguments into leaves and back, as torch's own checkpoint does.
tree_flatten, tree_unflatten, tree_map_only = _pytree.tree_flatten, _pytree.tree_unflatten, _pytree.tree_map_only

# FLOP formulas per operator overload packet (torch.utils.flop_counter's registry); most take shapes
# through `shape_wrapper`, whose code object tells them apart (they are called with shapes, cheaply).
flop_registry = _flop_counter.flop_registry
_SHAPE_FORMULA = _flop_counter.shape_wrapper(lambda: 0).__code__


def writes_inputs(func: torch._ops.OpOverload) -> bool:
    """Whether the operator writes into any of its arguments (an in-place or `out=` form): its schema
    marks one as written. An operator whose output merely shares an input's storage without it
    (`_unsafe_view`, as `linear` ends on a batch of sequences) writes nothing."""
    return func._schema.is_mutable


def takes_shapes(formula: Callable) -> bool:
    """Whether a FLOP formula of `flop_registry` wants shapes (`formula.__wrapped__(*shapes, out_shape=...)`)."""
    return formula.__code__ is _SHAPE_FORMULA


def checkpoint_generator(function: Callable, context_fn: Callable, *args: Any, **kwargs: Any) -> Iterator[None]:
    """torch.utils.checkpoint's non-reentrant checkpoint as a generator: everything between its first
    and its second `next()` runs under the checkpoint's saved-tensor hooks, and `function(*args,
    **kwargs)` is what backward replays. It relies on `_checkpoint_without_reentrant_generator(fn,
    preserve_rng_state, context_fn, determinism_check, debug, early_stop, *args, **kwargs)`, the engine
    of `checkpoint(use_reentrant=False)`, whose leading arguments are positional since the inputs follow:
    the RNG state is preserved, metadata checked, and the replay stops once it has what backward needs."""
    preserve_rng_state, determinism_check, debug, early_stop = True, "default", False, True
    return _checkpoint._checkpoint_without_reentrant_generator(
        function, preserve_rng_state, context_fn, determinism_check, debug, early_stop, *args, **kwargs
    )


@contextlib.contextmanager
def outside_checkpoint_modes() -> Iterator[None]:
    """Steps out of a selective checkpoint's dispatch mode, which expects only the forward's
    operators; modes below it (a memory tracker) still see what runs. Relies on the mode stack's
    `_get_current_dispatch_mode` and `_pop_mode_temporarily`, and on the caching modes being
    defined in torch.utils.checkpoint."""
    mode = _python_dispatch._get_current_dispatch_mode()
    if mode is not None and type(mode).__module__ == _checkpoint.__name__:
        with _python_dispatch._pop_mode_temporarily():
            yield
    else:
        yield


def autocast_caches(func: torch._ops.OpOverload, args: tuple, kwargs: dict, dtype: torch.dtype) -> bool:
    """Whether autocast to `dtype` keeps this call's result in its cache of casts until the outermost
    autocast context ends, however soon autograd lets it go: a cast of a float32 leaf that requires grad
    (a parameter) to `dtype` (relies on `cached_cast` in ATen's autocast_mode.cpp)."""
    if func is not torch.ops.aten._to_copy.default or kwargs.get("dtype") is not dtype:
        return False
    source = args[0]
    return source.dtype is torch.float32 and source.requires_grad and source.is_leaf and not source._is_view()


def draws_random(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> bool:
    """Whether an operator call draws random numbers: a seeded operator (its `nondeterministic_seeded`
    tag), unless its schema's dropout argument is 0."""
    if torch.Tag.nondeterministic_seeded not in func.tags:
        return False
    for i, arg in enumerate(func._schema.arguments):
        if arg.name in ("dropout_p", "dropout"):
            return bool(args[i] if i < len(args) else kwargs.get(arg.name, arg.default_value))
    return True


def compiled_draws_as_eager() -> bool:
    """Whether compiled code draws random numbers from torch's generator, as eager code does, and not
    its own (inductor's `fallback_random`)."""
    from torch._inductor import config

    return config.fallback_random


def in_backward() -> bool:
    """Whether the autograd engine is running a backward on this thread (its graph task id is set)."""
    return torch._C._current_graph_task_id() != -1


def fake_mode_of(tensors: list[torch.Tensor]):
    """The FakeTensorMode some tensors were made under, or None for real tensors (torch._guards)."""
    from torch._guards import detect_fake_mode

    return detect_fake_mode(tensors)


def fake_tensor_mode():
    """A new FakeTensorMode (torch._subclasses): tensors with shapes, dtypes and devices, and no memory."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


class CpuScratch:
    """The most bytes c10's CPU allocator holds during one operator call beyond what it holds when the
    call returns (or during a whole compiled step, whose kernels allocate outside the dispatcher),
    from the legacy autograd profiler's memory events (no kineto session: cheap, and quiet).
    Unavailable where another profiler is running, or where this torch lacks the API
    (`_enable_profiler_legacy` with a `ProfilerConfig` of state, report_input_shapes, profile_memory,
    with_stack, with_flops, with_modules, experimental config; `_disable_profiler_legacy`)."""

    def __init__(self) -> None:
        try:
            from torch._C._autograd import _disable_profiler_legacy, _enable_profiler_legacy, _ProfilerDisableOptions
            from torch.autograd.profiler import ProfilerConfig, ProfilerState, _ExperimentalConfig

            self._config = ProfilerConfig(ProfilerState.CPU, False, True, False, False, False, _ExperimentalConfig())
            self._options = _ProfilerDisableOptions(True, True)  # (clean up thread-local state, consolidate)
        except (ImportError, TypeError, AttributeError):
            self._config = None
            return
        self._enable, self._disable = _enable_profiler_legacy, _disable_profiler_legacy

    def available(self) -> bool:
        return self._config is not None

    def start(self) -> bool:
        """Whether it started: not where a profiler runs already (the caller's comes first)."""
        if torch._C._autograd._profiler_enabled():
            return False
        self._enable(self._config)
        return True

    def stop(self) -> int:
        """Ends what `start` began; the call's scratch in bytes."""
        peak, live = self.stop_peak()
        return peak - live

    def stop_peak(self) -> tuple[int, int]:
        """Ends what `start` began: the most bytes the allocator held beyond what it held at the start,
        and what it holds beyond that now."""
        events = [e for thread in self._disable(self._options) for e in thread if e.kind() == "memory_alloc"]
        live = peak = 0
        for e in sorted(events, key=lambda e: e.start_us()):  # (a stable sort: one thread's stay in order)
            live += e.cpu_memory_usage()  # negative for a free
            peak = max(peak, live)
        return peak, live


@contextlib.contextmanager
def watching_storage_resizes(resized: Callable[[torch.UntypedStorage], None]) -> Iterator[None]:
    """Calls `resized(storage)` after every `UntypedStorage.resize_` while active (FSDP2 grows and
    frees unsharded parameters' storages so). Relies on `resize_` being a Python-visible method of
    `torch.UntypedStorage` that can be replaced on the class and put back."""
    own = torch.UntypedStorage.__dict__.get("resize_")
    original = own or torch.UntypedStorage.resize_

    def resize_(storage: torch.UntypedStorage, size: int):
        out = original(storage, size)
        resized(storage)
        return out

    torch.UntypedStorage.resize_ = resize_
    try:
        yield
    finally:
        if own is None:
            del torch.UntypedStorage.resize_
        else:
            torch.UntypedStorage.resize_ = own


def is_compiled(model: torch.nn.Module) -> bool:
    """Whether `model` is what `torch.compile(module)` returns (torch._dynamo's OptimizedModule, whose
    `_orig_mod` is the module it compiles); a model cannot be one before Dynamo is imported."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


def original(model: torch.nn.Module) -> torch.nn.Module:
    """The module `torch.compile` compiled into `model`, or `model` itself."""
    return model._orig_mod if is_compiled(model) else model


def side_effects_once_under_checkpoint() -> contextlib.AbstractContextManager:
    """While on, Dynamo traces a checkpointed function that changes state outside it (Hugging Face's
    hub-kernel layers set and reset a context variable in every forward) into the graph, and runs
    the change once, in forward, as the step without a checkpoint does, instead of breaking the graph
    there: `torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint`."""
    return torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)


def forget_compiled_code() -> None:
    """Make every compiled function compile again at its next call (`torch.compiler.reset()`), where
    Dynamo has been loaded (before, nothing was compiled)."""
    if "torch._dynamo" in sys.modules:
        torch.compiler.reset()


def partitioning_backend(on_partition: Callable[[torch.fx.GraphModule, torch.fx.GraphModule], None]) -> Callable:
    """A torch.compile backend that partitions the joint graph as inductor does (its decompositions,
    `min_cut_rematerialization_partition(..., compiler="inductor")`), tells `on_partition(forward,
    backward)` of each pair of graphs, and runs them as they are (no code generated). Relies on
    torch._dynamo.backends.common.aot_autograd, functorch.compile.make_boxed_func and inductor's
    `select_decomp_table`."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    def partition(joint, inputs, **kwargs):
        forward, backward = min_cut_rematerialization_partition(joint, inputs, compiler="inductor", **kwargs)
        on_partition(forward, backward)
        return forward, backward

    def run(graph, example_inputs):
        return make_boxed_func(graph.forward)

    return aot_autograd(fw_compiler=run, bw_compiler=run, decompositions=select_decomp_table(), partition_fn=partition)


def saved_for_backward(forward: torch.fx.GraphModule, backward: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The nodes of a partitioned forward graph whose values its backward takes (its inputs other than
    the incoming gradients, `tangents_*`), each followed through views to the node that made its
    storage, once; the forward's own inputs (parameters, the batch) are left out."""
    taken = {n.name for n in backward.graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")}
    (output,) = [n for n in forward.graph.nodes if n.op == "output"]
    made: dict[torch.fx.Node, None] = {}
    for node in output.args[0]:
        if not isinstance(node, torch.fx.Node) or node.name not in taken:
            continue
        while isinstance(node.target, torch._ops.OpOverload) and node.target.is_view:
            node = node.args[0]
        if node.op != "placeholder":
            made[node] = None
    return list(made)
