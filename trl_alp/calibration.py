"""σ₀ calibration (``alp_init_sigma="auto"``): pick the noise scale whose own KL matches a share of the mismatch.

The perturbation exists to cover the training–inference mismatch, so its size is measured in the same unit: the k3
estimate of KL between the clean training policy and a reference on the sampled tokens. Given the mismatch KL
``KL(μ‖π)`` of the first batch and a callable ``σ ↦ KL(π‖π_σ)`` (no-grad perturbed forwards with fixed noise), one σ₀
is found by bisection in ``log σ`` so that ``KL(π‖π_σ) ≈ target_ratio · KL(μ‖π)``. The noise KL grows with σ (≈ σ²
for small σ), so bisection on the log scale converges in a handful of forwards.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from .loss import k3

if TYPE_CHECKING:
    from .perturbation import LayerPerturbation

logger = logging.getLogger(__name__)

# No measurable mismatch below this k3 KL (nats/token): fp32 rollouts of the training weights give ~1e-12.
MISMATCH_KL_FLOOR = 1e-8
# σ₀ used when there is no mismatch to calibrate against (the authors' single-turn value).
FALLBACK_SIGMA = 0.02
SIGMA_BRACKET = (1e-6, 10.0)


@dataclass
class Calibration:
    """Outcome of one σ₀ calibration, as saved in ``alp_state.json``."""

    sigma: float
    mismatch_kl: float
    target_kl: float
    noise_kl: float
    forwards: int
    fallback: bool

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate_sigma(
    noise_kl: Callable[[float], float],
    mismatch_kl: float,
    target_ratio: float,
    *,
    bracket: tuple[float, float] = SIGMA_BRACKET,
    max_forwards: int = 16,
    rel_tol: float = 0.05,
    floor: float = MISMATCH_KL_FLOOR,
    fallback_sigma: float = FALLBACK_SIGMA,
) -> Calibration:
    """Bisection in ``log σ`` for ``noise_kl(σ) = target_ratio · mismatch_kl``.

    `noise_kl` must be deterministic and non-decreasing in σ (fixed noise draw). Stops when the relative error is
    below `rel_tol` or after `max_forwards` evaluations, returning the best σ seen. When `mismatch_kl` is not finite
    or below `floor` there is nothing to calibrate against: returns `fallback_sigma` with ``fallback=True`` and no
    forward. A target outside what the bracket can reach returns the bracket end (the closest achievable σ).
    """
    if not target_ratio > 0:
        raise ValueError(f"alp_sigma_target must be > 0, got {target_ratio!r}")
    lo, hi = bracket
    if not 0 < lo < hi:
        raise ValueError(f"bracket must satisfy 0 < lo < hi, got {bracket!r}")
    if not (math.isfinite(mismatch_kl) and mismatch_kl >= floor):
        return Calibration(fallback_sigma, mismatch_kl, math.nan, math.nan, 0, True)
    target = target_ratio * mismatch_kl
    log_lo, log_hi = math.log(lo), math.log(hi)
    best: tuple[float, float, float] | None = None  # (|log error|, σ, kl)
    forwards = 0

    def evaluate(log_sigma: float) -> float:
        nonlocal best, forwards
        sigma = math.exp(log_sigma)
        kl = noise_kl(sigma)
        forwards += 1
        error = abs(math.log(max(kl, 1e-30) / target)) if math.isfinite(kl) else math.inf
        if best is None or error < best[0]:
            best = (error, sigma, kl)
        return kl

    # The bracket ends: a target beyond them is answered by the nearer end.
    if evaluate(log_hi) <= target or evaluate(log_lo) >= target:
        _, sigma, kl = best
        return Calibration(sigma, mismatch_kl, target, kl, forwards, False)
    while forwards < max_forwards and best[0] > math.log1p(rel_tol):
        middle = 0.5 * (log_lo + log_hi)
        kl = evaluate(middle)
        if not math.isfinite(kl) or kl > target:
            log_hi = middle
        else:
            log_lo = middle
    _, sigma, kl = best
    return Calibration(sigma, mismatch_kl, target, kl, forwards, False)


def masked_k3_kl(log_ratio: torch.Tensor, mask: torch.Tensor, reduce: bool = True):
    """Masked mean of `trl_alp.loss.k3` (the logged ``alp/mismatch/k3_kl`` estimator) over the tokens in `mask`.

    Args:
        log_ratio: ``log π − log μ`` (or noisy − clean) per token; entries outside `mask` are ignored, even non-finite.
        mask: 1 for the tokens to average over.
        reduce: ``False`` returns the ``(sum, count)`` tensors, for a cross-process reduction.

    Returns:
        The mean as a float (NaN when `mask` is empty), or ``(sum, count)``. Float64: calibration compares KLs of 1e-6
        and below, which fp32 cancellation would drown.
    """
    mask = mask.double()
    log_ratio = torch.where(mask.bool(), log_ratio.double(), 0.0)
    total = (k3(log_ratio) * mask).sum()
    count = mask.sum()
    if not reduce:
        return total, count
    return (total / count).item() if count > 0 else math.nan


def report_calibration(result: Calibration) -> None:
    """Log what one calibration chose, and why when it fell back."""
    if result.fallback:
        logger.warning(
            "alp_init_sigma='auto': the training–rollout mismatch KL on the first batch is %.3g (below the floor, "
            "or no rollout log-probs): nothing to calibrate against, using σ₀ = %g.",
            result.mismatch_kl,
            result.sigma,
        )
    else:
        logger.info(
            "alp_init_sigma='auto': mismatch k3 KL %.3g → σ₀ = %.4g (noise k3 KL %.3g, target %.3g, %d forwards)",
            result.mismatch_kl,
            result.sigma,
            result.noise_kl,
            result.target_kl,
            result.forwards,
        )


def calibrate_on_batch(
    completion_logps: Callable[[], torch.Tensor],
    perturbation: LayerPerturbation,
    mask: torch.Tensor,
    rollout_logps: torch.Tensor | None,
    target_ratio: float,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor],
    seed_key: tuple[int, int, int],
) -> Calibration:
    """`calibrate_sigma` on one batch, leaving the chosen σ₀ in every perturbed layer.

    Args:
        completion_logps: A forward of the batch's completion tokens (run here without grad).
        perturbation: The `LayerPerturbation` to calibrate.
        mask: The tokens that count; those without a finite rollout log-prob are left out.
        rollout_logps: The rollout engine's log-probs, or `None` (nothing to calibrate against: the fallback σ).
        target_ratio: ``alp_sigma_target``.
        reduce_sum: A sum over every process (every process calls it in the same order).
        seed_key: ``(step, micro_step, rank)`` of the noise draws, when the perturbation is not already active.
    """
    mask = mask * torch.isfinite(rollout_logps) if rollout_logps is not None else mask

    def global_k3(log_ratio: torch.Tensor) -> float:
        total, count = reduce_sum(torch.stack(masked_k3_kl(log_ratio, mask, reduce=False))).tolist()
        return total / count if count > 0 else math.nan

    with torch.no_grad(), contextlib.ExitStack() as stack:
        clean = completion_logps()
        mismatch = (
            math.nan
            if rollout_logps is None
            else global_k3(clean - torch.nan_to_num(rollout_logps, nan=0.0, posinf=0.0, neginf=0.0))
        )
        if not perturbation.is_active:
            stack.enter_context(perturbation.active(*seed_key))

        def noise_kl(sigma: float) -> float:
            perturbation.log_sigma.fill_(math.log(sigma))
            with perturbation.forced():
                return global_k3(completion_logps() - clean)

        result = calibrate_sigma(noise_kl, mismatch, target_ratio)
        perturbation.log_sigma.fill_(math.log(result.sigma))
    return result
