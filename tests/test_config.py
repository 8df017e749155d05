"""ALPConfig: every check that needs only the config runs at construction, naming the field and the allowed values."""

import logging

import pytest
from tiny_setup import alp_log
from trl import GRPOConfig

from trl_alp import ALPConfig, ALPGRPOTrainer
from trl_alp.config import CORRECTIONS, alp_defaults

BASE = dict(output_dir="unused", report_to="none", bf16=False, use_cpu=True)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"correction": "alp"}, "correction must be one of"),
        ({"alp_init_sigma": 0.0}, "alp_init_sigma must be a number > 0 or 'auto'"),
        ({"alp_init_sigma": float("nan")}, "alp_init_sigma must be a number > 0 or 'auto'"),
        ({"alp_epsilon_low": 1.0}, r"alp_epsilon_low must be in \(0, 1\)"),
        ({"alp_dual_clip": 1.0}, "alp_dual_clip must be > 1, got 1.0"),
        ({"alp_layers": "3-1"}, "alp_layers"),
        ({"alp_layers": [0, 1.5]}, "ints only"),
        ({"alp_rollout_dtype": "int8"}, "alp_rollout_dtype must be one of"),
        ({"alp_rollout_weight_bits": 3}, "alp_rollout_weight_bits must be one of"),
        ({"alp_sigma_learning_rate": -1.0}, "alp_sigma_learning_rate must be >= 0"),
        # TRL options the correction cannot honour
        ({"delta": 4.0}, "delta=4.0 is TRL's two-sided clip.*alp_dual_clip"),
        ({"importance_sampling_level": "sequence"}, "importance_sampling_level='sequence'.*'geo-alp'"),
        ({"entropy_coef": 0.01}, "entropy_coef / use_adaptive_entropy"),
        ({"use_transformers_continuous_batching": True}, "returns no rollout log-probs"),
        # TIS/MIS bands are TRL's vllm_importance_sampling_clip_min/max
        (
            {"correction": "token-tis", "vllm_importance_sampling_clip_max": None},
            "needs a band.*vllm_importance_sampling_clip_max",
        ),
        (
            {"correction": "seq-mis", "vllm_importance_sampling_clip_min": 5.0},
            r"vllm_importance_sampling_clip_min \(5.0\) must be < vllm_importance_sampling_clip_max \(3.0\)",
        ),
        (
            {"correction": "token-mis", "vllm_importance_sampling_clip_max": float("inf")},
            "vllm_importance_sampling_clip_max must be a finite",
        ),
        ({"correction": "seq-tis", "loss_type": "vespo"}, "TRL rejects sequence-level importance sampling with VESPO"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        ALPConfig(**BASE, **overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        {"correction": "grpo", "delta": 4.0, "importance_sampling_level": "sequence", "entropy_coef": 0.01},
        {"correction": "token-tis", "delta": 4.0, "importance_sampling_level": "sequence"},  # TRL's ratio options
        {"correction": "token-mis", "loss_type": "vespo"},
        {"correction": "seq-mis", "vllm_importance_sampling_clip_max": None, "vllm_importance_sampling_clip_min": 0.5},
    ],
)
def test_trl_options_that_do_apply_are_accepted(overrides, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_alp"):
        config = ALPConfig(**BASE, **overrides)
    assert alp_log(caplog) == ""  # accepted silently: none of them is named as ignored
    assert all(getattr(config, name) == value for name, value in overrides.items())


@pytest.mark.parametrize(
    ("overrides", "ignored"),
    [
        ({"correction": "seq-bypass", "alp_init_sigma": 0.1, "alp_layers": "late"}, "alp_layers, alp_init_sigma"),
        ({"correction": "grpo", "alp_dual_clip": 20.0}, "alp_dual_clip"),
        ({"correction": "seq-alp", "vllm_importance_sampling_clip_max": 5.0}, "vllm_importance_sampling_clip_max"),
        ({"correction": "seq-alp", "epsilon": 0.3}, "epsilon"),
        ({"correction": "token-mis", "vllm_importance_sampling_mode": "token_mask"}, "vllm_importance_sampling_mode"),
    ],
)
def test_options_that_cannot_apply_say_so_at_construction(caplog, overrides, ignored):
    with caplog.at_level(logging.WARNING, logger="trl_alp"):
        ALPConfig(**BASE, **overrides)
    assert f"{ignored} do not apply to correction={overrides['correction']!r}" in caplog.text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"alp_rollout_mask_max": 3.0, "alp_rollout_mask_weighted": False},
            "alp_rollout_mask_max, alp_rollout_mask_weighted are ignored: alp_rollout_mask is None.",
        ),
        ({"alp_kl_clamp": True}, "alp_kl_clamp=True is ignored: beta=0.0 adds no KL term."),
    ],
)
def test_rollout_mask_and_kl_clamp_fields_that_cannot_apply_say_so(caplog, overrides, message):
    with caplog.at_level(logging.WARNING, logger="trl_alp"):
        ALPConfig(**BASE, correction="seq-alp", **overrides)
    assert message in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_alp"):  # where they apply: no warning
        ALPConfig(**BASE, correction="seq-alp", alp_rollout_mask="sequence", beta=0.01, **overrides)
    assert alp_log(caplog) == ""


