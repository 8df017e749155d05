"""Rollout rejection as pure tensor functions: which completion tokens leave the loss because the rollout engine's
distribution μ disagrees too much with the training policy π_old on them.

Three kinds, all on the per-token log-ratio ``log r_t = log π_old(y_t) − log μ(y_t)`` (the trainer passes the
recomputed, unperturbed old policy; see docs/corrections.md#rollout-rejection for why):

* the ALP authors' ratio band (:func:`rollout_mask_weights`, ``alp_rollout_mask``): the weight ``r`` per token, as
  the sequence product or its geometric mean, kept inside ``[min, max]`` and multiplied into the loss;
* verl's divergence criteria (``rollout_rs``: :func:`rejection_statistic`, ``alp_rollout_rejection``): k1/k2/k3 per
  token, or their sum, mean or max over the sequence, against a threshold;
* verl's token veto (``rollout_token_veto_threshold``: :func:`veto_rejected`): a sequence with any token whose
  ratio falls below a floor is rejected whole.

Shapes: ``old_logps``, ``rollout_logps`` and ``mask`` are ``(B, T)``, ``mask`` 1 on the completion tokens that
count. "Rejected" tensors are boolean ``(B, T)`` and never mark padding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .loss import LOG_RATIO_CLAMP, k3

ROLLOUT_MASK_LEVELS = ("token", "sequence", "geometric")
# verl 0.9.1's `SUPPORTED_ROLLOUT_RS_OPTIONS` (verl/trainer/ppo/rollout_corr_helper.py), in its documented order.
REJECTION_CRITERIA = (
    "token_k1",
    "token_k2",
    "token_k3",
    "seq_sum_k1",
    "seq_sum_k2",
    "seq_sum_k3",
    "seq_mean_k1",
    "seq_mean_k2",
    "seq_mean_k3",
    "seq_max_k2",
    "seq_max_k3",
)
VETO = "veto"  # the veto's name among the criteria in `RolloutRejection.rejected` and in the metrics


def rollout_mask_weights(
    old_logps: torch.Tensor,
    rollout_logps: torch.Tensor,
    mask: torch.Tensor,
    level: str,
    low: float,
    high: float,
    weighted: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ALP authors' rollout rejection mask (``rollout_is_mode="mask"``), ``(B, T)`` weights, detached.

    Transcribes ``compute_rollout_importance_weights`` (multi-turn/verl/trainer/ppo/rollout_is.py of
    amazon-science/adaptive-layerwise-perturbation) without its veto (:func:`veto_rejected` is verl's): the weight
    ``w = π_old / μ`` of the recomputed, unperturbed old policy over the rollout engine, per token (``token``), as the
    product over the sequence (``sequence``: masked sum of log-ratios) or its geometric mean (``geometric``), log
    clamped to ±20, is kept where ``low <= w <= high`` (inclusive) and zeroed elsewhere; padding gets 0.

    Args:
        old_logps: The unperturbed old policy's log-probs, ``(B, T)``.
        rollout_logps: The rollout engine's log-probs μ, ``(B, T)``.
        mask: 1 on the completion tokens that count, ``(B, T)``.
        level: ``token``, ``sequence`` or ``geometric``.
        low: Lower bound of the kept band (inclusive).
        high: Upper bound of the kept band (inclusive).
        weighted: ``True`` returns ``w`` itself on kept entries, as the authors do (their
            ``pg_losses * rollout_is_weights``); ``False`` a plain 0/1 rejection mask.

    Returns:
        ``(weights, rejected)``: ``(B, T)`` weights and the masked-out valid tokens.
    """
    log_ratio = (old_logps - rollout_logps).detach() * mask
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True)
    elif level == "geometric":
        log_ratio = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    elif level != "token":
        raise ValueError(f"rollout mask level must be one of {ROLLOUT_MASK_LEVELS}, got {level!r}")
    weights = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).expand_as(mask)
    keep = (weights >= low) & (weights <= high)
    weights = torch.where(keep, weights if weighted else torch.ones_like(weights), 0.0) * mask
    return weights.detach(), ~keep & mask.bool()


