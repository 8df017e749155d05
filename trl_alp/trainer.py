"""`ALPGRPOTrainer`: TRL's `GRPOTrainer` with the Adaptive Layerwise Perturbation ratio."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import shutil
import textwrap
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer

from .calibration import FALLBACK_SIGMA, Calibration, calibrate_sigma, masked_k3_kl
from .config import KL_CLAMP, ALPConfig, alp_defaults
from .loss import (
    aggregate_loss,
    alp_log_weights,
    k3_kl,
    kl_weights,
    policy_loss,
    rollout_correction_weights,
    rollout_mask_weights,
    sequence_log_ratio,
)
from .metrics import mismatch_stats, quantile_stats, weight_diagnostics
from .perturbation import LayerPerturbation, find_decoder_layers, is_logits_only, parse_layer_spec, unwrap_model
from .rollout import record_generate_logprobs, rollout_engine
from .support import SupportedLogp, pack_supports, replay_forward, support_stats, support_warpers, supported_logp
from .vllm_engine import alp_engine

logger = logging.getLogger(__name__)

ALP_STATE_FILE = "alp_state.json"
ALP_STATE_VERSION = 2  # 1 (trl-alp 0.1): layer_indices and σ only; 2: the whole perturbation setup

# The GRPOTrainer methods this trainer overrides or calls, with the parameter names of TRL 1.16 that it was built
# against: tests/test_trl_parity.py fails with a clear message when an installed TRL differs.
TRL_METHODS = {
    # overridden
    "create_optimizer": ("self", "model"),
    "training_step": ("self", "model", "inputs", "num_items_in_batch"),
    "_prepare_inputs": ("self", "generation_batch"),
    "_generate_single_turn": (
        "self",
        "prompt_ids",
        "images",
        "multimodal_fields",
        "num_generations",
        "has_tool_images",
    ),
    "_generate_and_score_completions": ("self", "inputs"),
    "_get_per_token_logps_and_entropies": (
        ("self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy")
        + ("compute_aux_loss", "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask")
        + ("spatial_shapes", "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
    ),
    "_compute_loss": ("self", "model", "inputs"),
    "_save_checkpoint": ("self", "model", "trial"),
    "save_model": ("self", "output_dir", "_internal_call"),
    "_load_optimizer_and_scheduler": ("self", "checkpoint"),
    # called
    "get_gamma_weights": (
        ("advantages", "log_ratio_per_token", "mask", "importance_sampling_ratio")
        + ("k_pos", "lambda_pos", "k_neg", "lambda_neg")
    ),
    "get_off_policy_mask": (
        "advantages",
        "per_token_logps",
        "sampling_per_token_logps",
        "mask",
        "off_policy_threshold",
    ),
    "get_high_entropy_mask": ("self", "entropies", "mask", "threshold"),
}

# The batch's support table under truncated sampling (`support.pack_supports`): ids, counts and log covers.
SUPPORT_KEYS = ("alp_support_ids", "alp_support_counts", "alp_support_cover")

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


def engine_name(accelerator) -> str:
    """Which training engine `accelerator` drives: "fsdp2", "fsdp1", "zero0"-"zero3", "ddp" or "single"."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return f"fsdp{getattr(accelerator.state.fsdp_plugin, 'fsdp_version', 1)}"
    if kind == DistributedType.DEEPSPEED:
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    return "ddp" if accelerator.num_processes > 1 else "single"


def engine_owns_optimizer(accelerator) -> bool:
    """Whether the engine rebuilds the optimizer around the model's parameters, so σ (not a model parameter) needs
    an optimizer of its own: FSDP2 swaps every optimizer parameter for its sharded DTensor (accelerate raises a
    KeyError on any other parameter); DeepSpeed ZeRO flattens and partitions every parameter of its optimizer."""
    return engine_name(accelerator).startswith(("fsdp", "zero"))


