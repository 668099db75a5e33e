"""`planner.auto` on models the project did not write, with no units named: the budget holds in the
loop as a user writes it, the prediction matches it, and training is bit-identical."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import planner
from planner import planning
from planner.core.actions import Action, Choice, Kept, Semantics
from planner.core.gpus import roofline_for
from planner.core.graph import Category
from planner.core.plan import Plan
from planner.execution import ReplayFailed
from planner.planning import BudgetExceeded, InfeasibleBudget, hold
from planner.step import preserved
from planner.tracking import StorageTracker, tensors_in

pytest.importorskip("transformers")

from solvers.problem import random_draws  # noqa: E402
from tests.plans import plan_of  # noqa: E402
from tests.third_party import LOSSES, MODELS, VOCAB  # noqa: E402


def build(name: str):
    """The model (the same weights at every call), its batch and an optimizer."""
    torch.manual_seed(0)
    model, batch = MODELS[name]()
    return model, batch, torch.optim.AdamW(model.parameters(), lr=1e-3)


def forward_loss(model, batch, loss_fn):
    output = model(**batch) if isinstance(batch, dict) else model(*batch)
    return output.loss if loss_fn is None else loss_fn(output)


def user_step(model, batch, optimizer, loss_fn=None) -> torch.Tensor:
    """One step as a user's loop writes it: `loss = model(**batch).loss`, so the output is gone before backward."""
    loss = forward_loss(model, batch, loss_fn)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def user_loop_peak(model, batch, optimizer, loss_fn=None) -> int:
    """The peak of a steady-state step of the user's loop (model and optimizer restored afterwards):
    the storages that existed before it, plus the most that were alive at once during it."""
    with preserved(model, optimizer):
        user_step(model, batch, optimizer, loss_fn)  # AdamW's state exists from here on
        existing = [*model.parameters(), *model.buffers(), *tensors_in(optimizer.state), *tensors_in(batch)]
        before = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in existing}
        tracker = StorageTracker("cpu", existing)
        with tracker:
            user_step(model, batch, optimizer, loss_fn)
        tracker.stop_tracking()
    return sum(before.values()) + tracker.peak_bytes


def half_the_activations(graph, unplanned_bytes: int) -> int:
    """Fixed memory (parameters, gradients, optimizer state, buffers, the batch) + 50% of the rest."""
    grads = sum(b.bytes for b in graph.blocks if b.category is Category.GRADIENTS)
    fixed = graph.fixed.total + grads
    return int(fixed + 0.5 * (unplanned_bytes - fixed))


def train(model, batch, optimizer, loss_fn, steps: int = 2):
    """Losses, gradients and the final state of `steps` steps of the user's loop."""
    torch.manual_seed(1)
    losses, grads = [], []
    for _ in range(steps):
        loss = forward_loss(model, batch, loss_fn)
        loss.backward()
        grads.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses, grads, {k: v.clone() for k, v in model.state_dict().items()}


def assert_identical(a, b) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
    for step_a, step_b in zip(a[1], b[1]):
        assert all(x is y is None or torch.equal(x, y) for x, y in zip(step_a, step_b))
    assert all(torch.equal(a[2][k], b[2][k]) for k in b[2])  # buffers included


OUT_OF_REACH = {"resnet"}  # its stem's batch-norm backward, at the end of the step, needs its tensors at once


@pytest.mark.parametrize("name", sorted(set(MODELS) - OUT_OF_REACH))
def test_auto_holds_half_the_activations_bit_identically(name):
    loss_fn = LOSSES.get(name)
    model, batch, optimizer = build(name)
    graph = planner.profile(model, batch, loss_fn=loss_fn, optimizer=optimizer)
    assert len(graph.units) > 4, [u.key for u in graph.units]
    unplanned = user_loop_peak(model, batch, optimizer, loss_fn)
    assert abs(planner.simulate(graph).peak_bytes - unplanned) <= 0.02 * unplanned
    budget = half_the_activations(graph, unplanned)

    handle = planner.auto(model, batch, budget, loss_fn=loss_fn, optimizer=optimizer)
    assert handle.measured.peak_bytes <= budget
    measured = user_loop_peak(model, batch, optimizer, loss_fn)
    assert measured <= budget
    assert abs(handle.plan.predicted_peak_bytes - measured) <= 0.02 * measured

    planned = train(model, batch, optimizer, loss_fn)
    handle.remove()
    reference, _, reference_optimizer = build(name)
    assert_identical(planned, train(reference, batch, reference_optimizer, loss_fn))


