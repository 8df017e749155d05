"""`trl-alp train` and the command line's contract: TRL-style parsing, recipes, rewards and resume; one-line errors
for setup problems only; light imports for help and usage errors."""

import json
import math
import subprocess
import sys

import pytest

from trl_alp.cli import train as cli
from trl_alp.cli.main import main

CPU = ["--bf16", "false", "--use_cpu", "true", "--report_to", "none"]
SMALL = ["--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "8"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run from an empty folder, with `sys.path` restored afterwards (the CLI puts the current folder on it)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert not any(line.startswith("usage:") for line in err)  # one line, not the whole usage
    return err[-1]


@pytest.mark.parametrize(
    "spec",
    [
        "tiny_arithmetic",
        "tiny_arithmetic.yaml",
        "trl_alp/configs/tiny_arithmetic.yaml",
        "trl_alp/recipes/tiny_arithmetic.yaml",  # the folder's former name: an alias
    ],
)
def test_shipped_recipes_resolve_by_name_or_package_path(in_tmp, spec):
    assert cli.resolve_config_file(spec) == str(cli.CONFIGS_DIR / "tiny_arithmetic.yaml")


def test_local_recipe_file_wins_and_unknown_recipe_lists_the_shipped_ones(in_tmp):
    (in_tmp / "tiny_arithmetic.yaml").write_text("max_steps: 1\n")
    assert cli.resolve_config_file("tiny_arithmetic.yaml") == "tiny_arithmetic.yaml"
    with pytest.raises(
        cli.CLIError,
        match=r"shipped: \['paper_single_turn_qwen2.5_math_1.5b', 'qwen2.5_0.5b_gsm8k', 'smollm2_135m_lora_gsm8k', 'tiny_",
    ):
        cli.resolve_config_file("nope")
    with pytest.raises(cli.CLIError, match="no such file"):
        cli.resolve_config_file("elsewhere/tiny_arithmetic.yaml")  # a path in another folder is not a recipe name


def test_train_from_local_jsonl(in_tmp):
    data = in_tmp / "data.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1)} for i in range(8)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    args = ["train", "--model_name_or_path", "tiny", "--dataset_name", str(data), "--output_dir", "o", *CPU]
    assert main([*args, "--max_steps", "1", *SMALL]) == 0


# ---------------------------------------------------------------------------------------------------- resume
def test_resume_true_continues_sigma_and_step_count(in_tmp):
    base = ["train", "--config", "tiny_arithmetic", "--max_steps", "4", "--output_dir", "run", *SMALL]
    base += ["--save_strategy", "steps", "--save_steps", "2"]
    assert main(base) == 0  # a recipe by name, from a folder that does not hold it
    run = in_tmp / "run"
    assert (run / "model.safetensors").exists() and (run / "alp_state.json").exists()
    for leftover in ("checkpoint-4",):  # as if the job had been stopped after step 2
        for path in sorted((run / leftover).rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        (run / leftover).rmdir()
    # Mark checkpoint-2 with a σ no fresh run has and a logged value no fresh run logs.
    alp_state = json.loads((run / "checkpoint-2" / "alp_state.json").read_text())
    alp_state["log_sigma"] = [math.log(0.05)] * len(alp_state["log_sigma"])
    (run / "checkpoint-2" / "alp_state.json").write_text(json.dumps(alp_state))
    state = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())
    state["log_history"][0]["reward"] = 123.0
    (run / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(state))

    assert main([*base, "--resume_from_checkpoint", "true"]) == 0  # true: the newest checkpoint, here step 2

    final = json.loads((run / "trainer_state.json").read_text())  # save_state(): the run can be plotted
    steps = [h for h in final["log_history"] if "alp/sigma/mean" in h]
    assert final["global_step"] == 4 and [h["step"] for h in steps] == [1, 2, 3, 4]
    assert steps[0]["reward"] == 123.0  # steps 1-2 come from the checkpoint, they were not trained again
    assert steps[2]["alp/sigma/mean"] == pytest.approx(0.05, rel=1e-6)  # step 3 starts from the checkpoint's σ
    assert steps[3]["alp/sigma/mean"] != pytest.approx(0.05, rel=1e-6)  # and σ keeps learning from there
    assert (run / "checkpoint-4" / "alp_state.json").exists()


@pytest.mark.parametrize(
    ("resume", "message"),
    [
        ("out/checkpoint-7", "--resume_from_checkpoint 'out/checkpoint-7': no such checkpoint folder"),
        ("true", "--resume_from_checkpoint true: no checkpoint-* folder in output_dir 'out'"),
    ],
)
def test_resume_without_a_checkpoint_is_a_one_line_error(in_tmp, capsys, resume, message):
    argv = ["train", "--config", "tiny_arithmetic", "--output_dir", "out", "--resume_from_checkpoint", resume]
    assert main(argv) == 2
    assert _error_line(capsys) == f"trl-alp train: error: {message}"
    assert not (in_tmp / "out").exists()


# ---------------------------------------------------------------------------------------------------- rewards
REWARDS_PY = """
def length_reward(completions, **kwargs):
    return [float(len(c[-1]["content"])) for c in completions]

def needs_solution(completions, **kwargs):
    return [float(s) for s in kwargs["solution"]]  # the dataset has no 'solution': KeyError while training
"""


def test_reward_forms_like_trls_script(in_tmp):
    from trl.rewards import think_format_reward

    from trl_alp.tasks import correctness_reward

    (in_tmp / "my_cli_rewards.py").write_text(REWARDS_PY)
    dotted = cli.load_reward("my_cli_rewards.length_reward")  # TRL's form, found in the current folder
    assert dotted.__module__ == "my_cli_rewards" and dotted([[{"content": "abc"}]]) == [3.0]
    assert cli.load_reward("my_cli_rewards:length_reward") is dotted
    assert cli.load_reward("think_format_reward") is think_format_reward  # TRL's built-in names
    overlong = cli.load_reward("get_soft_overlong_punishment")  # built with TRL's script values
    assert overlong(completion_ids=[[0] * 1024, [0] * 1280]) == [0.0, -1.0]
    assert cli.load_reward("correctness") is correctness_reward  # ours
    assert cli.load_reward("json.dumps") is json.dumps  # any importable path


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "nope",
            "unknown reward 'nope': use one of ['correctness', 'number_format', 'digit_share', 'running_sums', 'accuracy_reward'",
        ),
        ("no_such_module.f", "no module named 'no_such_module' in the current folder"),
        ("my_cli_rewards.missing", "module 'my_cli_rewards' has no function 'missing'"),
    ],
)
def test_bad_reward_names_are_one_line_errors(in_tmp, capsys, name, message):
    (in_tmp / "my_cli_rewards.py").write_text(REWARDS_PY)
    assert main(["train", "--config", "tiny_arithmetic", "--reward_funcs", name, "--output_dir", "o"]) == 2
    assert message in _error_line(capsys)
    assert not (in_tmp / "o").exists()


