"""Shared fixtures: an offline tokenizer, tiny models and a trainer factory (TRL is imported once per process)."""

from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from datasets import Dataset  # noqa: E402
from hypothesis import settings  # noqa: E402
from tiny_setup import PROMPT_ROWS, TRAINER_SETTINGS, length_reward  # noqa: E402

from trl_alp import ALPConfig, ALPGRPOTrainer  # noqa: E402
from trl_alp.cli.tiny import build_tiny_model, build_tokenizer  # noqa: E402

logging.getLogger("trl_alp").setLevel(logging.INFO)
# Property tests explore the same examples on every run, so CI is reproducible (new seeds: --hypothesis-seed).
settings.register_profile("trl-alp", derandomize=True)
settings.load_profile("trl-alp")


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
