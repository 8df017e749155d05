"""What the experiment runners (``demo``, ``stress``, ``bench``, ``mismatch``, ``plot``) share, so each holds only its
own logic.

Their runs' common settings, their comma-separated flags, the runs' log histories (read from ``trainer_state.json``)
and the summaries taken from them, and their reports: Markdown tables and strict JSON.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Every experiment run logs each step (its summary and plots read the log history), saves no checkpoint and reports
# to no tracker; the command shows its own progress, if any (see `remove_log_printers`).
RUN_SETTINGS = {"logging_steps": 1, "save_strategy": "no", "report_to": "none", "disable_tqdm": True}
# Runs whose learning is compared (demo, stress): a constant learning rate, sampling at temperature 1 (the ratio
# compares whole distributions), no KL term, and no gradient checkpointing (the models are small).
TRAINING_SETTINGS = {
    **RUN_SETTINGS,
    "lr_scheduler_type": "constant",
    "temperature": 1.0,
    "beta": 0.0,
    "gradient_checkpointing": False,  # the name transformers 5.17 (vLLM's CPU build) and 5.24 both accept
}


def remove_log_printers(trainer) -> None:
    """Remove the Trainer's progress bar and metric printer: their output would bury the runner's own."""
    from transformers import PrinterCallback, ProgressCallback

    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)


# ------------------------------------------------------------------------------------------------------ flags
FINETUNE = ("auto", "lora", "full")


def machine_info(load_before: Sequence[float]) -> dict[str, Any]:
    """What a benchmark record says of its machine: platform, processor, cores and the load around the run."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
    }


@dataclass
class BenchModelArguments:
    """The model and the batch of both benchmark modes (`trl-alp bench`, `trl-alp bench --mode ab`)."""

    model: str = field(default="tiny", metadata={"help": "'tiny', 'smollm2', or a local model folder."})
    finetune: str = field(
        default="auto",
        metadata={"help": "'lora' (r=16, all linear layers), 'full', or 'auto' (tiny: full, otherwise LoRA)."},
    )
    completions: int = field(default=64, metadata={"help": "Completions per batch (one optimizer step's)."})
    num_generations: int = field(default=8, metadata={"help": "Completions per prompt (GRPO group size)."})
    max_completion_length: int = field(default=32, metadata={"help": "Maximum tokens per completion."})

    def __post_init__(self):
        for name in ("completions", "num_generations", "max_completion_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.completions % self.num_generations:
            raise ValueError(
                f"--completions ({self.completions}) must be a multiple of --num_generations ({self.num_generations})"
            )
        if self.finetune not in FINETUNE:
            raise ValueError(f"--finetune must be one of {list(FINETUNE)}, got {self.finetune!r}")


def comma_list(value: str, flag: str, choices: Collection[str] | None = None) -> list[str]:
    """The items of a comma-separated flag value, blanks dropped.

    Raises:
        ValueError: naming ``--flag``, when no item is left or an item is not one of `choices`.
    """
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise ValueError(f"--{flag} is empty")
    unknown = [item for item in items if choices is not None and item not in choices]
    if unknown:
        raise ValueError(f"--{flag}: unknown {unknown}; choose from {list(choices)}")
    return items


def int_list(value: str, flag: str) -> list[int]:
    """The distinct integers of a comma-separated flag value, in increasing order."""
    items = comma_list(value, flag)
    try:
        numbers = {int(item) for item in items}
    except ValueError:
        raise ValueError(f"--{flag} must be comma-separated integers, got {value!r}") from None
    return sorted(numbers)


# ---------------------------------------------------------------------------------------------- log history
def finite(value: Any) -> bool:
    """Whether `value` is a real, finite number (not None, NaN or ±inf)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def mean(values: Sequence[float]) -> float:
    """Mean of `values`; NaN when there is none, like a metric that was never logged."""
    return statistics.fmean(values) if values else math.nan


def state_path(run_dir: str) -> str:
    """The run's ``trainer_state.json``, or its newest ``checkpoint-*``'s when the run was not finished."""
    path = os.path.join(run_dir, "trainer_state.json")
    if os.path.exists(path):
        return path
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run folder {run_dir!r} does not exist")
    checkpoints = sorted(
        (d for d in os.listdir(run_dir) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[-1])
    )
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir}: no trainer_state.json (nor checkpoint-*/trainer_state.json) found")
    return os.path.join(run_dir, checkpoints[-1], "trainer_state.json")


def load_log_history(run_dir: str) -> list[dict]:
    """The ``log_history`` of a run folder (or of its newest ``checkpoint-*`` when the run was not finished)."""
    return read_json(state_path(run_dir))["log_history"]


def series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of `key` in a log history (entries without it, or with None/NaN, are skipped)."""
    steps, values = [], []
    for entry in history:
        value = entry.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            steps.append(entry["step"])
            values.append(float(value))
    return steps, values


class LogHistory:
    """A Trainer's ``log_history`` read metric by metric.

    Entries without the metric (or with NaN) are skipped, and a metric that was never logged reads as NaN (e.g. σ of
    a run without noise), so every summary has the same keys.
    """

    def __init__(self, entries: list[dict]):
        self.entries = entries

    def series(self, key: str) -> tuple[list[int], list[float]]:
        return series(self.entries, key)

    def values(self, key: str) -> list[float]:
        return self.series(key)[1]

    def first(self, key: str, n: int = 1) -> float:
        """Mean of the first `n` values."""
        return mean(self.values(key)[:n])

    def last(self, key: str, n: int = 1) -> float:
        """Mean of the last `n` values."""
        return mean(self.values(key)[-n:])

    def max(self, key: str) -> float:
        return max(self.values(key), default=math.nan)

    def min(self, key: str) -> float:
        return min(self.values(key), default=math.nan)


# --------------------------------------------------------------------------------------------------- reports
def number(value: Any, spec: str = ".3f", missing: str = "n/a") -> str:
    """`value` formatted by `spec`, or `missing` when it was not measured (None, NaN, ±inf)."""
    return format(value, spec) if finite(value) else missing


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table of formatted cells, one sequence of cells per row."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(row) for row in rows)])


def json_safe(value: Any) -> Any:
    """`value` with NaN and ±inf (a metric that was never measured) as None: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def to_json(data: Any) -> str:
    """`data` as strict JSON (NaN and ±inf as null), indented: what every report file and ``--json`` holds."""
    return json.dumps(json_safe(data), indent=2, allow_nan=False)


def write_json(path: str, data: Any) -> None:
    """Write `data` to `path` as `to_json` does, atomically: a killed run never leaves a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial"
    with open(partial, "w") as f:
        f.write(to_json(data))
    os.replace(partial, path)


def read_json(path: str) -> Any:
    """The JSON data of the file `path`."""
    with open(path) as f:
        return json.load(f)


def sample_completions(
    model, tokenizer, prompts: list, samples: int, seed: int, max_new_tokens: int, **generate_kwargs
):
    """`samples` completions per chat prompt, sampled from `model` at temperature 1 without truncation from a fixed
    seed, the prompts left-padded. Returns ``generate``'s output and the padded prompt length."""
    import torch

    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            **batch.to(next(model.parameters()).device),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=samples,
            pad_token_id=tokenizer.pad_token_id,
            **generate_kwargs,
        )
    return out, batch["input_ids"].shape[1]