# ------------------------------------------------------------------------------------------- verl's criteria
class RejectionBounds(NamedTuple):
    """What one criterion keeps. k1 criteria: ``lower <= exp(statistic) <= upper``, i.e. the band is on
    ``exp(k1) = μ/π_old`` (verl's definition; a single number ``u`` gives ``[1/u, u]``). k2/k3 criteria:
    ``statistic <= upper`` (``lower`` is None: a divergence is never too small)."""

    lower: float | None
    upper: float


def parse_rejection_criteria(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """``alp_rollout_rejection`` as a tuple of verl criterion names, duplicates dropped, order kept.

    Accepts ``None``, one name, a comma-separated string (verl's ``rollout_rs`` syntax) or a list of names.

    Raises:
        ValueError: An unknown name, or a value that names no criterion.
    """
    if value is None:
        return ()
    parts = value.split(",") if isinstance(value, str) else list(value)
    names = [part.strip() if isinstance(part, str) else part for part in parts]
    names = [name for name in names if name != ""]
    unknown = [name for name in names if name not in REJECTION_CRITERIA]
    if unknown or not names:
        raise ValueError(
            f"alp_rollout_rejection must be None or one or more of {list(REJECTION_CRITERIA)} (comma-separated or "
            f"a list), got {value!r}"
        )
    return tuple(dict.fromkeys(names))


def _positive_number(text: str, criterion: str, spec) -> float:
    try:
        number = float(text)
    except ValueError:
        raise ValueError(
            f"alp_rollout_rejection_threshold: {text!r} for {criterion} is not a number ({spec!r})"
        ) from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"alp_rollout_rejection_threshold for {criterion} must be finite and > 0, got {spec!r}")
    return number


def parse_rejection_thresholds(
    criteria: tuple[str, ...], spec: str | float | list | tuple | None
) -> dict[str, RejectionBounds]:
    """``alp_rollout_rejection_threshold`` for `criteria`, with verl's ``rollout_rs_threshold`` syntax
    (``_parse_rollout_rs_thresholds``, verl/trainer/ppo/rollout_corr_helper.py of verl 0.9.1).

    One entry shared by every criterion, or one per criterion (comma-separated, or a list). A k1 entry is
    ``"lower_upper"`` or a single ``upper`` (then ``lower = 1/upper``); a k2/k3 entry is one upper bound. Every
    number must be finite and > 0, and ``lower <= upper``.

    Raises:
        ValueError: A missing threshold, a count that matches neither 1 nor the number of criteria, a malformed or
            non-positive number, ``lower > upper``, or a ``lower_upper`` pair for a k2/k3 criterion.
    """
    if spec is None:
        raise ValueError(
            "alp_rollout_rejection_threshold must be set when alp_rollout_rejection is: e.g. '2.0' for a k1 "
            "criterion (band [1/2, 2]), '0.01' for seq_mean_k3."
        )
    if isinstance(spec, bool):
        raise ValueError(f"alp_rollout_rejection_threshold must be a number or a string, got {spec!r}")
    if isinstance(spec, (int, float)):
        entries = [repr(float(spec))]
    elif isinstance(spec, str):
        entries = [part.strip() for part in spec.split(",") if part.strip()]
    else:
        entries = [str(part).strip() for part in spec]
    if len(entries) not in (1, len(criteria)):
        raise ValueError(
            f"alp_rollout_rejection_threshold needs one threshold for all criteria or one per criterion "
            f"({len(criteria)}: {', '.join(criteria)}), got {len(entries)}: {spec!r}"
        )
    entries = entries * len(criteria) if len(entries) == 1 else entries
    bounds = {}
    for criterion, entry in zip(criteria, entries, strict=True):
        if criterion.endswith("k1"):
            if "_" in entry:
                lower_text, upper_text = entry.split("_", 1)
                lower = _positive_number(lower_text, criterion, spec)
                upper = _positive_number(upper_text, criterion, spec)
            else:
                upper = _positive_number(entry, criterion, spec)
                lower = 1.0 / upper
            if lower > upper:
                raise ValueError(
                    f"alp_rollout_rejection_threshold for {criterion} must be 'lower_upper' with lower <= upper, "
                    f"got {entry!r}"
                )
            bounds[criterion] = RejectionBounds(lower, upper)
        else:
            if "_" in entry:
                raise ValueError(
                    f"alp_rollout_rejection_threshold for {criterion} is one upper bound on the divergence (no "
                    f"'lower_upper' pair), got {entry!r}"
                )
            bounds[criterion] = RejectionBounds(None, _positive_number(entry, criterion, spec))
    return bounds