def test_a_reward_module_with_a_broken_import_keeps_its_traceback(in_tmp):
    (in_tmp / "rewards_with_bug.py").write_text("import not_installed_dependency\n")
    with pytest.raises(ModuleNotFoundError, match="not_installed_dependency"):
        cli.load_reward("rewards_with_bug.f")


def test_exception_in_a_reward_function_keeps_its_traceback(in_tmp):
    (in_tmp / "my_cli_rewards2.py").write_text(REWARDS_PY)
    argv = ["train", "--config", "tiny_arithmetic", "--reward_funcs", "my_cli_rewards2.needs_solution"]
    with pytest.raises(KeyError, match="solution"):  # not a one-line usage error: exit status 1 with the traceback
        main([*argv, "--max_steps", "1", *SMALL, "--output_dir", "o"])


def test_reward_arguments_must_be_dataset_columns(in_tmp, capsys):
    from trl.rewards import accuracy_reward

    from trl_alp.tasks import correctness_reward, number_format_reward

    assert cli.required_columns(correctness_reward) == {"answer"}
    assert cli.required_columns(accuracy_reward) == {"solution"}
    assert cli.required_columns(number_format_reward) == set()
    assert main(["train", "--config", "tiny_arithmetic", "--reward_funcs", "accuracy_reward"]) == 2
    assert "has columns ['prompt', 'answer'] but needs ['solution']" in _error_line(capsys)