@contextlib.contextmanager
def checkpointed(model, names):
    """torch.utils.checkpoint around each named module, as a user writes it by hand."""
    modules = dict(model.named_modules())
    for name in names:
        forward = modules[name].forward
        modules[name].forward = functools.partial(checkpoint, forward, use_reentrant=False)
    try:
        yield
    finally:
        for name in names:
            del modules[name].forward


@pytest.mark.parametrize("name", sorted(OUT_OF_REACH))
def test_a_budget_out_of_reach_is_refused_with_the_smallest_and_no_hand_checkpointing_does_better(name):
    model, batch, optimizer = build(name)
    graph = planner.profile(model, batch, optimizer=optimizer)
    unplanned = user_loop_peak(model, batch, optimizer)
    with pytest.raises(InfeasibleBudget, match="give a budget of at least") as refused:
        planner.auto(model, batch, half_the_activations(graph, unplanned), optimizer=optimizer)
    smallest = refused.value.smallest_bytes
    handle = planner.auto(model, batch, smallest, optimizer=optimizer)
    assert user_loop_peak(model, batch, optimizer) <= smallest
    handle.remove()
    leaves = [n for n, m in model.named_modules() if not list(m.children()) and list(m.parameters())]
    for names in ([u.name for u in graph.units], leaves):  # the planner's units, or every layer with weights
        with checkpointed(model, names):
            assert user_loop_peak(model, batch, optimizer) >= smallest


def test_units_are_the_blocks_and_the_parts_around_them():
    model, batch, optimizer = build("gpt2")
    names = [u.name for u in planner.profile(model, batch, optimizer=optimizer).units]
    assert [n for n in names if n.startswith("transformer.h.")] == [f"transformer.h.{i}" for i in range(4)]
    assert {"transformer.wte", "transformer.ln_f", "lm_head"} <= set(names)
    model, batch, optimizer = build("convnext")  # a stage of blocks is split into its blocks
    names = [u.name for u in planner.profile(model, batch, optimizer=optimizer).units]
    assert "convnext.encoder.stages.0.layers.1" in names and "convnext.encoder.stages.0" not in names
    model, batch, optimizer = build("swin")  # a stage that is itself a declared block, of declared blocks
    names = [u.name for u in planner.profile(model, batch, optimizer=optimizer).units]
    assert "swin.encoder.layers.0.blocks.1" in names and "swin.encoder.layers.0" not in names


def test_a_key_value_cache_is_refused_before_training_with_a_message():
    model, batch, optimizer = build("gpt2")
    model.config.use_cache = True
    graph = planner.profile(model, batch, optimizer=optimizer)
    assert all(u.writes_state for u in graph.units if u.name.startswith("transformer.h."))
    unplanned = planner.simulate(graph).peak_bytes
    with pytest.raises(InfeasibleBudget, match="use_cache = False"):
        planner.auto(model, batch, half_the_activations(graph, unplanned), optimizer=optimizer)
    model.config.use_cache = False
    planner.auto(model, batch, half_the_activations(graph, unplanned), optimizer=optimizer).remove()


class Block(nn.Module):
    """A residual MLP block. One that leaks keeps memory in a replay that its first run never
    allocated; one that does not takes time no replay should repeat (work without gradients), so
    that a plan recomputes the leaking blocks first."""

    def __init__(self, width: int, leaks: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 4 * width)
        self.back = nn.Linear(4 * width, width)
        self.register_buffer("work", torch.randn(width, 4 * width))
        self.leaks = leaks
        self._kept = None

    def forward(self, x):
        if self.leaks and torch._C._current_graph_task_id() != -1:
            self._kept = torch.cat([x] * 8)
        if not self.leaks:
            with torch.no_grad():
                for _ in range(8):
                    torch.mm(x, self.work)
        return x + self.back(torch.relu(self.fc(x)))


