"""`ALPConfig`: TRL's `GRPOConfig` plus the fields of Adaptive Layerwise Perturbation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import NamedTuple

from trl import GRPOConfig

from .perturbation import validate_layer_spec
from .rollout import ROLLOUT_DTYPES, ROLLOUT_WEIGHT_BITS


class Correction(NamedTuple):
    """A parsed `correction` value: what forms the ratio, at which level, and with or without noise."""

    name: str
    family: str  # "alp" | "bypass" | "grpo" | "tis" | "mis"
    level: str  # "token" | "sequence" | "geometric" (for "grpo": TRL's `importance_sampling_level`)
    description: str

    @property
    def perturbs(self) -> bool:
        return self.family == "alp"

    @property
    def uses_old_logps(self) -> bool:
        """Whether the loss needs TRL's recomputed old log-probs (so its extra forward must not be skipped)."""
        return self.family in ("grpo", "tis", "mis")


_LEVELS = {"seq": "sequence", "token": "token", "geo": "geometric"}
_ALP = "ALP: perturbed numerator π_θ,δ over the rollout log-probs μ, {} ratio, clip [1−alp_epsilon_low, 1+alp_epsilon_high] + dual clip."
_BYPASS = "Bypass: numerator π_θ (no noise) over the rollout log-probs μ, {} ratio, same clips as ALP."
_IS = "{}: TRL's GRPO ratio π_θ/π_old (epsilon/epsilon_high) times the {} weight π_old/μ {}."
CORRECTIONS: dict[str, Correction] = {
    **{f"{p}-alp": Correction(f"{p}-alp", "alp", lv, _ALP.format(lv)) for p, lv in _LEVELS.items()},
    **{f"{p}-bypass": Correction(f"{p}-bypass", "bypass", lv, _BYPASS.format(lv)) for p, lv in _LEVELS.items()},
    "grpo": Correction(
        "grpo", "grpo", "trl", "GRPO/GSPO: TRL's own loss, recomputed old log-probs, no rollout correction."
    ),
    **{
        f"{p}-tis": Correction(
            f"{p}-tis",
            "tis",
            _LEVELS[p],
            _IS.format("TIS", _LEVELS[p], "truncated to [rollout_is_min, rollout_is_max]"),
        )
        for p in ("token", "seq")
    },
    **{
        f"{p}-mis": Correction(
            f"{p}-mis",
            "mis",
            _LEVELS[p],
            _IS.format("MIS", _LEVELS[p], "zeroed outside [rollout_is_min, rollout_is_max]"),
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

    Defaults are the ALP authors' single-turn math recipe: sequence-level ratio, σ₀ = 0.02, σ learning rate 1e-2,
    clip [0.5, 4.0], dual clip 10.
    """

    correction: str = field(
        default="seq-alp",
        metadata={
            "help": "Off-policy correction. 'seq-alp' (default): perturbed numerator, product-of-tokens sequence "
            "ratio; 'token-alp': per-token ratio; 'geo-alp': length-normalised (geometric mean) sequence ratio; "
            "'seq-bypass' / 'token-bypass' / 'geo-bypass': the same ratios without noise (Bypass baseline); "
            "'grpo': TRL's own GRPO/GSPO loss (recomputed old log-probs, no rollout correction); "
            "'token-tis' / 'seq-tis': GRPO times the rollout weight π_old/μ truncated to [rollout_is_min, "
            "rollout_is_max]; 'token-mis' / 'seq-mis': the same weight zeroed outside that band.",
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
    rollout_is_min: float | None = field(
        default=None,
        metadata={"help": "TIS/MIS: lower bound of the rollout weight π_old/μ (None = open). MIS paper band: 0."},
    )
    rollout_is_max: float | None = field(
        default=3.0,
        metadata={"help": "TIS/MIS: upper bound of the rollout weight π_old/μ (TRL's default 3.0; MIS paper: 5)."},
    )
    alp_rollout_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Generate under autocast in this dtype ('bfloat16' or 'float16') while training in the model's "
            "dtype: a reproducible training–inference mismatch without vLLM (transformers generate path only).",
            "choices": [None, "bfloat16", "float16"],
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

    def __post_init__(self):
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
            if self.alp_dual_clip <= 1 + self.alp_epsilon_high:
                raise ValueError(
                    f"alp_dual_clip must be > 1 + alp_epsilon_high = {1 + self.alp_epsilon_high}, "
                    f"got {self.alp_dual_clip!r} (or None to disable it)"
                )
        validate_layer_spec(self.alp_layers)  # the trainer checks the range against the model
        for name in ("rollout_is_min", "rollout_is_max"):
            if getattr(self, name) is not None:
                _check_finite(name, getattr(self, name), nonnegative=True)
        if None not in (self.rollout_is_min, self.rollout_is_max) and self.rollout_is_min >= self.rollout_is_max:
            raise ValueError(
                f"rollout_is_min ({self.rollout_is_min}) must be < rollout_is_max ({self.rollout_is_max})."
            )
        if self.alp_rollout_dtype not in (None, *ROLLOUT_DTYPES):
            raise ValueError(
                f"alp_rollout_dtype must be one of {list(ROLLOUT_DTYPES)} or None, got {self.alp_rollout_dtype!r}"
            )
        if self.alp_rollout_weight_bits not in (None, *ROLLOUT_WEIGHT_BITS):
            raise ValueError(
                f"alp_rollout_weight_bits must be one of {list(ROLLOUT_WEIGHT_BITS)} or None, "
                f"got {self.alp_rollout_weight_bits!r}"
            )
        if self.use_vllm and (self.alp_rollout_dtype or self.alp_rollout_weight_bits):
            raise ValueError(
                "alp_rollout_dtype / alp_rollout_weight_bits emulate an inference engine; with use_vllm=True vLLM is "
                "the engine: unset them."
            )
        super().__post_init__()

    @property
    def parsed_correction(self) -> Correction:
        return CORRECTIONS[self.correction]

    @classmethod
    def from_grpo_config(cls, args: GRPOConfig) -> ALPConfig:
        """An `ALPConfig` with every field of `args` and the ALP defaults."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(GRPOConfig) if f.init}
        values["generation_batch_size"] = None  # derived from steps_per_generation in __post_init__
        return cls(**values)
