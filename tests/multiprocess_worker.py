"""Worker for tests/test_multiprocess.py: a few ALP steps of a tiny LoRA model under torch.distributed (gloo, CPU).

Launched as `python -m torch.distributed.run --nproc_per_node 2 tests/multiprocess_worker.py OUT_DIR`; each rank
writes OUT_DIR/rank{N}.json with its σ, a checksum of its LoRA weights, its noise seeds and the logged loss.
"""

import json
import os
import sys

import torch
from datasets import Dataset
from peft import LoraConfig

import trl_alp.perturbation as perturbation
from trl_alp import ALPConfig, ALPGRPOTrainer
from trl_alp.experiments.models import build_tiny_model, build_tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_setup import PROMPT_ROWS, TRAINER_SETTINGS, length_reward  # noqa: E402


def main(out_dir: str) -> None:
    seeds = []
    original = perturbation.noise_seed

    def recording(*args):
        seeds.append(original(*args))
        return seeds[-1]

    perturbation.noise_seed = recording
    tokenizer = build_tokenizer()
    args = ALPConfig(
        **{**TRAINER_SETTINGS, "max_steps": 3}, output_dir=os.path.join(out_dir, "run"), ddp_backend="gloo"
    )
    trainer = ALPGRPOTrainer(
        model=build_tiny_model(tokenizer),
        reward_funcs=length_reward,
        args=args,
        train_dataset=Dataset.from_list(PROMPT_ROWS),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()
    lora = [p.detach().double().sum().item() for n, p in trainer.model.named_parameters() if "lora_" in n]
    result = {
        "rank": trainer.accelerator.process_index,
        "world": trainer.accelerator.num_processes,
        "log_sigma": trainer.alp_perturbation.log_sigma.tolist(),
        "lora_checksums": lora,
        "noise_seeds": seeds,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    with open(os.path.join(out_dir, f"rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
