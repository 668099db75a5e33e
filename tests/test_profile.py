"""Profiling: what it records, that it predicts the measured peak, and that it changes nothing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import planner
from planner.core.graph import Category
from planner.scenario import list_scenarios, load_scenario
from planner.core.simulator import simulate
from planner.step import Batch

ZOO = [name for name in list_scenarios() if name != "gpt7b" and not load_scenario(name).model.startswith("transformers:")]


def profile_workload(w, **kwargs):
    return planner.profile(
        w.model, Batch(w.inputs, w.kwargs), loss_fn=w.loss_closure(), optimizer=w.optimizer,
        autocast_dtype=w.autocast_dtype, **kwargs,
    )


def measure_workload(w):
    return planner.measure(
        w.model, Batch(w.inputs, w.kwargs), loss_fn=w.loss_closure(), optimizer=w.optimizer,
        autocast_dtype=w.autocast_dtype, steps=1,
    )


@pytest.mark.parametrize("name", ZOO)
def test_predicted_peak_matches_measured(name):
    w = load_scenario(name).build()
    predicted = simulate(profile_workload(w)).peak_bytes
    measured = measure_workload(w).peak_bytes
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


@pytest.mark.parametrize("name", ["gpt", "resnet", "lstm_cell"])
def test_meta_profile_predicts_the_same_memory(name):
    real = profile_workload(load_scenario(name).build())
    meta = profile_workload(load_scenario(name).build(device="meta"))
    assert not meta.measured_times and real.measured_times
    assert [u.key for u in meta.units] == [u.key for u in real.units]
    assert [u.saved_bytes for u in meta.units] == [u.saved_bytes for u in real.units]
    assert simulate(meta).peak_bytes == simulate(without_scratch(real)).peak_bytes
    assert meta.step_ms > 0


def without_scratch(graph):
    """The profile with the operators' scratch left out: the meta device has none (a CPU's oneDNN kernels do)."""
    return dataclasses.replace(graph, blocks=tuple(dataclasses.replace(b, bytes=0) if b.scratch else b for b in graph.blocks))


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("name", ["resnet", "gpt"])  # batch norm and AdamW; dropout
def test_training_after_a_profile_is_the_training_without_it(name, warm):
    profiled, untouched = load_scenario(name).build(), load_scenario(name).build()
    if warm:  # the optimizer has state to preserve
        for w in (profiled, untouched):
            torch.manual_seed(2)
            w.step()
    torch.manual_seed(3)
    graph = profile_workload(profiled)
    losses = [profiled.step() for _ in range(2)]
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(losses, [untouched.step() for _ in range(2)]))
    expected = untouched.model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in profiled.model.state_dict().items())  # buffers included
    for a, b in zip(profiled.optimizer.state.values(), untouched.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert (graph.first_step_extra_bytes > 0) != warm  # AdamW creates its state at the first step


def test_units_of_a_module_called_several_times():
    w = load_scenario("lstm_cell").build()
    graph = profile_workload(w)
    cells = [u for u in graph.units if u.kind == "LSTMCell"]
    steps = w.inputs[0].shape[1]
    layers = len({u.name for u in cells})
    assert len(cells) == steps * layers
    assert {u.call for u in cells} == set(range(steps))
    assert len({u.key for u in graph.units}) == len(graph.units)


class Shared(nn.Module):
    """One block applied twice, Python control flow on data, and a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.block = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.out = nn.Linear(32, 4)

    def forward(self, x, *, scale: float = 1.0, mask=None):
        h = self.inp(x)
        for _ in range(2):
            h = self.block(h)
        if h.mean() > 0:  # data-dependent branch
            h = h * scale
        if mask is not None:
            h = h * mask
        return {"logits": self.out(h)}


