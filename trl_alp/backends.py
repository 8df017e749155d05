"""Training backends (DDP, FSDP2, DeepSpeed ZeRO) and σ.

σ is one float per perturbed layer, kept outside the model so that no backend shards it and vLLM's weight sync never
sees it. That leaves ALP four things to do for each backend, all here: name the backend, turn accelerate's multi-CPU
state into FSDP when FSDP was asked for, refuse the states where every rank would train alone, and step σ (a group of
the main optimizer under DDP, an optimizer of its own where the backend owns the main one), all-reducing its gradient.
"Engine" in this package means the rollout engine only; these are backends.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Iterator

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


def backend_name(accelerator) -> str:
    """Which training backend `accelerator` drives: "fsdp2", "fsdp1", "zero0"-"zero3", "ddp" or "single"."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return f"fsdp{getattr(accelerator.state.fsdp_plugin, 'fsdp_version', 1)}"
    if kind == DistributedType.DEEPSPEED:
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    return "ddp" if accelerator.num_processes > 1 else "single"


def backend_owns_optimizer(accelerator) -> bool:
    """Whether the backend rebuilds the optimizer around the model's parameters, so σ (not a model parameter) needs
    an optimizer of its own: FSDP2 swaps every optimizer parameter for its sharded DTensor (accelerate raises a
    KeyError on any other parameter); DeepSpeed ZeRO flattens and partitions every parameter of its optimizer."""
    return backend_name(accelerator).startswith(("fsdp", "zero"))


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


def check_backend_state(accelerator) -> None:
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


def prepare_backend(accelerator, fsdp_plugin_args: dict | None, gradient_checkpointing: bool) -> bool:
    """After accelerate is set up: refuse one-process-per-rank states and promote multi-CPU to FSDP where asked.
    Returns whether FSDP was turned on here."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    accelerator._alp_fsdp_plugin = FullyShardedDataParallelPlugin(**fsdp_plugin_args) if fsdp_plugin_args else None
    check_backend_state(accelerator)
    if not promote_cpu_fsdp(accelerator):
        return False
    if accelerator.state.fsdp_plugin.activation_checkpointing and gradient_checkpointing:
        raise ValueError(
            "The activation_checkpointing in the FSDP config and gradient_checkpointing in the training arguments "
            "cannot both be on: use one of them."
        )
    return True


def add_sigma_to_optimizer(
    optimizer: torch.optim.Optimizer, log_sigma: torch.nn.Parameter, accelerator, lr: float, weight_decay: float
) -> torch.optim.Optimizer | None:
    """Give σ its learning rate and weight decay next to `optimizer`: a param group of it, or (where the backend
    owns the optimizer, see `backend_owns_optimizer`) an optimizer of the same class and settings, returned."""
    group = {"lr": lr, "weight_decay": weight_decay}
    if not backend_owns_optimizer(accelerator):
        optimizer.add_param_group({"params": [log_sigma], **group})
        return None
    accepted = inspect.signature(type(optimizer).__init__).parameters
    kwargs = {key: value for key, value in optimizer.defaults.items() if key in accepted}
    logger.info("%s: σ has its own %s", backend_name(accelerator), type(optimizer).__name__)
    return type(optimizer)([log_sigma], **{**kwargs, **group})


@contextlib.contextmanager
def full_state_dict(accelerator, is_fsdp_enabled: bool) -> Iterator[None]:
    """transformers' `save_model` writes no weights at all for an FSDP ``SHARDED_STATE_DICT`` model (checkpoints
    keep the shards): within the context FSDP gathers the full state dict on rank 0 instead."""
    plugin = accelerator.state.fsdp_plugin if is_fsdp_enabled else None
    if plugin is None or "FULL_STATE_DICT" in str(plugin.state_dict_type):
        yield
        return
    previous = plugin.state_dict_type
    plugin.set_state_dict_type("FULL_STATE_DICT")
    try:
        yield
    finally:
        plugin.set_state_dict_type(previous)


class SigmaGradCallback(TrainerCallback):
    """σ lives outside the model, so no backend (DDP, FSDP2, DeepSpeed) all-reduces, steps or zeroes its gradient: do
    it here, and drop a non-finite σ gradient (counted in ``alp/faults/sigma_grad_nonfinite``).

    Under DDP σ is a group of the main optimizer, stepped with it. Under FSDP2 and DeepSpeed it has an optimizer of
    its own (`ALPGRPOTrainer.alp_sigma_optimizer`), stepped here at the main scheduler's current learning-rate factor
    (what σ's group would get from that scheduler)."""

    def __init__(self, trainer):
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
