"""σ's checkpoint file, ``alp_state.json``, and the ALP section of the model card.

σ is not part of the model: it is saved beside the weights in every checkpoint and in the output folder, with the
perturbation setup it belongs to (a σ only fits a run that perturbs the same sites), its σ₀ calibration record and,
under FSDP2/DeepSpeed, the state of σ's own optimizer (under DDP that state is a group in the Trainer's
``optimizer.pt``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import textwrap
from typing import Any

import torch

from .perturbation import LayerPerturbation

logger = logging.getLogger(__name__)

ALP_STATE_FILE = "alp_state.json"
ALP_STATE_VERSION = 2  # 1 (trl-alp 0.1): layer_indices and σ only; 2: the whole perturbation setup

# The paper, as TRL's model card cites a trainer's `_paper`.
PAPER = {
    "title": "Adaptive Layerwise Perturbation: Unifying Off-Policy Corrections for LLM RL",
    "id": "2603.19470",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @misc{ye2026adaptive,
            title        = {{Adaptive Layerwise Perturbation: Unifying Off-Policy Corrections for LLM RL}},
            author       = {Chenlu Ye and Xuanchang Zhang and Yifan Hao and Zhou Yu and Ziji Zhang and Abhinav Gullapalli and Hao Chen and Jing Huang and Tong Zhang},
            year         = 2026,
            eprint       = {2603.19470},
            archivePrefix = {arXiv},
        }"""),
}


def alp_setup(perturbation: LayerPerturbation, layers_path: str | None) -> dict:
    """What the perturbation's parameters mean: a checkpoint's σ only fits a run with the same setup."""
    return {
        "layers_path": layers_path,
        "layer_indices": perturbation.layer_indices,
        "labels": perturbation.labels,
        "relative": perturbation.relative,
    }


def alp_state(
    perturbation: LayerPerturbation,
    layers_path: str | None,
    calibration: dict | None,
    sigma_optimizer: torch.optim.Optimizer | None,
) -> dict:
    """σ, its calibration and the perturbation setup, as saved in ``alp_state.json``."""
    return {
        "format_version": ALP_STATE_VERSION,
        **alp_setup(perturbation, layers_path),
        "log_sigma": perturbation.log_sigma.tolist(),
        "sigma": perturbation.sigma.tolist(),
        "calibration": calibration,
        "sigma_optimizer": json_state(sigma_optimizer.state_dict()) if sigma_optimizer else None,
    }


def write_alp_state(directory: str, state: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ALP_STATE_FILE), "w") as f:
        json.dump(state, f, indent=2)


def read_alp_state(checkpoint: str | None) -> dict | None:
    """A checkpoint folder's ``alp_state.json``, or `None` where it has none."""
    path = os.path.join(checkpoint, ALP_STATE_FILE) if checkpoint is not None else None
    if path is None or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_alp_setup(state: dict, setup: dict, source: str) -> None:
    """Refuse a state of a newer format, or one written for another perturbation setup than `setup`."""
    version = state.get("format_version", 1)
    if version > ALP_STATE_VERSION:
        raise ValueError(
            f"{source}: {ALP_STATE_FILE} has format_version {version}; this trl-alp reads up to "
            f"{ALP_STATE_VERSION}. Upgrade trl-alp."
        )
    # version 1 stored only the layer indices; compare what the file has
    differ = {key: (state[key], value) for key, value in setup.items() if key in state and state[key] != value}
    if differ:
        details = "; ".join(f"{key}: checkpoint {old!r}, this run {new!r}" for key, (old, new) in differ.items())
        raise ValueError(
            f"{source} was saved with another ALP perturbation setup ({details}). Resume with the same "
            "correction, alp_layers, alp_layers_path and alp_relative_sigma, or start a new run."
        )


def restore_sigma(state: dict, perturbation: LayerPerturbation, sigma_optimizer, source: str) -> None:
    """Copy σ from `state` (an ``alp_state.json`` whose setup was checked), and the state of σ's own optimizer where
    the run has one (FSDP2/DeepSpeed; under DDP it is a group of the Trainer's ``optimizer.pt``)."""
    with torch.no_grad():
        perturbation.log_sigma.copy_(torch.tensor(state["log_sigma"]))
    if sigma_optimizer is None:
        return
    if state.get("sigma_optimizer") is None:
        logger.warning("%s has no state of σ's optimizer: σ's Adam moments start from zero.", source)
    else:
        sigma_optimizer.load_state_dict(tensor_state(state["sigma_optimizer"]))


