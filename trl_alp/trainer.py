"""`ALPGRPOTrainer`: TRL's `GRPOTrainer` with the Adaptive Layerwise Perturbation ratio."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer

from .calibration import FALLBACK_SIGMA, Calibration, calibrate_sigma, masked_k3_kl
from .config import ALPConfig
from .loss import (
    aggregate_loss,
    alp_log_weights,
    clipped_surrogate,
    k3_kl,
    rollout_correction_weights,
    sequence_log_ratio,
)
from .metrics import mismatch_stats, quantile_stats, weight_diagnostics
from .perturbation import LayerPerturbation, find_decoder_layers, is_logits_only, parse_layer_spec, unwrap_model
from .rollout import record_generate_logprobs, rollout_engine

logger = logging.getLogger(__name__)

ALP_STATE_FILE = "alp_state.json"

# Extra model inputs (multimodal) that TRL forwards to `_get_per_token_logps_and_entropies` in the loss.
_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


class _SigmaGradCallback(TrainerCallback):
    """σ lives outside the (DDP) model, so the Trainer neither all-reduces nor zeroes its gradient: do both here,
    and drop a non-finite σ gradient (counted in ``alp/faults/sigma_grad_nonfinite``)."""

    def __init__(self, trainer: ALPGRPOTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        log_sigma = self.trainer.alp_perturbation.log_sigma
        if not log_sigma.requires_grad:
            return
        grad = log_sigma.grad if log_sigma.grad is not None else torch.zeros_like(log_sigma)
        if self.trainer.accelerator.num_processes > 1:
            grad = self.trainer.accelerator.reduce(grad, reduction="mean")
        finite = bool(torch.isfinite(grad).all())
        self.trainer._metrics["train"]["alp/faults/sigma_grad_nonfinite"].append(float(not finite))
        log_sigma.grad = grad if finite else torch.zeros_like(grad)  # a bad step must not corrupt σ

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.alp_perturbation.log_sigma.grad = None  # the Trainer only calls model.zero_grad()


class ALPGRPOTrainer(GRPOTrainer):
    """Drop-in replacement for `trl.GRPOTrainer` that trains with the ALP importance ratio.

    Swap the class name and keep everything else. A plain `GRPOConfig` is upgraded to an `ALPConfig` with the ALP
    defaults (see `ALPConfig` for which TRL fields the ALP ratio replaces). σ is kept outside the model: it is not in
    the saved weights nor in vLLM's weight sync; it is saved in ``alp_state.json`` in every checkpoint and in the
    output directory, restored by ``resume_from_checkpoint``, and stepped by its own group of the main optimizer.
    """

    _tag_names = ["trl", "grpo", "alp"]
    _name = "ALP-GRPO"

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, *trainer_args, **trainer_kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path or type(model).__name__
            args = ALPConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-ALP")
        elif not isinstance(args, ALPConfig):
            logger.warning(
                "ALPGRPOTrainer got a plain GRPOConfig: training with the ALP defaults (correction='seq-alp', "
                "σ₀=0.02, clip [0.5, 4.0], dual clip 10). Use ALPConfig to change them."
            )
            args = ALPConfig.from_grpo_config(args)
        self.correction = args.parsed_correction
        _check_compatible(args)
        logger.info("correction=%r: %s", self.correction.name, self.correction.description)

        super().__init__(model, reward_funcs, args, *trainer_args, **trainer_kwargs)

        self.alp_perturbation = self._build_perturbation(args).to(self.accelerator.device)
        if self.alp_perturbation.log_sigma.requires_grad and self.optimizer is not None:
            raise ValueError(
                "ALPGRPOTrainer builds σ's optimizer group itself: pass optimizers=(None, None), or set "
                "alp_learn_sigma=False to keep σ fixed with your own optimizer."
            )
        if self.use_vllm and self.vllm_importance_sampling_correction:
            logger.info(
                "TRL's vLLM importance-sampling correction is turned off: correction=%r decides the ratio.",
                self.correction.name,
            )
            self.vllm_importance_sampling_correction = False
        if self.top_p < 1.0 or (self.top_k or 0) > 0 or self.min_p is not None:
            logger.warning(
                "top_p/top_k/min_p truncate the sampling distribution; the rollout log-probs of the ratio are "
                "those of the untruncated temperature-scaled distribution (the same form as the numerator), so the "
                "ratio ignores the truncation."
            )
        self._alp_skip_old_pass = False
        self._alp_capture_loss_logps = False
        self.alp_calibration: dict | None = None  # σ₀ calibration (alp_init_sigma="auto"), saved in alp_state.json
        self._alp_sigma_restored = False  # σ came from a checkpoint: never recalibrate
        self.add_callback(_SigmaGradCallback(self))

    def _build_perturbation(self, args: ALPConfig) -> LayerPerturbation:
        seed = args.seed if args.alp_noise_seed is None else args.alp_noise_seed
        init_sigma = FALLBACK_SIGMA if args.alp_init_sigma == "auto" else args.alp_init_sigma  # "auto": set later
        if not self.correction.perturbs:
            return LayerPerturbation(torch.nn.ModuleList(), [], init_sigma, learnable=False, seed=seed)
        layers_path, layers = find_decoder_layers(self.model, args.alp_layers_path)
        indices = parse_layer_spec(args.alp_layers, len(layers))
        final = unwrap_model(self.model).base_model if is_logits_only(args.alp_layers) else None
        logger.info(
            "ALP: correction=%s, noise on %s",
            self.correction.name,
            "the final hidden state" if final else f"{layers_path}{indices}",
        )
        return LayerPerturbation(
            layers,
            indices,
            init_sigma=init_sigma,
            learnable=args.alp_learn_sigma and (bool(indices) or final is not None),
            seed=seed,
            relative=args.alp_relative_sigma,
            final_module=final,
        )

    # ----------------------------------------------------------------------------------------------- optimizer
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        log_sigma = self.alp_perturbation.log_sigma
        if log_sigma.requires_grad and not any(p is log_sigma for g in optimizer.param_groups for p in g["params"]):
            optimizer.add_param_group(
                {
                    "params": [log_sigma],
                    "lr": self.args.alp_sigma_learning_rate,
                    "weight_decay": self.args.alp_sigma_weight_decay,
                }
            )
        return optimizer

    # ------------------------------------------------------------------------------------ perturbation scope
    def training_step(self, model, inputs, num_items_in_batch):
        """Arm the hooks for this micro-step's forward *and* backward (so a recomputation sees the same noise)."""
        micro_step = self._step % max(self.current_gradient_accumulation_steps, 1)
        with self.alp_perturbation.active(self.state.global_step, micro_step, self.accelerator.process_index):
            return super().training_step(model, inputs, num_items_in_batch)

    def _prepare_inputs(self, generation_batch):
        # Generation, old and reference log-prob passes run here: never perturbed.
        with self.alp_perturbation.suspended():
            inputs = super()._prepare_inputs(generation_batch)
        if self._alp_calibration_due():
            self.calibrate_sigma(inputs)
        return inputs

    # ---------------------------------------------------------------------------------- σ₀ calibration
    def _alp_calibration_due(self) -> bool:
        return (
            self.args.alp_init_sigma == "auto"
            and self.model.training
            and self.alp_calibration is None
            and not self._alp_sigma_restored
            and self.alp_perturbation.log_sigma.numel() > 0
        )

    def calibrate_sigma(self, inputs: dict) -> dict:
        """Set σ₀ of every perturbed layer from the first batch (``alp_init_sigma="auto"``), once per run.

        Measures the k3 KL(μ‖π) between the clean training policy and the rollout log-probs, then bisects σ (no-grad
        forwards with the noise forced on and drawn from fixed seeds, so the result is deterministic) until the
        noise's own k3 KL(π‖π_σ) is ``alp_sigma_target`` times it; see `trl_alp.calibration`.
        """
        perturbation, mask = self.alp_perturbation, inputs["completion_mask"]
        mask = mask * inputs["tool_mask"] if "tool_mask" in inputs else mask
        rollout_logps = inputs.get("sampling_per_token_logps")
        mask = mask * torch.isfinite(rollout_logps) if rollout_logps is not None else mask

        def global_k3(log_ratio: torch.Tensor) -> float:
            local = torch.stack(masked_k3_kl(log_ratio, mask, reduce=False))
            total, count = self.accelerator.reduce(local, reduction="sum").tolist()
            return total / count if count > 0 else math.nan

        with torch.no_grad(), contextlib.ExitStack() as stack:
            clean, _, _ = self._completion_logps(self.model, inputs)
            if rollout_logps is None:
                mismatch = math.nan
            else:
                mismatch = global_k3(clean - torch.nan_to_num(rollout_logps, nan=0.0, posinf=0.0, neginf=0.0))
            if not perturbation.is_active:
                stack.enter_context(perturbation.active(self.state.global_step, 0, self.accelerator.process_index))

            def noise_kl(sigma: float) -> float:
                perturbation.log_sigma.fill_(math.log(sigma))
                with perturbation.forced():
                    noisy, _, _ = self._completion_logps(self.model, inputs)
                return global_k3(noisy - clean)

            result: Calibration = calibrate_sigma(noise_kl, mismatch, self.args.alp_sigma_target)
            perturbation.log_sigma.fill_(math.log(result.sigma))
        if result.fallback:
            logger.warning(
                "alp_init_sigma='auto': the training–rollout mismatch KL on the first batch is %.3g (below the floor, "
                "or no rollout log-probs): nothing to calibrate against, using σ₀ = %g.",
                mismatch,
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
        metrics = self._metrics["train"]
        metrics["alp/sigma/calibrated"].append(result.sigma)
        metrics["alp/sigma/calibration_mismatch_kl"].append(result.mismatch_kl)
        metrics["alp/sigma/calibration_noise_kl"].append(result.noise_kl)
        self.alp_calibration = result.to_dict()
        return self.alp_calibration

    # ----------------------------------------------------------------------------------- rollout log-probs
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self.use_vllm or self.use_transformers_continuous_batching:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        target = self.accelerator.unwrap_model(self.model_wrapped)
        engine = rollout_engine(target, self.args.alp_rollout_dtype, self.args.alp_rollout_weight_bits)
        with engine, record_generate_logprobs(target, self.temperature) as recorder:
            completion_ids, _ = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        logps = recorder.results[-1].cpu()
        return completion_ids, [row[: len(ids)].tolist() for row, ids in zip(logps, completion_ids, strict=True)]

    def _generate_and_score_completions(self, inputs):
        # ALP and Bypass use the rollout log-probs as denominator, so TRL's extra no-grad "old" pass is not needed.
        # TRL runs it exactly when generation and optimizer steps are misaligned (its vLLM IS correction, the other
        # trigger, is off in this trainer).
        generate_every = self.args.steps_per_generation * self.num_iterations
        self._alp_skip_old_pass = (
            not self.correction.uses_old_logps and self.args.gradient_accumulation_steps % generate_every != 0
        )
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._alp_skip_old_pass = False

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        if self._alp_skip_old_pass:  # the first pass of `_generate_and_score_completions` is the "old" one
            self._alp_skip_old_pass = False
            return None, None, None
        out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        if self._alp_capture_loss_logps:  # TRL's loss forward: kept for the diagnostics of correction="grpo"
            self._alp_loss_logps = out[0]
        return out

    # ------------------------------------------------------------------------------------------------- loss
    def _completion_logps(self, model, inputs, **kwargs):
        """Per-token log-probs (and optionally entropies / aux loss) of a batch's completion tokens."""
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        return self._get_per_token_logps_and_entropies(
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            completion_ids.size(1),
            **kwargs,
            **{key: inputs.get(key) for key in _FORWARD_KEYS},
        )

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        mask = (
            inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        )
        rollout_logps = inputs.get("sampling_per_token_logps")
        if self.correction.family == "grpo":  # TRL's own loss; only the diagnostics are ours
            self._alp_loss_logps = None
            self._alp_capture_loss_logps = True
            try:
                loss = super()._compute_loss(model, inputs)
            finally:
                self._alp_capture_loss_logps = False
            if rollout_logps is not None:
                self._log_diagnostics(mode, inputs, self._alp_loss_logps, rollout_logps, mask)
            return loss
        if rollout_logps is None:
            raise RuntimeError(
                f"correction={self.correction.name!r} needs the log-probs the rollout engine reported, but this "
                "batch has none (a custom rollout_func must return 'logprobs'); use correction='grpo' otherwise."
            )

        per_token_logps, entropies, aux_loss = self._completion_logps(
            model, inputs, compute_entropy=True, compute_aux_loss=self.aux_loss_enabled
        )
        # Faults: tokens the engine could not score (vLLM reports NaN) or whose training log-prob is not finite carry
        # no ratio. They are counted, dropped from the loss and zeroed (so no NaN reaches σ or the weights).
        rollout_ok, numerator_ok = torch.isfinite(rollout_logps), torch.isfinite(per_token_logps.detach())
        faults = torch.stack([(mask * ~rollout_ok).sum(), (mask * ~numerator_ok).sum()]).float()
        faults = self.accelerator.reduce(faults, reduction="sum").tolist()
        self._metrics[mode]["alp/faults/rollout_nonfinite"].append(faults[0])
        self._metrics[mode]["alp/faults/numerator_nonfinite"].append(faults[1])
        mask = mask * rollout_ok * numerator_ok
        rollout_logps = torch.where(rollout_ok, rollout_logps, 0.0)
        per_token_logps = torch.where(numerator_ok, per_token_logps, 0.0)
        entropies = torch.nan_to_num(entropies, nan=0.0, posinf=0.0, neginf=0.0)
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        args = self.args

        is_weights = None
        if self.correction.family in ("alp", "bypass"):
            log_weights = alp_log_weights(per_token_logps, rollout_logps, mask, self.correction.level)
            clip = (args.alp_epsilon_low, args.alp_epsilon_high, args.alp_dual_clip)
        else:  # TIS / MIS: TRL's GRPO ratio over the old log-probs, times the rollout weight π_old/μ
            old_logps = inputs.get("old_per_token_logps")
            old_logps = per_token_logps.detach() if old_logps is None else old_logps
            log_weights = alp_log_weights(per_token_logps, old_logps, mask, "token")
            clip = (self.epsilon_low, self.epsilon_high, None)
            is_weights, is_hit = rollout_correction_weights(
                old_logps,
                rollout_logps,
                mask,
                self.correction.level,
                "truncate" if self.correction.family == "tis" else "mask",
                args.rollout_is_min,
                args.rollout_is_max,
            )

        clip_stats = None
        if self.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            per_token_loss, clip_stats = clipped_surrogate(log_weights, advantages, *clip)
        elif self.loss_type == "cispo":
            capped = torch.clamp(torch.exp(log_weights), max=1 + clip[1]).detach()
            per_token_loss = -capped * advantages * per_token_logps
        elif self.loss_type == "sapo":
            temperatures = torch.where(advantages > 0, args.sapo_temperature_pos, args.sapo_temperature_neg)
            per_token_loss = (
                -torch.sigmoid(temperatures * (torch.exp(log_weights) - 1)) * 4 / temperatures * advantages
            )
        elif self.loss_type == "vespo":
            phi = self.get_gamma_weights(
                advantages,
                per_token_logps - rollout_logps,
                mask,
                None,
                k_pos=args.vespo_k_pos,
                lambda_pos=args.vespo_lambda_pos,
                k_neg=args.vespo_k_neg,
                lambda_neg=args.vespo_lambda_neg,
            )
            per_token_loss = -phi * advantages * per_token_logps
        else:
            raise ValueError(f"Unknown loss_type {self.loss_type!r}")

        if is_weights is not None:
            per_token_loss = per_token_loss * is_weights
        if self.top_entropy_quantile < 1.0:
            per_token_loss = per_token_loss * self.get_high_entropy_mask(
                entropies, mask, 1 - self.top_entropy_quantile
            )
        if self.off_policy_mask_threshold is not None:
            per_token_loss = per_token_loss * self.get_off_policy_mask(
                advantages, per_token_logps, rollout_logps, mask, self.off_policy_mask_threshold
            )
        if self.beta != 0.0:
            per_token_kl = k3_kl(per_token_logps, inputs["ref_per_token_logps"])
            if args.use_bias_correction_kl:
                per_token_kl = per_token_kl * torch.exp(log_weights).detach()
            per_token_loss = per_token_loss + self.beta * per_token_kl

        training = mode == "train"
        loss, policy_loss = aggregate_loss(
            per_token_loss,
            mask,
            self.loss_type,
            accumulation_steps=self.current_gradient_accumulation_steps if training else 1,
            num_items_in_batch=inputs["num_items_in_batch"],
            num_processes=self.accelerator.num_processes,
            steps_per_generation=args.steps_per_generation if training else 1,
            max_completion_length=self.max_completion_length,
        )
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / (
                self.current_gradient_accumulation_steps if training else 1
            )

        metrics = self._metrics[mode]
        self._log_diagnostics(mode, inputs, per_token_logps, rollout_logps, mask)
        if clip_stats is not None:
            low = self._global_masked_mean(clip_stats["low"], mask)
            high = self._global_masked_mean(clip_stats["high"], mask)
            metrics["alp/clip/low"].append(low)
            metrics["alp/clip/high"].append(high)
            metrics["alp/clip/dual"].append(self._global_masked_mean(clip_stats["dual"], mask))
            metrics["clip_ratio/low_mean"].append(low)
            metrics["clip_ratio/high_mean"].append(high)
            metrics["clip_ratio/region_mean"].append(
                self._global_masked_mean(clip_stats["low"] | clip_stats["high"], mask)
            )
        if is_weights is not None:
            metrics[f"alp/is/{'truncated' if self.correction.family == 'tis' else 'masked'}_frac"].append(
                self._global_masked_mean(is_hit, mask)
            )
        if self.beta != 0.0:
            metrics["kl"].append(self._global_masked_mean(per_token_kl, mask))
        metrics["entropy"].append(self._global_masked_mean(entropies, mask))
        metrics["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        return loss

    # ---------------------------------------------------------------------------------------------- metrics
    def _global_masked_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        values = values.expand_as(mask).float()
        local = torch.stack([(values * mask).sum(), mask.sum().float()])
        total, count = self.accelerator.reduce(local, reduction="sum").tolist()
        return total / max(count, 1.0)

    def _gather_flat(self, values: torch.Tensor) -> torch.Tensor:
        """Gather 1-D tensors of different lengths from every process (NaN-padded)."""
        values = values.detach().float().contiguous()
        if self.accelerator.num_processes > 1:
            values = self.accelerator.pad_across_processes(values, dim=0, pad_index=math.nan)
            values = self.accelerator.gather(values)
        return values

    def _log_ratio_metrics(self, mode: str, prefix: str, logps, rollout_logps, mask) -> None:
        """Quantiles, tail fractions, χ², ESS and KL estimates of ``π/μ`` at token and sequence level."""
        metrics = self._metrics[mode]
        valid = mask.bool() & torch.isfinite(rollout_logps)
        rollout_logps = torch.nan_to_num(rollout_logps, nan=0.0, posinf=0.0, neginf=0.0)
        logps, valid_f = logps.detach(), valid.float()
        token = self._gather_flat(alp_log_weights(logps, rollout_logps, valid_f, "token")[valid])
        seq = self._gather_flat(sequence_log_ratio(logps, rollout_logps, valid_f, "sequence"))
        seq_mean = self._gather_flat(sequence_log_ratio(logps, rollout_logps, valid_f, "geometric"))
        for level, values in (("token", token), ("seq", seq)):
            for name, value in quantile_stats(torch.exp(values)).items():
                metrics[f"{prefix}/ratio/{level}/{name}"].append(value)
            for name, value in weight_diagnostics(values).items():
                metrics[f"{prefix}/ratio/{level}/{name}"].append(value)
        for name, value in mismatch_stats(token, seq_mean).items():
            metrics[f"{prefix}/mismatch/{name}"].append(value)

    def _log_diagnostics(self, mode, inputs, per_token_logps, rollout_logps, mask) -> None:
        self._log_ratio_metrics(mode, "alp", per_token_logps, rollout_logps, mask)
        if self.args.alp_log_unperturbed_ratio:
            with torch.no_grad():  # no grad: the hooks stay silent, this is the clean policy
                clean, _, _ = self._completion_logps(self.model, inputs)
            self._log_ratio_metrics(mode, "alp/unperturbed", clean, rollout_logps, mask)
        sigma = self.alp_perturbation.sigma
        if sigma.numel():
            metrics = self._metrics[mode]
            for label, value in zip(self.alp_perturbation.labels, sigma.tolist(), strict=True):
                metrics[f"alp/sigma/layer_{label}"].append(value)
            metrics["alp/sigma/min"].append(sigma.min().item())
            metrics["alp/sigma/mean"].append(sigma.mean().item())
            metrics["alp/sigma/max"].append(sigma.max().item())

    # ------------------------------------------------------------------------------------ saving / loading
    def alp_state(self) -> dict:
        """σ and the perturbed layers, as saved in ``alp_state.json``."""
        p = self.alp_perturbation
        return {
            "layer_indices": p.layer_indices,
            "log_sigma": p.log_sigma.tolist(),
            "sigma": p.sigma.tolist(),
            "calibration": self.alp_calibration,
        }

    def _write_alp_state(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, ALP_STATE_FILE), "w") as f:
            json.dump(self.alp_state(), f, indent=2)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            checkpoint = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            self._write_alp_state(os.path.join(self._get_output_dir(trial=trial), checkpoint))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.args.should_save and not _internal_call:
            self._write_alp_state(output_dir or self.args.output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, ALP_STATE_FILE) if checkpoint is not None else None
        if path is not None and os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
            if state["layer_indices"] != self.alp_perturbation.layer_indices:
                raise ValueError(
                    f"Checkpoint {checkpoint} perturbs layers {state['layer_indices']}, but this run perturbs "
                    f"{self.alp_perturbation.layer_indices}; resume with the same alp_layers."
                )
            with torch.no_grad():
                self.alp_perturbation.log_sigma.copy_(torch.tensor(state["log_sigma"]))
            self.alp_calibration = state.get("calibration")
            self._alp_sigma_restored = True


# ALP fields that only matter for some corrections: (applies?, fields).
_FIELD_SCOPES = (
    (
        lambda c: c.perturbs,
        ("alp_layers", "alp_layers_path", "alp_init_sigma", "alp_sigma_target", "alp_learn_sigma")
        + ("alp_sigma_learning_rate",)
        + ("alp_sigma_weight_decay", "alp_relative_sigma", "alp_noise_seed"),
    ),
    (lambda c: c.family in ("alp", "bypass"), ("alp_epsilon_low", "alp_epsilon_high", "alp_dual_clip")),
    (lambda c: c.family in ("tis", "mis"), ("rollout_is_min", "rollout_is_max")),
)


def _warn_unused_fields(args: ALPConfig) -> None:
    """Say which ALP fields the chosen correction ignores, when the user changed them."""
    defaults = {f.name: f.default for f in dataclasses.fields(ALPConfig)}
    for applies, names in _FIELD_SCOPES:
        changed = [n for n in names if getattr(args, n) != defaults[n]]
        if changed and not applies(args.parsed_correction):
            logger.warning("%s do not apply to correction=%r and are ignored.", ", ".join(changed), args.correction)


def _check_compatible(args: ALPConfig) -> None:
    """Reject TRL options the chosen correction cannot honour, before the model is loaded."""
    _warn_unused_fields(args)
    if args.correction == "grpo":
        return  # TRL's own loss: every TRL option applies
    if args.delta is not None:
        raise ValueError(
            f"delta={args.delta} is TRL's two-sided clip; with correction={args.correction!r} use alp_dual_clip."
        )
    if args.importance_sampling_level != "token":
        raise ValueError(
            f"importance_sampling_level={args.importance_sampling_level!r} selects TRL's ratio; with "
            f"correction={args.correction!r} the level is part of the correction (e.g. 'seq-alp', 'token-alp', "
            "'geo-alp', 'seq-mis'); use correction='grpo' for TRL's GSPO."
        )
    if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
        raise ValueError(
            f"entropy_coef / use_adaptive_entropy (TRL's entropy bonus) are only supported with correction='grpo', "
            f"not {args.correction!r}: set entropy_coef=0.0 and use_adaptive_entropy=False."
        )
    if args.use_transformers_continuous_batching:
        raise ValueError(
            f"use_transformers_continuous_batching=True returns no rollout log-probs, which correction="
            f"{args.correction!r} needs: use the default transformers generate path, use_vllm=True, or "
            "correction='grpo'."
        )
    if args.parsed_correction.family in ("alp", "bypass") and (
        args.epsilon != 0.2 or (args.epsilon_high is not None and args.epsilon_high != args.epsilon)
    ):
        logger.warning(
            "epsilon/epsilon_high are TRL's clip and are not used by correction=%r: its ratio is clipped with "
            "alp_epsilon_low=%s, alp_epsilon_high=%s.",
            args.correction,
            args.alp_epsilon_low,
            args.alp_epsilon_high,
        )
