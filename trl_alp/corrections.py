"""The registry behind `ALPConfig.correction`: each name parsed once into the facts the trainer needs.

Adding a correction touches this module (its name, family and level) and `trl_alp.loss` (its math) only.
"""

from __future__ import annotations

from typing import NamedTuple


class Correction(NamedTuple):
    """A parsed `correction` value: the facts the trainer needs, so adding a correction touches config and loss only.

    ``family`` is ``alp`` | ``bypass`` | ``grpo`` | ``tis`` | ``mis``; ``level`` is the ratio level of ALP/Bypass
    (``token`` | ``sequence`` | ``geometric``) or the level of the TIS/MIS weight (``token`` | ``sequence``).
    """

    name: str
    family: str
    level: str
    description: str

    @property
    def perturbs(self) -> bool:
        """Noise in the loss forward (ALP)."""
        return self.family == "alp"

    @property
    def uses_old_logps(self) -> bool:
        """The ratio's denominator is TRL's recomputed π_old (so TRL's old-log-prob pass must not be skipped)."""
        return self.family in ("grpo", "tis", "mis")

    @property
    def uses_alp_clip(self) -> bool:
        """The ratio is clipped with the alp_epsilon_* / alp_dual_clip fields (else TRL's epsilon / delta)."""
        return self.family in ("alp", "bypass")

    @property
    def is_mode(self) -> str | None:
        """How the TIS/MIS rollout weight π_old/μ is bounded: ``truncate`` | ``mask`` (None outside TIS/MIS)."""
        return {"tis": "truncate", "mis": "mask"}.get(self.family)

    @property
    def trl_is_mode(self) -> str | None:
        """The same weight as TRL's ``vllm_importance_sampling_mode`` (e.g. ``sequence_mask`` for ``seq-mis``)."""
        return None if self.is_mode is None else f"{self.level}_{self.is_mode}"


_LEVELS = {"seq": "sequence", "token": "token", "geo": "geometric"}
_ALP = "ALP: perturbed numerator π_θ,δ over the rollout log-probs μ, {} ratio, clip [1−alp_epsilon_low, 1+alp_epsilon_high] + dual clip."
_BYPASS = "Bypass: numerator π_θ (no noise) over the rollout log-probs μ, {} ratio, same clips as ALP."
_IS = "{}: TRL's GRPO loss over π_old times the {} rollout weight π_old/μ {} (TRL's vLLM IS semantics)."
CORRECTIONS: dict[str, Correction] = {
    **{f"{p}-alp": Correction(f"{p}-alp", "alp", lv, _ALP.format(lv)) for p, lv in _LEVELS.items()},
    **{f"{p}-bypass": Correction(f"{p}-bypass", "bypass", lv, _BYPASS.format(lv)) for p, lv in _LEVELS.items()},
    "grpo": Correction(
        "grpo",
        "grpo",
        "trl",
        "GRPO/GSPO: TRL's own loss and options, unchanged (with vLLM, TRL's own importance-sampling correction).",
    ),
    **{
        f"{p}-tis": Correction(
            f"{p}-tis",
            "tis",
            _LEVELS[p],
            _IS.format("TIS", _LEVELS[p], "truncated to [vllm_importance_sampling_clip_min, _max]"),
        )
        for p in ("token", "seq")
    },
    **{
        f"{p}-mis": Correction(
            f"{p}-mis",
            "mis",
            _LEVELS[p],
            _IS.format("MIS", _LEVELS[p], "zeroed outside [vllm_importance_sampling_clip_min, _max]"),
        )
        for p in ("token", "seq")
    },
}