def copy_model_card(output_dir: str, target_dir: str) -> None:
    """A model saved outside the run's `output_dir` gets the card TRL wrote there (TRL writes it to `output_dir`)."""
    card = os.path.join(output_dir, "README.md")
    if os.path.abspath(target_dir) != os.path.abspath(output_dir) and os.path.exists(card):
        shutil.copyfile(card, os.path.join(target_dir, "README.md"))


def json_state(value: Any) -> Any:
    """An optimizer state dict as JSON (tensors as ``{"tensor": values, "dtype": name}``; float repr round-trips)."""
    if isinstance(value, torch.Tensor):
        return {"tensor": value.tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, dict):
        return {str(key): json_state(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_state(item) for item in value]
    return value


def tensor_state(value: Any, key: str | None = None) -> Any:
    """Inverse of `json_state` for an optimizer state dict (its per-parameter keys are ints again)."""
    if isinstance(value, dict) and set(value) == {"tensor", "dtype"}:
        return torch.tensor(value["tensor"], dtype=getattr(torch, value["dtype"]))
    if isinstance(value, dict):
        convert = int if key == "state" else str
        return {convert(k): tensor_state(v, k) for k, v in value.items()}
    if isinstance(value, list):
        items = [tensor_state(item) for item in value]
        return tuple(items) if key == "betas" else items
    return value


def rejection_summary(args) -> str:
    """The run's rollout-rejection criteria in one line (``none`` without any)."""
    parts = []
    if args.alp_rollout_mask is not None:
        parts.append(f"`{args.alp_rollout_mask}` band [{args.alp_rollout_mask_min:g}, {args.alp_rollout_mask_max:g}]")
    for name, bounds in args.rollout_rejection_bounds.items():
        kept = f"≤ {bounds.upper:g}" if bounds.lower is None else f"μ/π_old in [{bounds.lower:g}, {bounds.upper:g}]"
        parts.append(f"`{name}` {kept}")
    if args.alp_rollout_veto_threshold is not None:
        parts.append(f"veto below {args.alp_rollout_veto_threshold:g}")
    if not parts:
        return "none"
    return ", ".join(parts) + (" (logged only)" if args.alp_rollout_rejection_metrics_only else "") + " on π_old/μ"


def model_card_section(args, correction, perturbation: LayerPerturbation, layers_path: str | None, calibrated: bool):
    """The model card's "ALP settings" section: the run's settings and what ``alp_state.json`` holds."""
    sigma = ", ".join(f"{s:.4g}" for s in perturbation.sigma.tolist()) or "none (no noise)"
    rows = [
        ("correction", f"`{args.correction}`: {correction.description}"),
        ("perturbed sites", f"`{layers_path}` {perturbation.labels}" if perturbation.labels else "none"),
        ("initial σ₀", f"`{args.alp_init_sigma}`" + (" (calibrated)" if calibrated else "")),
        ("σ now", sigma),
        ("σ learned", f"{args.alp_learn_sigma} (learning rate {args.alp_sigma_learning_rate})"),
        ("relative σ", str(args.alp_relative_sigma)),
        ("clip", f"[{1 - args.alp_epsilon_low}, {1 + args.alp_epsilon_high}], dual clip {args.alp_dual_clip}"),
        ("rollout rejection", rejection_summary(args)),
        ("recipe", f"`{args.alp_recipe}`" if args.alp_recipe else "none"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return (
        "\n\n## ALP settings\n\n"
        "Trained with trl-alp's `ALPGRPOTrainer`, [Adaptive Layerwise Perturbation]"
        "(https://arxiv.org/abs/2603.19470) on TRL's `GRPOTrainer`.\n\n| setting | value |\n|---|---|\n"
        f"{table}\n\n"
        f"`{ALP_STATE_FILE}` (next to the weights) holds σ, which is not part of the model: `format_version`, "
        "the perturbation setup (`layers_path`, `layer_indices`, `labels`, `relative`), `log_sigma` and `sigma` "
        'per perturbed site, and `calibration` (the σ₀ calibration record of `alp_init_sigma="auto"`, or null). '
        "`resume_from_checkpoint` restores σ from it; the weights alone load and generate without it.\n"
    )
