"""``trl-alp`` command line (also ``python -m trl_alp``): ``train``, ``demo``, ``plot`` and ``bench``.

``train`` is built on TRL's `TrlParser`, so flags and ``--config recipe.yaml`` work like ``trl grpo``.
Bad input ends with one line on stderr and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field

USAGE = """usage: trl-alp {train,demo,plot,bench,stress} [options]

  train   train with ALPGRPOTrainer: trl-alp train --config recipe.yaml [--flag value ...]
  demo    GRPO vs Bypass vs ALP on an embedded default (offline): trl-alp demo [--model tiny]
  plot    ratio-envelope PNG from run folders: trl-alp plot RUN_DIR [RUN_DIR ...] --output envelopes.png
  bench   ALPGRPOTrainer vs GRPOTrainer step time (and peak memory on CUDA): trl-alp bench [--model smollm2]
  stress  mismatch stress test, corrections × mismatch cells × seeds: trl-alp stress --preset cpu [--workers 2]

Run `trl-alp COMMAND --help` for the options of a command."""

MODEL_ALIASES = ("smollm2", "tiny")


class CLIError(Exception):
    """A user error on the command line: reported in one line."""


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
        metadata={"help": "Built-in rewards ('correctness', 'number_format') or 'package.module:function' paths."},
    )


def _parser(dataclass_types, prog: str):
    """A `TrlParser` whose usage errors raise `CLIError` (one line) instead of printing the whole usage."""
    from trl import TrlParser

    parser = TrlParser(dataclass_types, prog=prog)

    def error(message):
        raise CLIError(f"{message} (see `{prog} --help`)")

    parser.error = error
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _load_reward(name: str):
    from .data import REWARD_FUNCS

    if name in REWARD_FUNCS:
        return REWARD_FUNCS[name]
    if ":" not in name:
        raise CLIError(f"unknown reward {name!r}: use one of {sorted(REWARD_FUNCS)} or 'package.module:function'")
    module, attr = name.split(":", 1)
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise CLIError(f"cannot import reward {name!r}: {_one_line(e)}") from e


def _load_dataset(script):
    from datasets import load_dataset, load_from_disk

    from .data import arithmetic_dataset, gsm8k_to_prompts

    name = script.dataset_name
    if name == "arithmetic":
        return arithmetic_dataset(script.num_prompts)
    if os.path.isdir(name):
        dataset = load_from_disk(name)
        dataset = dataset[script.dataset_train_split] if hasattr(dataset, "keys") else dataset
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


def train(argv: list[str]) -> None:
    from trl import ModelConfig, get_peft_config

    from ..config import ALPConfig
    from ..trainer import ALPGRPOTrainer

    parser = _parser((TrainScriptArguments, ALPConfig, ModelConfig), "trl-alp train")
    script, config, model_args = parser.parse_args_and_config(argv)
    dataset = _load_dataset(script)
    rewards = [_load_reward(name) for name in script.reward_funcs]
    needed = {"prompt"} | ({"answer"} if any(r.__name__ == "correctness_reward" for r in rewards) else set())
    missing = needed - set(dataset.column_names)
    if missing:
        raise CLIError(
            f"dataset {script.dataset_name!r} has columns {dataset.column_names} but needs {sorted(missing)} "
            "(use --dataset_format gsm8k for question/answer data)"
        )
    model, tokenizer = _resolve_model(model_args.model_name_or_path)
    if isinstance(model, str):
        config.model_init_kwargs = {**(config.model_init_kwargs or {}), "dtype": model_args.dtype or "auto"}
    trainer = ALPGRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(config.output_dir)


def demo(argv: list[str]) -> None:
    from .demo import DemoArguments, run_demo

    (args,) = _parser((DemoArguments,), "trl-alp demo").parse_args_and_config(argv)
    run_demo(args)


def bench(argv: list[str]) -> None:
    from .bench import BenchArguments
    from .bench import main as run

    (args,) = _parser((BenchArguments,), "trl-alp bench").parse_args_and_config(argv)
    run(args)


def plot(argv: list[str]) -> None:
    from .plot import plot_envelopes

    parser = argparse.ArgumentParser(prog="trl-alp plot", description="Ratio-envelope plot of one or more runs.")
    parser.add_argument("run_dirs", nargs="+", help="run folders (with trainer_state.json or checkpoint-*/)")
    parser.add_argument("--output", default="envelopes.png", help="PNG to write")
    parser.add_argument("--labels", nargs="*", help="one label per run (default: folder names)")
    parser.add_argument("--level", choices=["seq", "token"], default="seq", help="ratio level to plot")
    args = parser.parse_args(argv)
    plot_envelopes(args.run_dirs, args.output, labels=args.labels, level=args.level)
    print(f"wrote {args.output}")


def stress(argv: list[str]) -> None:
    from .stress import StressArguments, run_stress

    (args,) = _parser((StressArguments,), "trl-alp stress").parse_args_and_config(argv)
    run_stress(args)
    print(f"Report: {os.path.abspath(args.output_dir)}/results.md, results.json, phase_diagram.png, envelopes/")


COMMANDS = {"train": train, "demo": demo, "plot": plot, "bench": bench, "stress": stress}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"trl-alp: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # transformers' deprecation notices about arguments TRL sets itself are not actionable from this command line
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    logging.getLogger("trl_alp").setLevel(logging.INFO)
    try:
        COMMANDS[command](rest)
    except (CLIError, ValueError, FileNotFoundError, KeyError, OSError) as error:
        print(f"trl-alp {command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
