# Copyright 2026 The trl-alp Authors. Licensed under the Apache License, Version 2.0.
"""Train a model on your own data with ALP-GRPO: LoRA, vLLM colocate, bf16, logging, checkpoints and resume.

Copy this file and change `correct_answer` (your reward) and the data file. It uses the public API only: TRL's
`TrlParser`, `ScriptArguments` and `ModelConfig`, and `trl_alp.ALPConfig` / `trl_alp.ALPGRPOTrainer` where a TRL
script has `GRPOConfig` / `GRPOTrainer`. The defaults are for one CUDA GPU; every flag of TRL's `GRPOConfig`,
`ModelConfig` and `ALPConfig` works, on the command line or in a YAML file given with `--config`:

    python train_alp_grpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --data_files my_data.jsonl \
        --output_dir runs/my-alp
    accelerate launch --num_processes 4 train_alp_grpo.py ...            # several GPUs (DDP; FSDP/ZeRO configs too)
    python train_alp_grpo.py ... --resume_from_checkpoint true            # resume from the last checkpoint

Your data: a JSON Lines (or .json/.csv/.parquet) file, one row per prompt, with a `prompt` column (a string, or chat
messages `[{"role": "user", "content": ...}]`) and the columns your reward reads (`answer` here). Every column
reaches the reward function as a keyword argument, as in TRL.

Metrics to watch (logged to every `report_to` backend and to trainer_state.json):
* `reward` and `alp/ratio/seq/q02`-`q98`: the sequence ratio's envelope; tails that widen step after step are the
  off-policy trouble ALP exists for.
* `alp/mismatch/k3_kl`: the engine–trainer mismatch per token (bf16 vLLM: ~1e-3; above ~1e-2 see the rejection
  options in docs/corrections.md).
* `alp/sigma/mean`: the learned noise scale; `alp/clip/{low,high,dual}`: the share of tokens the clip held constant.
"""

import re
from dataclasses import dataclass, field

from datasets import load_dataset
from transformers.trainer_utils import get_last_checkpoint
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from trl_alp import ALPConfig, ALPGRPOTrainer

# The settings a GPU run starts from; a flag or --config overrides each. LoRA, vLLM in the training process, bf16.
GPU_DEFAULTS = {
    "use_peft": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "use_vllm": True,
    "vllm_mode": "colocate",
    "bf16": True,
    "learning_rate": 1e-5,
    "per_device_train_batch_size": 8,
    "num_generations": 8,
    "max_completion_length": 256,
    "logging_steps": 1,
    "report_to": "all",  # every installed logger: trackio, wandb, tensorboard, ...
    "save_steps": 50,
    "correction": "seq-alp",
    "alp_init_sigma": "auto",  # σ₀ calibrated to the engine's measured mismatch on the first batch
}


@dataclass
class DataArguments(ScriptArguments):
    """TRL's script arguments plus a local data file (`dataset_name` still takes a Hub dataset)."""

    data_files: str | None = field(
        default=None, metadata={"help": "A local .jsonl/.json/.csv/.parquet file with a 'prompt' column."}
    )


def correct_answer(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion's last number equals the row's `answer`, else 0.0 (replace with your reward)."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        numbers = re.findall(r"-?\d+(?:\.\d+)?", text)
        rewards.append(float(bool(numbers) and float(numbers[-1]) == float(expected)))
    return rewards


def main(script_args: DataArguments, training_args: ALPConfig, model_args: ModelConfig) -> None:
    if script_args.data_files:
        extension = script_args.data_files.rsplit(".", 1)[-1].replace("jsonl", "json")
        dataset = load_dataset(extension, data_files=script_args.data_files, split="train")
    else:
        dataset = load_dataset(script_args.dataset_name, script_args.dataset_config, split="train")
    model_init_kwargs = {"dtype": model_args.dtype, "attn_implementation": model_args.attn_implementation}
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    trainer = ALPGRPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=correct_answer,
        args=training_args,
        train_dataset=dataset,
        peft_config=get_peft_config(model_args),
    )
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is not None and checkpoint.lower() == "true":
        checkpoint = get_last_checkpoint(training_args.output_dir)
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(training_args.output_dir)  # the adapter (or model) and alp_state.json with the learned σ


if __name__ == "__main__":
    parser = TrlParser((DataArguments, ALPConfig, ModelConfig))
    parser.set_defaults(**GPU_DEFAULTS)
    main(*parser.parse_args_and_config())
