"""Diagnostics against hand computations."""

import math

import pytest
import torch

from trl_alp.metrics import QUANTILES, mismatch_stats, quantile_stats, weight_diagnostics


def test_quantiles_match_torch_and_ignore_nan():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan"), 100.0])
    stats = quantile_stats(values)
    finite = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    for name, q in QUANTILES.items():
        assert stats[name] == pytest.approx(torch.quantile(finite, q).item())
    assert stats["min"] == 1.0 and stats["max"] == 100.0
    assert all(math.isnan(v) for v in quantile_stats(torch.tensor([float("nan")])).values())


def test_mismatch_hand_values():
    token = torch.tensor([0.5, -0.5, 0.0, float("nan")])
    stats = mismatch_stats(token, torch.tensor([0.25, -0.75]))
    assert stats["k1_kl"] == pytest.approx(0.0)
    assert stats["k3_kl"] == pytest.approx(((math.exp(0.5) - 1.5) + (math.exp(-0.5) - 0.5)) / 3)
    assert stats["abs_logp_diff"] == pytest.approx(1 / 3)
    assert stats["log_ppl_diff"] == pytest.approx(0.25)


def test_weight_diagnostics_hand_values():
    log_w = torch.log(torch.tensor([1.0, 3.0, 0.15, 12.0]))
    stats = weight_diagnostics(log_w)
    w = torch.tensor([1.0, 3.0, 0.15, 12.0], dtype=torch.float32).double()
    assert stats["chi2"] == pytest.approx((w**2).mean().item() - 1)
    assert stats["ess"] == pytest.approx((w.sum() ** 2 / (4 * (w**2).sum())).item())
    assert stats["frac_above_2x"] == 0.5 and stats["frac_above_5x"] == 0.25 and stats["frac_above_10x"] == 0.25
    assert stats["frac_below_2x"] == 0.25 and stats["frac_below_5x"] == 0.25 and stats["frac_below_10x"] == 0.0


def test_on_policy_weights_are_ideal():
    stats = weight_diagnostics(torch.zeros(10))
    assert stats["chi2"] == pytest.approx(0.0) and stats["ess"] == pytest.approx(1.0)
