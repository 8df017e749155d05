"""Worker for tests/test_distributed.py: ALP under FSDP2 or DeepSpeed ZeRO on two CPU processes, several checks in one
launch (each process start costs seconds of imports on CI's two cores).

Launched as ``accelerate launch --config_file examples/accelerate/<engine>_cpu.yaml tests/distributed_worker.py OUT``;
every rank writes OUT/<phase>_rank{N}.json. Phases, each a fresh trainer on a freshly built tiny model (same seed, same
initial weights on every rank):

* ``full``: full fine-tuning, 3 steps, checkpoint at step 2; per step σ, the noise seeds and the loss; proof that the
  engine is active (world size, parameter types and shards, optimizer class); the weights after step 3.
* ``resume``: a new trainer resumed from checkpoint-2 for step 3 (σ, σ's optimizer state, weights, engine optimizer).
* ``lora``: LoRA, 2 steps; σ per step.
* ``cli``: ``trl_alp.cli.main.main(["train", ...])`` (what ``-m trl_alp train`` runs), LoRA, one step; its log lines.
* ``bypass``: correction="seq-bypass" (no noise, σ not trained) on fixed rollouts, one optimizer step; the full weights
  after it (gathered) for comparison with a single-process step on the same global batch (tests/test_distributed.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, TrainerCallback

import trl_alp.perturbation as perturbation
from trl_alp import ALPConfig, ALPGRPOTrainer
from trl_alp.backends import backend_name
from trl_alp.experiments.models import build_tiny_model, build_tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_setup import PROMPT_ROWS, TRAINER_SETTINGS, length_reward  # noqa: E402

GLOBAL_ROWS = 8  # fixed-rollout batch of the bypass phase: 4 rows per rank, 8 in the single-process reference
PROMPT_LEN, COMPLETION_LEN = 6, 5


def fixed_rollouts(rows: slice, vocab: int) -> dict[str, torch.Tensor]:
    """A deterministic GRPO batch (as `_generate_and_score_completions` returns it) for rows `rows` of the global one."""
    g = torch.Generator().manual_seed(1234)
    prompt_ids = torch.randint(3, vocab, (GLOBAL_ROWS, PROMPT_LEN), generator=g)
    completion_ids = torch.randint(3, vocab, (GLOBAL_ROWS, COMPLETION_LEN), generator=g)
    completion_mask = torch.ones(GLOBAL_ROWS, COMPLETION_LEN, dtype=torch.long)
    completion_mask[::3, 3:] = 0  # some shorter completions
    advantages = torch.randn(GLOBAL_ROWS, generator=g)
    rollout_logps = -2.0 - torch.rand(GLOBAL_ROWS, COMPLETION_LEN, generator=g)
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "sampling_per_token_logps": rollout_logps,
        "old_per_token_logps": None,
    }
    out = {key: value[rows] if value is not None else None for key, value in batch.items()}
    out["num_items_in_batch"] = completion_mask.sum()  # global, as TRL gathers it
    return out


class FixedRolloutTrainer(ALPGRPOTrainer):
    """Serves `fixed_rollouts` (this rank's rows) instead of sampling: the rest of TRL's pipeline runs as usual."""

    def _generate_and_score_completions(self, inputs):
        per_rank = GLOBAL_ROWS // self.accelerator.num_processes
        rank = self.accelerator.process_index
        batch = fixed_rollouts(slice(rank * per_rank, (rank + 1) * per_rank), self.processing_class.vocab_size)
        return {key: value for key, value in batch.items() if value is not None}


class Recorder(TrainerCallback):
    """σ after every optimizer step (on_step_end) and at train begin (after a resume has loaded it)."""

    def __init__(self, trainer):
        self.trainer, self.sigma, self.begin_sigma = trainer, [], None

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin_sigma = self.trainer.alp_perturbation.log_sigma.tolist()

    def on_step_end(self, args, state, control, **kwargs):
        self.sigma.append(self.trainer.alp_perturbation.log_sigma.tolist())


def full_weights(trainer) -> dict[str, torch.Tensor]:
    """The whole model's weights on every rank (FSDP2 and ZeRO-3 gather their shards)."""
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped, unwrap=True)
    return {name: value.detach().float().cpu() for name, value in (state or {}).items()}


def checksum(weights: dict[str, torch.Tensor]) -> float:
    return math.fsum(value.double().sum().item() for value in weights.values())