def test_defaults_say_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="trl_alp"):
        for correction in CORRECTIONS:
            ALPConfig(**BASE, correction=correction)
    assert alp_log(caplog) == ""


def test_correction_facts():
    facts = {name: (c.perturbs, c.uses_old_logps, c.uses_alp_clip, c.trl_is_mode) for name, c in CORRECTIONS.items()}
    assert facts["seq-alp"] == (True, False, True, None)
    assert facts["geo-bypass"] == (False, False, True, None)
    assert facts["grpo"] == (False, True, False, None)
    assert facts["token-tis"] == (False, True, False, "token_truncate")
    assert facts["seq-mis"] == (False, True, False, "sequence_mask")


def test_ratio_level_and_clip_follow_the_correction():
    alp = ALPConfig(**BASE, correction="geo-alp")
    assert alp.ratio_level == "geometric"
    assert tuple(alp.clip) == (0.5, 3.0, 10.0, None, 4.0)
    tis = ALPConfig(**BASE, correction="seq-tis", epsilon=0.2, epsilon_high=0.28, delta=5.0)
    assert tis.ratio_level == "token"  # TRL's importance_sampling_level, not the weight's level
    assert tuple(tis.clip) == (0.2, 0.28, None, 5.0, 0.28)  # CISPO caps at epsilon_high, as TRL
    assert ALPConfig(**BASE, correction="token-mis", importance_sampling_level="sequence").ratio_level == "geometric"


def test_plain_grpo_config_is_upgraded_with_the_defaults_in_words(caplog, make_trainer):
    with caplog.at_level(logging.WARNING, logger="trl_alp"):
        trainer = make_trainer(config_cls=GRPOConfig, max_steps=1)
    assert isinstance(trainer.args, ALPConfig) and isinstance(trainer, ALPGRPOTrainer)
    assert trainer.args.correction == "seq-alp" and trainer.args.alp_epsilon_high == 3.0
    assert "plain GRPOConfig" in caplog.text and alp_defaults() in caplog.text
    assert alp_defaults() == "correction='seq-alp', σ₀=0.02, σ lr 0.01, clip [0.5, 4.0], dual clip 10.0"


def test_default_values_in_messages_are_read_from_the_fields(monkeypatch, caplog, make_trainer):
    import dataclasses

    field = {f.name: f for f in dataclasses.fields(ALPConfig)}["alp_init_sigma"]
    monkeypatch.setattr(field, "default", 0.05)
    assert "σ₀=0.05" in alp_defaults()
    with caplog.at_level(logging.WARNING, logger="trl_alp"):
        make_trainer(config_cls=GRPOConfig, max_steps=1)
    assert "σ₀=0.05" in caplog.text  # the upgrade warning says what the fields say, not a copy of them


def test_plain_grpo_config_with_an_option_alp_cannot_honour_fails_at_upgrade():
    with pytest.raises(ValueError, match="delta"):
        ALPConfig.from_grpo_config(GRPOConfig(**BASE, delta=3.0))
