"""Importance-ratio and loss math as pure tensor functions (no trainer state), so tests can check them by hand.

Shapes: ``logps``, ``rollout_logps`` and ``mask`` are ``(B, T)``; ``advantages`` is ``(B,)`` or ``(B, 1)``.
All log-weights returned here are ``(B, T)``: sequence-level ratios are broadcast to their tokens with the
gradient of each token's own log-prob, as in the ALP authors' GSPO-style form.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .corrections import Correction

LOG_RATIO_CLAMP = 20.0
RATIO_LEVELS = ("token", "sequence", "geometric")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")


def _as_column(advantages: torch.Tensor) -> torch.Tensor:
    return advantages.unsqueeze(1) if advantages.dim() == 1 else advantages


def sequence_log_ratio(
    logps: torch.Tensor, rollout_logps: torch.Tensor, mask: torch.Tensor, level: str = "sequence"
) -> torch.Tensor:
    """Per-sequence log-ratio: the masked sum (``sequence``) or mean (``geometric``) of token log-ratios.

    Args:
        logps: Numerator log-probs, ``(B, T)``.
        rollout_logps: Denominator log-probs, ``(B, T)``.
        mask: 1 on the completion tokens that count, ``(B, T)``.
        level: ``sequence``, ``geometric``, or ``token`` (the masked sum too: the log of the product of token
            ratios).

    Returns:
        ``(B,)`` log-ratios, clamped to ±20 so that ``exp`` stays finite.
    """
    delta = (logps - rollout_logps) * mask
    total = delta.sum(-1)
    if level == "geometric":
        total = total / mask.sum(-1).clamp(min=1.0)
    return total.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def alp_log_weights(
    logps: torch.Tensor, rollout_logps: torch.Tensor, mask: torch.Tensor, level: str = "sequence"
) -> torch.Tensor:
    """Log importance weights ``log w_t`` of the ALP ratio ``π_{θ,δ}(y) / μ(y)``.

    * ``token``: ``clamp(log π(y_t) − log μ(y_t), ±20)``.
    * ``sequence``: value ``S = Σ_t m_t (log π − log μ)`` (the product of token ratios), gradient per token:
      ``log w_t = sg(S) + log π(y_t) − sg(log π(y_t))`` (the authors' GSPO-style form).
    * ``geometric``: the same with ``S`` divided by the number of completion tokens.

    Args:
        logps: Numerator log-probs with gradient (perturbed under ALP), ``(B, T)``.
        rollout_logps: The rollout engine's log-probs μ, ``(B, T)``.
        mask: 1 on the completion tokens that count, ``(B, T)``.
        level: ``token``, ``sequence`` or ``geometric``.

    Returns:
        ``(B, T)`` log-weights; sequence levels broadcast one value over the sequence's tokens.

    Raises:
        ValueError: An unknown `level`.
    """
    if level == "token":
        return (logps - rollout_logps).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if level not in RATIO_LEVELS:
        raise ValueError(f"ratio level must be one of {RATIO_LEVELS}, got {level!r}")
    seq = sequence_log_ratio(logps.detach(), rollout_logps, mask, level).unsqueeze(-1)
    return seq + (logps - logps.detach())  # exactly seq in value (no rounding), per-token gradient


class Clip(NamedTuple):
    """The clip settings of a policy loss: PPO range ``[1 − low, 1 + high]``, ALP's dual clip ``dual`` (loss capped at
    ``dual·|A|`` for negative advantages), TRL's two-sided ``delta`` (the unclipped ratio capped at ``delta``), and
    the CISPO cap of the detached ratio."""

    low: float
    high: float
    dual: float | None = None
    delta: float | None = None
    cispo_cap: float | None = None


def clipped_surrogate(
    log_weights: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    dual_clip: float | None = None,
    delta: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped loss ``−min(r·A, clip(r, 1−ε_low, 1+ε_high)·A)`` with optional dual clip or TRL's `delta`.

    Dual clip (for ``A < 0``): the loss is capped at ``c·|A|``, i.e. the objective is ``max(PPO, c·A)``, so a huge
    ratio on a negative-advantage token cannot blow up the gradient. `delta` is TRL's two-sided clip: the unclipped
    ratio is capped at `delta` before the ``min``.

    Args:
        log_weights: Log importance weights, ``(B, T)``.
        advantages: ``(B,)`` or ``(B, 1)``.
        epsilon_low: The ratio's lower clip is ``1 − epsilon_low``.
        epsilon_high: The ratio's upper clip is ``1 + epsilon_high``.
        dual_clip: ALP's dual-clip constant c, or None.
        delta: TRL's two-sided clip, or None.

    Returns:
        The per-token loss ``(B, T)`` and boolean masks ``low`` / ``high`` / ``dual`` of the tokens each clip made
        constant (for the ``alp/clip/*`` metrics).
    """
    advantages = _as_column(advantages)
    ratio = torch.exp(log_weights)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * advantages
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    per_token_loss = -torch.min(ratio * advantages, clipped)
    negative = advantages < 0
    is_dual = torch.zeros_like(negative.expand_as(ratio))
    if dual_clip is not None:
        per_token_loss = torch.where(negative, torch.minimum(per_token_loss, -dual_clip * advantages), per_token_loss)
        is_dual = (ratio > dual_clip) & negative
    stats = {
        "low": (ratio < 1 - epsilon_low) & negative,
        "high": (ratio > 1 + epsilon_high) & (advantages > 0),
        "dual": is_dual,
    }
    return per_token_loss, stats


