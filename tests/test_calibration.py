"""σ₀ calibration (alp_init_sigma="auto"): the bisection, the trainer integration, resume and the fallback."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_setup import last_logged
from trl import TrlParser

from trl_alp import ALPConfig
from trl_alp.calibration import FALLBACK_SIGMA, calibrate_sigma, masked_k3_kl


def test_bisection_hits_the_target_of_a_quadratic_kl():
    calls = []

    def kl(sigma):
        calls.append(sigma)
        return 3.0 * sigma**2

    result = calibrate_sigma(kl, mismatch_kl=1e-3, target_ratio=2.0)
    assert not result.fallback
    assert result.target_kl == pytest.approx(2e-3)
    assert result.noise_kl == pytest.approx(2e-3, rel=0.05)
    assert result.sigma == pytest.approx(math.sqrt(2e-3 / 3), rel=0.03)
    assert result.forwards == len(calls) <= 16


def test_bisection_is_deterministic_and_clamps_to_the_bracket():
    first = calibrate_sigma(lambda s: s**2, 0.01, 1.0)
    assert calibrate_sigma(lambda s: s**2, 0.01, 1.0) == first
    # a target no σ in the bracket reaches: the nearest end
    assert calibrate_sigma(lambda s: s**2 * 1e-9, 1.0, 1.0, bracket=(1e-3, 10.0)).sigma == pytest.approx(10.0)
    assert calibrate_sigma(lambda s: 1.0 + s, 1e-3, 1.0, bracket=(1e-3, 10.0)).sigma == pytest.approx(1e-3)


@pytest.mark.parametrize("mismatch", [0.0, 1e-12, math.nan])
def test_no_mismatch_falls_back_without_forwards(mismatch):
    result = calibrate_sigma(lambda s: pytest.fail("no forward expected"), mismatch, 1.0)
    assert result.fallback and result.sigma == FALLBACK_SIGMA and result.forwards == 0


def test_bad_target_is_rejected():
    with pytest.raises(ValueError, match="alp_sigma_target"):
        calibrate_sigma(lambda s: s, 1.0, 0.0)


def test_masked_k3_matches_the_formula():
    log_ratio = torch.tensor([[0.1, -0.2, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    expected = ((math.exp(0.1) - 1 - 0.1) + (math.exp(-0.2) - 1 + 0.2)) / 2
    assert masked_k3_kl(log_ratio, mask) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("value", "parsed"), [("auto", "auto"), ("AUTO", "auto"), (0.05, 0.05), ("0.05", 0.05), (1, 1.0)]
)
def test_config_accepts_numbers_and_auto(value, parsed, tmp_path):
    assert ALPConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, alp_init_sigma=value).alp_init_sigma == parsed


@pytest.mark.parametrize("value", ["big", -0.1, 0, None, math.inf, True])
def test_config_rejects_bad_sigma(value, tmp_path):
    with pytest.raises(ValueError, match="alp_init_sigma must be a number > 0 or 'auto'"):
        ALPConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, alp_init_sigma=value)


def test_config_rejects_bad_target(tmp_path):
    with pytest.raises(ValueError, match="alp_sigma_target"):
        ALPConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, alp_sigma_target=0)


@pytest.mark.parametrize(("flag", "parsed"), [("auto", "auto"), ("0.003", 0.003)])
def test_cli_parser_reads_auto_and_numbers(flag, parsed, tmp_path):
    (config,) = TrlParser((ALPConfig,)).parse_args_and_config(
        [
            "--output_dir",
            str(tmp_path),
            "--use_cpu",
            "--bf16",
            "false",
            "--alp_init_sigma",
            flag,
            "--alp_sigma_target",
            "0.5",
        ]
    )
    assert config.alp_init_sigma == parsed and config.alp_sigma_target == 0.5


AUTO = dict(alp_init_sigma="auto", alp_rollout_weight_bits=4, alp_learn_sigma=False, max_steps=1)


def test_auto_calibrates_to_the_target_within_20_percent(make_trainer):
    trainer = make_trainer(**AUTO, alp_sigma_target=2.0)
    trainer.train()
    cal = trainer.alp_calibration
    assert not cal["fallback"] and cal["mismatch_kl"] > 1e-6
    assert cal["noise_kl"] == pytest.approx(2.0 * cal["mismatch_kl"], rel=0.2)
    # σ is frozen here, so the trained σ is the calibrated one; the logged values are the calibration's
    torch.testing.assert_close(trainer.alp_perturbation.sigma, torch.full((2,), cal["sigma"]))
    assert last_logged(trainer, "alp/sigma/calibrated") == pytest.approx(cal["sigma"])
    assert last_logged(trainer, "alp/sigma/calibration_mismatch_kl") == pytest.approx(cal["mismatch_kl"])
    assert last_logged(trainer, "alp/sigma/calibration_noise_kl") == pytest.approx(cal["noise_kl"])
    assert cal["sigma"] != FALLBACK_SIGMA


def test_auto_noise_kl_is_really_measured_with_the_noise_on(make_trainer):
    """Re-measure the calibrated noise's KL independently of the calibration's own bookkeeping."""
    trainer = make_trainer(**AUTO, alp_sigma_target=1.0)
    captured = {}
    original = trainer.calibrate_sigma

    def spy(inputs):
        captured["inputs"] = inputs
        return original(inputs)

    trainer.calibrate_sigma = spy
    trainer.train()
    inputs, p = captured["inputs"], trainer.alp_perturbation
    with torch.no_grad():
        clean, _, _ = trainer._alp_completion_logps(trainer.model, inputs)
        with p.active(0, 0), p.forced():
            noisy, _, _ = trainer._alp_completion_logps(trainer.model, inputs)
    # the weights moved by one step since, so only the order of magnitude is compared
    kl = masked_k3_kl(noisy - clean, inputs["completion_mask"])
    assert kl > 0
    assert 0.1 < kl / trainer.alp_calibration["noise_kl"] < 10


def test_auto_is_deterministic(make_trainer, tmp_path):
    sigmas = []
    for name in ("a", "b"):
        trainer = make_trainer(**AUTO, output_dir=str(tmp_path / name))
        trainer.train()
        sigmas.append(trainer.alp_calibration["sigma"])
    assert sigmas[0] == sigmas[1]


def test_auto_falls_back_when_there_is_no_mismatch(make_trainer, caplog):
    trainer = make_trainer(alp_init_sigma="auto", max_steps=1, alp_learn_sigma=False)  # fp32 rollouts: μ = π
    with caplog.at_level("WARNING", logger="trl_alp"):
        trainer.train()
    assert trainer.alp_calibration["fallback"] is True
    assert trainer.alp_calibration["mismatch_kl"] < 1e-8
    torch.testing.assert_close(trainer.alp_perturbation.sigma, torch.full((2,), FALLBACK_SIGMA))
    assert "nothing to calibrate against" in caplog.text


def test_auto_is_saved_and_not_recalibrated_on_resume(make_trainer, tmp_path):
    run = dict(AUTO, alp_learn_sigma=True, max_steps=2, save_strategy="steps", save_steps=1)
    full = make_trainer(**run, output_dir=str(tmp_path / "a"))
    full.train()
    saved = json.loads((tmp_path / "a" / "checkpoint-1" / "alp_state.json").read_text())
    assert saved["calibration"] == full.alp_calibration
    assert saved["sigma"][0] != pytest.approx(saved["calibration"]["sigma"])  # σ was learned after calibration

    resumed = make_trainer(**run, output_dir=str(tmp_path / "b"))
    resumed.calibrate_sigma = lambda inputs: pytest.fail("recalibrated on resume")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    assert resumed.alp_calibration == saved["calibration"]
    torch.testing.assert_close(resumed.alp_perturbation.log_sigma, full.alp_perturbation.log_sigma)