def token_divergence(log_ratio: torch.Tensor, estimator: str) -> torch.Tensor:
    """verl's per-token estimators of ``log r = log π_old − log μ``, clamped to ±20 first: ``k1 = −log r``,
    ``k2 = ½ (log r)²``, ``k3 = r − 1 − log r`` (the package's :func:`~trl_alp.loss.k3`)."""
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return k3(log_ratio)
    raise ValueError(f"estimator must be one of ('k1', 'k2', 'k3'), got {estimator!r}")


def is_token_level(criterion: str) -> bool:
    """Whether `criterion` rejects single tokens (``token_*``) rather than whole sequences."""
    return criterion.startswith("token_")


def rejection_statistic(log_ratio: torch.Tensor, mask: torch.Tensor, criterion: str) -> torch.Tensor:
    """The quantity `criterion` thresholds: the token divergence ``(B, T)`` for ``token_*``, its masked sum, mean or
    max over each sequence ``(B,)`` for ``seq_sum_*`` / ``seq_mean_*`` / ``seq_max_*``. A sequence without valid
    tokens gets 0 (as verl's ``masked_mean`` and ``_sequence_max`` give it)."""
    if criterion not in REJECTION_CRITERIA:
        raise ValueError(f"criterion must be one of {list(REJECTION_CRITERIA)}, got {criterion!r}")
    aggregation, estimator = criterion.rsplit("_", 1)
    values = token_divergence(log_ratio, estimator)
    if aggregation == "token":
        return values
    valid = mask.bool()
    if aggregation == "seq_max":
        peak = values.masked_fill(~valid, -math.inf).amax(-1)
        return torch.where(valid.any(-1), peak, torch.zeros_like(peak))
    total = torch.where(valid, values, 0.0).sum(-1)
    return total if aggregation == "seq_sum" else total / mask.sum(-1).clamp(min=1.0)


def criterion_keeps(statistic: torch.Tensor, criterion: str, bounds: RejectionBounds) -> torch.Tensor:
    """Where `statistic` passes `criterion`'s `bounds` (boolean, same shape): k1 inside
    ``[log lower, log upper]`` (inclusive), k2/k3 at most ``upper``; NaN never passes."""
    if criterion.endswith("k1"):
        return (statistic >= math.log(bounds.lower)) & (statistic <= math.log(bounds.upper))
    return statistic <= bounds.upper