def test_replays_that_allocate_unseen_memory_are_caught_by_the_first_step(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(*(Block(64, leaks=i % 2 == 1) for i in range(6)))
    x = torch.randn(512, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    graph = planner.profile(model, x, optimizer=optimizer)
    budget = int(0.8 * planner.simulate(graph).peak_bytes)
    unchecked = planner.auto(model, x, budget, optimizer=optimizer, check=False)
    assert planner.measure(model, x, optimizer=optimizer, steps=0).peak_bytes > budget  # the prediction misses it
    unchecked.remove()
    with caplog.at_level(logging.WARNING, logger="planner.planning"):
        handle = planner.auto(model, x, budget, optimizer=optimizer)
    assert "left memory behind" in caplog.text
    assert handle.measured.peak_bytes <= budget
    assert planner.measure(model, x, optimizer=optimizer, steps=0).peak_bytes <= budget
    assert all(not model[u].leaks for c in handle.plan.choices for u in c.units)
    handle.remove()
    with pytest.raises((BudgetExceeded, InfeasibleBudget), match="left memory behind"):
        planner.auto(model, x, int(0.7 * planner.simulate(graph).peak_bytes), optimizer=optimizer)


def test_a_replay_that_runs_other_operators_is_named_and_planned_around(caplog):
    """A selective checkpoint refuses a replay that runs operators its forward did not: the error names
    the unit, and the first-step check plans again without recomputing it."""
    torch.manual_seed(0)
    model = nn.Sequential(*(Block(64, leaks=i == 1) for i in range(4)))
    x = torch.randn(512, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    graph = planner.profile(model, x, optimizer=optimizer)
    plan = plan_of(graph, Choice(Action.RECOMPUTE, (1,), frozenset({Kept(1, "aten.addmm", 0)})))
    with planner.apply(model, plan), pytest.raises(ReplayFailed, match="replay of 1#0"):
        planner.measure(model, x, optimizer=optimizer, steps=0)
    with caplog.at_level(logging.WARNING, logger="planner.planning"):
        handle = hold(model, graph, plan, x, optimizer=optimizer)
    assert "failed in the replay of 1#0" in caplog.text
    assert handle.measured.peak_bytes <= plan.budget_bytes
    assert all(1 not in c.units for c in handle.plan.choices if c.action is Action.RECOMPUTE)
    handle.remove()


def test_where_the_high_water_mark_counts_the_checked_step_keeps_room_for_the_heap(monkeypatch, caplog):
    """In a process whose C library gives freed memory back, the checked step counts the rise of the
    high-water mark with HEAP_SLACK_BYTES more: a step measured within that of the budget is planned again
    with the excess kept free."""
    torch.manual_seed(0)
    model = nn.Sequential(*(Block(64) for _ in range(4)))
    x = torch.randn(512, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    graph = planner.profile(model, x, optimizer=optimizer)
    plan = planner.plan(graph, int(0.8 * planner.simulate(graph).peak_bytes))
    heap = plan.budget_bytes - plan.predicted_peak_bytes - planning.HEAP_SLACK_BYTES // 2  # beside live storages
    measure = planning.measure
    monkeypatch.setattr(planning, "RETURNS_FREED_MEMORY", True)
    monkeypatch.setattr(planning, "measure", lambda *args, **kwargs: dataclasses.replace(
        m := measure(*args, **kwargs), process_peak_bytes=m.peak_bytes + heap))
    with caplog.at_level(logging.WARNING, logger="planner.planning"):
        handle = hold(model, graph, plan, x, optimizer=optimizer)
    assert "counted with 256 KiB for the heap" in caplog.text
    assert handle.measured.process_peak_bytes + planning.HEAP_SLACK_BYTES <= plan.budget_bytes
    handle.remove()


@pytest.mark.parametrize("name, recomputed", [("llama", 3), ("t5", 4)])
def test_under_autocast_the_casts_of_a_recomputed_layers_weights_live_until_the_forward_ends(name, recomputed):
    """Autocast keeps its casts of parameters in a cache until its context ends, whether autograd saves
    them or not: recomputing a layer frees its weights' casts only from then on."""
    model, batch, optimizer = build(name)
    step = {"optimizer": optimizer, "autocast_dtype": torch.bfloat16}
    graph = planner.profile(model, batch, **step)
    blocks = ("LlamaDecoderLayer", "T5Block")
    layers = [u.index for u in graph.units if type(model.get_submodule(u.name)).__name__ in blocks]
    plan = plan_of(graph, *(Choice(Action.RECOMPUTE, (u,)) for u in layers[:recomputed]))
    with planner.apply(model, plan):
        assert planner.measure(model, batch, steps=0, **step).peak_bytes == plan.predicted_peak_bytes


def accumulating_step(model, micro_batches, optimizer, scaler):
    """A user's own step: gradients accumulated over micro-batches, the loss scaled by a GradScaler."""

    def step():
        for micro in micro_batches:
            loss = model(**micro).loss / len(micro_batches)
            scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


@pytest.mark.parametrize("name", ["gpt2", "llama"])  # LLaMA's first operator runs in its first unit
def test_a_step_of_the_users_own_is_planned_as_it_runs(name):
    model, batch, optimizer = build(name)
    micro = [{k: v[i::2] for k, v in batch.items()} for i in range(2)]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    step = accumulating_step(model, micro, optimizer, scaler)
    graph = planner.profile(model, step=step, optimizer=optimizer)
    assert graph.forwards == 2
    assert len(graph.units) == 2 * len({u.name for u in graph.units})  # each unit twice: one per micro-batch
    unplanned = planner.measure(model, step=step, optimizer=optimizer, steps=0).peak_bytes
    assert abs(planner.simulate(graph).peak_bytes - unplanned) <= 0.02 * unplanned
    handle = planner.auto(model, budget=half_the_activations(graph, unplanned), step=step, optimizer=optimizer)
    measured = planner.measure(model, step=step, optimizer=optimizer, steps=0).peak_bytes
    assert measured <= handle.plan.budget_bytes
    assert abs(handle.plan.predicted_peak_bytes - measured) <= 0.02 * measured

    def run(model, optimizer, scaler):
        torch.manual_seed(1)
        accumulating_step(model, micro, optimizer, scaler)()
        return {k: v.clone() for k, v in model.state_dict().items()}

    planned = run(model, optimizer, scaler)
    handle.remove()
    reference, _, reference_optimizer = build(name)
    expected = run(reference, reference_optimizer, torch.amp.GradScaler("cpu", init_scale=1024.0))
    assert all(torch.equal(planned[k], expected[k]) for k in expected)


def bart_dropping_layers():
    """BART whose encoder and decoder skip each layer with probability 0.3 in training (LayerDrop)."""
    import transformers as hf

    torch.manual_seed(0)
    config = hf.BartConfig(d_model=64, encoder_ffn_dim=256, decoder_ffn_dim=256, encoder_layers=4, decoder_layers=4,
                           encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=VOCAB, use_cache=False,
                           decoder_start_token_id=2, forced_eos_token_id=None, encoder_layerdrop=0.3,
                           decoder_layerdrop=0.3)
    model = hf.BartForConditionalGeneration(config)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def test_layers_skipped_at_random_are_planned_for_the_step_that_runs_them_all():
    """LayerDrop: the profile and the checked step run every layer (the most memory a step can take),
    the plan recomputes regions of one layer, and steps that skip some of them train as without it."""
    model, optimizer = bart_dropping_layers()
    batch = {"input_ids": torch.randint(0, VOCAB, (4, 64)), "labels": torch.randint(3, VOCAB, (4, 32))}
    graph = planner.profile(model, batch, optimizer=optimizer)
    assert graph.drops_layers
    assert {f"model.encoder.layers.{i}#0" for i in range(4)} <= {u.key for u in graph.units}
    every_layer = planner.measure(model, batch, optimizer=optimizer, steps=0).peak_bytes
    assert abs(planner.simulate(graph).peak_bytes - every_layer) <= 0.02 * every_layer
    handle = planner.auto(model, batch, half_the_activations(graph, every_layer), optimizer=optimizer)
    assert all(len(c.units) == 1 for c in handle.plan.choices)
    assert handle.measured.peak_bytes <= handle.plan.budget_bytes

    ran = []
    hooks = [layer.register_forward_hook(lambda *_: ran.append(1)) for layer in model.model.encoder.layers]

    planned = train(model, batch, optimizer, None, steps=4)
    handle.remove()
    for hook in hooks:
        hook.remove()
    assert len(ran) < 4 * 4  # some step skipped some layer
    reference, reference_optimizer = bart_dropping_layers()
    assert_identical(planned, train(reference, batch, reference_optimizer, None, steps=4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_on_cuda_the_reserved_peak_of_planned_steps_holds_the_budget(name):
    model, batch, _ = build(name)
    model.cuda()
    batch = {k: v.cuda() for k, v in batch.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    handle = planner.auto(model, batch, "70%", optimizer=optimizer)
    measured = planner.measure(model, batch, optimizer=optimizer, steps=0)  # the allocator's cache emptied first
    assert measured.reserved_bytes <= handle.plan.budget_bytes
    handle.remove()


def test_a_trainer_holds_its_budget_with_the_plan(tmp_path):
    """The Trainer's own activation checkpointing, asked for, gives way to the plan."""
    import transformers as hf

    model, batch, _ = build("gpt2")
    rows = [{"input_ids": ids, "labels": ids} for ids in batch["input_ids"]] * 3
    args = hf.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, use_cpu=True,
                                report_to=[], save_strategy="no", logging_strategy="no", dataloader_num_workers=0,
                                activation_checkpointing=True)
    trainer = hf.Trainer(model=model, args=args, train_dataset=rows)
    handle = planner.plan_trainer(trainer, "60%")
    assert handle.plan.choices and handle.measured.peak_bytes <= handle.plan.budget_bytes
    assert not trainer.args.activation_checkpointing
    existing = [*model.parameters(), *model.buffers()]
    tracker = StorageTracker("cpu", existing)
    with tracker:
        trainer.train()
    tracker.stop_tracking()
    before = sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in existing}.values())
    assert before + tracker.peak_bytes <= handle.plan.budget_bytes
    assert "forward" not in vars(model.transformer.h[0])  # the plan came off when training ended


def test_a_model_checkpointing_its_own_layers_is_planned_without_it(caplog):
    model, batch, optimizer = build("gpt2")
    unplanned = planner.simulate(planner.profile(model, batch, optimizer=optimizer)).peak_bytes
    model.activation_checkpointing_enable()
    with caplog.at_level(logging.WARNING, logger="planner.planning"):
        handle = planner.auto(model, batch, "60%", optimizer=optimizer)
    assert "checkpoints its layers itself" in caplog.text
    assert not model.is_activation_checkpointing
    assert handle.plan.unplanned_peak_bytes == unplanned and handle.measured.peak_bytes <= handle.plan.budget_bytes


def test_a_region_keeping_its_random_draws_replays_none_of_them():
    """A region may keep its random draws saved: every dropout's mask, with the calls that made and
    wrote it (`empty_like`, `bernoulli_`, `div_`). Its replay then draws nothing, and training is
    bit-identical, at the predicted peak."""
    model, batch, optimizer = build("gpt2")
    graph = planner.profile(model, batch, optimizer=optimizer)
    draws = random_draws(graph)
    blocks = [u.index for u in graph.units if u.kind == "GPT2Block"]
    assert all({"aten.empty_like", "aten.bernoulli_", "aten.div_"} <= {k.op for k in draws[u]} for u in blocks)
    plans = [plan_of(graph, *(Choice(Action.RECOMPUTE, (u,), kept.get(u, frozenset())) for u in blocks))
             for kept in ({}, draws)]
    assert plans[1].predicted_peak_bytes > plans[0].predicted_peak_bytes
    for plan, replayed in zip(plans, (len(blocks) * 3, 0)):
        with planner.apply(model, plan):
            measured = user_loop_peak(model, batch, optimizer)
            with _counting(torch.ops.aten.bernoulli_) as calls:
                forward_loss(model, batch, None).backward()
            model.zero_grad(set_to_none=True)
        assert abs(measured - plan.predicted_peak_bytes) <= 0.01 * measured
        assert calls["backward"] == replayed

    with planner.apply(model, plans[1]):
        planned = train(model, batch, optimizer, None)
    reference, _, reference_optimizer = build("gpt2")
    assert_identical(planned, train(reference, batch, reference_optimizer, None))


@contextlib.contextmanager
def _counting(packet):
    """Counts the calls of an operator (an overload packet) while it runs, as `calls["backward"]`: the
    calls inside `loss.backward()` once the forward is over, counted from where `backward` is called."""
    calls = {"forward": 0, "backward": 0}

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is packet:
                calls["backward" if torch._C._current_graph_task_id() != -1 else "forward"] += 1
            return func(*args, **(kwargs or {}))

    with Counting():
        yield calls


def test_a_region_keeps_saved_the_operator_calls_its_plan_names():
    """A plan names operator calls (`aten.addmm#2`: a unit's third `addmm`), and a recomputed region
    keeps those calls' outputs saved and no other call of the operator: as predicted, through the plan
    file, and bit-identically."""
    model, batch, optimizer = build("gpt2")
    graph = planner.profile(model, batch, optimizer=optimizer)
    blocks = tuple(u.index for u in graph.units if u.kind == "GPT2Block")[:2]
    assert all(sum(op.name == "aten.addmm" for op in graph.units[u].ops) == 4 for u in blocks)
    peaks = []
    for call in (2, None):  # the MLP's first projection, or every projection
        plan = plan_of(graph, Choice(Action.RECOMPUTE, blocks, frozenset(Kept(u, "aten.addmm", call) for u in blocks)))
        assert Plan.from_dict(plan.to_dict()) == plan
        with planner.apply(model, Plan.from_dict(plan.to_dict())):
            measured = user_loop_peak(model, batch, optimizer)
        assert abs(measured - plan.predicted_peak_bytes) <= 0.01 * measured
        peaks.append(measured)
    assert peaks[0] < peaks[1]  # the other three projections were recomputed

    with planner.apply(model, plan):
        planned = train(model, batch, optimizer, None)
    reference, _, reference_optimizer = build("gpt2")
    assert_identical(planned, train(reference, batch, reference_optimizer, None))


def test_a_replay_is_charged_for_the_calls_it_runs_up_to_where_it_stops():
    """A checkpointed LLaMA layer's replay stops at the last tensor the layer saved, the input of its
    down projection: the time model charges the replay the calls torch runs again, not the projection
    nor the residual sum after it."""
    model, batch, optimizer = build("llama")
    graph = planner.profile(model, batch, optimizer=optimizer)
    layer = next(u for u in graph.units if u.kind == "LlamaDecoderLayer")
    replayed = []

    class Replay(TorchDispatchMode):  # the context the checkpoint replays the layer in
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is not torch.ops.aten.detach:  # the checkpoint's own, of what it saves
                replayed.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    module = dict(model.named_modules())[layer.name]
    module.forward = functools.partial(checkpoint, module.forward, use_reentrant=False,
                                       context_fn=lambda: (contextlib.nullcontext(), Replay()))
    with preserved(model, optimizer):
        forward_loss(model, batch, None).backward()
    del module.forward
    names = [op.name for op in layer.ops]
    rest = names[len(replayed):]  # the down projection, a view of it, and the residual sum
    assert replayed == names[: len(replayed)] and rest[0] == "aten.mm" and rest[-1] == "aten.add"

    roofline = dataclasses.replace(roofline_for(graph), mechanism=None)  # the replay alone
    effect = Semantics(graph, roofline).effect(Choice(Action.RECOMPUTE, (layer.index,)))
    assert effect.extra_ms == pytest.approx(sum(op.ms for op in layer.ops[: len(replayed)]))


def test_a_backward_that_runs_a_graph_of_its_own_and_retains_it_is_predicted():
    """Reformer's reversible layers save nothing: their backward runs each layer again and backpropagates
    through it with `retain_graph=True`. The profile's saved-tensor hooks kept each saved output's own
    node alive there, a cycle that only Python's collector breaks (predicted 40.4 MiB, 26.6 measured)."""
    import transformers as hf

    config = hf.ReformerConfig(
        hidden_size=128, feed_forward_size=256, num_attention_heads=4, attention_head_size=32, is_decoder=True,
        attn_layers=["local"] * 4, axial_pos_shape=(8, 16), axial_pos_embds_dim=(64, 64), max_position_embeddings=128,
        hidden_dropout_prob=0.0, vocab_size=VOCAB, pad_token_id=0, eos_token_id=0, use_cache=False)
    torch.manual_seed(0)
    model = hf.ReformerModelWithLMHead(config)
    tokens = torch.randint(0, VOCAB, (4, 128))
    batch, optimizer = {"input_ids": tokens, "labels": tokens}, torch.optim.AdamW(model.parameters(), lr=1e-3)
    graph = planner.profile(model, batch, optimizer=optimizer)
    assert planner.simulate(graph).peak_bytes == user_loop_peak(model, batch, optimizer)
