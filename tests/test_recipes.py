"""The published recipes: the table in docs/recipes.md, explicit arguments winning, the CLI, and a training step each."""

import ast
import copy
import dataclasses
import re
from importlib.resources import files

import pytest
from doc_blocks import doc_block, doc_files
from tiny_setup import last_logged

from trl_alp import ALPConfig
from trl_alp.cli.main import main
from trl_alp.recipes import RECIPES

CPU = {"bf16": False, "use_cpu": True, "report_to": "none"}


def docs_preset_table() -> dict[str, dict[str, object]]:
    """``{preset: {field: value}}`` from the flag table of docs/recipes.md (backticked literals in the preset columns)."""
    lines = doc_block("recipes", "table").splitlines()
    rows = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))] for line in lines]
    header, rows = rows[0], rows[2:]
    columns = {name: header.index(f"`{name}`") for name in RECIPES}
    table: dict[str, dict[str, object]] = {name: {} for name in RECIPES}
    for row in rows:
        field = re.fullmatch(r"`(\w+)`", row[header.index("`ALPConfig` field")])
        for name, column in columns.items():
            literal = re.fullmatch(r"`(.+)`", row[column])
            if literal:
                assert field, f"a preset value without a single ALPConfig field: {row}"
                table[name][field.group(1)] = ast.literal_eval(literal.group(1))
    return table


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_preset_field_matches_the_docs_table(name):
    table = docs_preset_table()[name]
    assert table == RECIPES[name]  # same fields, same values: the table documents exactly what the preset sets
    config = ALPConfig(output_dir="x", alp_recipe=name, **CPU)
    for field, value in table.items():
        assert getattr(config, field) == value, field


def test_recipes_set_nothing_but_config_fields():
    names = {f.name for f in dataclasses.fields(ALPConfig)}
    for preset in RECIPES.values():
        assert set(preset) <= names


def test_explicit_arguments_win_even_at_their_default_value():
    defaults = ALPConfig(output_dir="x", **CPU)
    config = ALPConfig(
        output_dir="x",
        alp_recipe="paper-multi-turn",
        alp_init_sigma=defaults.alp_init_sigma,  # 0.02: the default, passed explicitly
        loss_type="dapo",  # TRL's default, passed explicitly
        **CPU,
    )
    assert config.alp_init_sigma == 0.02 and config.loss_type == "dapo"
    assert config.alp_sigma_learning_rate == 5e-4 and config.alp_dual_clip == 3.0  # the rest is the preset
    assert config.max_tool_calling_iterations == 4


def test_a_dataclass_subclass_keeps_explicit_arguments_at_their_default_value():
    @dataclasses.dataclass
    class MyConfig(ALPConfig):
        my_field: int = 0

    config = MyConfig(output_dir="x", alp_recipe="paper-multi-turn", alp_dual_clip=10.0, alp_epsilon_high=2.0, **CPU)
    assert config.alp_epsilon_high == 2.0  # changed from the default: kept
    assert config.alp_dual_clip == 10.0  # the default, passed explicitly: kept too (the preset's is 3.0)
    assert config.alp_sigma_learning_rate == 5e-4  # not passed: the preset's


def test_copies_keep_their_values():
    config = ALPConfig(output_dir="x", alp_recipe="paper-multi-turn", alp_dual_clip=10.0, **CPU)
    copied = copy.deepcopy(config)
    assert (copied.alp_dual_clip, copied.alp_sigma_learning_rate, copied._alp_explicit) == (
        10.0,
        5e-4,
        config._alp_explicit,
    )


def test_unknown_recipe_is_rejected():
    with pytest.raises(ValueError, match=r"alp_recipe must be one of \['paper-single-turn', 'paper-multi-turn'\]"):
        ALPConfig(output_dir="x", alp_recipe="paper", **CPU)


@pytest.mark.parametrize("marker", ["recipes", "mask"])
def test_docs_config_examples_run(marker, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(doc_block(marker), {})


def test_single_turn_preset_trains_with_the_clamped_kl(make_trainer, tokenizer, tmp_path):
    model_dir = tmp_path / "base"
    from trl_alp.experiments.models import build_tiny_model

    build_tiny_model(tokenizer).save_pretrained(model_dir)  # beta > 0: TRL rebuilds the reference from the path
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir), max_steps=1, alp_recipe="paper-single-turn"
    )
    assert trainer.args.beta == 0.001 and trainer.args.alp_kl_clamp and trainer.loss_type == "bnpo"
    trainer.train()
    assert 0.0 <= last_logged(trainer, "kl") <= 10.0
    assert last_logged(trainer, "alp/sigma/mean") == pytest.approx(0.02, rel=0.2)


def test_multi_turn_preset_trains(make_trainer):
    trainer = make_trainer(max_steps=1, alp_recipe="paper-multi-turn", learning_rate=1e-3)
    trainer.train()
    assert trainer.optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    assert last_logged(trainer, "alp/sigma/mean") == pytest.approx(1e-6, rel=0.2)


@pytest.fixture
def captured_args(monkeypatch):
    """Run `trl-alp train` up to the trainer, record its args and tools, skip the training itself."""
    from trl_alp.trainer import ALPGRPOTrainer

    seen = {}

    def train(self, *args, **kwargs):
        seen["args"], seen["tools"] = self.args, self.tools

    monkeypatch.setattr(ALPGRPOTrainer, "train", train)
    return seen


def test_cli_recipe_flags_and_yaml_win(tmp_path, captured_args):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("alp_recipe: paper-multi-turn\nalp_dual_clip: 10.0\nalp_epsilon_high: 2.0\nmax_steps: 1\n")
    argv = ["train", "--config", str(recipe), "--model_name_or_path", "tiny", "--output_dir", str(tmp_path / "o")]
    argv += ["--alp_epsilon_high", "3.0", "--alp_init_sigma", "0.02", "--bf16", "false", "--use_cpu", "true"]
    assert main([*argv, "--report_to", "none"]) == 0
    args = captured_args["args"]
    assert args.alp_dual_clip == 10.0  # from the YAML (the default value, given explicitly)
    assert args.alp_epsilon_high == 3.0  # the flag beats the YAML
    assert args.alp_init_sigma == 0.02  # a flag at its default value still wins
    assert args.alp_sigma_learning_rate == 5e-4 and args.loss_type == "bnpo"  # the preset fills the rest


def test_docs_cli_preset_command_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = "\n".join(path.read_text() for path in doc_files())
    command = re.search(r"trl-alp train --model_name_or_path tiny [^\n]*--alp_recipe paper-single-turn[^\n]*", text)
    argv = command.group(0).split()[1:]
    assert main([*argv, "--max_steps", "1", "--output_dir", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "alp_state.json").exists()


def test_recipe_yamls_use_valid_fields():
    import yaml
    from trl import ModelConfig

    from trl_alp.cli.train import TrainScriptArguments

    known = {f.name for cls in (TrainScriptArguments, ALPConfig, ModelConfig) for f in dataclasses.fields(cls)}
    for recipe in (files("trl_alp") / "configs").iterdir():
        if recipe.name.endswith(".yaml"):
            fields = yaml.safe_load(recipe.read_text())
            assert set(fields) <= known, recipe.name
            assert fields.get("alp_recipe") in (None, *RECIPES)
