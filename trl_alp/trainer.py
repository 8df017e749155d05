"""`ALPGRPOTrainer`: TRL's `GRPOTrainer` with the Adaptive Layerwise Perturbation ratio.

The trainer keeps TRL's hook overrides and the loss pipeline. What they delegate to lives in the module that owns it:
`perturbation` (the noise and its scope), `calibration` (σ₀), `rollout` and `vllm_engine` (the rollout log-probs),
`support` (the sampling-support replay), `loss` (the math), `metrics`, `backends` (DDP/FSDP/DeepSpeed, σ's optimizer)
and `checkpoint` (``alp_state.json``, the model card).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer

from .backends import SigmaGradCallback, add_sigma_to_optimizer, backend_name, full_state_dict, prepare_backend
from .calibration import FALLBACK_SIGMA, calibrate_on_batch, report_calibration
from .checkpoint import (
    PAPER,
    alp_setup,
    alp_state,
    check_alp_setup,
    copy_model_card,
    model_card_section,
    read_alp_state,
    restore_sigma,
    write_alp_state,
)
from .compat import FORWARD_KEYS, GENERATE_LOGPROBS
from .config import KL_CLAMP, ALPConfig, alp_defaults
from .logps import SUPPORT_KEYS, LogpsCall
from .loss import aggregate_loss, correction_ratio, drop_nonfinite, k3_kl, kl_weights, policy_loss
from .metrics import ALPMetrics
from .perturbation import build_perturbation, unwrap_model
from .rejection import decide_rollouts
from .rollout import record_generate_logprobs, rollout_engine
from .support import RolloutSupports, replay_forward, support_warpers
from .vllm_engine import alp_engine

logger = logging.getLogger(__name__)


class ALPGRPOTrainer(GRPOTrainer):
    """Drop-in replacement for `trl.GRPOTrainer` that trains with the ALP importance ratio.

    Swap the class name and keep everything else. σ is kept outside the model: not in the saved weights nor in vLLM's
    weight sync; it is stepped by its own group of the main optimizer and saved in ``alp_state.json`` in every
    checkpoint and in the output directory (restored by ``resume_from_checkpoint``).

    Args:
        model: A model id or path, a `PreTrainedModel` or a PEFT model, as for `trl.GRPOTrainer`.
        reward_funcs: Reward functions or models, as for `trl.GRPOTrainer`.
        args: An [`ALPConfig`][trl_alp.config.ALPConfig]. A plain `trl.GRPOConfig` is upgraded to one with the ALP
            defaults (with a warning); `None` uses the defaults with an output folder named after the model.
        *trainer_args: Passed on to `trl.GRPOTrainer` (datasets, processing class, callbacks, ...).
        **trainer_kwargs: Passed on to `trl.GRPOTrainer`. ``optimizers`` must be ``(None, None)`` while σ is
            learned: the trainer adds σ's group to the optimizer it builds.

    Raises:
        ValueError: A config option the correction cannot honour, a layer selection that does not fit the model,
            or a custom optimizer with a learned σ.
    """

    _tag_names = ["trl", "grpo", "alp"]
    _name = "ALP-GRPO"
    _paper = PAPER  # TRL's model card cites it (`BaseTrainer.create_model_card`)

    def __init__(
        self,
        model: str | torch.nn.Module,
        reward_funcs: Any = None,
        args: GRPOConfig | None = None,
        *trainer_args: Any,
        **trainer_kwargs: Any,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path or type(model).__name__
            args = ALPConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-ALP")
        elif not isinstance(args, ALPConfig):
            logger.warning(
                "ALPGRPOTrainer got a plain GRPOConfig: training with the ALP defaults (%s). Use ALPConfig to change "
                "them.",
                alp_defaults(),
            )
            args = ALPConfig.from_grpo_config(args)
        self.correction = args.parsed_correction
        logger.info("correction=%r: %s", self.correction.name, self.correction.description)
        # Every attribute ALP adds, before TRL's constructor calls any override.
        self._alp_call = LogpsCall()  # what the shared log-prob helper does now (TRL's own behaviour by default)
        self._alp_warned_no_support = False
        self._alp_warned_all_rejected = False
        self._alp_layers_path: str | None = None  # where the perturbed layers live (`find_decoder_layers`)
        self._alp_sigma_restored = False  # σ came from a checkpoint: never recalibrate
        self._alp_main_optimizer: torch.optim.Optimizer | None = None  # the optimizer σ's was made next to
        self.alp_calibration: dict | None = None  # σ₀ calibration (alp_init_sigma="auto"), saved in alp_state.json
        self.alp_sigma_optimizer: torch.optim.Optimizer | None = None  # σ's own, where the backend owns the optimizer
        self.alp_metrics = ALPMetrics(self)

        support_tokens, support_bound = 0, None
        if args.replays_support and args.use_vllm:  # vLLM returns the support as its top-N processed log-probs
            support_bound = args.top_k if (args.top_k or 0) > 0 else None
            support_tokens = min(args.alp_support_max_tokens, support_bound or args.alp_support_max_tokens)
        with alp_engine(args.alp_rollout_dtype if args.use_vllm else None, support_tokens, support_bound):
            super().__init__(model, reward_funcs, args, *trainer_args, **trainer_kwargs)

        if args.replays_support and backend_name(self.accelerator) in ("zero3", "fsdp1"):
            raise ValueError(
                f"alp_replay_support (top_k/top_p/min_p) reads the LM head's weight outside its forward, which "
                f"{backend_name(self.accelerator)} keeps partitioned: use FSDP2 or ZeRO-0/1/2, or set "
                "alp_replay_support=False (the ratio is then off by the kept mass)."
            )
        self.alp_perturbation, self._alp_layers_path = build_perturbation(
            self.model,
            args.alp_layers,
            args.alp_layers_path,
            FALLBACK_SIGMA if args.alp_init_sigma == "auto" else args.alp_init_sigma,  # "auto": calibrated later
            perturbs=self.correction.perturbs,
            learnable=args.alp_learn_sigma,
            seed=args.seed if args.alp_noise_seed is None else args.alp_noise_seed,
            relative=args.alp_relative_sigma,
        )
        self.alp_perturbation.to(self.accelerator.device)
        if self.alp_perturbation.log_sigma.requires_grad and self.optimizer is not None:
            raise ValueError(
                "ALPGRPOTrainer builds σ's optimizer group itself: pass optimizers=(None, None), or set "
                "alp_learn_sigma=False to keep σ fixed with your own optimizer."
            )
        if self.use_vllm and self.vllm_importance_sampling_correction and self.correction.family != "grpo":
            logger.info(
                "TRL's vLLM importance-sampling correction is turned off: correction=%r decides the ratio.",
                self.correction.name,
            )
            self.vllm_importance_sampling_correction = False
        self.add_callback(SigmaGradCallback(self))

    # ------------------------------------------------------------------------------------ backends and optimizer
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if prepare_backend(self.accelerator, self.args.fsdp_plugin_args, self.args.gradient_checkpointing):
            self.is_fsdp_enabled = True

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        log_sigma = self.alp_perturbation.log_sigma
        if self.alp_sigma_optimizer is not None and self._alp_main_optimizer is optimizer:
            return optimizer  # asked again for the same optimizer (DeepSpeed's setup calls this twice)
        self.alp_sigma_optimizer, self._alp_main_optimizer = None, optimizer
        if log_sigma.requires_grad and not any(p is log_sigma for g in optimizer.param_groups for p in g["params"]):
            self.alp_sigma_optimizer = add_sigma_to_optimizer(
                optimizer,
                log_sigma,
                self.accelerator,
                self.args.alp_sigma_learning_rate,
                self.args.alp_sigma_weight_decay,
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
        result = calibrate_on_batch(
            lambda: self._alp_completion_logps(self.model, inputs)[0],
            self.alp_perturbation,
            self._alp_loss_mask(inputs),
            inputs.get("sampling_per_token_logps"),
            self.args.alp_sigma_target,
            reduce_sum=lambda tensor: self.accelerator.reduce(tensor, reduction="sum"),
            seed_key=(self.state.global_step, 0, self.accelerator.process_index),
        )
        report_calibration(result)
        self.alp_metrics.log_calibration(result)
        self.alp_calibration = result.to_dict()
        return self.alp_calibration

    # ----------------------------------------------------------------------------------- rollout log-probs
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """On the ``generate`` path TRL stores no rollout log-probs: record them (and the supports) while it samples."""
        if self.use_vllm or self.use_transformers_continuous_batching:
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        target = self.accelerator.unwrap_model(self.model_wrapped)
        engine = rollout_engine(target, self.args.alp_rollout_dtype, self.args.alp_rollout_weight_bits)
        warpers = support_warpers(self.top_k, self.top_p, self.min_p) if self.args.replays_support else None
        recording = record_generate_logprobs(target, self.temperature, warpers, self.args.alp_support_max_tokens)
        with engine, recording as recorder:
            completion_ids, _ = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        return completion_ids, recorder.rows(completion_ids)

    def _generate(self, prompts):
        """Hand the rollout rows' supports (truncated sampling) to the scoring call that is under way."""
        output = super()._generate(prompts)
        if self.args.replays_support:
            rows = output[GENERATE_LOGPROBS] or []
            if RolloutSupports.carried_by(rows):
                self._alp_call.rollout = RolloutSupports(rows)
                self.alp_metrics.log_support("train" if self.model.training else "eval", rows)
            elif not self._alp_warned_no_support:
                self._alp_warned_no_support = True
                logger.warning(
                    "top_k/top_p/min_p: these rollouts carry no sampling support (a custom rollout_func returns plain "
                    "log-probs), so the ratio is not replayed on it; return trl_alp.support.SupportedLogp values to "
                    "replay it."
                )
        return output

    def _generate_and_score_completions(self, inputs):
        # ALP and Bypass use the rollout log-probs as denominator, so TRL's no-grad "old" pass is not needed. TRL runs
        # it when generation and optimizer steps are misaligned (its vLLM IS correction, the other trigger, is off here
        # for these corrections). Rollout rejection is computed on π_old/μ: then the old pass stays. Under truncated
        # sampling `_generate` puts the rollout supports on the call, so the old and reference passes replay them.
        skip_old = not self.correction.uses_old_logps and not self.args.rejects_rollouts
        with self._alp_logps_call(LogpsCall(skip_old=skip_old)) as call:
            output = super()._generate_and_score_completions(inputs)
        if call.rollout is not None:  # the table travels with the batch through TRL's shuffles and splits
            table = call.rollout.table(output["completion_ids"].size(1))
            output.update({key: value.to(self.accelerator.device) for key, value in zip(SUPPORT_KEYS, table)})
        return output

    # ----------------------------------------------------------------------------------- the log-prob helper
    @contextlib.contextmanager
    def _alp_logps_call(self, call: LogpsCall) -> Iterator[LogpsCall]:
        """Within the context, TRL's shared log-prob helper does what `call` says (see `LogpsCall`)."""
        previous, self._alp_call = self._alp_call, call
        try:
            yield call
        finally:
            self._alp_call = previous

    def _alp_is_old_pass(self, model) -> bool:
        """Whether a log-prob pass is TRL's old one: no grad, the policy model itself, and not the reference (a model
        of its own, or this PEFT model with its adapter disabled or switched to TRL's "ref" adapter)."""
        if torch.is_grad_enabled() or model is not self.model:
            return False
        base = self.accelerator.unwrap_model(model)
        return not (getattr(base, "_adapters_disabled", False) or getattr(base, "active_adapter", None) == "ref")

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        call = self._alp_call
        if call.skip_old and self._alp_is_old_pass(model):
            call.skip_old = False  # one old pass per generation; TRL stores None = "not computed"
            return None, None, None
        width = kwargs.get("logits_to_keep", args[2] if len(args) > 2 else None)
        support = call.support(width)
        if support is None:
            out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        else:
            out = self._alp_replayed_logps_and_entropies(model, support, *args, **kwargs)
        call.logps = out[0]
        return out

    def _alp_replayed_logps_and_entropies(self, model, support, input_ids, attention_mask, logits_to_keep, *a, **kw):
        """TRL's pass, with each completion token's log-prob replayed on its sampling support (`trl_alp.support`);
        tokens without a support (tool output, padding) keep TRL's value. Entropies stay over the whole vocabulary."""
        ids, counts, covers = support
        replay = replay_forward(unwrap_model(model), input_ids, logits_to_keep, ids, counts, covers, self.temperature)
        with replay as replayed:
            logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *a, **kw
            )
        self._alp_call.unreplayed_logps = logps.detach()
        return (
            torch.where(counts.to(logps.device) > 0, torch.cat(replayed).to(logps.dtype), logps),
            entropies,
            aux_loss,
        )

    def _alp_completion_logps(self, model, inputs, call: LogpsCall | None = None, **kwargs):
        """Per-token log-probs (and optionally entropies / aux loss) of a batch's completion tokens, replayed on the
        batch's sampling supports where it carries them. `call` (a new one by default) receives what the pass left."""
        call = call or LogpsCall()
        call.table = tuple(inputs[key] for key in SUPPORT_KEYS) if SUPPORT_KEYS[0] in inputs else None
        with self._alp_logps_call(call):
            return self._get_per_token_logps_and_entropies(
                model,
                torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
                torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
                inputs["completion_ids"].size(1),
                **kwargs,
                **{key: inputs.get(key) for key in FORWARD_KEYS},
            )

    # ------------------------------------------------------------------------------------------------- loss
    @staticmethod
    def _alp_loss_mask(inputs) -> torch.Tensor:
        mask = inputs["completion_mask"]
        return mask * inputs["tool_mask"] if "tool_mask" in inputs else mask

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        mask, rollout_logps = self._alp_loss_mask(inputs), inputs.get("sampling_per_token_logps")
        if self.correction.family == "grpo":  # TRL's own loss; only the diagnostics are ours
            with self._alp_logps_call(LogpsCall()) as call:
                loss = super()._compute_loss(model, inputs)
            if rollout_logps is not None:
                self._alp_log_diagnostics(mode, inputs, call.logps, rollout_logps, mask)
            return loss
        if rollout_logps is None:
            raise RuntimeError(
                f"correction={self.correction.name!r} needs the log-probs the rollout engine reported, but this "
                "batch has none (a custom rollout_func must return 'logprobs'); use correction='grpo' otherwise."
            )
        call = LogpsCall()
        per_token_logps, entropies, aux_loss = self._alp_completion_logps(
            model, inputs, call, compute_entropy=True, compute_aux_loss=self.aux_loss_enabled
        )
        (mask, per_token_logps, rollout_logps, entropies), faults = drop_nonfinite(
            mask, per_token_logps, rollout_logps, entropies
        )
        self.alp_metrics.log_faults(mode, faults)
        if call.unreplayed_logps is not None:
            self.alp_metrics.log_kept_mass(mode, call.unreplayed_logps, per_token_logps, inputs[SUPPORT_KEYS[1]], mask)
        metrics = self._metrics[mode]
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        args, correction, level = self.args, self.correction, self.args.ratio_level

        ratio = correction_ratio(
            correction,
            per_token_logps,
            rollout_logps,
            inputs.get("old_per_token_logps"),
            mask,
            level,
            (args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max),
        )
        denominator, is_weights = ratio.denominator, ratio.is_weights

        vespo_weights = None
        if self.loss_type == "vespo":  # TRL's γ-weights; the rollout weight goes inside them, never multiplied again
            vespo_weights = self.get_gamma_weights(
                advantages,
                per_token_logps - denominator,
                mask,
                is_weights,
                k_pos=args.vespo_k_pos,
                lambda_pos=args.vespo_lambda_pos,
                k_neg=args.vespo_k_neg,
                lambda_neg=args.vespo_lambda_neg,
            )
        per_token_loss, clip_stats = policy_loss(
            self.loss_type,
            ratio.log_weights,
            advantages,
            per_token_logps,
            args.clip,
            sapo_temperatures=(args.sapo_temperature_pos, args.sapo_temperature_neg),
            vespo_weights=vespo_weights,
        )

        # Masks, rollout weight, rollout rejection and KL, in TRL's order.
        if self.off_policy_mask_threshold is not None:
            per_token_loss = per_token_loss * self.get_off_policy_mask(
                advantages, per_token_logps, rollout_logps, mask, self.off_policy_mask_threshold
            )
        if self.top_entropy_quantile < 1.0:
            per_token_loss = per_token_loss * self.get_high_entropy_mask(
                entropies, mask, 1 - self.top_entropy_quantile
            )
        if is_weights is not None and self.loss_type != "vespo":
            per_token_loss = per_token_loss * is_weights
        loss_mask = mask
        if args.rejects_rollouts:  # on π_old/μ, after the clips (see `_alp_rollout_rejection`)
            old_logps = denominator if correction.uses_old_logps else None
            band_weights, keep = self._alp_rollout_rejection(mode, inputs, old_logps, rollout_logps, mask)
            if band_weights is not None:
                per_token_loss = per_token_loss * band_weights
            if keep is not None:  # verl's criteria take the token out of the loss and its normaliser
                loss_mask = mask * keep
        if self.beta != 0.0:
            per_token_kl = k3_kl(
                per_token_logps, inputs["ref_per_token_logps"], clamp=KL_CLAMP if args.alp_kl_clamp else None
            )
            if args.use_bias_correction_kl:
                per_token_kl = per_token_kl * kl_weights(per_token_logps, denominator, mask, level)
            per_token_loss = per_token_loss + self.beta * per_token_kl

        training = mode == "train"
        loss, policy_loss_value = aggregate_loss(
            per_token_loss,
            loss_mask,
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

        self._alp_log_diagnostics(mode, inputs, per_token_logps, rollout_logps, mask)
        if clip_stats is not None:
            self.alp_metrics.log_clip(mode, clip_stats, mask)
        if is_weights is not None:
            name = f"alp/is/{'truncated' if correction.is_mode == 'truncate' else 'masked'}_frac"
            metrics[name].append(self.alp_metrics.masked_mean(ratio.is_hit, mask))
        if self.beta != 0.0:
            metrics["kl"].append(self.alp_metrics.masked_mean(per_token_kl, mask))
        metrics["entropy"].append(self.alp_metrics.masked_mean(entropies, mask))
        metrics["policy_loss"].append(self.accelerator.gather(policy_loss_value).nanmean().item())
        return loss

    def _alp_rollout_rejection(
        self, mode: str, inputs, old_logps: torch.Tensor | None, rollout_logps: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The config's rollout rejection on π_old/μ (`trl_alp.rejection.decide_rollouts`), logged.

        Returns ``(band_weights, keep)``: the authors' band weights multiply the clipped loss (the token stays in the
        normaliser); verl's criteria and veto give a 0/1 mask on the loss mask (the token leaves loss and normaliser).
        Either is None when not set; both are None under ``alp_rollout_rejection_metrics_only``. π_old is TIS/MIS's
        denominator, else TRL's old pass, else (steps aligned) a no-grad forward, where the hooks stay silent.
        """
        if old_logps is None:
            old_logps = inputs.get("old_per_token_logps")
        if old_logps is None:
            with torch.no_grad():
                old_logps = self._alp_completion_logps(self.model, inputs)[0]
        decision = decide_rollouts(self.args, old_logps, rollout_logps, mask)
        rejected_frac = self.alp_metrics.log_rejection(mode, decision.rejection, decision.band_rejected, mask)
        if self.args.alp_rollout_rejection_metrics_only:
            return None, None
        if rejected_frac == 1.0 and not self._alp_warned_all_rejected:
            self._alp_warned_all_rejected = True
            logger.warning(
                "Rollout rejection rejected every completion token of a batch (alp/rollout_rejection/masked_frac = "
                "1): the batch gives no policy gradient. Loosen the thresholds, or try them first with "
                "alp_rollout_rejection_metrics_only=True."
            )
        return decision.band_weights, None if decision.rejection is None else decision.rejection.keep

    def _alp_log_diagnostics(self, mode, inputs, per_token_logps, rollout_logps, mask) -> None:
        self.alp_metrics.log_ratio(mode, "alp", per_token_logps, rollout_logps, mask)
        if self.args.alp_log_unperturbed_ratio:
            with torch.no_grad():  # no grad: the hooks stay silent, this is the clean policy
                clean, clean_entropy, _ = self._alp_completion_logps(self.model, inputs, compute_entropy=True)
            self.alp_metrics.log_ratio(mode, "alp/unperturbed", clean, rollout_logps, mask)
            # TRL's `entropy` comes from the loss forward, which ALP perturbs: this one is the policy that samples
            self._metrics[mode]["alp/unperturbed/entropy"].append(self.alp_metrics.masked_mean(clean_entropy, mask))
        self.alp_metrics.log_sigma(mode, self.alp_perturbation)

    # ------------------------------------------------------------------------------------ saving / loading
    def alp_state(self) -> dict:
        """σ, its calibration and the perturbation setup, as saved in ``alp_state.json`` (`trl_alp.checkpoint`)."""
        return alp_state(self.alp_perturbation, self._alp_layers_path, self.alp_calibration, self.alp_sigma_optimizer)

    def _alp_write_state(self, directory: str) -> None:
        write_alp_state(directory, self.alp_state())

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            self._alp_write_state(os.path.join(self._get_output_dir(trial=trial), folder))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        gather = (
            contextlib.nullcontext() if _internal_call else full_state_dict(self.accelerator, self.is_fsdp_enabled)
        )
        with gather:
            super().save_model(output_dir, _internal_call)
        if self.args.should_save and not _internal_call:
            output_dir = output_dir or self.args.output_dir
            self._alp_write_state(output_dir)
            self.create_model_card(model_name=os.path.basename(os.path.normpath(output_dir)))
            copy_model_card(self.args.output_dir, output_dir)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card (citing ALP through `_paper`) plus the run's ALP settings and what alp_state.json holds."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        path = os.path.join(self.args.output_dir, "README.md")
        if self.is_world_process_zero() and os.path.exists(path):
            section = model_card_section(
                self.args, self.correction, self.alp_perturbation, self._alp_layers_path, bool(self.alp_calibration)
            )
            with open(path, "a") as f:
                f.write(section)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # The ALP state first: a checkpoint of another perturbation setup would also fail in the optimizer's state
        # (σ's group), with a message that does not say why.
        state = read_alp_state(checkpoint)
        if state is not None:
            check_alp_setup(state, self._alp_setup(), source=checkpoint)
        super()._load_optimizer_and_scheduler(checkpoint)
        if state is not None:
            self.load_alp_state(state, source=checkpoint)

    def _alp_setup(self) -> dict:
        return alp_setup(self.alp_perturbation, self._alp_layers_path)

    def load_alp_state(self, state: dict, source: str = "the state") -> None:
        """Restore σ (and its calibration, never redone) from `state` (an ``alp_state.json``); refuse a state written
        for another perturbation setup."""
        check_alp_setup(state, self._alp_setup(), source)
        restore_sigma(state, self.alp_perturbation, self.alp_sigma_optimizer, source)
        self.alp_calibration = state.get("calibration")
        self._alp_sigma_restored = True
