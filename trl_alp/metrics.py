"""Diagnostics of the importance ratio and of the training–rollout mismatch, as plain floats.

Inputs are already gathered across processes (NaN marks padding); every function ignores NaN entries.
"""

from __future__ import annotations

import math

import torch

QUANTILES = {
    "q01": 0.01,
    "q02": 0.02,
    "q05": 0.05,
    "q25": 0.25,
    "q50": 0.5,
    "q75": 0.75,
    "q95": 0.95,
    "q98": 0.98,
    "q99": 0.99,
}
TAIL_FACTORS = (2, 5, 10)


def _finite(values: torch.Tensor) -> torch.Tensor:
    values = values.detach().float().flatten()
    return values[torch.isfinite(values)]


def quantile_stats(values: torch.Tensor) -> dict[str, float]:
    """``q01 … q99``, ``min`` and ``max`` of the finite entries of `values` (NaN for all when there are none)."""
    values = _finite(values)
    if values.numel() == 0:
        return {name: math.nan for name in (*QUANTILES, "min", "max")}
    qs = torch.quantile(values, torch.tensor(list(QUANTILES.values()), dtype=values.dtype, device=values.device))
    stats = dict(zip(QUANTILES, qs.tolist(), strict=True))
    stats["min"], stats["max"] = values.min().item(), values.max().item()
    return stats


def mismatch_stats(token_log_ratio: torch.Tensor, seq_mean_log_ratio: torch.Tensor) -> dict[str, float]:
    """Mismatch between training log-probs π and rollout log-probs μ on the tokens μ sampled.

    `token_log_ratio` holds ``log π(y_t) − log μ(y_t)`` of every completion token, `seq_mean_log_ratio` its mean
    over each sequence. Returns

    * ``k1_kl``: mean of ``log μ − log π`` (unbiased estimate of KL(μ‖π); can be negative on a batch);
    * ``k3_kl``: mean of ``r − 1 − log r`` with ``r = π/μ`` (low-variance, non-negative estimate of KL(μ‖π));
    * ``abs_logp_diff``: mean ``|log π − log μ|``;
    * ``log_ppl_diff``: mean over sequences of ``log PPL_π − log PPL_μ`` (= −mean log-ratio of the sequence).
    """
    log_r = _finite(token_log_ratio)
    seq = _finite(seq_mean_log_ratio)
    nan = math.nan
    return {
        "k1_kl": (-log_r).mean().item() if log_r.numel() else nan,
        "k3_kl": (torch.exp(log_r) - 1 - log_r).mean().item() if log_r.numel() else nan,
        "abs_logp_diff": log_r.abs().mean().item() if log_r.numel() else nan,
        "log_ppl_diff": (-seq).mean().item() if seq.numel() else nan,
    }


def weight_diagnostics(log_ratio: torch.Tensor) -> dict[str, float]:
    """Heavy-tail diagnostics of importance weights ``w = exp(log_ratio)`` (token or sequence level).

    * ``chi2``: ``mean(w²) − 1``, the χ² divergence estimate (0 when on-policy);
    * ``ess``: normalised effective sample size ``(Σw)² / (N·Σw²)`` in (0, 1];
    * ``frac_above_{k}x`` / ``frac_below_{k}x``: fraction of weights ``> k`` / ``< 1/k`` for k in 2, 5, 10.
    """
    log_w = _finite(log_ratio).double().clamp(-20.0, 20.0)
    names = ["chi2", "ess"] + [f"frac_{side}_{k}x" for k in TAIL_FACTORS for side in ("above", "below")]
    if log_w.numel() == 0:
        return dict.fromkeys(names, math.nan)
    w = torch.exp(log_w)
    stats = {"chi2": (w.pow(2).mean() - 1).item(), "ess": (w.sum().pow(2) / (w.numel() * w.pow(2).sum())).item()}
    for k in TAIL_FACTORS:
        stats[f"frac_above_{k}x"] = (log_w > math.log(k)).double().mean().item()
        stats[f"frac_below_{k}x"] = (log_w < -math.log(k)).double().mean().item()
    return stats