# ---------------------------------------------------------------------------------------------------- setup errors
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--model_name_or_path", "./no/such/model"], "model path './no/such/model' does not exist"),
        (["train", "--model_name_or_path", "tiny", "--dataset_name", "./missing.jsonl"], "not found"),
        (["train", "--model_name_or_path", "tiny", "--correction", "alpha"], "invalid choice"),
        (["train", "--config", "no_such_recipe"], "--config 'no_such_recipe': no such file"),
        (["demo", "--model", "gpt5"], "--model must be one of"),
        (["demo", "--model", "tiny", "--corrections", "seq-alp,nope"], "unknown ['nope']"),
        (["bench", "--model", "./nowhere"], "--model './nowhere': use 'tiny', 'smollm2' or a local model folder"),
        (["plot", "no-such-run"], "run folder 'no-such-run' does not exist"),
        (["plot"], "the following arguments are required: run_dirs"),
        (["frobnicate"], "unknown command 'frobnicate'"),
    ],
)
def test_bad_input_gives_one_line_error(argv, message, capsys, in_tmp):
    if argv[0] == "train":
        argv = [*argv, *CPU, "--output_dir", "o"]
    assert main(argv) == 2
    assert message in _error_line(capsys)
    assert sorted(p.name for p in in_tmp.iterdir()) == []  # nothing written


def test_missing_dataset_column(in_tmp, capsys):
    data = in_tmp / "data.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    argv = ["train", "--model_name_or_path", "tiny", "--dataset_name", str(data), *CPU, "--output_dir", "o"]
    assert main(argv) == 2
    last = _error_line(capsys)
    assert last.startswith("trl-alp train: error: ")
    assert "needs ['prompt']" in last and "--dataset_format gsm8k" in last


def test_layer_range_error_is_short_and_leaves_no_output_folder(in_tmp, capsys):
    argv = ["train", "--model_name_or_path", "tiny", "--alp_layers", "0-999", *CPU, "--output_dir", "out"]
    assert main(argv) == 2  # found while building the trainer, which had already made output_dir
    line = _error_line(capsys)
    assert line == (
        "trl-alp train: error: alp_layers='0-999' selects layers [4, 5, ..., 999] (996 layers), but the model has "
        "layers 0..3."
    )
    assert not (in_tmp / "out").exists()


# ---------------------------------------------------------------------------------------------------- tiny model
def test_tiny_alias_defaults_to_a_completion_length_that_fits(in_tmp):
    tiny = ["--model_name_or_path", "tiny", *CPU]
    assert cli.parse_train_args(tiny).config.max_completion_length == 16  # TRL's default (512) exceeds 256
    assert cli.parse_train_args([*tiny, "--max_completion_length", "32"]).config.max_completion_length == 32
    assert cli.parse_train_args(CPU + ["--model_name_or_path", "x"]).config.max_completion_length == 512
    (in_tmp / "recipe.yaml").write_text("model_name_or_path: tiny\nmax_completion_length: 24\n")
    assert cli.parse_train_args(["--config", "recipe.yaml", *CPU]).config.max_completion_length == 24


def test_prompt_plus_completion_beyond_the_models_positions_is_refused(in_tmp, capsys):
    argv = ["train", "--model_name_or_path", "tiny", "--max_completion_length", "300", *CPU, "--output_dir", "o"]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "max_completion_length=300 plus the longest prompt" in line and "exceeds the model's 256 positions" in line
    assert not (in_tmp / "o").exists()


# ---------------------------------------------------------------------------------------------------- imports
def test_help_and_usage_errors_import_no_torch(tmp_path):
    code = """
import sys
import trl_alp
from trl_alp.cli.main import main

assert main(["--help"]) == 0 and main(["frobnicate"]) == 2
assert main(["plot", "no-such-run"]) == 2 and main(["demo", "--model", "gpt5"]) == 2
assert "ALPConfig" in dir(trl_alp)
print("HEAVY", sorted(m for m in ("torch", "transformers", "peft", "datasets", "trl.trainer") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout


def test_package_names_load_on_first_use():
    import trl_alp
    from trl_alp.config import CORRECTIONS, ALPConfig
    from trl_alp.trainer import ALPGRPOTrainer

    assert (trl_alp.ALPConfig, trl_alp.ALPGRPOTrainer, trl_alp.CORRECTIONS) == (ALPConfig, ALPGRPOTrainer, CORRECTIONS)
    with pytest.raises(AttributeError, match="has no attribute 'ALPTrainer'"):
        trl_alp.ALPTrainer  # noqa: B018


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "trl_alp", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage: trl-alp {train,demo,plot,bench,stress,mismatch}" in done.stdout