def engine_facts(trainer) -> dict:
    """What proves the engine really runs: world size, parameter sharding, the optimizer the engine wraps."""
    from torch.distributed.tensor import DTensor

    acc = trainer.accelerator
    params = list(trainer.model_wrapped.parameters())
    facts = {
        "engine": backend_name(acc),
        "world": acc.num_processes,
        "rank": acc.process_index,
        "dist_world": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
        "sigma_optimizer": type(trainer.alp_sigma_optimizer).__name__ if trainer.alp_sigma_optimizer else None,
        "sigma_in_main_optimizer": any(
            p is trainer.alp_perturbation.log_sigma for g in trainer.optimizer.param_groups for p in g["params"]
        ),
    }
    if facts["engine"] == "fsdp2":
        dtensors = [p for p in params if isinstance(p, DTensor)]
        facts["dtensor_frac"] = len(dtensors) / len(params)
        facts["shard_mesh_sizes"] = sorted({p.device_mesh.size() for p in dtensors})
        facts["placements"] = sorted({str(p.placements) for p in dtensors})
        facts["local_numel"] = sum(p.to_local().numel() for p in dtensors)
        facts["global_numel"] = sum(p.numel() for p in dtensors)
    if facts["engine"].startswith("zero"):
        facts["engine_optimizer"] = type(trainer.model_wrapped.optimizer).__name__
        if facts["engine"] == "zero3":
            facts["local_numel"] = sum(p.numel() for p in params)  # partitioned: 0-element placeholders
            facts["global_numel"] = sum(p.ds_numel for p in params)
            facts["partitioned_frac"] = sum(p.ds_tensor.numel() for p in params) / facts["global_numel"]
    return facts


def build_model(tokenizer):
    """The model of every phase: the folder the test saved (``TRL_ALP_TEST_MODEL``), else the tiny model built in code.

    A folder gives every engine the same initial weights: under ZeRO-3 transformers builds a model inside
    ``deepspeed.zero.Init``, whose random initialisation differs from a plain build with the same seed."""
    folder = os.environ.get("TRL_ALP_TEST_MODEL")
    if folder is None:
        return build_tiny_model(tokenizer)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def make_trainer(tokenizer, out_dir: str, cls=ALPGRPOTrainer, peft: bool = False, **overrides):
    # FSDP2 on CPUs runs under accelerate's multi-CPU state (use_cpu); DeepSpeed needs use_cpu off (accelerate turns
    # DeepSpeed off on "cpu") and the gloo backend named (see docs/distributed.md).
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    # None: the single-process reference (an earlier in-process test, e.g. vLLM colocate, may leave WORLD_SIZE=1)
    backend = "gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    settings = {**TRAINER_SETTINGS, "use_cpu": not deepspeed, "ddp_backend": backend, "gradient_checkpointing": False}
    args = ALPConfig(**{**settings, **overrides}, output_dir=out_dir)
    trainer = cls(
        model=build_model(tokenizer),
        reward_funcs=length_reward,
        args=args,
        train_dataset=Dataset.from_list(PROMPT_ROWS),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if peft else None,
    )
    plugin = trainer.accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        # DeepSpeed keeps parameters under 1e5 elements whole on every rank (all of the tiny model's): partition them
        # all, so the forward (and ALP's hooks) run on gathered-on-demand parameters as they do on a real model
        plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    return trainer, recorder


