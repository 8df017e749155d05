"""``trl-alp bench --mode ab``: ALP's training micro-step against GRPO's, in one process, resolved to about 1 %.

Whole-step arms (``trl-alp bench``) each run in a fresh process, and two processes doing the same work differ by
several percent: too coarse for a noise that costs one or two. Here both trainers share one model, one prepared batch
and one set of weights, and each *run* is one real training micro-step (`Trainer.training_step`: the loss forward,
its bookkeeping and the backward; with ``--optimizer_step`` also gradient clipping, the optimizer-step callbacks and
the optimizer step) on that batch. Gradients, weights, optimizer state and the trainers' counters are restored after
every run, so every run does the same work. Arms:

* ``grpo``: TRL's `GRPOTrainer` micro-step (its loss);
* ``alp``: `ALPGRPOTrainer`'s micro-step (``seq-alp``: its loss, bookkeeping and noise);
* ``alp-quiet``: `ALPGRPOTrainer`'s loss and bookkeeping with the noise hooks not armed;
* ``grpo-noise``: TRL's micro-step with ALP's noise hooks armed: the hooks alone.

A *comparison* ``X/Y`` runs pairs of one X and one Y run in ABBA order (XY, YX, XY, ...) after the warm-up runs, and
reports the median and quartiles of the per-pair ratios X/Y (wall and CPU time). ``grpo/grpo`` is the A/A
comparison: its spread is the measurement's resolution. Pairs of all comparisons are interleaved, so slow drifts of
the machine hit every comparison alike.

Peak tensor memory per arm, above its level when the run starts: on CUDA ``torch.cuda.max_memory_allocated`` over
every timed run; on CPU one extra untimed run per arm under ``torch.profiler`` with ``profile_memory=True`` (the peak
of the live tensor bytes from its allocation records; CPU tensors have no allocator statistics).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from .bench import minor_page_faults, profiled_tensor_peak, stats
from .runner import BenchModelArguments, machine_info, remove_log_printers, to_json, write_json

logger = logging.getLogger(__name__)

ARMS = {
    "grpo": "TRL's GRPOTrainer micro-step",
    "alp": "ALPGRPOTrainer micro-step (seq-alp), noise armed",
    "alp-quiet": "ALPGRPOTrainer micro-step, noise hooks not armed",
    "grpo-noise": "TRL's micro-step with ALP's noise hooks armed",
    "alp-unreplayed": "ALPGRPOTrainer micro-step without the sampling-support replay (with --top_p/--top_k)",
}
NOISY_ARMS = ("alp", "grpo-noise")


@dataclass
class ABArguments(BenchModelArguments):
    """Arguments of ``trl-alp bench --mode ab``."""

    mode: str = field(
        default="ab",
        metadata={
            "help": "'ab': this in-process A/B of the training micro-step (without --mode, `trl-alp bench` times "
            "whole steps, each arm in its own process).",
            "choices": ["ab"],
        },
    )
    comparisons: str = field(
        default="alp/grpo,grpo/grpo",
        metadata={
            "help": f"Comma-separated X/Y comparisons of the arms {list(ARMS)}; grpo/grpo is the A/A resolution, "
            "grpo-noise/grpo the noise hooks alone, alp-quiet/grpo ALP's loss and bookkeeping alone."
        },
    )
    pairs: int = field(default=20, metadata={"help": "Timed pairs per comparison, in ABBA order."})
    warmup: int = field(
        default=2, metadata={"help": "Untimed runs of every arm before the pairs (>= 1; they also check the noise)."}
    )
    top_p: float = field(
        default=1.0, metadata={"help": "Sampling top_p of the batch (with top_k: the replay's cost)."}
    )
    top_k: int = field(default=0, metadata={"help": "Sampling top_k of the batch (0: off)."})
    optimizer_step: bool = field(
        default=False,
        metadata={"help": "Also clip the gradients and take the optimizer step in every run (weights restored)."},
    )
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "Activation checkpointing, as TRL's default (False: keep activations)."}
    )
    memory: bool = field(
        default=True,
        metadata={"help": "Peak tensor memory per arm (on CPU one extra profiled run per arm, untimed)."},
    )
    profile: bool = field(
        default=False,
        metadata={
            "help": "Write the torch.profiler op table of one extra, untimed run per arm (CPU: its memory run)."
        },
    )
    threads: int = field(
        default=1, metadata={"help": "torch intra-op threads (0: torch's default; 1 on a shared machine)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the trainers (sampling of the batch, noise)."})
    json: bool = field(default=False, metadata={"help": "Print the results as JSON instead of the table."})
    output_dir: str = field(default="runs/bench-ab", metadata={"help": "Folder for ab.json, ab.md and profiles."})

    def __post_init__(self):
        super().__post_init__()
        if self.pairs < 1:
            raise ValueError(f"--pairs must be >= 1, got {self.pairs}")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {self.threads}")
        if self.warmup < 1:
            raise ValueError(
                f"--warmup must be >= 1 (the warm-up also checks which arms drew noise), got {self.warmup}"
            )
        if "alp-unreplayed" in self.arm_list and self.top_p == 1.0 and self.top_k == 0:
            raise ValueError("the arm alp-unreplayed needs truncated sampling: set --top_p < 1 or --top_k > 0")
        pairs = self.comparison_list
        bad = [f"{x}/{y}" for x, y in pairs if x not in ARMS or y not in ARMS]
        if bad or not pairs:
            raise ValueError(
                f"--comparisons must be comma-separated X/Y of the arms {list(ARMS)}, got {self.comparisons!r}"
            )

    @property
    def comparison_list(self) -> list[tuple[str, str]]:
        items = [c.strip() for c in self.comparisons.split(",") if c.strip()]
        return [tuple(c.split("/", 1)) if "/" in c else (c, "") for c in items]

    @property
    def arm_list(self) -> list[str]:
        return [arm for arm in ARMS if any(arm in pair for pair in self.comparison_list)]


# ------------------------------------------------------------------------------------------------ the micro-step
class MicroStep:
    """One real training micro-step per arm on a fixed batch, and the state restored after it.

    Both trainers have trained one real step first (`build`), so their optimizers, gradient checkpointing and
    lazily built state exist; their `_prepare_inputs` then returns the captured batch as it is.
    """

    def __init__(self, alp, grpo, batch: dict, num_items, optimizer_step: bool):
        from ..logps import SUPPORT_KEYS

        self.alp, self.grpo, self.batch, self.num_items = alp, grpo, batch, num_items
        self.unreplayed = {key: value for key, value in batch.items() if key not in SUPPORT_KEYS}
        self.model = alp.model
        self.optimizer_step = optimizer_step
        self.cuda = torch.cuda.is_available()
        self.perturbation = alp.alp_perturbation
        for trainer in (alp, grpo):
            trainer._prepare_inputs = _identity
        self._counters = {id(t): (t._step, t.state.global_step) for t in (alp, grpo)}
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        if optimizer_step:  # every trainable tensor and optimizer state the step changes, restored in place
            tensors = [p for p in self.model.parameters() if p.requires_grad] + [self.perturbation.log_sigma]
            for trainer in (alp, grpo):
                optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
                tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
            self._saved = [(t, t.detach().clone()) for t in tensors]
        self.reset()

    def run(self, arm: str, check: bool = False) -> dict | None:
        """One micro-step of `arm` (see `ARMS`); with `check`, whether it drew noise (`noise_check`)."""
        from trl import GRPOTrainer

        trainer = self.grpo if arm.startswith("grpo") else self.alp
        if arm == "alp":  # its own `training_step` arms the hooks
            trainer.training_step(self.model, self.batch, self.num_items)
        elif arm == "alp-quiet":  # TRL's `training_step` under ALP's loss: no hooks
            GRPOTrainer.training_step(trainer, self.model, self.batch, self.num_items)
        elif arm == "alp-unreplayed":  # the batch without its support table: full-vocabulary log-probs
            trainer.training_step(self.model, self.unreplayed, self.num_items)
        elif arm == "grpo-noise":
            with self.perturbation.active(self.alp.state.global_step, 0, self.alp.accelerator.process_index):
                trainer.training_step(self.model, self.batch, self.num_items)
        else:
            trainer.training_step(self.model, self.batch, self.num_items)
        noise = self.noise_check() if check else None  # before the optimizer step drops σ's gradient
        if self.optimizer_step:
            if trainer.args.max_grad_norm > 0:
                trainer._clip_grad_norm(self.model)
            args, state = trainer.args, trainer.state
            trainer.control = trainer.callback_handler.on_pre_optimizer_step(args, state, trainer.control)
            trainer.optimizer.step()
            trainer.control = trainer.callback_handler.on_optimizer_step(args, state, trainer.control)
            self.model.zero_grad()
        return noise

    def noise_check(self) -> dict:
        """Whether the current run drew noise: hook applications and σ's gradient."""
        grad = self.perturbation.log_sigma.grad
        return {
            "noise_applications": sum(self.perturbation.applied),
            "sigma_grad_abs_sum": None if grad is None else float(grad.abs().sum()),  # None: σ not in the graph
        }

    def reset(self) -> None:
        """Gradients, weights, optimizer state, step counters and logged metrics back to where `build` left them."""
        self.model.zero_grad(set_to_none=True)
        self.perturbation.log_sigma.grad = None
        self.perturbation.applied = [0] * len(self.perturbation.applied)
        with torch.no_grad():
            for tensor, saved in self._saved:
                tensor.copy_(saved)
        for trainer in (self.alp, self.grpo):
            trainer._step, trainer.state.global_step = self._counters[id(trainer)]
            trainer._metrics["train"].clear()
        gc.collect()

    def now(self) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def timed(self, arm: str) -> dict:
        """Run `arm` once: its wall and CPU seconds, minor page faults (memory mapped afresh) and, on CUDA, its peak
        tensor bytes above the start."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            start_bytes = torch.cuda.memory_allocated()
        faults = minor_page_faults()
        wall, cpu = self.now()
        self.run(arm)
        wall_end, cpu_end = self.now()
        record = {
            "wall_s": wall_end - wall,
            "cpu_s": cpu_end - cpu,
            "minor_page_faults": None if faults is None else minor_page_faults() - faults,
            "noise_applications": sum(self.perturbation.applied),
        }
        if self.cuda:
            record["peak_tensor_bytes"] = torch.cuda.max_memory_allocated() - start_bytes
        self.reset()
        return record

    def profiled(self, arm: str, table: str | None) -> int:
        """Peak live CPU tensor bytes of one run of `arm` (profiler allocation records); writes the op table."""
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            self.run(arm)
        if table is not None:
            with open(table, "w") as f:
                f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=50))
        self.reset()
        return profiled_tensor_peak(prof)


def _identity(inputs):
    return inputs


def build(args: ABArguments) -> MicroStep:
    """Both trainers on one model, each after one real optimizer step on one batch, that batch, and the step."""
    from trl import GRPOConfig, GRPOTrainer

    from ..config import ALPConfig
    from ..tasks import REWARD_FUNCS, arithmetic_dataset
    from ..trainer import ALPGRPOTrainer
    from .models import load_offline_model, lora_config

    cuda = torch.cuda.is_available()
    model, tokenizer, lora = load_offline_model(args.model, seed=args.seed)
    if args.finetune == "full":
        lora = None
    elif args.finetune == "lora" and lora is None:
        lora = lora_config()
    settings = dict(
        max_steps=1,
        per_device_train_batch_size=args.completions,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        gradient_checkpointing=args.gradient_checkpointing,
        learning_rate=1e-5,
        lr_scheduler_type="constant",  # the optimizer steps of the runs keep the learning rate (a decay ends at 0)
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=cuda,
        use_cpu=not cuda,
        seed=args.seed,
        disable_tqdm=True,
        top_p=args.top_p,
        top_k=args.top_k,
    )
    common = dict(
        reward_funcs=REWARD_FUNCS["number_format"],
        train_dataset=arithmetic_dataset(max(64, args.completions // args.num_generations)),
        processing_class=tokenizer,
    )
    alp = ALPGRPOTrainer(
        model=model,
        args=ALPConfig(correction="seq-alp", output_dir=os.path.join(args.output_dir, "alp"), **settings),
        peft_config=lora,
        **common,
    )
    captured: dict = {}
    prepare, training_step = alp._prepare_inputs, alp.training_step

    def capture_batch(generation_batch):
        captured["batch"] = prepare(generation_batch)
        return captured["batch"]

    def capture_items(model, inputs, num_items_in_batch=None):
        captured["num_items"] = num_items_in_batch
        return training_step(model, inputs, num_items_in_batch)

    alp._prepare_inputs, alp.training_step = capture_batch, capture_items
    remove_log_printers(alp)
    alp.train()  # one real step: the batch (generated here), the optimizer with σ's group, checkpointing on
    del alp._prepare_inputs, alp.training_step
    # TRL's trainer on the same (possibly PEFT-wrapped) model, trained one real step on the same batch
    grpo = GRPOTrainer(
        model=alp.model,
        args=GRPOConfig(output_dir=os.path.join(args.output_dir, "grpo"), **settings),
        **common,
    )
    grpo._prepare_inputs = lambda _: captured["batch"]
    remove_log_printers(grpo)
    grpo.train()
    return MicroStep(alp, grpo, captured["batch"], captured["num_items"], args.optimizer_step)


# ------------------------------------------------------------------------------------------------ the measurement
def schedule(comparisons: list[tuple[str, str]], pairs: int) -> list[tuple[int, int, int, str]]:
    """``(comparison, pair, side, arm)`` in run order (side 0: X, 1: Y): pair by pair, every comparison in turn,
    X then Y in even pairs and Y then X in odd ones (ABBA), also for an A/A comparison."""
    order = []
    for pair in range(pairs):
        for index, (x, y) in enumerate(comparisons):
            sides = ((0, x), (1, y)) if pair % 2 == 0 else ((1, y), (0, x))
            order += [(index, pair, side, arm) for side, arm in sides]
    return order


def run_ab(args: ABArguments, step_factory: Callable[[ABArguments], MicroStep] = build) -> dict:
    """Warm up every arm, time the interleaved pairs, measure peak memory per arm; return the results."""
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    step = step_factory(args)
    arms, comparisons = args.arm_list, args.comparison_list
    checks = {}
    for arm in arms:
        for _ in range(args.warmup):
            checks[arm] = step.run(arm, check=True)
            step.reset()
    pairs: list[list[list[dict]]] = [[[{}, {}] for _ in range(args.pairs)] for _ in comparisons]
    by_arm: dict[str, list[dict]] = {arm: [] for arm in arms}
    order = schedule(comparisons, args.pairs)
    for n, (index, pair, side, arm) in enumerate(order):
        record = step.timed(arm)
        pairs[index][pair][side] = record
        by_arm[arm].append(record)
        logger.info(
            "bench ab: run %d/%d (%s, pair %d): %s %.3f s",
            n + 1,
            len(order),
            "/".join(comparisons[index]),
            pair + 1,
            arm,
            record["wall_s"],
        )
    memory = {}
    if args.memory or args.profile:
        for arm in arms:
            if step.cuda:
                memory[arm] = stats([float(r["peak_tensor_bytes"]) for r in by_arm[arm]])
            else:
                table = os.path.join(args.output_dir, f"profile-{arm}.txt") if args.profile else None
                memory[arm] = stats([float(step.profiled(arm, table))])
    batch = step.batch
    results = {
        "args": asdict(args),
        "device": torch.cuda.get_device_name() if step.cuda else "cpu",
        "threads": torch.get_num_threads(),
        "finetune": "lora" if hasattr(step.model, "peft_config") else "full",
        "trainable_parameters": sum(p.numel() for p in step.model.parameters() if p.requires_grad),
        "batch": {
            "completions": int(batch["completion_ids"].size(0)),
            "prompt_tokens": int(batch["prompt_mask"].sum()),
            "completion_tokens": int(batch["completion_mask"].sum()),
            "padded_length": int(batch["prompt_ids"].size(1) + batch["completion_ids"].size(1)),
        },
        "memory_method": (
            "torch.cuda.max_memory_allocated above the run's start, median over the timed runs"
            if step.cuda
            else "peak of the live CPU tensor bytes above the run's start in one profiled run per arm "
            "(torch.profiler allocation records)"
        ),
        "machine": machine_info(load_before),
        "date": datetime.date.today().isoformat(),
        "arms": {
            arm: {
                "description": ARMS[arm],
                "wall_s": stats([r["wall_s"] for r in by_arm[arm]]),
                "cpu_s": stats([r["cpu_s"] for r in by_arm[arm]]),
                "minor_page_faults": stats([float(r["minor_page_faults"] or 0) for r in by_arm[arm]]),
                **checks[arm],
                "noise_applications_timed": sorted({r["noise_applications"] for r in by_arm[arm]}),
                **({"peak_tensor_bytes": memory[arm]} if arm in memory else {}),
            }
            for arm in arms
        },
        "comparisons": {},
    }
    for index, (x, y) in enumerate(comparisons):
        done = pairs[index]
        row = {
            "pairs": len(done),
            "wall_ratio": stats([a["wall_s"] / b["wall_s"] for a, b in done]),
            "cpu_ratio": stats([a["cpu_s"] / b["cpu_s"] for a, b in done]),
            # other jobs only ever add time: on a shared machine the fastest runs are the least disturbed
            "fastest_cpu_ratio": min(a["cpu_s"] for a, _ in done) / min(b["cpu_s"] for _, b in done),
            "runs": done,
        }
        if x in memory and y in memory:
            row["peak_tensor_memory_ratio"] = memory[x]["median"] / memory[y]["median"]
        results["comparisons"][f"{x}/{y}"] = row
    results["wall_s"] = time.perf_counter() - started
    return results


def _spread(s: dict, digits: int = 3) -> str:
    return f"**{s['median']:.{digits}f}** [{s['q1']:.{digits}f}–{s['q3']:.{digits}f}] ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def format_table(results: dict) -> str:
    """Markdown: a header line, the comparisons (per-pair ratios) and the arms (seconds per micro-step, memory)."""
    args, batch, machine = results["args"], results["batch"], results["machine"]
    lines = [
        f"device: {results['device']} ({results['threads']} threads), model: {args['model']} ({results['finetune']}, "
        f"{results['trainable_parameters'] / 1e6:.1f} M trainable), {batch['completions']} completions "
        f"({batch['prompt_tokens']} prompt + {batch['completion_tokens']} completion tokens, padded length "
        f"{batch['padded_length']}), micro-step = loss forward + backward"
        + (" + optimizer step" if args["optimizer_step"] else "")
        + f", activation checkpointing {'on' if args['gradient_checkpointing'] else 'off'}; {args['pairs']} pairs "
        f"per comparison after {args['warmup']} warm-up runs per arm, ABBA order; ratios: median [quartiles] "
        f"(range) of the per-pair ratios; memory: {results['memory_method']}; load average "
        f"{machine['load_average_before'][0]:.1f} → {machine['load_average_after'][0]:.1f} on "
        f"{machine['cpu_count']} CPUs; {results['date']}",
        "",
        "| comparison | pairs | wall-time ratio | CPU-time ratio | fastest CPU times' ratio | peak tensor memory ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results["comparisons"].items():
        x, y = name.split("/")
        label = f"{name} (A/A: resolution)" if x == y else name
        memory = f"{row['peak_tensor_memory_ratio']:.4f}" if "peak_tensor_memory_ratio" in row else "–"
        lines.append(
            f"| {label} | {row['pairs']} | {_spread(row['wall_ratio'])} | {_spread(row['cpu_ratio'])} | "
            f"{row['fastest_cpu_ratio']:.3f} | {memory} |"
        )
    lines += [
        "",
        "| arm | what | wall s per micro-step | CPU s | minor page faults | peak tensor MiB | noise per micro-step "
        "(σ gradient) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, row in results["arms"].items():
        memory = f"{row['peak_tensor_bytes']['median'] / 2**20:.1f}" if "peak_tensor_bytes" in row else "–"
        grad = row["sigma_grad_abs_sum"]
        noise = f"{row['noise_applications']} applications ({'none' if grad is None else f'‖dL/dσ‖₁ {grad:.3g}'})"
        lines.append(
            f"| {arm} | {row['description']} | {_spread(row['wall_s'])} | {_spread(row['cpu_s'])} | "
            f"{row['minor_page_faults']['median']:.0f} | {memory} | {noise} |"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send what the trainers, DeepSpeed's import and C extensions print to stderr: stdout is the table's (or JSON's)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(args: ABArguments) -> dict:
    """Run the measurement, write ``ab.json`` and ``ab.md`` in ``output_dir`` and print the table (or the JSON)."""
    with _stdout_to_stderr():
        results = run_ab(args)
    table = format_table(results)
    write_json(os.path.join(args.output_dir, "ab.json"), results)
    with open(os.path.join(args.output_dir, "ab.md"), "w") as f:
        f.write(table + "\n")
    print(to_json(results) if args.json else table)
    return results
