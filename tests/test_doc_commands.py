"""Every `trl-alp` command printed in the README, the docs pages and the recipes' header comments runs, quickly.

Commands are the `trl-alp` lines of the ```bash blocks (extracted by mktestdocs, see doc_blocks.py) and the inline
`trl-alp ...` spans of the prose. Other shell lines (`pip install`, `make`) are not run here: `make test` and CI run
the Makefile's install itself.

The commands run in order, in one scratch folder (the `plot` example reads the run folder the first `train` example
wrote). Quick variants: `train` stops after at most 2 steps (4 when it saves checkpoints, so a resume example has one
to resume from) of 4 completions of ≤ 8 tokens for 1 prompt; `demo` runs the tiny model for 1 step of `seq-alp` (the SmolLM2 demo is the same code on another model; its loader is tested in test_models.py); `bench`
is test_bench.py's run, whatever scenarios or output flags the page shows: 1 cycle, no warm-up, 1 repeat of 4
completions, full fine-tuning, three scenarios, profiled, as JSON (on vLLM: one scenario); `demo --engine vllm` is
test_demo.py's run on the engine (`bench --mode ab`: 1 warm-up
run and 1 pair per comparison of 4 completions, full fine-tuning); `stress` trains one cell of one correction for one seed and step (the sharp grids on the tests' tiny sharp policy). Commands that need the Hugging Face Hub (for model or data) are only parsed
and validated (recipe, every field, rewards), with `--bf16 false --use_cpu true` for this CPU machine, and their test
id says so.
"""

import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml
from doc_blocks import code_blocks, doc_block, doc_files
from test_bench import BENCH, BENCH_ON_VLLM
from test_demo import DEMO_ON_VLLM

from trl_alp.cli import main as cli
from trl_alp.cli import train as cli_train
from trl_alp.cli.main import main

# Inline mentions of `trl-alp ...` in the docs that are not commands.
NOT_COMMANDS = {"trl-alp train: error: ..."}
ERROR_MESSAGE = re.compile(r"trl-alp \w+: error: ")  # a quoted error message, not a command
HUB_ONLY = "[Hub: parsed and validated only]"


def _doc_commands() -> list[tuple[str, str]]:
    """``(file, command)`` for every command in the README and the docs pages."""
    commands = []
    for path in doc_files():
        name = path.relative_to(doc_files()[0].parent).as_posix()
        blocks = code_blocks(path, "bash")
        commands += [
            (name, line.strip()) for block in blocks for line in block.splitlines() if line.startswith("trl-alp")
        ]
        prose = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        spans = re.findall(r"`(trl-alp[^`]*)`", prose)
        commands += [(name, span) for span in spans if span not in NOT_COMMANDS and not ERROR_MESSAGE.match(span)]
    return commands


def _recipe_commands() -> list[tuple[str, str]]:
    return [
        (recipe.name, line.lstrip("# ").strip())
        for recipe in sorted(cli_train.CONFIGS_DIR.glob("*.yaml"))
        for line in recipe.read_text().splitlines()
        if line.startswith("# trl-alp")
    ]


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    """`argv` with `--flag value` replaced, or appended."""
    if f"--{flag}" in argv:
        i = argv.index(f"--{flag}")
        return [*argv[: i + 1], value, *argv[i + 2 :]]
    return [*argv, f"--{flag}", value]


def _needs_hub(argv: list[str]) -> bool:
    recipe_path = cli.flag_value(argv, "config")
    recipe = yaml.safe_load(Path(cli_train.resolve_config_file(recipe_path)).read_text()) if recipe_path else {}
    model = cli.flag_value(argv, "model_name_or_path") or recipe.get("model_name_or_path")
    dataset = cli.flag_value(argv, "dataset_name") or recipe.get("dataset_name", "arithmetic")
    local_model = model in cli.MODEL_ALIASES or (model is not None and model.startswith((".", "/", "~")))
    local_data = dataset == "arithmetic" or Path(dataset).exists() or dataset.startswith((".", "/", "~"))
    return not (local_model and local_data)


