"""The ALP authors' published recipes, one line each: ``ALPConfig(alp_recipe="paper-multi-turn")``.

Each recipe sets the algorithmic fields of one released training script of amazon-science/adaptive-layerwise-
perturbation (commit 96a96556) and nothing else; model, data, batch sizes, sequence lengths and steps stay yours.
Fields you pass explicitly win over the recipe (see `ALPConfig` for how "explicit" is detected).

* ``paper-single-turn``: ``single-turn/run_scripts/run_exp_perturbation.sh`` with perturbation enabled (σ₀ 0.02,
  ``perturb_lr`` 1e-2 and ``coef_learnable`` True are the defaults of ``single-turn/verl/workers/config/actor.py`` and
  ``fsdp_workers.py``), ``loss_mode=sequence``, clip 0.5/3.0, ``clip_ratio_c=10``, ``loss_agg_mode=token-mean``,
  ``use_kl_loss`` with ``kl_loss_coef=0.001`` and ``kl_loss_type=low_var_kl``, actor lr 1e-6, AdamW weight decay 0.01,
  constant schedule, ``grad_clip`` 1.0.
* ``paper-multi-turn``: ``multi-turn/train_perturb.sh`` (σ₀ 1e-6, ``perturb_lr`` 5e-4, all layers, sequence ratio,
  clip 0.5/3.0, ``clip_ratio_c=3``, ``grad_clip`` 1.0, ``max_turns`` 5, no KL loss), optimizer from
  ``multi-turn/verl/workers/fsdp_workers.py`` (AdamW betas (0.9, 0.99), weight decay 0.01, constant schedule).
  The script also passes ``rollout_is=True`` (sequence mask, band [0, 5]), but with ``use_perturbation=True`` its
  actor (``multi-turn/verl/workers/actor/dp_actor.py``) calls ``compute_policy_loss_perturbed``, which never reads
  the rollout-IS settings: the published ALP run trained without that mask. The recipe reproduces what ran
  (``alp_rollout_mask=None``); add ``alp_rollout_mask="sequence"`` for what the flags describe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

_ALP_COMMON: dict[str, Any] = {
    "correction": "seq-alp",  # loss_mode=sequence, is_geometric=False, rollout log-probs as denominator
    "alp_layers": "all",  # perturb_start 0, perturb_end null
    "alp_learn_sigma": True,  # coef_learnable
    "alp_sigma_weight_decay": 0.01,  # σ sits in the actor's AdamW (weight_decay 0.01)
    "alp_epsilon_low": 0.5,  # clip_ratio_low
    "alp_epsilon_high": 3.0,  # clip_ratio_high
    "loss_type": "bnpo",  # loss_agg_mode=token-mean: masked token mean per micro-batch
    "max_grad_norm": 1.0,  # grad_clip
    "learning_rate": 1e-6,  # actor optim.lr
    "weight_decay": 0.01,  # actor optim weight_decay
    "lr_scheduler_type": "constant",  # verl's constant schedule, no warmup
    "warmup_steps": 0,
    "temperature": 1.0,  # rollout temperature
    "top_p": 1.0,
    "top_k": 0,
}

RECIPES: dict[str, dict[str, Any]] = {
    "paper-single-turn": {
        **_ALP_COMMON,
        "alp_init_sigma": 0.02,  # perturb_std
        "alp_sigma_learning_rate": 1e-2,  # perturb_lr
        "alp_dual_clip": 10.0,  # clip_ratio_c
        "alp_rollout_mask": None,  # rollout_is=null
        "beta": 0.001,  # use_kl_loss, kl_loss_coef
        "alp_kl_clamp": True,  # kl_loss_type=low_var_kl
        "use_bias_correction_kl": False,  # verl's KL loss is not weighted by the ratio
    },
    "paper-multi-turn": {
        **_ALP_COMMON,
        "alp_init_sigma": 1e-6,  # PERTURB_STD
        "alp_sigma_learning_rate": 5e-4,  # PERTURB_LR
        "alp_dual_clip": 3.0,  # clip_ratio_c
        "alp_rollout_mask": None,  # rollout_is=True is not read by compute_policy_loss_perturbed (module docstring)
        "beta": 0.0,  # use_kl_loss=False
        "alp_kl_clamp": False,
        "adam_beta2": 0.99,  # AdamW betas (0.9, 0.99)
        "max_tool_calling_iterations": 4,  # max_turns=5 generations = 1 + 4 tool rounds
    },
}


def apply_recipe(config: Any, name: str, explicit: Collection[str] | None) -> list[str]:
    """Set the fields of recipe `name` on `config`, except the `explicit` ones; returns the names it set.

    ``explicit=None`` means "unknown": then a field still equal to its dataclass default counts as not given (so
    passing a default value explicitly cannot be told apart from not passing it).
    """
    if name not in RECIPES:
        raise ValueError(f"alp_recipe must be one of {list(RECIPES)} or None, got {name!r}")
    if explicit is None:
        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        explicit = {key for key in RECIPES[name] if getattr(config, key) != defaults[key]}
    applied = [key for key in RECIPES[name] if key not in explicit]
    for key in applied:
        setattr(config, key, RECIPES[name][key])
    return applied


def rebuild_with_recipe(config: Any, explicit: Collection[str]) -> Any:
    """A new config of the same class with only the `explicit` fields of `config` and its ``alp_recipe``.

    For argument parsers (TRL's `TrlParser`) that construct the config with every field: the recipe then fills the
    fields the user did not give on the command line or in the YAML file.
    """
    names = {f.name for f in dataclasses.fields(config) if f.init}
    kwargs = {key: getattr(config, key) for key in names & set(explicit)}
    kwargs["alp_recipe"] = config.alp_recipe
    return type(config)(**kwargs)
