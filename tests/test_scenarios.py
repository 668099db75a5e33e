"""The model zoo, the built-in scenarios and the scenario loader.

Run: ``python -m pytest tests/test_scenarios.py -q``
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch

from planner.step import autocast
from planner.scenario import ScenarioError, list_scenarios, load_scenario
from scenarios.zoo import ZOO, build_model

ZOO_SCENARIOS = ["gpt", "gpt7b", "lstm", "lstm_cell", "resnet", "unet", "vgg"]
TRANSFORMERS = ["bert_base", "hf_gpt2", "llama3_70b", "llama3_8b", "vit_b16"]  # Hugging Face models from configs
BUILT_IN = sorted(ZOO_SCENARIOS + TRANSFORMERS)

VALID = """\
model: resnet
args: {depth: 18, width: 8, num_classes: 10, small_input: true}
batch_size: 2
inputs: [{shape: [B, 3, 16, 16], dtype: float32}]
target: {shape: [B], dtype: int64, high: 10}
"""


def write(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_built_in_scenarios_are_listed() -> None:
    assert list_scenarios() == BUILT_IN


@pytest.mark.parametrize("name", BUILT_IN)
def test_small_variant_trains_one_step(name: str) -> None:
    workload = load_scenario(name).build("small", device="cpu", seed=0)
    before = [p.detach().clone() for p in workload.model.parameters()]
    loss = workload.step()
    assert loss.dim() == 0 and not loss.requires_grad
    assert math.isfinite(loss.item())
    assert all(p.grad is None for p in workload.model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, workload.model.parameters(), strict=True))


@pytest.mark.parametrize("name", BUILT_IN)
def test_full_variant_constructs_on_meta(name: str) -> None:
    scenario = load_scenario(name)
    workload = scenario.build("full", device="meta")
    full = scenario.variant("full")
    assert all(p.is_meta for p in workload.model.parameters())
    assert [tuple(x.shape) for x in workload.inputs] == [s.sizes(full.batch_size) for s in full.inputs]
    assert all(x.is_meta for x in workload.inputs)


def test_gpt7b_full_has_about_seven_billion_parameters() -> None:
    model = load_scenario("gpt7b").build_model("full", device="meta")
    assert 6.0e9 < sum(p.numel() for p in model.parameters()) < 7.5e9


@pytest.mark.parametrize(
    ("name", "shape"),
    [("unet", (4, 4, 64, 64)), ("lstm_cell", (32, 32, 512)), ("lstm", (32, 32, 512)), ("gpt", (4, 64, 512))],
)
def test_output_shapes(name: str, shape: tuple[int, ...]) -> None:
    workload = load_scenario(name).build(device="meta")
    assert tuple(workload.model(*workload.inputs, **workload.kwargs).shape) == shape


def test_gpt_accepts_attention_mask_keyword() -> None:
    model = build_model("gpt", vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32).eval()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 16, dtype=torch.bool)
    with torch.no_grad():
        plain, masked = model(idx), model(idx, attention_mask=mask)
        mask[1, :4] = False
        padded = model(idx, attention_mask=mask)
    torch.testing.assert_close(masked, plain)
    torch.testing.assert_close(padded[0], plain[0])
    assert not torch.allclose(padded[1, 4:], plain[1, 4:])
    assert torch.isfinite(padded).all()


def test_gpt_scenario_passes_keyword_inputs() -> None:
    workload = load_scenario("gpt").build()
    assert set(workload.kwargs) == {"attention_mask"}
    assert workload.kwargs["attention_mask"].dtype == torch.bool and workload.kwargs["attention_mask"].all()


def test_bfloat16_scenario_autocasts_and_keeps_float32_parameters() -> None:
    workload = load_scenario("gpt7b").build()
    assert workload.autocast_dtype == torch.bfloat16
    with autocast(workload.device, workload.autocast_dtype):
        output = workload.model(*workload.inputs, **workload.kwargs)
    assert output.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in workload.model.parameters())
    assert math.isfinite(workload.step().item())


def test_meta_workload_steps_without_autocast() -> None:
    workload = load_scenario("gpt7b").build(device="meta")
    assert workload.step().is_meta


def test_gpt_lm_head_is_tied_to_token_embedding() -> None:
    with torch.device("meta"):
        model = build_model("gpt", n_layer=1)
    assert model.lm_head.weight is model.wte.weight


def test_every_zoo_factory_constructs_on_meta_with_defaults() -> None:
    for name in ZOO:
        with torch.device("meta"):
            model = build_model(name)
        assert all(p.is_meta for p in model.parameters()), name


def test_build_model_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown zoo model 'alexnet'.*gpt.*resnet"):
        build_model("alexnet")


def test_build_is_deterministic_and_restores_global_rng() -> None:
    scenario = load_scenario("resnet")
    state = torch.get_rng_state()
    a, b = scenario.build(seed=3), scenario.build(seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(a.inputs[0], b.inputs[0]) and torch.equal(a.target, b.target)
    assert not torch.equal(scenario.build(seed=4).inputs[0], a.inputs[0])


def test_batch_size_override_and_loss_closure() -> None:
    workload = load_scenario("resnet").build(batch_size=3)
    assert workload.inputs[0].shape[0] == 3 and workload.target.shape == (3,)
    output = workload.model(*workload.inputs)
    torch.testing.assert_close(workload.loss_closure()(output), workload.loss_fn(output, workload.target))


def test_full_variant_merges_args_and_replaces_the_rest() -> None:
    scenario = load_scenario("resnet")
    assert scenario.small.args["depth"] == 18 and scenario.variant("full").args["depth"] == 50
    assert scenario.full is not None and scenario.full.batch_size == 256
    assert scenario.budget == "60%" and scenario.gpus == ("a100-40gb", "rtx4090")


def test_name_defaults_to_stem_and_path_loads(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, VALID, "mine.yaml"))
    assert scenario.name == "mine" and scenario.optimizer.name == "adamw"
    assert scenario.full is None and scenario.variants == ("small",)
    assert math.isfinite(scenario.build().step().item())


def test_user_factory_and_loss_by_import_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def tiny(width=4):\n    return torch.nn.Linear(3, width)\n"
        "def l2(output, target):\n    return (output - target).pow(2).mean()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write(
        tmp_path,
        """\
        model: my_models:tiny
        args: {width: 5}
        inputs: [{shape: [B, 3]}]
        target: {shape: [B, 5]}
        loss: my_models:l2
        optimizer: {name: sgd, lr: 1e-2, momentum: 0.9}
        """,
    )
    scenario = load_scenario(path)
    assert scenario.optimizer.kwargs == {"lr": 0.01, "momentum": 0.9}
    assert math.isfinite(scenario.build(batch_size=4).step().item())


# ---------------------------------------------------------------------------------------------- errors


def expect_error(tmp_path: Path, text: str, *fragments: str) -> str:
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, text))
    message = str(info.value)
    assert message.startswith("bad.yaml: ")
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_a_bad_scenario_is_one_line_and_status_2_on_the_command_line(tmp_path: Path, capsys) -> None:
    from planner.cli import main

    assert main(["profile", str(write(tmp_path, VALID.replace("batch_size: 2", "batch_size: -4")))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: bad.yaml: field 'batch_size'"), err


def test_missing_required_field(tmp_path: Path) -> None:
    text = "\n".join(line for line in VALID.splitlines() if not line.startswith("model:"))
    expect_error(tmp_path, text, "missing required field 'model'")


def test_inputs_positional_or_keyword_are_required(tmp_path: Path) -> None:
    text = "\n".join(line for line in VALID.splitlines() if not line.startswith("inputs:"))
    expect_error(tmp_path, text, "field 'inputs' (positional) or 'kwargs' (keyword)")


TRANSFORMERS_GPT2 = """model: transformers:GPT2LMHeadModel
config: {n_layer: 2, n_embd: 64, n_head: 2, n_positions: 64, vocab_size: 128}
batch_size: 2
kwargs:
  input_ids: {shape: [B, 32], dtype: int64, high: 128}
  labels: input_ids