def promote_cpu_fsdp(accelerator) -> bool:
    """Turn accelerate's multi-CPU state into FSDP when FSDP was asked for (``ACCELERATE_USE_FSDP``, set by
    ``accelerate launch`` from an FSDP config or by a `FullyShardedDataParallelPlugin`).

    accelerate 1.15 enables FSDP only for accelerator devices: on CPUs (gloo) it keeps ``MULTI_CPU`` and the model
    runs replicated under DDP, while PyTorch's `fully_shard` itself runs on CPUs with gloo. Returns whether it
    promoted."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wanted or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = getattr(accelerator, "_alp_fsdp_plugin", None) or FullyShardedDataParallelPlugin()
    state.fsdp_plugin = plugin
    # both singletons: every `AcceleratorState()` call copies PartialState's fields over its own
    PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
    logger.info("FSDP%d on CPUs: %d processes, backend %s", plugin.fsdp_version, state.num_processes, state.backend)
    return True


def _json_state(value):
    """An optimizer state dict as JSON (tensors as ``{"tensor": values, "dtype": name}``; float repr round-trips)."""
    if isinstance(value, torch.Tensor):
        return {"tensor": value.tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, dict):
        return {str(key): _json_state(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_state(item) for item in value]
    return value


def _tensor_state(value, key: str | None = None):
    """Inverse of `_json_state` for an optimizer state dict (its per-parameter keys are ints again)."""
    if isinstance(value, dict) and set(value) == {"tensor", "dtype"}:
        return torch.tensor(value["tensor"], dtype=getattr(torch, value["dtype"]))
    if isinstance(value, dict):
        convert = int if key == "state" else str
        return {convert(k): _tensor_state(v, k) for k, v in value.items()}
    if isinstance(value, list):
        items = [_tensor_state(item) for item in value]
        return tuple(items) if key == "betas" else items
    return value


def check_engine_state(accelerator) -> None:
    """Refuse the states in which accelerate counts one process per rank while several run: each rank would train
    alone on its own data (no gradient all-reduce, no sharding) and the run would still look green."""
    from accelerate.utils import DistributedType

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world > 1 and accelerator.distributed_type == DistributedType.NO:
        raise ValueError(
            f"{world} processes run, but accelerate found no accelerator device and was not told to use the CPU, so "
            "each would train alone. On CPUs set use_cpu=True (--use_cpu true); for DeepSpeed on CPUs keep "
            "use_cpu=False and set ddp_backend='gloo' (see docs/distributed.md)."
        )
    if world > 1 and accelerator.num_processes != world:
        raise ValueError(
            f"{world} processes run, but accelerate counts {accelerator.num_processes} ({accelerator.distributed_type})"
            ": DeepSpeed on CPUs needs ddp_backend='gloo' (--ddp_backend gloo); see docs/distributed.md."
        )


class _SigmaGradCallback(TrainerCallback):
    """σ lives outside the model, so no engine (DDP, FSDP2, DeepSpeed) all-reduces, steps or zeroes its gradient: do
    it here, and drop a non-finite σ gradient (counted in ``alp/faults/sigma_grad_nonfinite``).

    Under DDP σ is a group of the main optimizer, stepped with it. Under FSDP2 and DeepSpeed it has an optimizer of
    its own (`ALPGRPOTrainer.alp_sigma_optimizer`), stepped here at the main scheduler's current learning-rate factor
    (what σ's group would get from that scheduler)."""

    def __init__(self, trainer: ALPGRPOTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        log_sigma = trainer.alp_perturbation.log_sigma
        if not log_sigma.requires_grad:
            return
        grad = log_sigma.grad if log_sigma.grad is not None else torch.zeros_like(log_sigma)
        if trainer.accelerator.num_processes > 1:
            grad = trainer.accelerator.reduce(grad, reduction="mean")
        finite = bool(torch.isfinite(grad).all())
        trainer._metrics["train"]["alp/faults/sigma_grad_nonfinite"].append(float(not finite))
        log_sigma.grad = grad if finite else torch.zeros_like(grad)  # a bad step must not corrupt σ
        optimizer = trainer.alp_sigma_optimizer
        if optimizer is not None:
            main_lr = trainer.lr_scheduler.get_last_lr()[0] if trainer.lr_scheduler is not None else args.learning_rate
            factor = main_lr / args.learning_rate if args.learning_rate else 1.0
            for group in optimizer.param_groups:
                group["lr"] = args.alp_sigma_learning_rate * factor
            optimizer.step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.alp_perturbation.log_sigma.grad = None  # the Trainer only calls model.zero_grad()


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

    # Per-call state gives TRL's shared log-prob helper, `_get_per_token_logps_and_entropies`, a role per call site,
    # because TRL calls it from several places with no argument that tells them apart. `_alp_skip_old_pass` is set
    # while TRL generates and scores a batch: its no-grad "old" pass (which ALP/Bypass do not need) then returns
    # nothing. `_alp_capture_loss_logps` is set during TRL's own loss under correction="grpo": the loss forward's
    # log-probs are then kept for ALP's diagnostics. Under truncated sampling the rows' supports say which tokens to
    # replay each pass on: `_alp_rollout_rows` while TRL scores a new batch (its old and reference passes), then
    # `_alp_support`, the batch's own table, around each `_completion_logps`. Each is set and reset in a try/finally
    # around one TRL call.
    _alp_skip_old_pass = False
    _alp_capture_loss_logps = False

    _tag_names = ["trl", "grpo", "alp"]
    _name = "ALP-GRPO"
    # TRL's model card cites the trainer's `_paper` (read by `BaseTrainer.create_model_card`).
    _paper = {
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

        # Sampling-support replay (top_k/top_p/min_p): the rollout rows' supports while a generation batch is
        # scored (TRL's old and reference passes), then the batch's own table (`_completion_logps`).
        self._alp_rollout_rows: list[list[float]] | None = None
        self._alp_rollout_tables: dict[int, tuple[torch.Tensor, ...]] = {}  # the rows packed, by token width
        self._alp_support: tuple[torch.Tensor, ...] | None = None
        self._alp_support_full_logps: torch.Tensor | None = None
        self._alp_warned_no_support = False
        support_tokens, support_bound = 0, None
        if args.replays_support and args.use_vllm:  # vLLM returns the support as its top-N processed log-probs
            support_bound = args.top_k if (args.top_k or 0) > 0 else None
            support_tokens = min(args.alp_support_max_tokens, support_bound or args.alp_support_max_tokens)
        with alp_engine(args.alp_rollout_dtype if args.use_vllm else None, support_tokens, support_bound):
            super().__init__(model, reward_funcs, args, *trainer_args, **trainer_kwargs)

        if args.replays_support and engine_name(self.accelerator) in ("zero3", "fsdp1"):
            raise ValueError(
                f"alp_replay_support (top_k/top_p/min_p) reads the LM head's weight outside its forward, which "
                f"{engine_name(self.accelerator)} keeps partitioned: use FSDP2 or ZeRO-0/1/2, or set "
                "alp_replay_support=False (the ratio is then off by the kept mass)."
            )
        self.alp_perturbation = self._build_perturbation(args).to(self.accelerator.device)
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
        self.alp_calibration: dict | None = None  # σ₀ calibration (alp_init_sigma="auto"), saved in alp_state.json
        self._alp_sigma_restored = False  # σ came from a checkpoint: never recalibrate
        self.alp_sigma_optimizer: torch.optim.Optimizer | None = None  # σ's own, when the engine owns the optimizer
        self._alp_main_optimizer: torch.optim.Optimizer | None = None  # the optimizer σ's was made next to
        self.add_callback(_SigmaGradCallback(self))

    def _build_perturbation(self, args: ALPConfig) -> LayerPerturbation:
        seed = args.seed if args.alp_noise_seed is None else args.alp_noise_seed
        self._alp_layers_path = None
        init_sigma = FALLBACK_SIGMA if args.alp_init_sigma == "auto" else args.alp_init_sigma  # "auto": set later
        if not self.correction.perturbs:
            return LayerPerturbation(torch.nn.ModuleList(), [], init_sigma, learnable=False, seed=seed)
        layers_path, layers = find_decoder_layers(self.model, args.alp_layers_path)
        self._alp_layers_path = layers_path
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
    # Everything ALP needs for the training engines (DDP, FSDP2, DeepSpeed ZeRO) is in this section, in the
    # module-level functions above `_SigmaGradCallback` and in that callback: FSDP on CPUs, refused one-process-per-
    # rank states, σ's optimizer (a group of the main one, or its own), σ's gradient all-reduce, the final FSDP save.
    # σ is replicated on every rank (a handful of floats), never sharded; saving it is rank 0's (`args.should_save`,
    # `_write_alp_state`), its own optimizer's state travels in alp_state.json (`alp_state`, `load_alp_state`).
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin_args = self.args.fsdp_plugin_args
        self.accelerator._alp_fsdp_plugin = FullyShardedDataParallelPlugin(**plugin_args) if plugin_args else None
        check_engine_state(self.accelerator)
        if promote_cpu_fsdp(self.accelerator):
            self.is_fsdp_enabled = True
            if self.accelerator.state.fsdp_plugin.activation_checkpointing and self.args.gradient_checkpointing:
                raise ValueError(
                    "The activation_checkpointing in the FSDP config and gradient_checkpointing in the training "
                    "arguments cannot both be on: use one of them."
                )

    @contextlib.contextmanager
    def _alp_full_state_dict(self):
        """transformers' `save_model` writes no weights at all for an FSDP ``SHARDED_STATE_DICT`` model (checkpoints
        keep the shards): gather the final model on rank 0 instead."""
        plugin = self.accelerator.state.fsdp_plugin if self.is_fsdp_enabled else None
        if plugin is None or "FULL_STATE_DICT" in str(plugin.state_dict_type):
            yield
            return
        previous = plugin.state_dict_type
        plugin.set_state_dict_type("FULL_STATE_DICT")
        try:
            yield
        finally:
            plugin.set_state_dict_type(previous)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        log_sigma = self.alp_perturbation.log_sigma
        if self.alp_sigma_optimizer is not None and self._alp_main_optimizer is optimizer:
            return optimizer  # asked again for the same optimizer (DeepSpeed's setup calls this twice)
        self.alp_sigma_optimizer, self._alp_main_optimizer = None, optimizer
        if not log_sigma.requires_grad or any(p is log_sigma for g in optimizer.param_groups for p in g["params"]):
            return optimizer
        group = {"lr": self.args.alp_sigma_learning_rate, "weight_decay": self.args.alp_sigma_weight_decay}
        if engine_owns_optimizer(self.accelerator):
            # the main optimizer's class and settings, σ's learning rate and weight decay (see `engine_owns_optimizer`)
            accepted = inspect.signature(type(optimizer).__init__).parameters
            kwargs = {key: value for key, value in optimizer.defaults.items() if key in accepted}
            self.alp_sigma_optimizer = type(optimizer)([log_sigma], **{**kwargs, **group})
            logger.info("%s: σ has its own %s", engine_name(self.accelerator), type(optimizer).__name__)
        else:
            optimizer.add_param_group({"params": [log_sigma], **group})
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
        warpers = support_warpers(self.top_k, self.top_p, self.min_p) if self.args.replays_support else None
        recording = record_generate_logprobs(target, self.temperature, warpers, self.args.alp_support_max_tokens)
        with engine, recording as recorder:
            completion_ids, _ = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        logps = recorder.results[-1].cpu()
        rows = [row[: len(ids)].tolist() for row, ids in zip(logps, completion_ids, strict=True)]
        if warpers is None:
            return completion_ids, rows
        ids, sizes, masses, covers = (t.cpu().tolist() for t in recorder.supports[-1])
        return completion_ids, [
            [supported_logp(*token) for token in zip(*row)]
            for row in zip(rows, ids, sizes, masses, covers, strict=True)
        ]

    def _generate(self, prompts):
        output = super()._generate(prompts)
        if self.args.replays_support:  # the rollout rows, with their supports, for the passes that score them
            rows = output[4] or []
            if any(isinstance(v, SupportedLogp) for row in rows for v in row):
                self._alp_rollout_rows, self._alp_rollout_tables = rows, {}
                self._log_support_stats(rows)
            elif not self._alp_warned_no_support:
                self._alp_warned_no_support = True
                logger.warning(
                    "top_k/top_p/min_p: these rollouts carry no sampling support (a custom rollout_func returns plain "
                    "log-probs), so the ratio is not replayed on it; return trl_alp.support.SupportedLogp values to "
                    "replay it."
                )
        return output

    def _log_support_stats(self, rows) -> None:
        stats = support_stats(rows or [])
        names = ("size", "truncated_frac", "engine_kept_mass")
        local = torch.tensor([stats.get(name, math.nan) for name in names], device=self.accelerator.device)
        values = self.accelerator.gather(local[None]).nanmean(0).tolist()
        metrics = self._metrics["train" if self.model.training else "eval"]
        for name, value in zip(names, values, strict=True):
            if not math.isnan(value):
                metrics[f"alp/support/{name}"].append(value)

    def _generate_and_score_completions(self, inputs):
        # ALP and Bypass use the rollout log-probs as denominator, so TRL's no-grad "old" pass is not needed. TRL runs
        # it when generation and optimizer steps are misaligned (its vLLM IS correction, the other trigger, is off here
        # for these corrections). The rollout mask is computed on π_old/μ: then the old pass stays.
        self._alp_skip_old_pass = not self.correction.uses_old_logps and self.args.alp_rollout_mask is None
        try:
            output = super()._generate_and_score_completions(inputs)
            if self._alp_rollout_rows is not None:  # rows travel with the batch through TRL's shuffles and splits
                table = self._rollout_support(output["completion_ids"].size(1))
                for key, value in zip(SUPPORT_KEYS, table, strict=True):
                    output[key] = value.to(self.accelerator.device)
            return output
        finally:
            self._alp_skip_old_pass = False
            self._alp_rollout_rows, self._alp_rollout_tables = None, {}

    def _is_old_pass(self, model) -> bool:
        """Whether a log-prob pass is TRL's old one: no grad, the policy model itself, and not the reference (a model
        of its own, or this PEFT model with its adapter disabled or switched to TRL's "ref" adapter)."""
        if torch.is_grad_enabled() or model is not self.model:
            return False
        base = self.accelerator.unwrap_model(model)
        return not (getattr(base, "_adapters_disabled", False) or getattr(base, "active_adapter", None) == "ref")

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        if self._alp_skip_old_pass and self._is_old_pass(model):
            self._alp_skip_old_pass = False  # one old pass per generation; TRL stores None = "not computed"
            return None, None, None
        support = self._alp_support
        if support is None and self._alp_rollout_rows is not None:  # TRL's old / reference pass of this batch
            logits_to_keep = kwargs.get("logits_to_keep", args[2] if len(args) > 2 else None)
            support = self._rollout_support(logits_to_keep)
        if support is None:
            out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        else:
            out = self._replayed_logps_and_entropies(model, support, *args, **kwargs)
        if self._alp_capture_loss_logps:  # TRL's loss forward: kept for the diagnostics of correction="grpo"
            self._alp_loss_logps = out[0]
        return out

    def _rollout_support(self, width: int) -> tuple[torch.Tensor, ...]:
        """The rollout rows' support table at `width` token columns, packed once per batch (the old and reference
        passes and the batch itself all read it)."""
        if width not in self._alp_rollout_tables:
            self._alp_rollout_tables[width] = pack_supports(self._alp_rollout_rows, width)
        return self._alp_rollout_tables[width]

    def _replayed_logps_and_entropies(self, model, support, input_ids, attention_mask, logits_to_keep, *args, **kw):
        """TRL's pass, with each completion token's log-prob replayed on its sampling support (`trl_alp.support`);
        tokens without a support (tool output, padding) keep TRL's value. Entropies stay over the whole vocabulary."""
        ids, counts, covers = support
        replay = replay_forward(unwrap_model(model), input_ids, logits_to_keep, ids, counts, covers, self.temperature)
        with replay as replayed:
            logps, entropies, aux_loss = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kw
            )
        counts = counts.to(logps.device)
        self._alp_support_full_logps = logps.detach()
        return torch.where(counts > 0, torch.cat(replayed).to(logps.dtype), logps), entropies, aux_loss

    # ------------------------------------------------------------------------------------------------- loss
    def _completion_logps(self, model, inputs, **kwargs):
        """Per-token log-probs (and optionally entropies / aux loss) of a batch's completion tokens."""
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        if SUPPORT_KEYS[0] in inputs:
            self._alp_support = tuple(inputs[key] for key in SUPPORT_KEYS)
        try:
            return self._get_per_token_logps_and_entropies(
                model,
                torch.cat([prompt_ids, completion_ids], dim=1),
                torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
                completion_ids.size(1),
                **kwargs,
                **{key: inputs.get(key) for key in _FORWARD_KEYS},
            )
        finally:
            self._alp_support = None

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
        mask, per_token_logps, rollout_logps, entropies = self._drop_nonfinite(
            mode, mask, per_token_logps, rollout_logps, entropies
        )
        if SUPPORT_KEYS[1] in inputs:  # π(S_t) of the policy being trained: what the replay divides out
            kept = torch.exp(self._alp_support_full_logps - per_token_logps.detach())
            self._metrics[mode]["alp/support/policy_kept_mass"].append(
                self._global_masked_mean(kept, mask * (inputs[SUPPORT_KEYS[1]] > 0))
            )
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        args, correction, level = self.args, self.correction, self.args.ratio_level

        # The ratio: ALP/Bypass over the rollout log-probs; TIS/MIS over TRL's π_old, times the rollout weight π_old/μ.
        if correction.uses_old_logps:
            old_logps = inputs.get("old_per_token_logps")
            denominator = per_token_logps.detach() if old_logps is None else old_logps
        else:
            denominator = rollout_logps
        log_weights = alp_log_weights(per_token_logps, denominator, mask, level)
        is_weights = None
        if correction.is_mode is not None:
            is_weights, is_hit = rollout_correction_weights(
                denominator,
                rollout_logps,
                mask,
                correction.level,
                correction.is_mode,
                args.vllm_importance_sampling_clip_min,
                args.vllm_importance_sampling_clip_max,
            )

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
            log_weights,
            advantages,
            per_token_logps,
            args.clip,
            sapo_temperatures=(args.sapo_temperature_pos, args.sapo_temperature_neg),
            vespo_weights=vespo_weights,
        )

        # Masks, rollout weight, rollout rejection mask and KL, in TRL's order.
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
        if args.alp_rollout_mask is not None:  # on π_old/μ, after the clips (see `_alp_rollout_mask`)
            per_token_loss = per_token_loss * self._alp_rollout_mask(mode, inputs, rollout_logps, mask)
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
            metrics[f"alp/is/{'truncated' if correction.is_mode == 'truncate' else 'masked'}_frac"].append(
                self._global_masked_mean(is_hit, mask)
            )
        if self.beta != 0.0:
            metrics["kl"].append(self._global_masked_mean(per_token_kl, mask))
        metrics["entropy"].append(self._global_masked_mean(entropies, mask))
        metrics["policy_loss"].append(self.accelerator.gather(policy_loss_value).nanmean().item())
        return loss

    def _drop_nonfinite(self, mode, mask, per_token_logps, rollout_logps, entropies):
        """Tokens the engine could not score (vLLM reports NaN) or whose training log-prob is not finite carry no
        ratio: count them, drop them from the mask and zero them, so no NaN reaches σ or the weights."""
        rollout_ok, numerator_ok = torch.isfinite(rollout_logps), torch.isfinite(per_token_logps.detach())
        faults = torch.stack([(mask * ~rollout_ok).sum(), (mask * ~numerator_ok).sum()]).float()
        faults = self.accelerator.reduce(faults, reduction="sum").tolist()
        self._metrics[mode]["alp/faults/rollout_nonfinite"].append(faults[0])
        self._metrics[mode]["alp/faults/numerator_nonfinite"].append(faults[1])
        return (
            mask * rollout_ok * numerator_ok,
            torch.where(numerator_ok, per_token_logps, 0.0),
            torch.where(rollout_ok, rollout_logps, 0.0),
            torch.nan_to_num(entropies, nan=0.0, posinf=0.0, neginf=0.0),
        )

    def _alp_rollout_mask(self, mode: str, inputs, rollout_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Weights of the rollout rejection mask (`loss.rollout_mask_weights`), logged under ``alp/rollout_mask/*``.

        As in the ALP authors' code (multi-turn/verl/trainer/ppo/core_algos.py, ``compute_rollout_importance_weights(
        old_log_prob=old_log_prob, rollout_log_prob=rollout_log_probs, ...)`` with ``old_log_probs`` recomputed by
        ``actor_rollout_wg.compute_log_prob`` in eval mode, i.e. without noise) the mask is computed on π_old/μ, not on
        the (perturbed) ratio being clipped, and multiplies the clipped policy loss, not the KL term. π_old is TRL's
        recomputed old log-probs; when generation and optimizer steps are aligned TRL does not compute them because
        the weights have not moved since sampling, so a no-grad forward of the current model (no noise: the hooks are
        silent without grad) is π_old.
        """
        old_logps = inputs.get("old_per_token_logps")
        if old_logps is None:
            with torch.no_grad():
                old_logps, _, _ = self._completion_logps(self.model, inputs)
        args = self.args
        weights, rejected = rollout_mask_weights(
            old_logps,
            rollout_logps,
            mask,
            args.alp_rollout_mask,
            args.alp_rollout_mask_min,
            args.alp_rollout_mask_max,
            args.alp_rollout_mask_weighted,
        )
        metrics = self._metrics[mode]
        metrics["alp/rollout_mask/masked_frac"].append(self._global_masked_mean(rejected, mask))
        has_tokens = mask.amax(-1, keepdim=True)
        metrics["alp/rollout_mask/seq_masked_frac"].append(
            self._global_masked_mean(rejected.any(-1, keepdim=True), has_tokens)
        )
        return weights

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
    def alp_setup(self) -> dict:
        """What the perturbation's parameters mean: a checkpoint's σ only fits a run with the same setup."""
        p = self.alp_perturbation
        return {
            "layers_path": self._alp_layers_path,
            "layer_indices": p.layer_indices,
            "labels": p.labels,
            "relative": p.relative,
        }

    def alp_state(self) -> dict:
        """σ, its calibration and the perturbation setup, as saved in ``alp_state.json``."""
        p = self.alp_perturbation
        return {
            "format_version": ALP_STATE_VERSION,
            **self.alp_setup(),
            "log_sigma": p.log_sigma.tolist(),
            "sigma": p.sigma.tolist(),
            "calibration": self.alp_calibration,
            # σ's own optimizer under FSDP2/DeepSpeed (under DDP its state is a group in the Trainer's optimizer.pt)
            "sigma_optimizer": _json_state(self.alp_sigma_optimizer.state_dict())
            if self.alp_sigma_optimizer
            else None,
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
        with contextlib.nullcontext() if _internal_call else self._alp_full_state_dict():
            super().save_model(output_dir, _internal_call)
        if self.args.should_save and not _internal_call:
            output_dir = output_dir or self.args.output_dir
            self._write_alp_state(output_dir)
            self.create_model_card(model_name=os.path.basename(os.path.normpath(output_dir)))
            card = os.path.join(self.args.output_dir, "README.md")
            if os.path.abspath(output_dir) != os.path.abspath(self.args.output_dir) and os.path.exists(card):
                shutil.copyfile(card, os.path.join(output_dir, "README.md"))

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card (citing ALP through `_paper`) plus the run's ALP settings and what alp_state.json holds."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        path = os.path.join(self.args.output_dir, "README.md")
        if self.is_world_process_zero() and os.path.exists(path):
            with open(path, "a") as f:
                f.write(self._alp_model_card_section())

    def _alp_model_card_section(self) -> str:
        args, p = self.args, self.alp_perturbation
        sigma = ", ".join(f"{s:.4g}" for s in p.sigma.tolist()) or "none (no noise)"
        rows = [
            ("correction", f"`{args.correction}`: {self.correction.description}"),
            ("perturbed sites", f"`{self._alp_layers_path}` {p.labels}" if p.labels else "none"),
            ("initial σ₀", f"`{args.alp_init_sigma}`" + (" (calibrated)" if self.alp_calibration else "")),
            ("σ now", sigma),
            ("σ learned", f"{args.alp_learn_sigma} (learning rate {args.alp_sigma_learning_rate})"),
            ("relative σ", str(args.alp_relative_sigma)),
            ("clip", f"[{1 - args.alp_epsilon_low}, {1 + args.alp_epsilon_high}], dual clip {args.alp_dual_clip}"),
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

    def _load_optimizer_and_scheduler(self, checkpoint):
        # The ALP state first: a checkpoint of another perturbation setup would also fail in the optimizer's state
        # (σ's group), with a message that does not say why.
        path = os.path.join(checkpoint, ALP_STATE_FILE) if checkpoint is not None else None
        state = None
        if path is not None and os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
            self._check_alp_setup(state, source=checkpoint)
        super()._load_optimizer_and_scheduler(checkpoint)
        if state is not None:
            self.load_alp_state(state, source=checkpoint)

    def _check_alp_setup(self, state: dict, source: str) -> None:
        version = state.get("format_version", 1)
        if version > ALP_STATE_VERSION:
            raise ValueError(
                f"{source}: {ALP_STATE_FILE} has format_version {version}; this trl-alp reads up to "
                f"{ALP_STATE_VERSION}. Upgrade trl-alp."
            )
        # version 1 stored only the layer indices; compare what the file has
        setup = self.alp_setup()
        differ = {key: (state[key], value) for key, value in setup.items() if key in state and state[key] != value}
        if differ:
            details = "; ".join(f"{key}: checkpoint {old!r}, this run {new!r}" for key, (old, new) in differ.items())
            raise ValueError(
                f"{source} was saved with another ALP perturbation setup ({details}). Resume with the same "
                "correction, alp_layers, alp_layers_path and alp_relative_sigma, or start a new run."
            )

    def load_alp_state(self, state: dict, source: str = "the state") -> None:
        """Restore σ (and its calibration, never redone) from `state` (an ``alp_state.json``); refuse a state written
        for another perturbation setup."""
        self._check_alp_setup(state, source)
        with torch.no_grad():
            self.alp_perturbation.log_sigma.copy_(torch.tensor(state["log_sigma"]))
        self.alp_calibration = state.get("calibration")
        self._alp_sigma_restored = True
        saved = state.get("sigma_optimizer")
        if self.alp_sigma_optimizer is not None:
            if saved is None:
                logger.warning("%s has no state of σ's optimizer: σ's Adam moments start from zero.", source)
            else:
                self.alp_sigma_optimizer.load_state_dict(_tensor_state(saved))