def test_reused_block_control_flow_and_keyword_arguments():
    model = Shared()
    x, mask = torch.randn(8, 16), torch.ones(8, 32)
    graph = planner.profile(
        model, Batch((x,), {"scale": 0.5, "mask": mask}), loss_fn=lambda out: out["logits"].pow(2).mean()
    )
    assert [u.key for u in graph.units] == ["inp#0", "block#0", "block#1", "out#0"]
    assert graph.edges == ((0, 1), (1, 2), (2, 3))
    assert graph.is_chain()


def test_units_chosen_by_class_and_pattern():
    w = load_scenario("resnet").build()
    by_class = profile_workload(w, units=["BasicBlock"])
    by_pattern = profile_workload(w, units=["layer*.*"])
    assert [u.key for u in by_class.units] == [u.key for u in by_pattern.units]
    assert all(u.name.startswith("layer") for u in by_class.units)
    with pytest.raises(ValueError, match="no module"):
        profile_workload(w, units=["NoSuchLayer"])


class SavesViews(nn.Module):
    """Saves a tensor, a view of it and a parameter: only the tensor is new memory."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 64))
        self.scale = nn.Parameter(torch.ones(64))

    def forward(self, x):
        y = torch.relu(x * self.scale)  # mul saves x (the batch) and scale (a parameter); relu saves y
        z = y.view(-1) * y.view(-1)  # mul saves the views of y
        return (z.view(32, 64) @ self.w).sum()  # mm saves its input (new) and the parameter (not new)


def test_saved_bytes_counted_once_per_storage_and_never_for_parameters():
    model = nn.Sequential(SavesViews())
    graph = planner.profile(model, torch.randn(32, 64))
    (unit,) = graph.units
    y_bytes = 32 * 64 * 4
    assert unit.saved_bytes == 2 * y_bytes  # y, and the product z that mm saves
    activations = [b for b in graph.blocks if b.category is Category.ACTIVATIONS and b.savers]
    assert sum(b.bytes for b in activations) == 2 * y_bytes


def test_skip_connections_are_edges():
    graph = profile_workload(load_scenario("unet").build())
    dag = graph.dag()
    assert any(v - u > 2 for u, v in dag.edges)  # a long skip from encoder to decoder
    assert not graph.is_chain()
    assert profile_workload(load_scenario("resnet").build()).is_chain()


def test_fixed_memory_and_first_step():
    w = load_scenario("gpt").build()
    graph = profile_workload(w)
    params = sum(p.numel() * p.element_size() for p in w.model.parameters())
    assert graph.fixed.parameters == params  # the tied head weight counted once
    n_tensors = len(list(w.model.parameters()))
    # AdamW keeps two moments per parameter and a step count per tensor, all made by the first step.
    assert 2 * params <= graph.fixed.optimizer <= 2 * params + 8 * n_tensors
    assert graph.first_step_extra_bytes == graph.fixed.optimizer
    assert graph.fixed.inputs == sum(t.numel() * t.element_size() for t in [*w.inputs, *w.kwargs.values()])


def test_batch_the_model_rejects_shows_its_error():
    model = nn.Sequential(nn.Linear(16, 4))
    with pytest.raises(RuntimeError, match="example batch.*(mat1 and mat2|shapes)"):
        planner.profile(model, torch.randn(8, 5))


def test_empty_model_is_refused():
    with pytest.raises(ValueError, match="no tensor that requires grad"):
        planner.profile(nn.Sequential(), torch.randn(4, 4))


def test_random_operators_are_known_by_their_dropout():
    from planner.torch_internals import draws_random

    aten, q = torch.ops.aten, torch.empty(1, 1, 4, 4)
    efficient = aten._scaled_dot_product_efficient_attention.default
    assert draws_random(efficient, (q, q, q, None, True), {"dropout_p": 0.1})
    assert draws_random(efficient, (q, q, q, None, True, 0.1), {})
    assert not draws_random(efficient, (q, q, q, None, True), {})  # dropout_p defaults to 0
    assert draws_random(aten.native_dropout.default, (q, 0.5, True), {})
    assert not draws_random(aten.mm.default, (q[0, 0], q[0, 0]), {})


def test_a_mask_read_before_it_is_final_is_never_kept():
    """A dropout mask written after an operator read it cannot be kept: the replay would hand that
    reader the mask's last state. A mask read only once it is final can."""
    from solvers.problem import random_draws

    class Noisy(nn.Module):
        def __init__(self, early: bool) -> None:
            super().__init__()
            self.linear, self.early = nn.Linear(64, 64), early

        def forward(self, x):
            h = self.linear(x)
            mask = torch.empty_like(h).bernoulli_(0.5)
            seen = mask.mean() if self.early else 0
            mask.div_(0.5)
            return torch.tanh(h * mask + seen)

    graph = planner.profile(nn.Sequential(Noisy(early=True), Noisy(early=False)), torch.randn(32, 64))
    draws = random_draws(graph)
    assert [graph.units[u].name for u in draws] == ["0", "1"]
    assert not draws[0] and {k.op for k in draws[1]} == {"aten.empty_like", "aten.bernoulli_", "aten.div_"}