"""


def test_a_transformers_model_from_a_config_needs_no_loss_and_no_inputs(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, TRANSFORMERS_GPT2, "gpt2.yaml"))
    workload = scenario.build()
    assert type(workload.model).__name__ == "GPT2LMHeadModel" and workload.model.config.n_layer == 2
    assert not workload.model.config.use_cache  # a training step keeps no key/value cache
    assert workload.kwargs["labels"] is workload.kwargs["input_ids"] and workload.inputs == ()
    assert torch.isfinite(workload.step())  # the model's own loss


def test_a_transformers_config_from_a_file_next_to_the_scenario(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_layer": 3, "n_embd": 64, "n_head": 2, "vocab_size": 128}')
    text = TRANSFORMERS_GPT2.replace("config: {n_layer: 2, n_embd: 64, n_head: 2, n_positions: 64, vocab_size: 128}", "config: config.json")
    assert load_scenario(write(tmp_path, text, "gpt2.yaml")).build().model.config.n_layer == 3


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (TRANSFORMERS_GPT2.replace("GPT2LMHeadModel", "NoSuchModel"), "transformers has no model class 'NoSuchModel'"),
        (TRANSFORMERS_GPT2.replace("n_layer:", "n_layers:"), "GPT2Config has no field 'n_layers'"),
        (TRANSFORMERS_GPT2.replace("labels: input_ids", "labels: inputs_ids"), "field 'kwargs.labels'"),
        (TRANSFORMERS_GPT2.replace("config: {", "config: no_such_file.json\nx: {"), "unknown field"),
    ],
)
def test_transformers_mistakes_are_named(tmp_path: Path, text: str, fragment: str) -> None:
    expect_error(tmp_path, text, fragment)


def test_wrong_type_names_field_and_expectation(tmp_path: Path) -> None:
    message = expect_error(tmp_path, VALID.replace("batch_size: 2", "batch_size: eight"))
    assert message == "bad.yaml: field 'batch_size' must be a positive integer, got 'eight'"


@pytest.mark.parametrize(
    ("old", "new", "fragments"),
    [
        ("dtype: float32", "dtype: float33", ["'inputs[0].dtype'", "float32", "float33"]),
        ("[B, 3, 16, 16]", "[B, 3, x, 16]", ["'inputs[0].shape'", "positive integers"]),
        ("high: 10", "hi: 10", ["unknown field 'target.hi'", "target.high"]),
        ("dtype: int64, high: 10", "dtype: int64", ["'target'", "needs 'high'"]),
        ("batch_size: 2", "batch_size: 2\nprecision: fp8", ["'precision'", "bfloat16"]),
        ("batch_size: 2", "batch_size: 2\nloss: hinge", ["'loss'", "lm_cross_entropy"]),
        ("batch_size: 2", "batch_size: 2\noptimizer: {name: lion}", ["'optimizer.name'", "adamw"]),
        ("batch_size: 2", "batch_size: 2\noptimizer: {name: sgd, momentun: 0.9}", ["'momentun'", "momentum"]),
        ("batch_size: 2", "batch_size: 2\nbudget: lots", ["'budget'", "60%"]),
        ("batch_size: 2", "batch_size: 2\nfull: {batch_size: 0}", ["'full.batch_size'", "positive integer"]),
        ("batch_size: 2", "batch_size: 2\nfull: {precision: bfloat16}", ["'full.precision'", "full.args"]),
        ("depth: 18", "dept: 18", ["'args'", "'dept'", "depth"]),
    ],
)
def test_invalid_values(tmp_path: Path, old: str, new: str, fragments: list[str]) -> None:
    assert old in VALID
    expect_error(tmp_path, VALID.replace(old, new), *fragments)


def test_unknown_top_level_field_lists_valid_ones(tmp_path: Path) -> None:
    expect_error(tmp_path, VALID + "epochs: 3\n", "unknown field 'epochs'", "batch_size", "optimizer")


def test_unknown_zoo_model_lists_valid_names(tmp_path: Path) -> None:
    expect_error(tmp_path, VALID.replace("model: resnet", "model: alexnet"), "'alexnet'", "gpt", "lstm_cell_lm")


def test_factory_module_that_does_not_import(tmp_path: Path) -> None:
    text = VALID.replace("model: resnet", "model: no_such_package.models:make")
    expect_error(tmp_path, text, "'model'", "'no_such_package.models'", "ModuleNotFoundError")


def test_factory_attribute_that_does_not_exist(tmp_path: Path) -> None:
    text = VALID.replace("model: resnet", "model: scenarios.zoo.resnet:resnet9000")
    expect_error(tmp_path, text, "'model'", "'scenarios.zoo.resnet'", "no attribute 'resnet9000'")


def test_target_required_by_built_in_loss(tmp_path: Path) -> None:
    text = "\n".join(line for line in VALID.splitlines() if not line.startswith("target:")) + "\nloss: mse\n"
    expect_error(tmp_path, text, "'target'", "mse")


def test_not_a_mapping_and_bad_yaml(tmp_path: Path) -> None:
    expect_error(tmp_path, "- just\n- a list\n", "must be a mapping")
    expect_error(tmp_path, "model: [unclosed\n", "not valid YAML")


def test_factory_rejecting_args_names_the_field(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, VALID.replace("depth: 18", "depth: 17")))
    with pytest.raises(ScenarioError, match=r"bad\.yaml: field 'args'.*depth"):
        scenario.build(device="meta")


def test_unknown_scenario_variant_and_batch_size() -> None:
    with pytest.raises(ScenarioError, match=r"unknown scenario 'resnet9'.*gpt7b.*vgg"):
        load_scenario("resnet9")
    with pytest.raises(ScenarioError, match="no such scenario file"):
        load_scenario("missing/dir/x.yaml")
    scenario = load_scenario("resnet")
    with pytest.raises(ScenarioError, match="no variant 'huge'; valid: small, full"):
        scenario.build("huge")
    with pytest.raises(ScenarioError, match="batch_size must be a positive integer"):
        scenario.build(batch_size=0)
