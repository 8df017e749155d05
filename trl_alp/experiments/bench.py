"""``trl-alp bench``: the cost of ALP against TRL's `GRPOTrainer` on the user's own hardware.

Every *arm* (scenario × trainer) runs in a fresh process (``python -m trl_alp.experiments.bench --worker SPEC``), so peak
memory is its own and no allocator or cache state leaks between arms; arms are interleaved (GRPO, ALP, ALP, GRPO,
...) over ``--repeats`` rounds so slow drifts of a shared machine hit both trainers alike. Each optimizer step is split:

* **generation**: TRL's ``_prepare_inputs`` (sampling, rewards, advantages and the no-grad old/reference log-prob
  passes; the rollout log-prob capture of ALP runs here too), amortised over the ``num_iterations`` steps that share
  one generation;
* **training**: the rest of the step, i.e. the loss forward and backward, gradient clipping and the optimizer step.
  This is the part whose cost ALP owns (the noise);
* **whole step**: ``on_step_begin`` to ``on_step_end``.

Scenarios: ``no-correction`` is GRPO with TRL's defaults (no old-log-prob pass) against ``seq-alp``;
``old-logprobs`` uses ``num_iterations=2`` for both (each generation is trained on twice) and ``stale-steps``
``steps_per_generation=2`` (each generation is split over two optimizer steps, the authors' mini-batch staleness):
there GRPO recomputes old log-probs and ALP does not. ``pass_saving_bound`` is the whole-step ratio ALP would reach if
skipping those passes were its only difference from GRPO: the floor that its savings can reach at this scale.

Peak memory per arm, above the arm's post-load baseline (model, tokenizer and trainer built): on CUDA from
``torch.cuda.max_memory_allocated``; on CPU the peak resident set size, read from ``VmHWM`` after resetting it through
``/proc/self/clear_refs`` (Linux), else sampled every 5 ms. ``--profile`` also records a ``torch.profiler`` trace per
arm and reports the ops that cost the most self time in each phase, and the peak of the live tensor memory from the
profiler's allocation records (which, unlike the RSS, leaves out what the C allocator keeps after frees).
"""

from __future__ import annotations

import datetime
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from transformers import TrainerCallback

from .runner import (
    RUN_SETTINGS,
    BenchModelArguments,
    LogHistory,
    comma_list,
    machine_info,
    markdown_table,
    read_json,
    remove_log_printers,
    to_json,
    write_json,
)

logger = logging.getLogger(__name__)

SCENARIOS = {"no-correction": {}, "old-logprobs": {"num_iterations": 2}, "stale-steps": {"steps_per_generation": 2}}
KINDS = ("grpo", "alp")
ENGINES = ("generate", "vllm")
PHASES = (
    "whole_step_s",
    "generation_s",
    "training_s",
    "logprob_pass_s",
    "whole_step_cpu_s",
    "generation_cpu_s",
    "training_cpu_s",
    "logprob_passes",  # log-prob passes that computed something during generation (ALP's skipped old pass: 0)
)
GENERATION_LABEL = "bench/generation"
NOISE_OP = "_AddSeededNoise"  # the autograd Function of trl_alp.perturbation (its backward: ...Backward)


