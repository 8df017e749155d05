"""Shared fixtures: an offline tokenizer, tiny models and a trainer factory (TRL is imported once per process)."""

from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from datasets import Dataset  # noqa: E402

from trl_alp import ALPConfig, ALPGRPOTrainer  # noqa: E402
from trl_alp.tiny import build_tiny_model, build_tokenizer  # noqa: E402

logging.getLogger("trl_alp").setLevel(logging.INFO)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def prompt_dataset():
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}]} for a in range(6) for b in range(6)]
    return Dataset.from_list(rows)


def length_reward(completions, **kwargs):
    """A cheap reward with spread inside each group, so advantages are non-zero."""
    return [float(len(c[0]["content"]) % 5) for c in completions]


@pytest.fixture
def make_trainer(tokenizer, prompt_dataset, tmp_path):
    """Build an ALPGRPOTrainer on a fresh tiny Qwen2 model; keyword arguments override ALPConfig fields."""

    def factory(model=None, peft_config=None, trainer_cls=ALPGRPOTrainer, **overrides):
        settings = dict(
            output_dir=str(tmp_path / "run"),
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=8,
            max_steps=2,
            learning_rate=1e-2,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            bf16=False,
            use_cpu=True,
            seed=0,
        )
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
