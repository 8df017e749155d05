"""`ALPConfig`: TRL's `GRPOConfig` plus the fields of Adaptive Layerwise Perturbation."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

from trl import GRPOConfig

from .corrections import CORRECTIONS, Correction
from .loss import Clip
from .perturbation import validate_layer_spec
from .recipes import RECIPES, apply_recipe
from .rejection import (
    REJECTION_CRITERIA,
    ROLLOUT_MASK_LEVELS,
    RejectionBounds,
    parse_rejection_criteria,
    parse_rejection_thresholds,
)
from .rollout import ROLLOUT_DTYPES, ROLLOUT_WEIGHT_BITS
from .support import truncates

logger = logging.getLogger(__name__)

# verl's low_var_kl bounds (the ALP authors' single-turn KL): log-ratio to ±20, estimate to ±10.
KL_CLAMP = (20.0, 10.0)


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
    Configuration for [`ALPGRPOTrainer`][trl_alp.trainer.ALPGRPOTrainer]: every `trl.GRPOConfig` field plus the ALP
    fields below.

    The ALP ratio is ``π_{θ,δ}(y) / μ(y)``: the numerator is the training policy's log-probs from a forward pass with
    learnable Gaussian noise ``σ_l · ε`` on the input of each selected decoder layer, the denominator the log-probs
    the rollout engine reported when it sampled. Every check that needs only the config runs at construction, so a
    typo fails before any model is loaded.

    Where the defaults come from: σ (`alp_init_sigma` 0.02, `alp_sigma_lr` 1e-2, `alp_sigma_weight_decay` 0.01), the
    clips (`alp_epsilon_low` 0.5, `alp_epsilon_high` 3.0, `alp_dual_clip` 10) and the sequence-level ratio
    (`correction="seq-alp"`) are the ALP authors' single-turn math recipe; the rollout band [0, 5] is their rejection
    mask's (the mask is off by default); every other ALP field defaults to off or to TRL's behaviour; every
    `GRPOConfig` field keeps TRL's default (`alp_recipe` applies the authors' full recipes, TRL fields included).

    Parameters: Correction
        correction (`str`, *optional*, defaults to `"seq-alp"`):
            The off-policy correction, one of `trl_alp.CORRECTIONS`: `seq-alp` / `token-alp` / `geo-alp` (ALP with a
            product-of-tokens, per-token or length-normalised ratio), the same three `*-bypass` without noise,
            `grpo` (TRL's loss unchanged), `token-tis` / `seq-tis` / `token-mis` / `seq-mis` (TRL's loss times TRL's
            vLLM importance-sampling weight, on the generate path too). Under ALP and Bypass the clip fields below
            replace TRL's `epsilon`, `epsilon_high`, `delta` and `importance_sampling_level`.

    Parameters: Noise and σ
        alp_layers (`str` or `list[int]`, *optional*, defaults to `"all"`):
            Where the noise goes: `"all"`, `"none"` (same as Bypass), `"early"` / `"middle"` / `"late"` (thirds of
            the stack), `"3"`, `"0-5"`, `"0-2,7"`, a list of ints, or `"logits"` (the final hidden state that the LM
            head projects, and no decoder layer). A range beyond the model's depth fails when the trainer is built.
        alp_layers_path (`str`, *optional*):
            Dotted path of the decoder-layer `nn.ModuleList` (e.g. `"model.layers"`), for architectures the automatic
            search does not know.
        alp_init_sigma (`float` or `str`, *optional*, defaults to `0.02`):
            Initial σ₀ of every perturbed layer (> 0; the authors use 0.02 single-turn, 1e-6 multi-turn), or `"auto"`:
            calibrated on the first batch so that the noise's k3 KL to the clean policy is `alp_sigma_target` times
            the measured training–rollout mismatch KL (0.02 with a warning when there is no measurable mismatch).
        alp_sigma_target (`float`, *optional*, defaults to `1.0`):
            With `alp_init_sigma="auto"`: the noise's KL as a multiple of the mismatch KL.
        alp_learn_sigma (`bool`, *optional*, defaults to `True`):
            Learn σ (one log-scale per layer) with the RL loss; `False` freezes it.
        alp_sigma_learning_rate (`float`, *optional*, defaults to `1e-2`):
            Peak learning rate of σ's optimizer group (it follows the main schedule's shape). Authors: 1e-2
            single-turn, 5e-4 multi-turn.
        alp_sigma_weight_decay (`float`, *optional*, defaults to `0.01`):
            Weight decay of σ's optimizer group, on log σ.
        alp_relative_sigma (`bool`, *optional*, defaults to `False`):
            Scale each token's noise by its detached hidden-state RMS, so one σ₀ fits models whose residual streams
            differ in scale. `False` is the paper's absolute σ.
        alp_noise_seed (`int`, *optional*):
            Seed of the noise; `None` uses `seed`.

    Parameters: Clip
        alp_epsilon_low (`float`, *optional*, defaults to `0.5`):
            Lower PPO clip of the ALP/Bypass ratio: ratio ≥ 1 − `alp_epsilon_low`; in (0, 1).
        alp_epsilon_high (`float`, *optional*, defaults to `3.0`):
            Upper PPO clip of the ALP/Bypass ratio: ratio ≤ 1 + `alp_epsilon_high`.
        alp_dual_clip (`float`, *optional*, defaults to `10.0`):
            Dual clip c for negative advantages: the loss is at most c·|A|. Must exceed 1 (the authors' only bound);
            `None` disables it.

    Parameters: Rollout engine
        alp_rollout_dtype (`str`, *optional*):
            The rollout engine's precision. With `use_vllm`: the dtype vLLM runs in (`"float32"`, `"bfloat16"`,
            `"float16"`; `None` is vLLM's `"auto"`). On the generate path: generate under `"bfloat16"`/`"float16"`
            autocast, a reproducible mismatch without vLLM.
        alp_rollout_weight_bits (`int`, *optional*):
            Generate from fake-quantised weights (4 or 8 bits, per-channel round-to-nearest): a reproducible mismatch
            on the generate path (not with `use_vllm`).
        alp_replay_support (`bool`, *optional*, defaults to `True`):
            With truncated sampling (`top_k > 0`, `top_p < 1` or `min_p` set): compare every policy log-prob on the
            support the engine sampled from, ``log π(y) − log π(S_t)``, as the engine's own log-probs are
            (`trl_alp/support.py`). `False` keeps the full-vocabulary log-probs (the ratio is then off by the kept mass
            on every token). No effect without truncation or with `correction="grpo"`.
        alp_support_max_tokens (`int`, *optional*, defaults to `256`):
            Most ids of S_t kept per token (the most probable, plus the sampled one). A larger support is cut: its
            head is replayed with the engine's cover of it, ``log π(S_t) ≈ log π(head) − log μ_S(head)`` (exact
            on-policy), and counted in `alp/support/truncated_frac`. With `use_vllm` it is the number of log-probs
            vLLM returns per token (`top_k` when that is smaller).
        alp_log_unperturbed_ratio (`bool`, *optional*, defaults to `False`):
            One extra no-grad clean forward per micro-step: its ratio to the rollout and its entropy logged under
            `alp/unperturbed/*` (TRL's `entropy` is the loss forward's, which ALP perturbs).

    Parameters: Rollout rejection and KL
        alp_rollout_mask (`str`, *optional*):
            The authors' rollout rejection mask on top of an ALP/Bypass ratio: the weight π_old/μ per `"token"`, as
            the `"sequence"` product or its `"geometric"` mean, zeroes the loss outside
            [`alp_rollout_mask_min`, `alp_rollout_mask_max`]. `None` disables it.
        alp_rollout_mask_min (`float`, *optional*, defaults to `0.0`):
            Lower bound (inclusive) of π_old/μ that the mask keeps.
        alp_rollout_mask_max (`float`, *optional*, defaults to `5.0`):
            Upper bound (inclusive) of π_old/μ that the mask keeps.
        alp_rollout_mask_weighted (`bool`, *optional*, defaults to `True`):
            Multiply the kept tokens' loss by π_old/μ, as the authors do; `False` gives a plain 0/1 mask.
        alp_rollout_rejection (`str` or `list[str]`, *optional*):
            verl's divergence-based rejection (its `rollout_rs`) on top of an ALP, Bypass, TIS or MIS correction, on
            log r = log π_old − log μ: one or more (comma-separated; all must pass) of `token_k1`, `token_k2`,
            `token_k3` (per token), `seq_sum_k1/k2/k3`, `seq_mean_k1/k2/k3`, `seq_max_k2/k3` (the sum, mean or
            max over the sequence rejects it whole), with k1 = −log r, k2 = ½(log r)², k3 = r − 1 − log r. A
            rejected token leaves the loss and its normaliser, as verl's response mask does. `None` disables it.
        alp_rollout_rejection_threshold (`str` or `float`, *optional*):
            verl's `rollout_rs_threshold`: one entry for all criteria or one per criterion (comma-separated). k2/k3:
            the largest divergence kept (e.g. `0.01` for `seq_mean_k3`). k1: `"lower_upper"`, a band on
            exp(k1) = μ/π_old, or one number u for [1/u, u]. Required with `alp_rollout_rejection`.
        alp_rollout_veto_threshold (`float`, *optional*):
            verl's token veto (`rollout_token_veto_threshold`): a sequence with any token whose π_old/μ is below this
            floor (> 0, e.g. 1e-4) is rejected whole. `None` disables it.
        alp_rollout_rejection_metrics_only (`bool`, *optional*, defaults to `False`):
            Compute every rejection set above (`alp_rollout_mask`, `alp_rollout_rejection`, the veto) and log what
            each would reject (`alp/rollout_mask/*`, `alp/rollout_rejection/*`) without changing the loss.
        alp_kl_clamp (`bool`, *optional*, defaults to `False`):
            Clamp the k3 KL to the reference like verl's `low_var_kl` (log-ratio to ±20, estimate to [−10, 10]), as
            in the authors' single-turn recipe. Needs `beta > 0` to matter.

    Parameters: Recipe
        alp_recipe (`str`, *optional*):
            `"paper-single-turn"` or `"paper-multi-turn"`: every algorithmic field of one of the authors' released
            scripts (`trl_alp/recipes.py`). Fields you pass explicitly win, even at their default value.
    """

    correction: str = field(
        default="seq-alp",
        metadata={
            "help": "Off-policy correction: seq-alp (default), token-alp, geo-alp, the *-bypass baselines, grpo (TRL's loss), token/seq-tis, token/seq-mis.",
            "choices": list(CORRECTIONS),
        },
    )
    alp_layers: str = field(
        default="all",
        metadata={"help": "Where the noise goes: all, none, early/middle/late, '3', '0-5', '0-2,7', or logits."},
    )
    alp_layers_path: str | None = field(
        default=None,
        metadata={
            "help": "Dotted path of the decoder-layer ModuleList (e.g. 'model.layers'); found automatically for common models."
        },
    )
    # `str` second in the Union: TRL's parser then reads the flag as a string, which `__post_init__` turns into a
    # number or keeps as "auto" (None is rejected there).
    alp_init_sigma: float | str | None = field(
        default=0.02,
        metadata={
            "help": "Initial noise scale σ₀ (> 0), or 'auto': calibrated to the mismatch KL of the first batch."
        },
    )
    alp_sigma_target: float = field(
        default=1.0,
        metadata={"help": "With alp_init_sigma='auto': the noise's KL as a multiple of the measured mismatch KL."},
    )
    alp_learn_sigma: bool = field(default=True, metadata={"help": "Learn σ with the RL loss; False freezes it."})
    alp_sigma_learning_rate: float = field(
        default=1e-2, metadata={"help": "Peak learning rate of σ's optimizer group."}
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
        default=10.0, metadata={"help": "Dual clip c for negative advantages (loss ≤ c·|A|), > 1; None disables it."}
    )
    alp_relative_sigma: bool = field(
        default=False,
        metadata={"help": "Scale each token's noise by its hidden-state RMS (False: the paper's absolute σ)."},
    )
    alp_rollout_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Rollout precision: vLLM's dtype with use_vllm, else autocast for generate (None: the model's own).",
            "choices": [None, "float32", "bfloat16", "float16"],
        },
    )
    alp_rollout_weight_bits: int | None = field(
        default=None, metadata={"help": "Generate from fake-quantised 4- or 8-bit weights (generate path only)."}
    )
    alp_replay_support: bool = field(
        default=True,
        metadata={
            "help": "Under top_k/top_p/min_p: compare log-probs on the sampled support S_t (False: full vocab)."
        },
    )
    alp_support_max_tokens: int = field(
        default=256, metadata={"help": "Most ids of the support S_t kept per token (vLLM: log-probs returned)."}
    )
    alp_log_unperturbed_ratio: bool = field(
        default=False,
        metadata={
            "help": "Also log the clean policy's ratio and entropy under alp/unperturbed/* (one extra no-grad forward)."
        },
    )
    alp_noise_seed: int | None = field(
        default=None, metadata={"help": "Seed of the perturbation noise; None uses `seed`."}
    )
    alp_recipe: str | None = field(
        default=None,
        metadata={
            "help": "The ALP authors' recipe: paper-single-turn or paper-multi-turn; fields you pass win.",
            "choices": [None, *RECIPES],
        },
    )
    alp_rollout_mask: str | None = field(
        default=None,
        metadata={
            "help": "Rollout rejection mask on π_old/μ on top of ALP/Bypass: token, sequence or geometric; None disables it.",
            "choices": [None, *ROLLOUT_MASK_LEVELS],
        },
    )
    alp_rollout_mask_min: float = field(
        default=0.0, metadata={"help": "Lower bound (inclusive) of π_old/μ kept by alp_rollout_mask."}
    )
    alp_rollout_mask_max: float = field(
        default=5.0, metadata={"help": "Upper bound (inclusive) of π_old/μ kept by alp_rollout_mask."}
    )
    alp_rollout_mask_weighted: bool = field(
        default=True, metadata={"help": "Multiply kept tokens by π_old/μ (the authors' mask); False: a 0/1 mask."}
    )
    # `str` in the type so that TRL's parser passes comma-separated lists through; a list is accepted in Python.
    alp_rollout_rejection: str | None = field(
        default=None,
        metadata={
            "help": f"verl's rollout_rs on π_old/μ: one or more (comma-separated, all must pass) of {', '.join(REJECTION_CRITERIA)}; None disables it."
        },
    )
    alp_rollout_rejection_threshold: str | None = field(
        default=None,
        metadata={
            "help": "verl's rollout_rs_threshold: one for all criteria or one per criterion (comma-separated); k2/k3: max divergence kept; k1: 'lower_upper' on μ/π_old or u for [1/u, u]."
        },
    )
    alp_rollout_veto_threshold: float | None = field(
        default=None,
        metadata={
            "help": "verl's token veto: reject a sequence whose π_old/μ falls below this floor (> 0) on any token; None disables it."
        },
    )
    alp_rollout_rejection_metrics_only: bool = field(
        default=False,
        metadata={
            "help": "Log what alp_rollout_mask / alp_rollout_rejection / the veto would reject; leave the loss alone."
        },
    )
    alp_kl_clamp: bool = field(
        default=False,
        metadata={"help": "Clamp the k3 KL to the reference like verl's low_var_kl (the authors' single-turn KL)."},
    )

    def __new__(cls, *args, **kwargs):
        # Which fields the caller passed, so that they win over `alp_recipe` even at their default value. Recorded
        # here rather than in __init__: a subclass declared with @dataclass gets a new __init__ but inherits __new__.
        self = super().__new__(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        self._alp_explicit = frozenset(names[: len(args)]) | frozenset(kwargs)
        return self

    def __post_init__(self):
        if self.alp_recipe is not None:  # first, so every check below sees the final values
            apply_recipe(self, self.alp_recipe, getattr(self, "_alp_explicit", None))
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
        self._check_rollout_rejection()
        max_tokens = self.alp_support_max_tokens
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"alp_support_max_tokens must be an integer >= 1, got {self.alp_support_max_tokens!r}")
        if self.use_vllm and self.alp_rollout_weight_bits:
            raise ValueError(
                "alp_rollout_weight_bits emulates a quantised inference engine; with use_vllm=True vLLM is the "
                "engine: unset it (alp_rollout_dtype sets vLLM's dtype)."
            )
        self._check_trl_options()
        super().__post_init__()
        warn_unused_fields(self)
        self._check_support_replay()

    @property
    def replays_support(self) -> bool:
        """Whether the trainer replays the sampling support (truncated sampling, ALP/Bypass/TIS/MIS, replay on)."""
        return (
            self.alp_replay_support
            and self.parsed_correction.family != "grpo"
            and truncates(self.top_k, self.top_p, self.min_p)
        )

    def _check_support_replay(self) -> None:
        if not truncates(self.top_k, self.top_p, self.min_p):
            if changed_fields(self, ("alp_replay_support", "alp_support_max_tokens")):
                logger.warning(
                    "alp_replay_support / alp_support_max_tokens have no effect: sampling is not truncated "
                    "(top_k=0, top_p=1, min_p=None)."
                )
            return
        if self.parsed_correction.family == "grpo":
            logger.warning(
                "correction='grpo' keeps TRL's loss: under top_k/top_p/min_p its vLLM importance-sampling weight "
                "compares full-vocabulary log-probs with the engine's truncated ones (biased by the kept mass, TRL "
                "issue #6789). token-tis/seq-tis/token-mis/seq-mis replay the sampling support."
            )
        elif not self.alp_replay_support:
            logger.warning(
                "alp_replay_support=False with top_k/top_p/min_p: the ratio compares full-vocabulary log-probs with "
                "the engine's truncated ones, off by the kept mass on every token."
            )
        elif unreplayed := [k for k in UNREPLAYED_WARPERS if (self.generation_kwargs or {}).get(k) is not None]:
            raise ValueError(
                f"generation_kwargs {unreplayed} truncate sampling in a way alp_replay_support does not reproduce "
                "(it replays top_k, top_p and min_p): remove them, or set alp_replay_support=False."
            )

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
        changed = changed_fields(self, ("alp_rollout_mask_min", "alp_rollout_mask_max", "alp_rollout_mask_weighted"))
        if self.alp_rollout_mask is None and changed:
            logger.warning("%s are ignored: alp_rollout_mask is None.", ", ".join(changed))
        if self.alp_kl_clamp and self.correction == "grpo":
            raise ValueError(
                "alp_kl_clamp=True clamps the KL of the ALP loss; correction='grpo' runs TRL's own loss: set "
                "alp_kl_clamp=False or choose another correction."
            )
        if self.alp_kl_clamp and self.beta == 0.0:
            logger.warning("alp_kl_clamp=True is ignored: beta=0.0 adds no KL term.")

    def _check_rollout_rejection(self) -> None:
        """verl's criteria, the veto and the metrics-only switch: valid values, and only where they can apply."""
        criteria = parse_rejection_criteria(self.alp_rollout_rejection)
        if criteria:
            parse_rejection_thresholds(criteria, self.alp_rollout_rejection_threshold)
        elif self.alp_rollout_rejection_threshold is not None:
            logger.warning("alp_rollout_rejection_threshold is ignored: alp_rollout_rejection is None.")
        veto = self.alp_rollout_veto_threshold
        if veto is not None and (
            isinstance(veto, bool) or not isinstance(veto, (int, float)) or not math.isfinite(veto) or veto <= 0
        ):
            raise ValueError(f"alp_rollout_veto_threshold must be a finite number > 0 or None, got {veto!r}")
        if (criteria or veto is not None) and self.parsed_correction.family == "grpo":
            raise ValueError(
                "alp_rollout_rejection / alp_rollout_veto_threshold apply on top of an ALP, Bypass, TIS or MIS "
                "correction; correction='grpo' runs TRL's loss unchanged: use e.g. 'seq-bypass' or 'token-mis', or "
                "unset them."
            )
        if not isinstance(self.alp_rollout_rejection_metrics_only, bool):
            raise ValueError(
                f"alp_rollout_rejection_metrics_only must be True or False, got {self.alp_rollout_rejection_metrics_only!r}"
            )
        if self.alp_rollout_rejection_metrics_only and not self.rejects_rollouts:
            logger.warning(
                "alp_rollout_rejection_metrics_only=True has nothing to log: set alp_rollout_mask, "
                "alp_rollout_rejection or alp_rollout_veto_threshold."
            )

    @property
    def rollout_rejection_bounds(self) -> dict[str, RejectionBounds]:
        """verl's criteria of `alp_rollout_rejection` with their parsed thresholds (empty when it is None)."""
        criteria = parse_rejection_criteria(self.alp_rollout_rejection)
        return parse_rejection_thresholds(criteria, self.alp_rollout_rejection_threshold) if criteria else {}

    @property
    def rejects_rollouts(self) -> bool:
        """Whether any rollout-rejection criterion is set (applied, or logged only): the trainer then needs π_old."""
        return (
            self.alp_rollout_mask is not None
            or self.alp_rollout_rejection is not None
            or self.alp_rollout_veto_threshold is not None
        )

    @property
    def parsed_correction(self) -> Correction:
        return CORRECTIONS[self.correction]

    @classmethod
    def from_grpo_config(cls, args: GRPOConfig) -> ALPConfig:
        """An `ALPConfig` with every field of `args` and the ALP defaults."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(GRPOConfig) if f.init}
        values["generation_batch_size"] = None  # derived from steps_per_generation in __post_init__
        return cls(**values)


def changed_fields(args: ALPConfig, names: tuple[str, ...]) -> list[str]:
    """Those of `names` whose value differs from the field's default, in the order given."""
    defaults = {f.name: f.default for f in dataclasses.fields(ALPConfig)}
    return [name for name in names if getattr(args, name) != defaults[name]]


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
    (lambda c: c.family != "grpo", ("alp_replay_support", "alp_support_max_tokens")),
)
# generate's other truncation warpers: the support replay does not reproduce them
UNREPLAYED_WARPERS = ("typical_p", "epsilon_cutoff", "eta_cutoff", "top_h")


def warn_unused_fields(args: ALPConfig) -> None:
    """Say which fields the chosen correction ignores, when the user changed them from their defaults."""
    correction = args.parsed_correction
    changed = [
        name for applies, names in _FIELD_SCOPES if not applies(correction) for name in changed_fields(args, names)
    ]
    if changed:
        logger.warning(
            "%s do not apply to correction=%r and are ignored (%s).",
            ", ".join(changed),
            args.correction,
            correction.description,
        )