def veto_rejected(log_ratio: torch.Tensor, mask: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's token veto (``rollout_token_veto_threshold``, verl 0.6's rollout_corr_helper.py): a sequence with any
    valid token whose *unclamped* ratio ``π_old/μ`` is below `threshold` (strictly) is rejected whole.

    Returns:
        ``(rejected, below)``: the valid tokens of vetoed sequences and the valid tokens under the floor, ``(B, T)``.
    """
    valid = mask.bool()
    below = (log_ratio < math.log(threshold)) & valid
    return below.any(-1, keepdim=True) & valid, below


class RolloutRejection(NamedTuple):
    """What verl's criteria and the veto decide on one batch.

    Attributes:
        rejected: Criterion name (or ``"veto"``) → the valid tokens it rejects on its own, ``(B, T)`` boolean.
        statistics: Criterion name → its statistic, per token ``(B, T)`` or per sequence ``(B,)``.
        below_veto: The valid tokens whose ratio is under the veto's floor (None without a veto).
        keep: 0 on the rejected tokens, 1 elsewhere (padding too): multiply it into the loss mask.
    """

    rejected: dict[str, torch.Tensor]
    statistics: dict[str, torch.Tensor]
    below_veto: torch.Tensor | None
    keep: torch.Tensor


def rollout_rejection(
    old_logps: torch.Tensor,
    rollout_logps: torch.Tensor,
    mask: torch.Tensor,
    bounds: dict[str, RejectionBounds],
    veto_threshold: float | None = None,
) -> RolloutRejection:
    """verl's rejection (``compute_rollout_rejection_mask`` of verl 0.9.1 and the veto of verl 0.6) on
    ``log r = log π_old − log μ``: every criterion of `bounds` and the veto must pass for a token to stay (verl's
    logical AND of comma-separated options).

    Args:
        old_logps: The unperturbed old policy's log-probs, ``(B, T)``.
        rollout_logps: The rollout engine's log-probs μ, ``(B, T)``.
        mask: 1 on the completion tokens that count, ``(B, T)``.
        bounds: Criterion → its bounds (:func:`parse_rejection_thresholds`); may be empty.
        veto_threshold: The veto's floor on the token ratio, or None.

    Returns:
        A `RolloutRejection`; every tensor is detached.
    """
    valid, keep_dtype = mask.bool(), mask.dtype
    mask = mask.to(old_logps.dtype)
    log_ratio = torch.where(valid, (old_logps - rollout_logps).detach(), 0.0)
    rejected, statistics = {}, {}
    for criterion, criterion_bounds in bounds.items():
        statistic = rejection_statistic(log_ratio, mask, criterion)
        keeps = criterion_keeps(statistic, criterion, criterion_bounds)
        rejected[criterion] = ~(keeps if is_token_level(criterion) else keeps.unsqueeze(-1)) & valid
        statistics[criterion] = statistic
    below = None
    if veto_threshold is not None:
        rejected[VETO], below = veto_rejected(log_ratio, mask, veto_threshold)
    any_rejected = torch.zeros_like(valid)
    for tokens in rejected.values():
        any_rejected = any_rejected | tokens
    return RolloutRejection(rejected, statistics, below, (~any_rejected).to(keep_dtype))


class RolloutDecision(NamedTuple):
    """Every rejection a config sets, on one batch: the authors' band (`band_weights`, `band_rejected`) and verl's
    criteria with the veto (`rejection`); each None when not set."""

    band_weights: torch.Tensor | None
    band_rejected: torch.Tensor | None
    rejection: RolloutRejection | None


def decide_rollouts(args, old_logps: torch.Tensor, rollout_logps: torch.Tensor, mask: torch.Tensor) -> RolloutDecision:
    """`rollout_mask_weights` and `rollout_rejection` as an `ALPConfig` (`args`) sets them, on π_old/μ."""
    band_weights, band_rejected, rejection = None, None, None
    if args.alp_rollout_mask is not None:
        band_weights, band_rejected = rollout_mask_weights(
            old_logps,
            rollout_logps,
            mask,
            args.alp_rollout_mask,
            args.alp_rollout_mask_min,
            args.alp_rollout_mask_max,
            args.alp_rollout_mask_weighted,
        )
    if args.alp_rollout_rejection is not None or args.alp_rollout_veto_threshold is not None:
        bounds = args.rollout_rejection_bounds
        rejection = rollout_rejection(old_logps, rollout_logps, mask, bounds, args.alp_rollout_veto_threshold)
    return RolloutDecision(band_weights, band_rejected, rejection)
