"""``trl-alp train``: TRL's ``trl grpo`` script for `ALPGRPOTrainer`.

Flags and ``--config FILE`` (a YAML config file: a path, or one shipped in ``trl_alp/configs/`` by name), parsed by
TRL's `TrlParser` into `TrainScriptArguments`, `ALPConfig` and TRL's `ModelConfig`; rewards by name or import path;
tools by import path; ``--resume_from_checkpoint``. `parse_train_args` checks what needs neither data nor model,
`train` loads both and builds the trainer; their errors are setup errors (one line, exit status 2).
"""

from __future__ import annotations

import importlib
import inspect
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .main import CLIError, command_parser, flag_value, given_flags

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
# `--config` finds a shipped config file by these package paths too (`trl_alp/recipes/` is its former name).
CONFIG_PACKAGE_PATHS = (os.path.join("trl_alp", "configs"), os.path.join("trl_alp", "recipes"))
# Defaults that replace TRL's for an offline model alias, unless given on the command line or in the config file.
ALIAS_DEFAULTS = {"tiny": {"max_completion_length": 16}}  # the tiny model has 256 positions; TRL's default is 512
# TRL's `trl grpo` reward registry (same names, same settings); ours are in `trl_alp.tasks.REWARD_FUNCS`.
TRL_REWARDS = ("accuracy_reward", "reasoning_accuracy_reward", "think_format_reward", "get_soft_overlong_punishment")
# Keyword arguments GRPOTrainer passes to every reward function itself (the others come from dataset columns).
TRL_REWARD_KWARGS = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric"}
PROMPT_SAMPLE = 1000  # rows whose prompt length is measured against the model's positions


