"""Which correction to use: the decision table of ``docs/choosing.md`` as one pure function.

`recommend` maps what a user knows (staleness, truncated sampling) and what ``trl-alp mismatch --recommend`` measures
on their model and engine (the k3 KL per token, the spread of the sequence log-ratio at their completion length, the
σ₀ that ``alp_init_sigma="auto"`` would pick) to a `correction` and its settings, with the reason for each choice.
Every threshold lives in `THRESHOLDS`; the page quotes them from here and cites the measurement each rests on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Thresholds:
    """The numbers the decision table turns on (see ``docs/choosing.md`` for the measurement behind each)."""

    # k3 KL(μ‖π) per token below which the engine counts as exact. vLLM's CPU build in fp32 measures ~5e-9, fp16
    # ~2e-5 and bf16 ~1e-3 on SmolLM2-135M (docs/results/vllm.md); σ₀ calibration ignores a mismatch below 1e-8.
    exact_k3: float = 1e-6
    # Standard deviation of the sequence log-ratio Σ_t (log π − log μ) at the completion length above which a
    # sequence-level ratio is replaced by a token-level one: at 0.35 the ±2 std band of the sequence ratio is
    # [0.5, 2], the lower edge of ALP's clip [1 − 0.5, 1 + 3]; beyond it a growing share of whole sequences is
    # clipped for the mismatch alone. bf16 vLLM crosses it between 16 (0.18) and 64 tokens (docs/results/vllm.md).
    sequence_std: float = 0.35
    # k3 KL per token above which verl's divergence rejection (seq_mean_k3) is added, at a threshold of
    # `rejection_factor` × the measured k3: the few diverging sequences go, the typical ones stay. 10× the bf16
    # engine's 1e-3; verl's presets use 0.01 (docs/corrections.md#rollout-rejection).
    rejection_k3: float = 1e-2
    rejection_factor: float = 4.0


THRESHOLDS = Thresholds()


@dataclass
class Situation:
    """A training setup, as the decision table reads it.

    Args:
        k3_kl: k3 estimate of KL(μ‖π) per token between the rollout engine and the training forward (nats).
        sequence_std: Spread (std over completions) of the sequence log-ratio at `completion_length`.
        completion_length: The run's ``max_completion_length``.
        staleness: Optimizer steps per rollout batch (``steps_per_generation × num_iterations`` in TRL's terms).
        truncated: Whether sampling truncates the distribution (``top_k``, ``top_p < 1`` or ``min_p``).
        auto_sigma: The σ₀ that ``alp_init_sigma="auto"`` picks on this model and engine, when measured.
    """

    k3_kl: float
    sequence_std: float
    completion_length: int
    staleness: int = 1
    truncated: bool = False
    auto_sigma: float | None = None

    def __post_init__(self):
        for name in ("k3_kl", "sequence_std"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.completion_length < 1 or self.staleness < 1:
            raise ValueError(
                f"completion_length and staleness must be >= 1, got {self.completion_length} and {self.staleness}"
            )


@dataclass
class Recommendation:
    """What to set, and why: ``settings`` are `ALPConfig` fields, ``reasons`` one line per choice."""

    correction: str
    settings: dict[str, object] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in {"correction": self.correction, **self.settings}.items())
        return "\n".join([f"ALPConfig({fields})", *(f"  - {reason}" for reason in self.reasons)])


def recommend(situation: Situation, thresholds: Thresholds = THRESHOLDS) -> Recommendation:
    """The decision table of ``docs/choosing.md``: a `correction`, its settings and the reason for each choice."""
    s, t = situation, thresholds
    exact = s.k3_kl < t.exact_k3
    if s.staleness > 1:
        return _stale(s, t, exact)
    if exact:
        if s.truncated:
            return Recommendation(
                "token-mis",
                {},
                [
                    f"exact engine (k3 {s.k3_kl:.2g} < {t.exact_k3:g} nats/token) and on-policy: nothing to correct",
                    "truncated sampling: TRL's own loss compares the full-vocabulary π with the engine's renormalised "
                    "μ (every ratio off by the kept mass); token-mis is TRL's loss with the support replayed, so its "
                    "weight is exactly 1 here",
                ],
            )
        return Recommendation(
            "grpo",
            {},
            [f"exact engine (k3 {s.k3_kl:.2g} < {t.exact_k3:g} nats/token) and on-policy: TRL's own loss, unchanged"],
        )
    token_level = s.sequence_std > t.sequence_std
    if token_level:
        reasons = [
            f"sequence log-ratio std {s.sequence_std:.2g} at {s.completion_length} tokens > {t.sequence_std:g}: the "
            "sequence ratio would be clipped for the engine's mismatch alone; a token-level ratio"
        ]
    else:
        reasons = [
            f"sequence log-ratio std {s.sequence_std:.2g} at {s.completion_length} tokens <= {t.sequence_std:g}: "
            "the sequence-level ratio (the authors' default) stays inside its clip"
        ]
    level = "token" if token_level else "seq"
    sigma = f" (σ₀ ≈ {s.auto_sigma:.3g} on this model and engine)" if s.auto_sigma is not None else ""
    reasons.append(
        f"inexact engine (k3 {s.k3_kl:.2g} nats/token): ALP with σ₀ calibrated to the mismatch{sigma}, never the "
        f"fixed 0.02, which trailed Bypass on the sharp policy; {level}-bypass measured the same within the spread on "
        "every grid run here, at ~1-7 % less time per step"
    )
    return _finish(Recommendation(f"{level}-alp", {"alp_init_sigma": "auto"}, reasons), s, t, exact)


def _stale(s: Situation, t: Thresholds, exact: bool) -> Recommendation:
    reasons = [
        f"{s.staleness} optimizer steps per rollout batch: token-mis, TRL's loss over the recomputed π_old with the "
        "rollout weight π_old/μ masked to its band (sharp policy, 16 steps per batch, 10 seeds, bf16 and fp32 engines "
        "alike: token-mis 0.180 and TRL's own correction 0.184 final reward against 0.140-0.147 for token-level "
        "ALP/Bypass and 0.117-0.147 for sequence-level ones; a flat random policy at learning rate 1e-2, which a "
        "pretrained model does not start from, ranked token-level ratios first in the stress test)"
    ]
    return _finish(Recommendation("token-mis", {}, reasons), s, t, exact)


def _finish(advice: Recommendation, s: Situation, t: Thresholds, exact: bool) -> Recommendation:
    """The settings every row adds: verl's k3 rejection for a large mismatch, the support replay when truncating."""
    if not exact and s.k3_kl > t.rejection_k3:
        threshold = f"{t.rejection_factor * s.k3_kl:.2g}"
        advice.settings |= {"alp_rollout_rejection": "seq_mean_k3", "alp_rollout_rejection_threshold": threshold}
        advice.reasons.append(
            f"k3 {s.k3_kl:.2g} > {t.rejection_k3:g} nats/token: reject the sequences whose mean k3 exceeds "
            f"{t.rejection_factor:g}× the engine's (verl's seq_mean_k3); run once with "
            "alp_rollout_rejection_metrics_only=True to read the share it would reject "
            "(docs/corrections.md#rollout-rejection)"
        )
    if s.truncated:
        advice.reasons.append(
            "truncated sampling: keep alp_replay_support=True (the default), so π and μ share a support"
        )
    return advice