def test_no_plan_replays_random_draws_it_cannot_repeat():
    """A recomputed region keeps saved all the calls that draw random numbers in it or none (a replay
    drawing some would draw the rest from another place in the stream), and never holds a unit that
    draws from cuDNN's own state."""
    from dataclasses import replace

    from planner.core.actions import Action, Kept
    from solvers import build_problem
    from solvers.problem import candidate_choices

    w = load_scenario("gpt").build()
    graph = planner.profile(w.model, w.batch, loss_fn=w.loss_closure(), optimizer=w.optimizer)
    block = next(u for u in graph.units if any(op.name == "aten.bmm" for op in u.ops))
    ops = tuple(replace(op, random=True) if op.name == "aten.bmm" else op for op in block.ops)
    units = tuple(replace(u, ops=ops) if u is block else u for u in graph.units)
    regions = [c for c in candidate_choices(replace(graph, units=units), 8) if block.index in c.units and c.save_ops]
    kept = [(c.save_ops, {Kept(u, op.name, op.call) for u in c.units for op in units[u].ops if op.random}) for c in regions]
    assert all(not (saved & draws) or draws <= saved for saved, draws in kept)
    assert any(draws <= saved for saved, draws in kept) and any(not saved & draws for saved, draws in kept)

    units = tuple(replace(u, replayable=False) if u is block else u for u in graph.units)
    options = build_problem(replace(graph, units=units), 0).options
    assert not any(o.choice.action is Action.RECOMPUTE and block.index in o.choice.units for o in options)
    assert any(o.choice.action is Action.OFFLOAD and o.choice.units == (block.index,) for o in options)


def test_the_survey_credits_a_saved_storage_to_the_module_that_made_it_when_its_key_was_another_s(monkeypatch):
    """A storage's key is its object's id, which a storage made later may take once the first is gone:
    the later storage is credited to the module that made it, not to the one that made the first (the
    survey credited some of Swin's last stage's saved storages to earlier modules and kept the stage one
    unit)."""
    from planner.profiling import survey

    rec = survey._Survey(torch.device("cpu"), [])
    rec.call_names = ["stem", "block"]
    rec.stack = [0]
    rec.on_alloc(7, 1 << 20)  # the stem's scratch, freed before the block runs
    rec.on_free(7)
    rec.stack = [1]
    rec.on_alloc(7, 1 << 10)  # the block's output, whose storage took the scratch's id
    monkeypatch.setattr(survey, "storage_key", lambda t: 7)
    rec.pack(torch.zeros(1))
    tree = {name: survey.ModuleShare(name, "Module", (), False, False, 0, 0, 0) for name in rec.call_names}
    shares, total = rec.shares(tree)
    assert (shares["stem"].saved_bytes, shares["block"].saved_bytes, total) == (0, 1 << 10, 1 << 10)