def main(out_dir: str, phases: list[str]) -> None:
    seeds: list[int] = []
    original = perturbation.noise_seed

    def recording(*args):
        seeds.append(original(*args))
        return seeds[-1]

    perturbation.noise_seed = recording
    writes: list[str] = []  # the alp_state.json files this rank wrote
    original_write = ALPGRPOTrainer._alp_write_state

    def counting_write(self, directory):
        writes.append(os.path.relpath(directory, out_dir))
        return original_write(self, directory)

    ALPGRPOTrainer._alp_write_state = counting_write
    tokenizer = build_tokenizer()
    run = os.path.join(out_dir, "run")
    results = {}
    rank = int(os.environ.get("RANK", "0"))

    started = time.perf_counter()
    if "full" in phases:
        seeds.clear()
        trainer, recorder = make_trainer(tokenizer, run, max_steps=3, save_strategy="steps", save_steps=2)
        trainer.train()
        weights = full_weights(trainer)
        results["full"] = {
            **engine_facts(trainer),
            "sigma_per_step": recorder.sigma,
            "noise_seeds": list(seeds),
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "weights_checksum": checksum(weights),
            "sigma_optimizer_step": _sigma_adam_step(trainer),
        }
        del trainer

    if "resume" in phases:
        trainer, recorder = make_trainer(tokenizer, run, max_steps=3, save_strategy="no")
        trainer.train(resume_from_checkpoint=os.path.join(run, "checkpoint-2"))
        results["resume"] = {
            "begin_sigma": recorder.begin_sigma,
            "sigma_per_step": recorder.sigma,
            "weights_checksum": checksum(full_weights(trainer)),
            "sigma_optimizer_step": _sigma_adam_step(trainer),
            "global_step": trainer.state.global_step,
        }
        del trainer

    if "lora" in phases:  # with top_k: the support replay runs under the engine (ZeRO-3 refuses it)
        seeds.clear()
        lora_dir = os.path.join(out_dir, "lora")
        zero3 = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
        replay_refused = None
        if zero3:
            try:
                make_trainer(tokenizer, lora_dir, peft=True, max_steps=2, top_k=5)
            except ValueError as error:
                replay_refused = str(error)
        trainer, recorder = make_trainer(tokenizer, lora_dir, peft=True, max_steps=2, top_k=0 if zero3 else 5)
        trainer.train()
        lora = {n: p for n, p in full_weights(trainer).items() if "lora_" in n}
        results["lora"] = {
            **engine_facts(trainer),
            "sigma_per_step": recorder.sigma,
            "noise_seeds": list(seeds),
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "lora_checksum": checksum(lora),
            "lora_tensors": len(lora),
            "support_size": [h["alp/support/size"] for h in trainer.state.log_history if "alp/support/size" in h],
            "token_ratio_q50": [h["alp/ratio/token/q50"] for h in trainer.state.log_history if "loss" in h],
            "replay_refused": replay_refused,
        }
        del trainer

    if "bypass" in phases:
        per_rank = GLOBAL_ROWS // int(os.environ.get("WORLD_SIZE", "1"))
        trainer, _ = make_trainer(
            tokenizer,
            os.path.join(out_dir, "bypass"),
            cls=FixedRolloutTrainer,
            correction="seq-bypass",
            max_steps=1,
            per_device_train_batch_size=per_rank,
            num_generations=4,
        )
        trainer.train()
        weights = full_weights(trainer)
        if trainer.accelerator.is_main_process:
            torch.save(weights, os.path.join(out_dir, "bypass_weights.pt"))
        results["bypass"] = {"engine": backend_name(trainer.accelerator), "world": trainer.accelerator.num_processes}
        del trainer

    if "cli" in phases:  # what `accelerate launch ... -m trl_alp train` runs in each process
        from trl_alp.cli.main import main as cli_main

        messages: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: messages.append(record.getMessage())
        logging.getLogger("trl_alp").addHandler(handler)
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        argv = [
            "train",
            "--model_name_or_path",
            "tiny",
            "--num_prompts",
            "16",
            "--output_dir",
            os.path.join(out_dir, "cli"),
        ]
        argv += ["--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations", "4"]
        argv += ["--max_completion_length", "8", "--report_to", "none", "--bf16", "false", "--save_strategy", "no"]
        argv += ["--use_cpu", str(not deepspeed), "--ddp_backend", "gloo", "--use_peft", "true"]
        results["cli"] = {"status": cli_main(argv), "messages": messages}

    results["alp_state_writes"] = writes
    results["phases_s"] = time.perf_counter() - started
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def _sigma_adam_step(trainer) -> float | None:
    """The step count in σ's optimizer state (its own optimizer, or σ's group of the main one)."""
    optimizer = trainer.alp_sigma_optimizer or trainer.optimizer
    state = optimizer.state.get(trainer.alp_perturbation.log_sigma, {})
    step = state.get("step")
    return float(step) if step is not None else None


if __name__ == "__main__":
    torch.set_num_threads(1)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        import deepspeed.ops

        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce (inference only; ZeRO training uses
        # torch.distributed) on first use: minutes on CI's two fresh cores. Marking it incompatible skips it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    main(sys.argv[1], sys.argv[2].split(",") if len(sys.argv) > 2 else ["full", "resume", "lora", "bypass", "cli"])
