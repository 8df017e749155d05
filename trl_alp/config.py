"""`ALPConfig`: TRL's `GRPOConfig` plus the fields of Adaptive Layerwise Perturbation."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass, field
from typing import NamedTuple

from trl import GRPOConfig

from .loss import ROLLOUT_MASK_LEVELS, Clip
from .perturbation import validate_layer_spec
from .presets import PRESETS, apply_preset
from .rollout import ROLLOUT_DTYPES, ROLLOUT_WEIGHT_BITS

logger = logging.getLogger(__name__)

# verl's low_var_kl bounds (the ALP authors' single-turn KL): log-ratio to ±20, estimate to ±10.
KL_CLAMP = (20.0, 10.0)


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


def _check_finite(name: str, value: float, *, positive: bool = False, nonnegative: bool = False) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def parse_init_sigma(value: float | str | None) -> float | str:
    """`alp_init_sigma` as given in Python or on the command line: a finite number > 0, or "auto"."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"alp_init_sigma must be a number > 0 or 'auto', got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"alp_init_sigma must be a number > 0 or 'auto', got {value!r}")
    return float(value)


@dataclass
class ALPConfig(GRPOConfig):
    r"""
    Configuration for [`ALPGRPOTrainer`]: every [`~trl.GRPOConfig`] field plus the ALP fields below.

    The ALP ratio is ``π_{θ,δ}(y) / μ(y)``: the numerator is the training policy's log-probs from a forward pass
    with learnable Gaussian noise ``σ_l · ε`` added to the input of each selected decoder layer, the denominator the
    log-probs the rollout engine reported when it sampled. In the ALP and Bypass corrections the PPO clip uses
    `alp_epsilon_low` / `alp_epsilon_high` / `alp_dual_clip`; TRL's `epsilon`, `epsilon_high`, `delta`,
    `importance_sampling_level` and the vLLM importance-sampling correction are not used (ALP replaces them).
    `correction="grpo"` is TRL's loss unchanged; the TIS/MIS corrections are TRL's loss (all its ratio options) times
    TRL's vLLM importance-sampling weight, on the generate path too.

    Every check that needs only the config runs here, at construction. The defaults are the ALP authors' single-turn
    math recipe (sequence-level ratio; σ₀, σ learning rate, clip and dual clip as the fields below).
    """

    correction: str = field(
        default="seq-alp",
        metadata={
            "help": "Off-policy correction. 'seq-alp' (default): perturbed numerator, product-of-tokens sequence "
            "ratio; 'token-alp': per-token ratio; 'geo-alp': length-normalised (geometric mean) sequence ratio; "
            "'seq-bypass' / 'token-bypass' / 'geo-bypass': the same ratios without noise (Bypass baseline); "
            "'grpo': TRL's own GRPO/GSPO loss, unchanged; 'token-tis' / 'seq-tis': TRL's loss times the rollout "
            "weight π_old/μ truncated to [vllm_importance_sampling_clip_min, vllm_importance_sampling_clip_max]; "
            "'token-mis' / 'seq-mis': the same weight zeroed outside that band (TRL's vLLM IS semantics, also on the "
            "generate path).",
            "choices": list(CORRECTIONS),
        },
    )
    alp_layers: str = field(
        default="all",
        metadata={
            "help": "Where the noise goes: 'all' decoder layers, 'none' (same as Bypass), 'early' / 'middle' / "
            "'late' (thirds of the stack), an index '3', an inclusive range '0-5', a comma-separated mix "
            "'0-2,7', a list of ints, or 'logits' (logits-only ablation: the final hidden state that the LM head "
            "projects, after the final norm, and no decoder layer)."
        },
    )
    alp_layers_path: str | None = field(
        default=None,
        metadata={
            "help": "Dotted path of the decoder-layer nn.ModuleList relative to the causal LM (e.g. 'model.layers'). "
            "Default: found automatically for Llama, Qwen2/3, Mistral, Gemma 1/2/3, Phi-3, GPT-2, GPT-NeoX, OPT."
        },
    )
    # `str` second in the Union: TRL's parser then reads the flag as a string, which `__post_init__` turns into a
    # number or keeps as "auto" (None is rejected there).
    alp_init_sigma: float | str | None = field(
        default=0.02,
        metadata={
            "help": "Initial noise scale σ₀ of every perturbed layer: a number > 0 (the paper's single-turn 0.02 is "
            "the default), or 'auto': before the first update, measure the k3 KL between the clean training policy "
            "and the rollout log-probs on the first batch and pick one σ₀ by no-grad bisection so that the noise's "
            "own k3 KL to the clean policy is alp_sigma_target × that mismatch KL (falls back to 0.02 with a "
            "warning when there is no measurable mismatch)."
        },
    )
    alp_sigma_target: float = field(
        default=1.0,
        metadata={
            "help": "With alp_init_sigma='auto': the perturbation's k3 KL to the clean policy, as a multiple of the "
            "measured training–rollout mismatch KL (1.0: the noise is as large as the mismatch it must cover; see "
            "the README's stress-test section for how it was chosen)."
        },
    )
    alp_learn_sigma: bool = field(
        default=True, metadata={"help": "Learn σ (one log-scale per layer) with the RL loss; False freezes it."}
    )
    alp_sigma_learning_rate: float = field(
        default=1e-2,
        metadata={"help": "Peak learning rate of σ's own optimizer group (it follows the main LR schedule's shape)."},
    )
    alp_sigma_weight_decay: float = field(
        default=0.01, metadata={"help": "Weight decay of σ's optimizer group (on log σ)."}
    )
    alp_epsilon_low: float = field(
        default=0.5, metadata={"help": "Lower PPO clip of the ALP/Bypass ratio: ratio ≥ 1 − alp_epsilon_low."}
    )
    alp_epsilon_high: float = field(
        default=3.0, metadata={"help": "Upper PPO clip of the ALP/Bypass ratio: ratio ≤ 1 + alp_epsilon_high."}
    )
    alp_dual_clip: float | None = field(
        default=10.0,
        metadata={
            "help": "Dual-clip constant c for negative advantages (loss capped at c·|A|); must exceed "
            "1 + alp_epsilon_high. None disables it."
        },
    )
    alp_relative_sigma: bool = field(
        default=False,
        metadata={
            "help": "Scale each token's noise by its detached hidden-state RMS, so σ is relative to the residual "
            "stream's scale (one σ₀ fits models whose hidden states differ in magnitude). False = the paper's "
            "absolute σ."
        },
    )
    alp_rollout_dtype: str | None = field(
        default=None,
        metadata={
            "help": "The rollout engine's precision. With use_vllm: the dtype vLLM runs in ('float32': an exact "
            "engine; 'bfloat16'/'float16': the paper's setting; None: vLLM's 'auto', logged at start). On the "
            "generate path: generate under autocast in 'bfloat16'/'float16' (a reproducible mismatch without "
            "vLLM); 'float32' or None: the model's own precision.",
            "choices": [None, "float32", "bfloat16", "float16"],
        },
    )
    alp_rollout_weight_bits: int | None = field(
        default=None,
        metadata={
            "help": "Generate from fake-quantised weights (4 or 8 bits, per-channel round-to-nearest) for a "
            "reproducible mismatch (transformers generate path only)."
        },
    )
    alp_log_unperturbed_ratio: bool = field(
        default=False,
        metadata={
            "help": "Also run one extra no-grad, noise-free forward per micro-step and log its ratio to the rollout "
            "log-probs under alp/unperturbed/*, next to the perturbed alp/ratio/*."
        },
    )
    alp_noise_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the perturbation noise; None uses `seed`."},
    )
    alp_recipe: str | None = field(
        default=None,
        metadata={
            "help": "A published ALP recipe (trl_alp/presets.py): 'paper-single-turn' or 'paper-multi-turn' sets "
            "every algorithmic field of the authors' script; fields you pass explicitly win.",
            "choices": [None, *PRESETS],
        },
    )
    alp_rollout_mask: str | None = field(
        default=None,
        metadata={
            "help": "Rollout rejection mask on top of an ALP/Bypass ratio (the authors' rollout_is, mode 'mask'): the "
            "weight π_old/μ of the recomputed unperturbed old policy over the rollout engine, per 'token', as the "
            "'sequence' product or its 'geometric' mean, zeroes the loss outside [alp_rollout_mask_min, "
            "alp_rollout_mask_max]. None disables it.",
            "choices": [None, *ROLLOUT_MASK_LEVELS],
        },
    )
    alp_rollout_mask_min: float = field(
        default=0.0, metadata={"help": "Lower bound (inclusive) of π_old/μ kept by alp_rollout_mask (authors: 0)."}
    )
    alp_rollout_mask_max: float = field(
        default=5.0, metadata={"help": "Upper bound (inclusive) of π_old/μ kept by alp_rollout_mask (authors: 5)."}
    )
    alp_rollout_mask_weighted: bool = field(
        default=True,
        metadata={
            "help": "Multiply the kept tokens' loss by π_old/μ, as the authors' mask mode does; False = a plain 0/1 "
            "rejection mask."
        },
    )
    alp_kl_clamp: bool = field(
        default=False,
        metadata={
            "help": "Clamp the k3 KL to the reference like verl's low_var_kl (log-ratio to ±20, estimate to [-10, 10]), "
            "as in the authors' single-turn recipe. False = TRL's unbounded estimate."
        },
    )

    def __post_init__(self):
        if self.alp_recipe is not None:  # first, so every check below sees the final values
            apply_preset(self, self.alp_recipe, getattr(self, "_alp_explicit", None))
        # ALP fields first: a typo fails in a second, before TRL/transformers set up devices.
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {list(CORRECTIONS)}, got {self.correction!r}")
        self.alp_init_sigma = parse_init_sigma(self.alp_init_sigma)
        _check_finite("alp_sigma_target", self.alp_sigma_target, positive=True)
        _check_finite("alp_sigma_learning_rate", self.alp_sigma_learning_rate, nonnegative=True)
        _check_finite("alp_sigma_weight_decay", self.alp_sigma_weight_decay, nonnegative=True)
        _check_finite("alp_epsilon_low", self.alp_epsilon_low, positive=True)
        _check_finite("alp_epsilon_high", self.alp_epsilon_high, positive=True)
        if self.alp_epsilon_low >= 1:
            raise ValueError(f"alp_epsilon_low must be in (0, 1), got {self.alp_epsilon_low!r}")
        if self.alp_dual_clip is not None:
            _check_finite("alp_dual_clip", self.alp_dual_clip)
            # c > 1 as the authors assert (core_algos.py); their multi-turn c = 3 lies inside 1 + clip_ratio_high = 4.
            if self.alp_dual_clip <= 1:
                raise ValueError(f"alp_dual_clip must be > 1, got {self.alp_dual_clip!r} (or None to disable it)")
        validate_layer_spec(self.alp_layers)  # the trainer checks the range against the model
        if self.alp_rollout_dtype not in (None, *ROLLOUT_DTYPES):
            raise ValueError(
                f"alp_rollout_dtype must be one of {list(ROLLOUT_DTYPES)} or None, got {self.alp_rollout_dtype!r}"
            )
        if self.alp_rollout_weight_bits not in (None, *ROLLOUT_WEIGHT_BITS):
            raise ValueError(
                f"alp_rollout_weight_bits must be one of {list(ROLLOUT_WEIGHT_BITS)} or None, "
                f"got {self.alp_rollout_weight_bits!r}"
            )
        self._check_rollout_mask_and_kl_clamp()
        if self.use_vllm and self.alp_rollout_weight_bits:
            raise ValueError(
                "alp_rollout_weight_bits emulates a quantised inference engine; with use_vllm=True vLLM is the "
                "engine: unset it (alp_rollout_dtype sets vLLM's dtype)."
            )
        self._check_trl_options()
        super().__post_init__()
        warn_unused_fields(self)

    def _check_trl_options(self) -> None:
        """Reject TRL options the chosen correction cannot honour."""
        correction = self.parsed_correction
        if correction.family == "grpo":
            return  # TRL's own loss: every TRL option applies
        if self.entropy_coef != 0.0 or self.use_adaptive_entropy:
            raise ValueError(
                f"entropy_coef / use_adaptive_entropy (TRL's entropy bonus) are only supported with "
                f"correction='grpo', not {self.correction!r}: set entropy_coef=0.0 and use_adaptive_entropy=False."
            )
        if self.use_transformers_continuous_batching:
            raise ValueError(
                f"use_transformers_continuous_batching=True returns no rollout log-probs, which correction="
                f"{self.correction!r} needs: use the default transformers generate path, use_vllm=True, or "
                "correction='grpo'."
            )
        if correction.uses_alp_clip:
            if self.delta is not None:
                raise ValueError(
                    f"delta={self.delta} is TRL's two-sided clip; with correction={self.correction!r} the ratio is "
                    "clipped by alp_epsilon_low / alp_epsilon_high / alp_dual_clip (use alp_dual_clip)."
                )
            if self.importance_sampling_level != "token":
                raise ValueError(
                    f"importance_sampling_level={self.importance_sampling_level!r} selects TRL's ratio; with "
                    f"correction={self.correction!r} the level is part of the correction (e.g. 'seq-alp', "
                    "'token-alp', 'geo-alp'); use correction='grpo' for TRL's GSPO."
                )
            return
        low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        for name, value in (("vllm_importance_sampling_clip_min", low), ("vllm_importance_sampling_clip_max", high)):
            if value is not None:
                _check_finite(name, value, nonnegative=True)
        if low is None and high is None:
            raise ValueError(
                f"correction={self.correction!r} needs a band for the rollout weight π_old/μ: set "
                "vllm_importance_sampling_clip_max (TRL's default 3.0) and/or vllm_importance_sampling_clip_min."
            )
        if None not in (low, high) and low >= high:
            raise ValueError(
                f"vllm_importance_sampling_clip_min ({low}) must be < vllm_importance_sampling_clip_max ({high})."
            )
        if self.loss_type == "vespo" and correction.level == "sequence":
            raise ValueError(
                f"loss_type='vespo' takes the rollout weight inside its γ-weights per token, as TRL does; TRL rejects "
                f"sequence-level importance sampling with VESPO: use 'token-tis' or 'token-mis', not "
                f"{self.correction!r}."
            )

    @property
    def ratio_level(self) -> str:
        """Level of the policy ratio: the correction's for ALP/Bypass, TRL's `importance_sampling_level` otherwise
        (``sequence`` there is TRL's length-normalised GSPO ratio, ``geometric`` here)."""
        if self.parsed_correction.uses_alp_clip:
            return self.parsed_correction.level
        return "geometric" if self.importance_sampling_level == "sequence" else "token"

    @property
    def clip(self) -> Clip:
        """The clip settings of the policy loss for this correction."""
        if self.parsed_correction.uses_alp_clip:
            return Clip(
                self.alp_epsilon_low,
                self.alp_epsilon_high,
                dual=self.alp_dual_clip,
                cispo_cap=1 + self.alp_epsilon_high,
            )
        high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        return Clip(self.epsilon, high, delta=self.delta, cispo_cap=high)

    def _check_rollout_mask_and_kl_clamp(self) -> None:
        """Rollout mask and KL clamp: valid values, and only where the chosen correction can apply them."""
        if self.alp_rollout_mask is not None:
            if self.alp_rollout_mask not in ROLLOUT_MASK_LEVELS:
                raise ValueError(
                    f"alp_rollout_mask must be one of {list(ROLLOUT_MASK_LEVELS)} or None, got {self.alp_rollout_mask!r}"
                )
            if self.parsed_correction.family not in ("alp", "bypass"):
                raise ValueError(
                    f"alp_rollout_mask applies on top of an ALP or Bypass ratio, not correction={self.correction!r} "
                    "(TIS/MIS already weight by π_old/μ; 'grpo' is TRL's own loss): use an '*-alp' or '*-bypass' "
                    "correction or alp_rollout_mask=None."
                )
        _check_finite("alp_rollout_mask_min", self.alp_rollout_mask_min, nonnegative=True)
        _check_finite("alp_rollout_mask_max", self.alp_rollout_mask_max, positive=True)
        if self.alp_rollout_mask_min >= self.alp_rollout_mask_max:
            raise ValueError(
                f"alp_rollout_mask_min ({self.alp_rollout_mask_min}) must be < alp_rollout_mask_max "
                f"({self.alp_rollout_mask_max})."
            )
        mask_fields = ("alp_rollout_mask_min", "alp_rollout_mask_max", "alp_rollout_mask_weighted")
        changed = [
            f.name for f in dataclasses.fields(self) if f.name in mask_fields and getattr(self, f.name) != f.default
        ]
        if self.alp_rollout_mask is None and changed:
            logger.warning("%s are ignored: alp_rollout_mask is None.", ", ".join(changed))
        if self.alp_kl_clamp and self.correction == "grpo":
            raise ValueError(
                "alp_kl_clamp=True clamps the KL of the ALP loss; correction='grpo' runs TRL's own loss: set "
                "alp_kl_clamp=False or choose another correction."
            )
        if self.alp_kl_clamp and self.beta == 0.0:
            logger.warning("alp_kl_clamp=True is ignored: beta=0.0 adds no KL term.")

    @property
    def parsed_correction(self) -> Correction:
        return CORRECTIONS[self.correction]

    @classmethod
    def from_grpo_config(cls, args: GRPOConfig) -> ALPConfig:
        """An `ALPConfig` with every field of `args` and the ALP defaults."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(GRPOConfig) if f.init}
        values["generation_batch_size"] = None  # derived from steps_per_generation in __post_init__
        return cls(**values)


def alp_defaults() -> str:
    """The ALP defaults in words (read from the fields, never written twice)."""
    d = {f.name: f.default for f in dataclasses.fields(ALPConfig)}
    return (
        f"correction={d['correction']!r}, σ₀={d['alp_init_sigma']}, σ lr {d['alp_sigma_learning_rate']}, "
        f"clip [{1 - d['alp_epsilon_low']}, {1 + d['alp_epsilon_high']}], dual clip {d['alp_dual_clip']}"
    )


# ALP fields that only matter for some corrections: (applies?, fields).
_FIELD_SCOPES = (
    (
        lambda c: c.perturbs,
        ("alp_layers", "alp_layers_path", "alp_init_sigma", "alp_sigma_target", "alp_learn_sigma")
        + ("alp_sigma_learning_rate",)
        + ("alp_sigma_weight_decay", "alp_relative_sigma", "alp_noise_seed"),
    ),
    (lambda c: c.uses_alp_clip, ("alp_epsilon_low", "alp_epsilon_high", "alp_dual_clip")),
    (
        lambda c: c.is_mode is not None or c.family == "grpo",
        ("vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max"),
    ),
    (lambda c: c.family == "grpo", ("vllm_importance_sampling_mode",)),
    (lambda c: not c.uses_alp_clip, ("epsilon", "epsilon_high")),
)


def warn_unused_fields(args: ALPConfig) -> None:
    """Say which fields the chosen correction ignores, when the user changed them from their defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(ALPConfig)}
    correction = args.parsed_correction
    changed = [
        name
        for applies, names in _FIELD_SCOPES
        if not applies(correction)
        for name in names
        if getattr(args, name) != defaults[name]
    ]
    if changed:
        logger.warning(
            "%s do not apply to correction=%r and are ignored (%s).",
            ", ".join(changed),
            args.correction,
            correction.description,
        )


def _record_explicit_fields(init):
    """Wrap the dataclass ``__init__`` so `alp_recipe` knows which fields the caller passed (those win)."""
    names = [f.name for f in dataclasses.fields(ALPConfig) if f.init]

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        self._alp_explicit = frozenset(names[: len(args)]) | frozenset(kwargs)
        init(self, *args, **kwargs)

    return __init__


# A subclass declared with @dataclass gets a new __init__ without this wrapper: `alp_recipe` then treats fields still
# at their default as not given (see `presets.apply_preset`).
ALPConfig.__init__ = _record_explicit_fields(ALPConfig.__init__)