@dataclass
class BenchArguments(BenchModelArguments):
    """Arguments of ``trl-alp bench``."""

    cycles: int = field(default=2, metadata={"help": "Measured generation cycles per arm (after the warm-up)."})
    warmup: int = field(default=1, metadata={"help": "Warm-up generation cycles per arm, not measured."})
    repeats: int = field(default=3, metadata={"help": "Interleaved rounds; every arm runs once per round."})
    scenarios: str = field(
        default=",".join(SCENARIOS), metadata={"help": f"Comma-separated subset of {list(SCENARIOS)}."}
    )
    engine: str = field(
        default="generate",
        metadata={
            "help": "Rollout engine of both trainers: 'generate' (transformers) or 'vllm' (colocated vLLM in fp32; "
            "vLLM's CPU build on a CPU; 'tiny' then uses its vLLM-compatible variant)."
        },
    )
    threads: int = field(
        default=0,
        metadata={
            "help": "torch intra-op threads per arm (0: torch's default). On a CPU shared with other jobs, 1 avoids "
            "parallel ops waiting for a descheduled thread."
        },
    )
    profile: bool = field(
        default=False,
        metadata={"help": "Also trace every arm with torch.profiler (slower; timings include its overhead)."},
    )
    json: bool = field(default=False, metadata={"help": "Print the results as JSON instead of a table."})
    output_dir: str = field(default="runs/bench", metadata={"help": "Scratch folder for the runs and profiles."})

    def __post_init__(self):
        super().__post_init__()
        for name in ("cycles", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {list(ENGINES)}, got {self.engine!r}")
        comma_list(self.scenarios, "scenarios", SCENARIOS)

    @property
    def scenario_list(self) -> list[str]:
        return comma_list(self.scenarios, "scenarios", SCENARIOS)


# ------------------------------------------------------------------------------------------------- one arm (worker)
class PeakMemory:
    """Peak memory of this process above a baseline taken at :meth:`start`."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.method = "torch.cuda.max_memory_allocated above the post-load memory_allocated" if cuda else ""

    @staticmethod
    def _status_kib(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    @staticmethod
    def _rss() -> int:
        try:
            return PeakMemory._status_kib("VmRSS") * 1024
        except OSError:
            import psutil

            return psutil.Process().memory_info().rss

    def start(self) -> int:
        """Take the baseline, reset the peak; returns the baseline in bytes."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        baseline = self._rss()
        try:  # "5" resets the kernel's peak-RSS counter (VmHWM) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "peak RSS (VmHWM, reset through /proc/self/clear_refs) above the post-load RSS"
        except OSError:
            self.method = "peak RSS sampled every 5 ms above the post-load RSS"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return baseline

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._samples.append(self._rss())

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            return max(self._samples, default=self._rss())
        return self._status_kib("VmHWM") * 1024


class StepTimer(TrainerCallback):
    """Times each optimizer step and, inside it, the generation phase and its no-grad log-prob passes.

    Wall time and this process's CPU time (all its threads): on a shared machine the CPU time is the steadier
    measure of the work done, the wall time what a user waits for.
    """

    def __init__(self, trainer, cuda: bool):
        self.cuda = cuda
        self.steps: list[dict] = []
        self._begin = (0.0, 0.0)
        self._generation = [0.0, 0.0]
        self._logprob = 0.0
        self._passes = 0
        self._in_prepare = False
        # the Trainer looks both methods up on the instance: wrap them there
        self._prepare, self._logps = trainer._prepare_inputs, trainer._get_per_token_logps_and_entropies
        trainer._prepare_inputs = self._timed_prepare
        trainer._get_per_token_logps_and_entropies = self._timed_logps
        trainer.add_callback(self)

    def _now(self) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def _timed_prepare(self, *args, **kwargs):
        start = self._now()
        self._in_prepare = True
        try:
            with torch.profiler.record_function(GENERATION_LABEL):
                return self._prepare(*args, **kwargs)
        finally:
            self._in_prepare = False
            end = self._now()
            self._generation = [g + e - s for g, e, s in zip(self._generation, end, start)]

    def _timed_logps(self, *args, **kwargs):
        if not self._in_prepare:  # the loss forward: part of training
            return self._logps(*args, **kwargs)
        start = self._now()[0]
        try:
            out = self._logps(*args, **kwargs)
            self._passes += out[0] is not None
            return out
        finally:
            self._logprob += self._now()[0] - start

    def on_step_begin(self, args, state, control, **kwargs):
        self._generation, self._logprob, self._passes = [0.0, 0.0], 0.0, 0
        self._begin = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        wall, cpu = (e - s for e, s in zip(self._now(), self._begin))
        self.steps.append(
            {
                "whole_step_s": wall,
                "generation_s": self._generation[0],
                "training_s": wall - self._generation[0],
                "logprob_pass_s": self._logprob,
                "logprob_passes": self._passes,
                "whole_step_cpu_s": cpu,
                "generation_cpu_s": self._generation[1],
                "training_cpu_s": cpu - self._generation[1],
            }
        )


class ProfileMeasuredSteps(TrainerCallback):
    """Starts the profiler when the warm-up steps are done."""

    def __init__(self, profiler, warmup_steps: int):
        self.profiler, self.warmup_steps = profiler, warmup_steps

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup_steps:
            self.profiler.start()


def _phase_profile(prof, steps: int) -> dict:
    """Per phase (generation / training = the rest of the step): the self CPU time of every op, and the inclusive
    time of ALP's noise (``_AddSeededNoise`` forward and backward), in ms per step."""
    self_ms: dict[str, dict[str, float]] = {"generation": defaultdict(float), "training": defaultdict(float)}
    noise_ms = {"generation": 0.0, "training": 0.0}
    for event in prof.events():
        if event.name == GENERATION_LABEL:
            continue
        parent, phase = event.cpu_parent, "training"
        while parent is not None:
            if parent.name == GENERATION_LABEL:
                phase = "generation"
                break
            parent = parent.cpu_parent
        self_ms[phase][event.name] += event.self_cpu_time_total / 1000 / steps
        if event.name.startswith(NOISE_OP):
            noise_ms[phase] += event.cpu_time_total / 1000 / steps
    return {**{phase: dict(ops) for phase, ops in self_ms.items()}, "noise_ms": noise_ms}


def profiled_tensor_peak(prof) -> int:
    """Peak of the live CPU tensor bytes over the profiled steps, above their level when the profiler started.

    The sum, in time order, of the allocation (+) and free (−) records that the profiler takes with
    ``profile_memory=True``: PyTorch's own tensor memory, without what the C allocator keeps after a free (the peak
    RSS includes that, and it varies from process to process). Frees of blocks allocated before the profiler started
    carry no size (PyTorch warns), so the figure can overstate the peak, never understate it."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import MEMORY_EVENT_NAME

    cpu = (DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP)
    records = [
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == MEMORY_EVENT_NAME and event.device_type() in cpu
    ]
    records.sort(key=lambda record: record[0])  # stable: records of one instant keep their order
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


def minor_page_faults() -> int | None:
    """This process's minor page faults so far (None where ``resource`` is missing, e.g. on Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_arm(spec: dict) -> dict:
    """Train one arm in this process and return its per-step timings and peak memory."""
    from trl import GRPOConfig, GRPOTrainer

    from ..config import ALPConfig
    from ..tasks import REWARD_FUNCS, arithmetic_dataset
    from ..trainer import ALPGRPOTrainer
    from ..vllm_engine import alp_engine
    from .models import load_offline_model, lora_config

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cuda = torch.cuda.is_available()
    scenario = SCENARIOS[spec["scenario"]]
    per_generation = scenario.get("steps_per_generation", 1)
    cycle = scenario.get("num_iterations", 1) * per_generation  # optimizer steps served by one generation
    generations = spec["warmup"] + spec["cycles"]
    steps = generations * cycle
    settings = dict(
        output_dir=os.path.join(spec["output_dir"], f"{spec['scenario']}-{spec['kind']}"),
        max_steps=steps,
        per_device_train_batch_size=spec["completions"],
        num_generations=spec["num_generations"],
        max_completion_length=spec["max_completion_length"],
        learning_rate=1e-5,
        bf16=cuda,
        use_cpu=not cuda,
        seed=0,
        **RUN_SETTINGS,
        **scenario,
    )
    if spec["engine"] == "vllm":  # the same exact engine for both trainers: the comparison stays ALP vs GRPO
        settings.update(use_vllm=True, vllm_mode="colocate")
    alp = {"alp_rollout_dtype": "float32"} if spec["engine"] == "vllm" else {}
    config = GRPOConfig(**settings) if spec["kind"] == "grpo" else ALPConfig(correction="seq-alp", **alp, **settings)
    model, tokenizer, lora = load_offline_model(spec["model"], engine=spec["engine"])
    finetune = spec["finetune"]
    if finetune == "full":
        lora = None
    elif finetune == "lora" and lora is None:
        lora = lora_config()
    prompts = generations * per_generation * spec["completions"] // spec["num_generations"]
    # TRL's GRPOTrainer builds the same engine as ALP's (TRL's weight sync cannot write to vLLM's CPU backend)
    with alp_engine("float32" if spec["engine"] == "vllm" else None):
        trainer = (GRPOTrainer if spec["kind"] == "grpo" else ALPGRPOTrainer)(
            model=model,
            reward_funcs=REWARD_FUNCS["number_format"],
            args=config,
            train_dataset=arithmetic_dataset(max(64, prompts)),
            processing_class=tokenizer,
            peft_config=lora,
        )
    remove_log_printers(trainer)
    timer = StepTimer(trainer, cuda)

    memory = PeakMemory(cuda)
    profiler = None
    if spec["profile"]:
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        profiler = torch.profiler.profile(activities=activities, profile_memory=True)
        trainer.add_callback(ProfileMeasuredSteps(profiler, spec["warmup"] * cycle))
    baseline = memory.start()
    faults = minor_page_faults()
    try:
        trainer.train()
    finally:
        if profiler is not None and profiler.profiler is not None:
            profiler.stop()
    peak = memory.peak()
    faults = None if faults is None else minor_page_faults() - faults  # null in the JSON where not measured

    measured = timer.steps[spec["warmup"] * cycle :]
    lengths = LogHistory(trainer.state.log_history).values("completions/mean_length")
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "engine": spec["engine"],
        "finetune": "lora" if lora is not None else "full",
        "threads": torch.get_num_threads(),
        # one record per generation cycle: the per-step mean of each phase over the cycle's steps
        "cycles": [
            {phase: statistics.fmean(s[phase] for s in measured[i : i + cycle]) for phase in PHASES}
            for i in range(0, len(measured), cycle)
        ],
        "mean_completion_tokens": statistics.fmean(lengths[spec["warmup"] * cycle :] or lengths or [0.0]),
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "baseline_bytes": baseline,
        "peak_bytes": peak,
        "peak_above_baseline_bytes": peak - baseline,
        "memory_method": memory.method,
        # pages the kernel had to map in during training (all steps): memory the allocator got afresh from the OS
        "minor_page_faults": faults,
    }
    if spec["profile"]:
        phases = _phase_profile(profiler, spec["cycles"] * cycle)
        path = os.path.join(spec["output_dir"], f"profile-{spec['scenario']}-{spec['kind']}-r{spec['repeat']}.txt")
        with open(path, "w") as f:
            f.write(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
        result["profile"] = {"file": path, "tensor_peak_bytes": profiled_tensor_peak(profiler), **phases}
    return result


def _worker_main(argv: list[str]) -> None:
    """``python -m trl_alp.experiments.bench --worker SPEC.json``: run one arm, write its result next to the spec."""
    if len(argv) != 2 or argv[0] != "--worker":
        raise SystemExit("usage: python -m trl_alp.experiments.bench --worker SPEC.json")
    os.dup2(2, 1)  # the parent's stdout belongs to its table / JSON: everything of the worker goes to stderr
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    spec = read_json(argv[1])
    write_json(spec["result"], run_arm(spec))


# ------------------------------------------------------------------------------------------- all arms (parent)
def _spawn(spec: dict, workdir: str) -> dict:
    name = f"{spec['scenario']}-{spec['kind']}-r{spec['repeat']}"
    spec_path = os.path.join(workdir, f"{name}.spec.json")
    spec = {**spec, "result": os.path.join(workdir, f"{name}.result.json")}
    write_json(spec_path, spec)
    load_before = os.getloadavg()[0]
    done = subprocess.run([sys.executable, "-m", "trl_alp.experiments.bench", "--worker", spec_path], check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench arm {name} failed (exit status {done.returncode}); its log is above.")
    result = read_json(spec["result"])
    # 1-minute load average when the arm started and ended: ~1 per busy bench thread on a machine left alone
    result["load_average"] = [load_before, os.getloadavg()[0]]
    return result


def stats(values: list[float]) -> dict:
    """Median, quartiles and range of `values`."""
    if len(values) > 1:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {
        "median": statistics.median(values),
        "q1": q1,
        "q3": q3,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _summarise_arm(runs: list[dict]) -> dict:
    cycles = [c for run in runs for c in run["cycles"]]
    arm = {phase: stats([c[phase] for c in cycles]) for phase in PHASES}
    for key in ("peak_above_baseline_bytes", "peak_bytes", "baseline_bytes"):
        arm[key] = stats([float(run[key]) for run in runs])
    arm["mean_completion_tokens"] = statistics.fmean(run["mean_completion_tokens"] for run in runs)
    arm["trainable_parameters"] = runs[0]["trainable_parameters"]
    arm["finetune"] = runs[0]["finetune"]
    return arm


def _ratio(alp: dict, grpo: dict, key: str) -> float:
    return alp[key]["median"] / grpo[key]["median"] if grpo[key]["median"] > 0 else float("nan")


ROUND_RATIOS = {
    "time_ratio": "whole_step_s",
    "train_time_ratio": "training_s",
    "cpu_time_ratio": "whole_step_cpu_s",
    "train_cpu_time_ratio": "training_cpu_s",
    "memory_ratio": "peak_above_baseline_bytes",
}


def round_ratios(grpo_runs: list[dict], alp_runs: list[dict]) -> dict[str, list[float]]:
    """ALP/GRPO per round (the i-th GRPO process against the i-th ALP process) for each of :data:`ROUND_RATIOS`."""
    paired = [(_summarise_arm([g]), _summarise_arm([a])) for g, a in zip(grpo_runs, alp_runs, strict=True)]
    return {name: [_ratio(a, g, key) for g, a in paired] for name, key in ROUND_RATIOS.items()}


def pass_saving_bound(alp: dict, grpo: dict) -> float:
    """The whole-step ALP/GRPO ratio if the only difference were the no-grad log-prob passes each runs (medians):
    how far below 1 skipping GRPO's old-log-prob pass can take ALP on this model, batch and machine."""
    whole = grpo["whole_step_s"]["median"]
    return (whole - grpo["logprob_pass_s"]["median"] + alp["logprob_pass_s"]["median"]) / whole


def _profile_extra(alp_runs: list[dict], grpo_runs: list[dict], top: int = 10) -> dict[str, list]:
    """Ops with the largest extra self time per step under ALP, per phase (mean over the repeats)."""
    out = {}
    for phase in ("generation", "training"):
        mean: dict[str, dict[str, float]] = {}
        for kind, runs in (("alp", alp_runs), ("grpo", grpo_runs)):
            ops: dict[str, float] = defaultdict(float)
            for run in runs:
                for name, ms in run["profile"][phase].items():
                    ops[name] += ms / len(runs)
            mean[kind] = ops
        names = set(mean["alp"]) | set(mean["grpo"])
        extra = [(n, mean["alp"].get(n, 0.0), mean["grpo"].get(n, 0.0)) for n in names]
        extra.sort(key=lambda t: t[2] - t[1])
        out[phase] = [{"op": n, "alp_ms": a, "grpo_ms": g, "extra_ms": a - g} for n, a, g in extra[:top]]
    out["noise_ms"] = {
        phase: statistics.fmean(run["profile"]["noise_ms"][phase] for run in alp_runs)
        for phase in ("generation", "training")
    }
    return out


def run_bench(args: BenchArguments) -> dict:
    """Run every arm in a fresh process, interleaved over the repeats; return per-phase statistics and ratios."""
    os.makedirs(args.output_dir, exist_ok=True)
    base = {k: v for k, v in asdict(args).items() if k not in ("json", "repeats", "scenarios")}
    load_before = os.getloadavg()
    runs: dict[tuple[str, str], list[dict]] = defaultdict(list)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.output_dir) as workdir:
        for repeat in range(args.repeats):
            kinds = KINDS if repeat % 2 == 0 else KINDS[::-1]  # ABBA order: drifts hit both trainers alike
            for scenario in args.scenario_list:
                for kind in kinds:
                    logger.warning("bench: round %d/%d, %s, %s", repeat + 1, args.repeats, scenario, kind)
                    spec = {**base, "scenario": scenario, "kind": kind, "repeat": repeat}
                    runs[(scenario, kind)].append(_spawn(spec, workdir))
    first = runs[(args.scenario_list[0], "grpo")][0]
    results = {
        "args": asdict(args),
        "device": first["device"],
        "threads": first["threads"],
        "memory_method": first["memory_method"],
        "machine": machine_info(load_before),
        "date": datetime.date.today().isoformat(),
        "wall_s": time.perf_counter() - started,
    }
    for scenario in args.scenario_list:
        grpo_runs, alp_runs = runs[(scenario, "grpo")], runs[(scenario, "alp")]
        grpo, alp = _summarise_arm(grpo_runs), _summarise_arm(alp_runs)
        rounds = round_ratios(grpo_runs, alp_runs)
        row = {
            "grpo": grpo,
            "alp": alp,
            "time_ratio": _ratio(alp, grpo, "whole_step_s"),
            "train_time_ratio": _ratio(alp, grpo, "training_s"),
            "generation_time_ratio": _ratio(alp, grpo, "generation_s"),
            "cpu_time_ratio": _ratio(alp, grpo, "whole_step_cpu_s"),
            "train_cpu_time_ratio": _ratio(alp, grpo, "training_cpu_s"),
            "memory_ratio": _ratio(alp, grpo, "peak_above_baseline_bytes"),
            "pass_saving_bound": pass_saving_bound(alp, grpo),
            # each round pairs one GRPO and one ALP process run back to back: the per-round ratios, their range and
            # median (steadier than the ratio of medians when the machine drifts over the rounds)
            "ratio_rounds": rounds,
            "ratio_range": {name: [min(r), max(r)] for name, r in rounds.items()},
            "paired_ratio": {name: statistics.median(r) for name, r in rounds.items()},
        }
        # every arm process's own record, round by round (the profiles stay in their files)
        row["runs"] = {
            kind: [{k: v for k, v in run.items() if k != "profile"} for run in kind_runs]
            for kind, kind_runs in (("grpo", grpo_runs), ("alp", alp_runs))
        }
        if args.profile:
            row["profile_extra"] = _profile_extra(alp_runs, grpo_runs)
            row["profile_files"] = {
                "grpo": [r["profile"]["file"] for r in grpo_runs],
                "alp": [r["profile"]["file"] for r in alp_runs],
            }
            # the profiler's tensor memory: what the noise keeps alive, without the C allocator's retention
            peaks = {
                kind: stats([float(r["profile"]["tensor_peak_bytes"]) for r in kind_runs])
                for kind, kind_runs in (("grpo", grpo_runs), ("alp", alp_runs))
            }
            row["tensor_peak_bytes"] = peaks
            row["tensor_memory_ratio"] = _ratio({"peak": peaks["alp"]}, {"peak": peaks["grpo"]}, "peak")
        results[scenario] = row
    return results


def _fmt(s: dict, scale: float = 1.0, digits: int = 3) -> str:
    return f"{s['median'] * scale:.{digits}f} [{s['min'] * scale:.{digits}f}–{s['max'] * scale:.{digits}f}]"


def format_table(results: dict) -> str:
    """A Markdown table: per scenario one row per trainer and one row of ALP/GRPO ratios (median [range over
    rounds])."""
    args = results["args"]
    scenarios = comma_list(args["scenarios"], "scenarios")
    finetune = results[scenarios[0]]["grpo"]["finetune"]
    columns = ("whole_step_s", "generation_s", "training_s", "training_cpu_s")
    ratio_of = {
        "whole_step_s": "time_ratio",
        "generation_s": "generation_time_ratio",
        "training_s": "train_time_ratio",
        "training_cpu_s": "train_cpu_time_ratio",
    }
    rows = []
    for scenario in scenarios:
        row = results[scenario]
        for kind in KINDS:
            arm = row[kind]
            cells = [_fmt(arm[c]) for c in (*columns, "logprob_pass_s")]
            cells.append(_fmt(arm["peak_above_baseline_bytes"], 2**-20, 0))
            rows.append([scenario, kind.upper(), *cells, f"{arm['mean_completion_tokens']:.1f}"])
        ranges = row["ratio_range"]
        cells = []
        for name in [ratio_of[c] for c in columns] + ["pass_saving_bound", "memory_ratio"]:
            span = ""
            if name in ranges:
                span = f" [{ranges[name][0]:.3f}–{ranges[name][1]:.3f}], paired {row['paired_ratio'][name]:.3f}"
            cells.append(f"**{row[name]:.3f}**{span}")
        rows.append([scenario, "ALP/GRPO", *cells, ""])
    header = ("scenario", "trainer", "whole step s", "generation s", "training s", "training CPU s")
    header += ("no-grad log-prob passes s (ALP/GRPO row: pass-saving bound)", "peak memory MiB", "tokens")
    lines = [
        f"device: {results['device']} ({results['threads']} threads), model: {args['model']} ({finetune}), "
        f"{args['completions']} completions × ≤{args['max_completion_length']} tokens, {args['repeats']} rounds × "
        f"{args['cycles']} cycles; seconds per optimizer step, median [min–max]; ALP/GRPO rows: ratio of the medians "
        "[range of the per-round ratios], paired = median of the per-round ratios; "
        f"memory: {results['memory_method']}; "
        f"load average {results['machine']['load_average_before'][0]:.1f} → "
        f"{results['machine']['load_average_after'][0]:.1f} on {results['machine']['cpu_count']} CPUs",
        markdown_table(header, rows),
    ]
    for scenario in scenarios:
        if "tensor_peak_bytes" in results[scenario]:
            row = results[scenario]
            grpo, alp = (_fmt(row["tensor_peak_bytes"][kind], 2**-20, 0) for kind in KINDS)
            lines.append(
                f"profiled tensor memory ({scenario}; peak live CPU tensor MiB above the measured steps' start, "
                f"median [min–max]): GRPO {grpo}, ALP {alp}, ALP/GRPO **{row['tensor_memory_ratio']:.3f}**"
            )
    return "\n".join(lines)


def main(args: BenchArguments) -> dict:
    results = run_bench(args)
    print(to_json(results) if args.json else format_table(results))
    return results


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