def policy_loss(
    loss_type: str,
    log_weights: torch.Tensor,
    advantages: torch.Tensor,
    logps: torch.Tensor,
    clip: Clip,
    *,
    sapo_temperatures: tuple[float, float] = (1.0, 1.05),
    vespo_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """Per-token policy loss of TRL 1.16's `loss_type` on the log importance weights ``log w``.

    * ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``luspo``: the clipped surrogate (:func:`clipped_surrogate`);
    * ``cispo``: ``−min(w, clip.cispo_cap)·A·log π`` with the capped ratio detached;
    * ``sapo``: the soft gate ``−σ(τ(w − 1))·4/τ·A`` with τ = ``sapo_temperatures`` (positive, negative advantage);
    * ``vespo``: ``−φ·A·log π`` with the detached γ-weights φ (TRL's ``get_gamma_weights``) in `vespo_weights`.

    Args:
        loss_type: One of TRL 1.16's loss types (`LOSS_TYPES`).
        log_weights: Log importance weights, ``(B, T)``.
        advantages: ``(B,)`` or ``(B, 1)``.
        logps: The numerator log-probs with gradient (for ``cispo`` and ``vespo``), ``(B, T)``.
        clip: The correction's clip settings.
        sapo_temperatures: SAPO's τ for positive and negative advantages.
        vespo_weights: TRL's γ-weights, required for ``vespo``.

    Returns:
        The per-token loss ``(B, T)`` and, for the clipped losses, the clip masks (else None).

    Raises:
        ValueError: An unknown `loss_type`, or a missing `clip.cispo_cap` / `vespo_weights`.
    """
    advantages = _as_column(advantages)
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        return clipped_surrogate(log_weights, advantages, clip.low, clip.high, clip.dual, clip.delta)
    if loss_type == "cispo":
        if clip.cispo_cap is None:
            raise ValueError("loss_type='cispo' needs clip.cispo_cap")
        capped = torch.clamp(torch.exp(log_weights), max=clip.cispo_cap).detach()
        return -capped * advantages * logps, None
    if loss_type == "sapo":
        positive, negative = sapo_temperatures
        temperatures = torch.where(advantages > 0, positive, negative)
        return -torch.sigmoid(temperatures * (torch.exp(log_weights) - 1)) * 4 / temperatures * advantages, None
    if loss_type == "vespo":
        if vespo_weights is None:
            raise ValueError("loss_type='vespo' needs vespo_weights (TRL's get_gamma_weights)")
        return -vespo_weights * advantages * logps, None
    raise ValueError(f"Unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}.")


def kl_weights(logps: torch.Tensor, denominator_logps: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """Importance weight of the per-token KL term (TRL's ``use_bias_correction_kl``), differentiable like TRL's.

    ``geometric``: the length-normalised sequence ratio, ``(B, 1)`` (TRL's ``importance_sampling_level="sequence"``).
    ``token`` and ``sequence``: the token ratio ``π(y_t)/denominator(y_t)``, ``(B, T)``. The product sequence ratio
    is never used here: it reaches e^20 on long sequences, and the token ratio is the weight that keeps the per-token
    reverse-KL estimate unbiased under the sampling distribution.

    Args:
        logps: Numerator log-probs with gradient, ``(B, T)``.
        denominator_logps: The ratio's denominator, ``(B, T)``.
        mask: 1 on the completion tokens that count, ``(B, T)``.
        level: The correction's ratio level.

    Returns:
        ``(B, 1)`` for ``geometric``, else ``(B, T)`` weights.
    """
    if level == "geometric":
        return torch.exp(sequence_log_ratio(logps, denominator_logps, mask, "geometric")).unsqueeze(-1)
    if level not in RATIO_LEVELS:
        raise ValueError(f"ratio level must be one of {RATIO_LEVELS}, got {level!r}")
    return torch.exp((logps - denominator_logps).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def k3(log_ratio: torch.Tensor, *, clamp: tuple[float, float] | None = None) -> torch.Tensor:
    """The package's one k3 KL estimator, per element: ``r − 1 − log r`` with ``log r = log_ratio``.

    Used by the loss's KL term (:func:`k3_kl`), the logged ``alp/mismatch/k3_kl`` and σ₀ calibration, so the three
    measure the same thing. Computed as ``expm1(x) − x``: the same gradient as TRL's ``exp(x) − x − 1`` and no
    cancellation for the small KLs that calibration compares (pass float64 where 1e-8 matters).

    Args:
        log_ratio: Log-ratio ``log r`` of the two policies on the sampled tokens, any shape.
        clamp: ``(max_log_ratio, max_value)`` bounds it as verl's ``low_var_kl`` does (the ALP authors' single-turn
            KL): ``log r`` clamped to ``±max_log_ratio``, the estimate to ``±max_value``. ``None`` leaves it
            unbounded (TRL's form).

    Returns:
        The per-element estimate, same shape and dtype as `log_ratio`.
    """
    if clamp is not None:
        log_ratio = log_ratio.clamp(-clamp[0], clamp[0])
    kl = torch.expm1(log_ratio) - log_ratio
    return kl if clamp is None else kl.clamp(-clamp[1], clamp[1])


def k3_kl(logps: torch.Tensor, other_logps: torch.Tensor, *, clamp: tuple[float, float] | None = None) -> torch.Tensor:
    """Per-token KL(π‖other) estimate of the loss's KL term: :func:`k3` of ``other_logps − logps`` (TRL's form).

    Args:
        logps: Log-probs of the policy being trained, ``(B, T)``.
        other_logps: Log-probs of the other policy (the reference), ``(B, T)``.
        clamp: As in :func:`k3`.

    Returns:
        ``(B, T)`` per-token estimates.
    """
    return k3(other_logps - logps, clamp=clamp)


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    *,
    accumulation_steps: int = 1,
    num_items_in_batch: torch.Tensor | float | None = None,
    num_processes: int = 1,
    steps_per_generation: int = 1,
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce a per-token loss the way TRL 1.16's `GRPOTrainer` does for `loss_type`.

    Args:
        per_token_loss: ``(B, T)`` (or broadcastable to `mask`).
        mask: 1 on the completion tokens that count, ``(B, T)``.
        loss_type: One of `LOSS_TYPES`.
        accumulation_steps: Gradient-accumulation steps; 1 in evaluation.
        num_items_in_batch: TRL's token count of the whole generation batch (``dapo``, ``cispo``, ``vespo``).
        num_processes: Number of processes (``dapo``, ``cispo``, ``vespo`` normalise per process).
        steps_per_generation: TRL's ``steps_per_generation``; 1 in evaluation.
        max_completion_length: Required for ``dr_grpo``.

    Returns:
        ``(loss to backpropagate, policy loss for logging)``.

    Raises:
        ValueError: An unknown `loss_type` or a missing argument it needs.
    """
    mask = mask.to(per_token_loss.dtype)
    per_token_loss = per_token_loss.expand_as(mask)
    if loss_type in ("grpo", "sapo"):
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' needs max_completion_length")
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    elif loss_type == "luspo":
        loss = (per_token_loss * mask).sum(-1).mean()
    elif loss_type in ("dapo", "cispo", "vespo"):
        if num_items_in_batch is None:
            raise ValueError(f"loss_type={loss_type!r} needs num_items_in_batch")
        normalizer = torch.as_tensor(num_items_in_batch, dtype=per_token_loss.dtype).clamp(min=1.0) / num_processes
        normalizer = normalizer * accumulation_steps / steps_per_generation
        loss = (per_token_loss * mask).sum() / normalizer
        return loss, loss.detach()
    else:
        raise ValueError(f"Unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}.")
    return loss / accumulation_steps, loss.detach()


def rollout_correction_weights(
    old_logps: torch.Tensor,
    rollout_logps: torch.Tensor,
    mask: torch.Tensor,
    level: str,
    mode: str,
    clip_min: float | None,
    clip_max: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TIS/MIS weights ``w = π_old / μ`` (TRL's vLLM importance-sampling semantics), detached.

    Args:
        old_logps: π_old's log-probs, ``(B, T)``.
        rollout_logps: The rollout engine's log-probs μ, ``(B, T)``.
        mask: 1 on the completion tokens that count, ``(B, T)``.
        level: ``token`` (``(B, T)`` weights) or ``sequence`` (``(B, 1)`` weights of the summed log-ratio).
        mode: ``truncate`` (TIS) clamps w to ``[clip_min, clip_max]``; ``mask`` (MIS) sets w to 0 outside it.
        clip_min: Lower bound of the band; None leaves it open.
        clip_max: Upper bound of the band; None leaves it open.

    Returns:
        ``(weights, hit)``, `hit` marking the entries that were clamped or masked.
    """
    diff = torch.nan_to_num((old_logps - rollout_logps).detach() * mask, nan=0.0)
    if level == "sequence":
        diff = diff.sum(-1, keepdim=True)
    elif level != "token":
        raise ValueError(f"TIS/MIS level must be 'token' or 'sequence', got {level!r}")
    weights = torch.exp(diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    hit = (weights < low) | (weights > high)
    if mode == "truncate":
        weights = weights.clamp(min=clip_min, max=clip_max)
    elif mode == "mask":
        weights = weights.masked_fill(hit, 0.0)
    else:
        raise ValueError(f"TIS/MIS mode must be 'truncate' or 'mask', got {mode!r}")
    return weights, hit


class Ratio(NamedTuple):
    """A correction's importance ratio on one batch (`correction_ratio`)."""

    log_weights: torch.Tensor  # (B, T) log-weights of the clipped ratio, with gradient through the numerator
    denominator: torch.Tensor  # (B, T) the ratio's denominator log-probs: μ (ALP, Bypass) or π_old (TIS, MIS)
    is_weights: torch.Tensor | None  # TIS/MIS rollout weight π_old/μ, (B, T) or (B, 1); None for ALP and Bypass
    is_hit: torch.Tensor | None  # where that weight was truncated or masked


def correction_ratio(
    correction: Correction,
    logps: torch.Tensor,
    rollout_logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    mask: torch.Tensor,
    level: str,
    is_clip: tuple[float | None, float | None] = (None, None),
) -> Ratio:
    """The ratio a `trl_alp.corrections.Correction` trains with: ALP and Bypass over the rollout log-probs μ; TIS and
    MIS over TRL's π_old (`old_logps`, or the detached numerator when TRL computed none: the weights have not moved
    since sampling), times the rollout weight π_old/μ bounded by `is_clip` (`rollout_correction_weights`).
    """
    denominator = rollout_logps
    if correction.uses_old_logps:
        denominator = logps.detach() if old_logps is None else old_logps
    is_weights = is_hit = None
    if correction.is_mode is not None:
        is_weights, is_hit = rollout_correction_weights(
            denominator, rollout_logps, mask, correction.level, correction.is_mode, *is_clip
        )
    return Ratio(alp_log_weights(logps, denominator, mask, level), denominator, is_weights, is_hit)


def drop_nonfinite(
    mask: torch.Tensor, logps: torch.Tensor, rollout_logps: torch.Tensor, entropies: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Tokens the engine could not score (vLLM reports NaN) or whose training log-prob is not finite carry no ratio:
    drop them from `mask` and zero them, so no NaN reaches σ or the weights.

    Returns:
        ``(mask, logps, rollout_logps, entropies)`` cleaned, and the counts of masked tokens dropped for a non-finite
        rollout log-prob and for a non-finite training log-prob, as a float tensor ``[rollout, numerator]``.
    """
    rollout_ok, numerator_ok = torch.isfinite(rollout_logps), torch.isfinite(logps.detach())
    faults = torch.stack([(mask * ~rollout_ok).sum(), (mask * ~numerator_ok).sum()]).float()
    cleaned = (
        mask * rollout_ok * numerator_ok,
        torch.where(numerator_ok, logps, 0.0),
        torch.where(rollout_ok, rollout_logps, 0.0),
        torch.nan_to_num(entropies, nan=0.0, posinf=0.0, neginf=0.0),
    )
    return cleaned, faults