@dataclass
class TrainScriptArguments:
    """Data and reward arguments of ``trl-alp train`` (model, LoRA and ALPConfig fields come from TRL's parsers)."""

    dataset_name: str = field(
        default="arithmetic",
        metadata={
            "help": "'arithmetic' (generated offline), a local .json/.jsonl/.csv/.parquet file or a saved dataset "
            "folder, or a Hugging Face Hub dataset id."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration (e.g. 'main')."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_format: str = field(
        default="prompt",
        metadata={
            "help": "'prompt': the data already has 'prompt' (and 'answer') columns; 'gsm8k': map GSM8K's "
            "'question' / 'answer' to them.",
            "choices": ["prompt", "gsm8k"],
        },
    )
    num_prompts: int = field(default=256, metadata={"help": "Rows of the 'arithmetic' dataset."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["correctness", "number_format"],
        metadata={
            "help": "Reward functions: ours ('correctness', 'number_format'), TRL's ('accuracy_reward', "
            "'reasoning_accuracy_reward', 'think_format_reward', 'get_soft_overlong_punishment'), or an import path "
            "'my_module.my_reward' (TRL's form) or 'my_module:my_reward'; the current folder is importable."
        },
    )
    tools: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Functions the model may call during generation ('package.module:function', e.g. "
            "'trl_alp.tasks:calculator'), run by TRL's multi-turn tool loop. With --model_name_or_path tiny the "
            "tiny tokenizer gets a tool-calling chat template."
        },
    )


# ------------------------------------------------------------------------------------------------ config files
def resolve_config_file(path: str) -> str:
    """A ``--config`` value as a file: the path itself, or a shipped config file by name (``tiny_arithmetic``,
    ``tiny_arithmetic.yaml``) or by its package path (``trl_alp/configs/tiny_arithmetic.yaml``; the older
    ``trl_alp/recipes/tiny_arithmetic.yaml`` too) from any folder."""
    if os.path.isfile(path):
        return path
    folder, name = os.path.split(os.path.normpath(path))
    if folder in ("", *CONFIG_PACKAGE_PATHS):
        shipped = CONFIGS_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
        if shipped.is_file():
            return str(shipped)
    names = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
    raise CLIError(f"--config {path!r}: no such file, and no shipped config file of that name (shipped: {names})")


def _with_config_file(argv: list[str]) -> tuple[list[str], dict]:
    """Resolve ``--config`` (also ``--config=PATH``) to a file; return the command line and the file's mapping."""
    import yaml

    path = flag_value(argv, "config")
    if path is None:
        return argv, {}
    resolved = resolve_config_file(path)
    rest, tokens = [], iter(argv)
    for token in tokens:  # drop every --config (TrlParser reads the resolved one put first below)
        if token == "--config":
            next(tokens, None)
        elif not token.startswith("--config="):
            rest.append(token)
    with open(resolved) as f:
        values = yaml.safe_load(f)
    if not isinstance(values, dict):
        raise CLIError(f"--config {path!r}: {resolved} is not a YAML mapping of flags to values")
    return ["--config", resolved, *rest], values


# ------------------------------------------------------------------------------------------------ rewards
def load_reward(name: str) -> Callable:
    """A reward function by name, like TRL's ``trl grpo``: a built-in name or an import path.

    Import paths are TRL's dotted form ``package.module.function`` or ``package.module:function``; the current
    folder is put on ``sys.path`` first (as TRL does), so ``my_rewards.length_reward`` finds ``./my_rewards.py``.
    """
    from ..tasks import REWARD_FUNCS

    if name in REWARD_FUNCS:
        return REWARD_FUNCS[name]
    if name in TRL_REWARDS:
        import trl.rewards

        reward = getattr(trl.rewards, name)
        # TRL's script builds this one with these values; pass your own through a module of yours to change them.
        return reward(max_completion_len=1280, soft_punish_cache=256) if name == TRL_REWARDS[-1] else reward
    if ":" in name:
        module_name, attr = name.split(":", 1)
    elif "." in name:
        module_name, attr = name.rsplit(".", 1)
    else:
        raise CLIError(
            f"unknown reward {name!r}: use one of {[*REWARD_FUNCS, *TRL_REWARDS]} or an import path "
            "'my_module.my_reward' / 'my_module:my_reward'"
        )
    return _import_function("reward", name, module_name, attr)


def _load_tool(name: str) -> Callable:
    module_name, _, attr = name.partition(":")
    if not attr:
        raise CLIError(f"tool {name!r}: use 'package.module:function'")
    return _import_function("tool", name, module_name, attr)


def _import_function(kind: str, name: str, module_name: str, attr: str) -> Callable:
    """``module_name.attr`` with the current folder importable (as TRL's script does); a missing module or function
    is a one-line setup error, an import error raised *inside* the user's module keeps its traceback."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is None or not (module_name == error.name or module_name.startswith(error.name + ".")):
            raise  # the module's own imports miss something: its traceback says what
        raise CLIError(
            f"cannot import {kind} {name!r}: no module named {error.name!r} in the current folder ({os.getcwd()}) "
            "or on sys.path"
        ) from error
    function = getattr(module, attr, None)
    if not callable(function):
        raise CLIError(f"cannot import {kind} {name!r}: module {module_name!r} has no function {attr!r}")
    return function


def required_columns(reward: Callable) -> set[str]:
    """Dataset columns a reward function needs: its parameters without a default that GRPOTrainer does not pass."""
    try:
        parameters = inspect.signature(reward).parameters.values()
    except (TypeError, ValueError):  # builtins and some callables have no signature
        return set()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in parameters if p.kind in kinds and p.default is p.empty} - TRL_REWARD_KWARGS


# ------------------------------------------------------------------------------------------------ data and model
def _load_dataset(script):
    from datasets import load_dataset, load_from_disk

    from ..tasks import arithmetic_dataset, gsm8k_to_prompts

    name = script.dataset_name
    if name == "arithmetic":
        return arithmetic_dataset(script.num_prompts)
    if os.path.isdir(name):
        dataset = load_from_disk(name)
        if hasattr(dataset, "keys"):
            if script.dataset_train_split not in dataset:
                raise CLIError(f"dataset {name!r} has splits {list(dataset)}, not {script.dataset_train_split!r}")
            dataset = dataset[script.dataset_train_split]
    elif os.path.isfile(name):
        extension = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(name.rsplit(".", 1)[-1])
        if extension is None:
            raise CLIError(f"dataset file {name!r}: use .json, .jsonl, .csv or .parquet")
        dataset = load_dataset(extension, data_files=name, split="train")
    elif name.startswith((".", "/", "~")) or name.endswith((".json", ".jsonl", ".csv", ".parquet")):
        raise CLIError(f"dataset {name!r} not found")
    else:
        dataset = load_dataset(name, script.dataset_config, split=script.dataset_train_split)
    if script.dataset_format == "gsm8k":
        missing = {"question", "answer"} - set(dataset.column_names)
        if missing:
            raise CLIError(
                f"dataset {name!r} has columns {dataset.column_names}; --dataset_format gsm8k needs {sorted(missing)}"
            )
        dataset = gsm8k_to_prompts(dataset)
    return dataset


def _check_columns(dataset, rewards, script) -> None:
    needed = {"prompt"}.union(*(required_columns(r) for r in rewards))
    missing = needed - set(dataset.column_names)
    if missing:
        raise CLIError(
            f"dataset {script.dataset_name!r} has columns {dataset.column_names} but needs {sorted(missing)} "
            "('prompt' to generate from, the others for the rewards' arguments; use --dataset_format gsm8k for "
            "question/answer data)"
        )


def _resolve_model(name: str | None):
    """Return (model or path, tokenizer or None) for a model path, Hub id, or one of the offline aliases."""
    if name is None:
        raise CLIError("--model_name_or_path is required (a local path, a Hub id, 'smollm2' or 'tiny')")
    if name == "smollm2":
        from ..experiments.models import smollm2_path

        return smollm2_path(), None
    if name == "tiny":
        from ..experiments.models import load_offline_model

        model, tokenizer, _ = load_offline_model("tiny")
        return model, tokenizer
    if name.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(name)):
        raise CLIError(f"model path {name!r} does not exist")
    return name, None


def _check_positions(trainer, dataset) -> None:
    """Prompt + completion must fit the model's positions (the tiny model has 256; TRL's default completion: 512)."""
    config = trainer.model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not positions:
        return
    completion = trainer.args.max_completion_length
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    prompts = dataset.select(range(min(len(dataset), PROMPT_SAMPLE)))["prompt"]
    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list) else p
        for p in prompts
    ]
    longest = max((len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]), default=0)
    if longest + completion > positions:
        raise CLIError(
            f"max_completion_length={completion} plus the longest prompt ({longest} tokens, first {len(texts)} rows) "
            f"exceeds the model's {positions} positions: use --max_completion_length {max(positions - longest, 1)} "
            "or less"
        )


def _resume_path(config) -> str | None:
    """``--resume_from_checkpoint``: a checkpoint folder, or ``true`` for the newest one in ``output_dir``."""
    value = config.resume_from_checkpoint
    if value is None or str(value).lower() == "false":
        return None
    if str(value).lower() == "true":
        from transformers.trainer_utils import get_last_checkpoint

        latest = get_last_checkpoint(config.output_dir) if os.path.isdir(config.output_dir) else None
        if latest is None:
            raise CLIError(
                f"--resume_from_checkpoint true: no checkpoint-* folder in output_dir {config.output_dir!r}"
            )
        return latest
    if not os.path.isdir(value):
        raise CLIError(f"--resume_from_checkpoint {value!r}: no such checkpoint folder")
    return value


def _remove_if_empty(path: str) -> None:
    """Remove a folder tree that holds no file (made by a trainer whose setup then failed)."""
    if os.path.isdir(path) and not any(files for _, _, files in os.walk(path)):
        shutil.rmtree(path)


class TrainSetup(NamedTuple):
    """A parsed and validated ``train`` command line: nothing loaded, nothing written yet."""

    script: TrainScriptArguments
    config: object  # ALPConfig
    model_args: object  # trl.ModelConfig
    rewards: list[Callable]
    tools: list[Callable]
    resume: str | None


def parse_train_args(argv: list[str]) -> TrainSetup:
    """Parse a ``train`` command line like ``trl grpo`` does (config file, flags, TRL's dataclasses) and check what
    needs neither data nor model: the config file, every field, the offline aliases' defaults, the resume path, the
    rewards and the tools."""
    argv, from_file = _with_config_file(argv)
    parser = command_parser("train")
    alias = flag_value(argv, "model_name_or_path") or from_file.get("model_name_or_path")
    given = given_flags(argv) | set(from_file)
    alias_defaults = {k: v for k, v in ALIAS_DEFAULTS.get(alias, {}).items() if k not in given}
    parser.set_defaults(**alias_defaults)
    script, config, model_args = parser.parse_args_and_config(argv)
    if config.alp_recipe is not None:  # the parser passed every field: let the recipe fill those not given
        from ..recipes import rebuild_with_recipe

        config = rebuild_with_recipe(config, given | set(alias_defaults))
    resume = _resume_path(config)
    rewards = [load_reward(name) for name in script.reward_funcs]
    tools = [_load_tool(name) for item in script.tools for name in item.split(",") if name]
    return TrainSetup(script, config, model_args, rewards, tools, resume)


def train(argv: list[str]) -> Callable[[], None]:
    """Set up ``trl-alp train``: parse, load the data and the model, build the trainer.

    Args:
        argv: The arguments after ``train`` (flags and ``--config``, as for ``trl grpo``).

    Returns:
        A function that trains, then saves the model, ``alp_state.json`` and ``trainer_state.json`` in
        ``output_dir``. Errors before it is returned are setup errors (`main` prints them in one line).
    """
    from trl import get_peft_config

    from ..trainer import ALPGRPOTrainer

    script, config, model_args, rewards, tools, resume = parse_train_args(argv)
    dataset = _load_dataset(script)
    _check_columns(dataset, rewards, script)
    if tools and model_args.model_name_or_path == "tiny":  # its tokenizer needs a tool-calling chat template
        from ..experiments.models import load_offline_model

        model, tokenizer, _ = load_offline_model("tiny", tools=tuple(tools))
    else:
        model, tokenizer = _resolve_model(model_args.model_name_or_path)
    if isinstance(model, str):
        config.model_init_kwargs = {**(config.model_init_kwargs or {}), "dtype": model_args.dtype or "auto"}
    existed = os.path.exists(config.output_dir)
    try:
        trainer = ALPGRPOTrainer(
            model=model,
            reward_funcs=rewards,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
            tools=tools or None,
        )
        _check_positions(trainer, dataset)
    except BaseException:
        if not existed:  # the trainer makes output_dir in its constructor: a failed setup leaves nothing behind
            _remove_if_empty(config.output_dir)
        raise

    def run() -> None:
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(config.output_dir)
        trainer.save_state()  # trainer_state.json: the logged metrics, for `trl-alp plot`
        if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers, as TRL's script does
            trainer.end()

    return run
