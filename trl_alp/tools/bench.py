"""``trl-alp bench``: the cost of ALP against TRL's `GRPOTrainer` on the user's own hardware.

Two scenarios, same model, data and seed, runs interleaved (GRPO, ALP, GRPO, ALP, ...). The unit is one generation
cycle (``num_iterations`` optimizer steps that share one generation), timed from TRL's per-step ``step_time``
(generation included, since every user pays for it); the table shows the median cycle divided by its steps:

* ``no-correction``: GRPO with TRL's defaults (no old-log-prob pass) vs ``seq-alp``;
* ``old-logprobs``: both with ``num_iterations=2``, where GRPO recomputes old log-probs and ALP does not.

Peak memory is reported on CUDA (``torch.cuda.max_memory_allocated``); on CPU it is not measured.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import asdict, dataclass, field

import torch

from .data import REWARD_FUNCS, arithmetic_dataset
from .models import load_offline_model

logger = logging.getLogger(__name__)

SCENARIOS = {"no-correction": {}, "old-logprobs": {"num_iterations": 2}}


@dataclass
class BenchArguments:
    """Arguments of ``trl-alp bench``."""

    model: str = field(default="tiny", metadata={"help": "'tiny', 'smollm2' (LoRA), or a local model path (LoRA)."})
    cycles: int = field(default=3, metadata={"help": "Measured generation cycles per run (after the warm-up)."})
    warmup: int = field(default=1, metadata={"help": "Warm-up generation cycles per run, not measured."})
    repeats: int = field(default=2, metadata={"help": "Interleaved repetitions of every run."})
    max_completion_length: int = field(default=32, metadata={"help": "Tokens per completion."})
    json: bool = field(default=False, metadata={"help": "Print the results as JSON instead of a table."})
    output_dir: str = field(default="runs/bench", metadata={"help": "Scratch folder for the runs."})

    def __post_init__(self):
        for name in ("cycles", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}")


def _run(args: BenchArguments, kind: str, scenario: str) -> tuple[list[float], int | None]:
    from trl import GRPOConfig, GRPOTrainer

    from ..config import ALPConfig
    from ..trainer import ALPGRPOTrainer

    cuda = torch.cuda.is_available()
    cycle = SCENARIOS[scenario].get("num_iterations", 1)
    settings = dict(
        output_dir=f"{args.output_dir}/{scenario}-{kind}",
        max_steps=(args.warmup + args.cycles) * cycle,
        per_device_train_batch_size=8,
        num_generations=8,
        max_completion_length=args.max_completion_length,
        learning_rate=1e-5,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=cuda,
        use_cpu=not cuda,
        seed=0,
        disable_tqdm=True,
        **SCENARIOS[scenario],
    )
    config = GRPOConfig(**settings) if kind == "grpo" else ALPConfig(correction="seq-alp", **settings)
    model, tokenizer, lora = load_offline_model(args.model)
    trainer_cls = GRPOTrainer if kind == "grpo" else ALPGRPOTrainer
    trainer = trainer_cls(
        model=model,
        reward_funcs=REWARD_FUNCS["number_format"],
        args=config,
        train_dataset=arithmetic_dataset(64),
        processing_class=tokenizer,
        peft_config=lora,
    )
    from transformers import PrinterCallback, ProgressCallback

    for callback in (PrinterCallback, ProgressCallback):  # keep stdout for the table / JSON
        trainer.remove_callback(callback)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steps = [h["step_time"] for h in trainer.state.log_history if "step_time" in h][args.warmup * cycle :]
    times = [sum(steps[i : i + cycle]) / cycle for i in range(0, len(steps), cycle)]  # per-step time of each cycle
    peak = torch.cuda.max_memory_allocated() if cuda else None
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return times, peak


def run_bench(args: BenchArguments) -> dict:
    """Run every scenario, interleaved; return medians, ratios and peaks."""
    samples: dict[tuple[str, str], list[float]] = {}
    peaks: dict[tuple[str, str], int | None] = {}
    for repeat in range(args.repeats):
        for scenario in SCENARIOS:
            for kind in ("grpo", "alp"):
                logger.warning("bench: repeat %d/%d, %s, %s", repeat + 1, args.repeats, scenario, kind)
                times, peak = _run(args, kind, scenario)
                samples.setdefault((scenario, kind), []).extend(times)
                if peak is not None:
                    peaks[(scenario, kind)] = max(peak, peaks.get((scenario, kind)) or 0)
    results = {"args": asdict(args), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for scenario in SCENARIOS:
        grpo = statistics.median(samples[(scenario, "grpo")])
        alp = statistics.median(samples[(scenario, "alp")])
        row = {"grpo_s": grpo, "alp_s": alp, "time_ratio": alp / grpo, "n_cycles": len(samples[(scenario, "alp")])}
        if (scenario, "alp") in peaks:
            row["grpo_peak_bytes"] = peaks[(scenario, "grpo")]
            row["alp_peak_bytes"] = peaks[(scenario, "alp")]
            row["memory_ratio"] = peaks[(scenario, "alp")] / peaks[(scenario, "grpo")]
        results[scenario] = row
    return results


def format_table(results: dict) -> str:
    lines = [
        f"device: {results['device']}, model: {results['args']['model']}",
        "| scenario | GRPO s/step | ALP s/step | ALP/GRPO time | ALP/GRPO peak memory |",
        "|---|---|---|---|---|",
    ]
    for scenario in SCENARIOS:
        r = results[scenario]
        memory = f"{r['memory_ratio']:.3f}" if "memory_ratio" in r else "not measured (CPU)"
        lines.append(f"| {scenario} | {r['grpo_s']:.3f} | {r['alp_s']:.3f} | {r['time_ratio']:.3f} | {memory} |")
    return "\n".join(lines)


def main(args: BenchArguments) -> dict:
    results = run_bench(args)
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return results
