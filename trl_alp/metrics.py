"""Diagnostics of the importance ratio and of the training–rollout mismatch, as plain floats.

Inputs are already gathered across processes (NaN marks padding); every function ignores NaN entries.
"""

from __future__ import annotations

import math

import torch

QUANTILES = {"q01": 0.01, "q05": 0.05, "q25": 0.25, "q50": 0.5, "q75": 0.75, "q95": 0.95, "q99": 0.99}


def quantile_stats(values: torch.Tensor) -> dict[str, float]:
    """``q01 … q99``, ``min`` and ``max`` of the finite entries of `values` (NaN for all when there are none)."""
    values = values.detach().float().flatten()
    values = values[torch.isfinite(values)]
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
    log_r = token_log_ratio.detach().float().flatten()
    log_r = log_r[torch.isfinite(log_r)]
    seq = seq_mean_log_ratio.detach().float().flatten()
    seq = seq[torch.isfinite(seq)]
    nan = math.nan
    return {
        "k1_kl": (-log_r).mean().item() if log_r.numel() else nan,
        "k3_kl": (torch.exp(log_r) - 1 - log_r).mean().item() if log_r.numel() else nan,
        "abs_logp_diff": log_r.abs().mean().item() if log_r.numel() else nan,
        "log_ppl_diff": (-seq).mean().item() if seq.numel() else nan,
    }