def _quick(argv: list[str]) -> list[str]:
    command = argv[0] if argv else None  # `trl-alp` alone prints the usage
    if command == "train" and not _needs_hub(argv):
        given, saves = cli.flag_value(argv, "max_steps"), cli.flag_value(argv, "save_steps")
        argv = _set(argv, "max_steps", str(min(int(given), 4 if saves else 2)) if given else "2")
        for flag, value in (("per_device_train_batch_size", "4"), ("num_generations", "4")):
            argv = _set(argv, flag, value)
        return _set(argv, "max_completion_length", "8")
    if command == "demo":  # the three-correction report is tested in test_demo.py
        if cli.flag_value(argv, "engine") == "vllm":  # test_demo.py's run on the engine: one run serves both
            return ["demo", *DEMO_ON_VLLM]
        quick = {"model": "tiny", "max_steps": "1", "corrections": "seq-alp", "seed": "0", "threads": "1"}
        for flag, value in quick.items():
            argv = _set(argv, flag, value)
        return argv
    if command == "stress":  # one cell, one correction, one seed, one step; the grid is tested in test_stress.py
        for flag, value in (("cells", "fp32-s1"), ("corrections", "seq-alp"), ("seeds", "1"), ("max_steps", "1")):
            argv = _set(argv, flag, value)
        if (cli.flag_value(argv, "grid") or "").startswith("sharp"):  # the same code on the tests' sharp policy
            argv = _set(argv, "grid", "sharp-tiny")
        if not cli.flag_value(argv, "output_dir"):  # one folder per grid: a grid refuses results of other settings
            argv = _set(argv, "output_dir", f"stress-{cli.flag_value(argv, 'grid') or 'cpu'}")
        return _set(argv, "workers", "1")
    if command == "bench" and cli.flag_value(argv, "mode") == "ab":  # one pair per comparison; see test_bench_ab.py
        quick = {"model": "tiny", "finetune": "full", "completions": "4", "num_generations": "2", "pairs": "1"}
        quick |= {"warmup": "1", "threads": "1"}
        for flag, value in quick.items():
            argv = _set(argv, flag, value)
        return _set(argv, "max_completion_length", "4")
    if command == "bench":  # the same run as test_bench.py's, whatever the scenarios and output flags asked for
        if cli.flag_value(argv, "engine") == "vllm":
            return ["bench", *BENCH_ON_VLLM]
        return ["bench", *BENCH]
    if command == "mismatch":  # two prompts of 8 tokens, one real and one emulated engine; see test_mismatch.py
        quick = {"model": "tiny", "num_prompts": "2", "max_tokens": "8", "lengths": "4,8"}
        quick |= {"engines": "vllm-fp32,4bit"}
        for flag, value in quick.items():
            argv = _set(argv, flag, value)
        return argv
    return argv


def _cases():
    cases, seen = [], set()
    for source, command in [*_doc_commands(), *_recipe_commands()]:
        argv = shlex.split(command, comments=True)[1:]
        quick = _quick(argv)
        key = tuple(quick if quick[:1] not in (["demo"], ["bench"]) else sorted(_set(quick, "output_dir", "-")))
        if key in seen:  # e.g. the two demo examples are one quick variant
            continue
        seen.add(key)
        hub = quick[:1] == ["train"] and _needs_hub(quick)
        shown = shlex.join(["trl-alp", *argv])
        case_id = f"{source}: {shown}" + (f" {HUB_ONLY}" if hub else "")
        cases.append(pytest.param(quick, hub, id=case_id, marks=_tiers(quick, hub)))
    return cases


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(f"--{flag}") + 1] if f"--{flag}" in argv[:-1] else ""


def _tiers(quick: list[str], hub: bool) -> list:
    """The pytest tiers of a case: running a command is `slow` (a Hub command is only parsed), and one whose engine,
    engines or cells name a vLLM engine (or `train --use_vllm true`) builds one: `vllm`."""
    if hub:
        return []
    engines = " ".join(_flag(quick, flag) for flag in ("engine", "engines", "cells"))
    vllm = "vllm" in engines or _flag(quick, "use_vllm").lower() == "true"
    return [pytest.mark.slow, pytest.mark.vllm] if vllm else [pytest.mark.slow]


CASES = _cases()


def test_the_docs_and_the_recipes_print_commands():
    ids = [case.id for case in CASES]
    assert any("trl-alp train --config tiny_arithmetic" in i for i in ids)
    assert sum(HUB_ONLY in i for i in ids) == 3  # the three Hub recipes
    commands = {case.values[0][0] for case in CASES if case.values[0]}
    assert commands >= {"train", "demo", "plot", "bench", "stress", "mismatch"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    # the docs' own reward module (the python block after <!-- example: my_rewards -->)
    (folder / "my_rewards.py").write_text(doc_block("my_rewards"))
    return folder


@pytest.mark.parametrize(("argv", "hub"), CASES)
def test_command_runs(argv, hub, workdir, monkeypatch, run_command):
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "path", list(sys.path))  # `train` puts the current folder on it
    if hub:
        setup = cli_train.parse_train_args([*argv[1:], "--bf16", "false", "--use_cpu", "true"])
        recipe = yaml.safe_load(Path(cli_train.resolve_config_file(cli.flag_value(argv, "config"))).read_text())
        assert setup.model_args.model_name_or_path == recipe["model_name_or_path"]
        expected = recipe.get("correction", "seq-alp")  # a recipe may leave it to its alp_recipe preset or the default
        assert setup.config.correction == expected and setup.script.dataset_name == recipe["dataset_name"]
        return
    if argv[:1] == ["bench"] or argv == ["demo", *DEMO_ON_VLLM]:  # shares its run with test_bench.py / test_demo.py
        assert run_command(argv).status == 0
        return
    assert main(argv) == 0
    output = cli.flag_value(argv, "output")
    if output:  # plot
        assert (workdir / output).read_bytes()[:4] == b"\x89PNG"
