"""`examples/train_alp_grpo.py`, the script a user copies: its quick variant on the tiny model, on CPU.

The README's command (`python examples/train_alp_grpo.py ...`), with `--use_cpu true --bf16 false` and 1-3 steps of 4
short completions: it trains LoRA on a JSON Lines file through the public API, saves a checkpoint with ALP's state,
resumes from it, and with its default `--use_vllm true` runs the colocated vLLM engine (vLLM's CPU build).
"""

import json
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from trl_alp.experiments.models import tiny_vllm_path
from trl_alp.tasks import arithmetic_dataset

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_alp_grpo.py"
QUICK = [
    *("--max_steps", "1"),
    *("--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--save_steps", "2"),
    *("--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "8"),
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "my_data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in arithmetic_dataset(16, seed=0)))
    return path


def readme_command(page: str = "README.md") -> list[str]:
    """The page's `python examples/train_alp_grpo.py ...` command, as argv after the script."""
    text = (SCRIPT.parents[1] / page).read_text()
    (command,) = re.findall(r"`(python examples/train_alp_grpo\.py[^`]*)`", text)
    return shlex.split(command)[2:]


def test_the_site_prints_the_readmes_command():
    assert readme_command("docs/index.md") == readme_command()


def run_script(monkeypatch, *flags):
    """The script run as `python examples/train_alp_grpo.py` with the README's flags, then the quick ones."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *readme_command(), *QUICK, *flags])
    runpy.run_path(str(SCRIPT), run_name="__main__")


def log_history(folder: Path) -> list[dict]:
    return json.loads((folder / "trainer_state.json").read_text())["log_history"]


def test_reward_reads_the_last_number_of_text_or_chat_completions():
    correct_answer = runpy.run_path(str(SCRIPT))["correct_answer"]
    completions = ["so 3 + 4 = 7", [{"role": "assistant", "content": "7.0"}], "it is 8", "no number"]
    assert correct_answer(completions, answer=["7", "7", "7", "7"]) == [1.0, 1.0, 0.0, 0.0]


def test_the_gpu_defaults_are_what_a_user_sees():
    from trl import ModelConfig, TrlParser

    from trl_alp import ALPConfig

    namespace = runpy.run_path(str(SCRIPT))
    parser = TrlParser((namespace["DataArguments"], ALPConfig, ModelConfig))
    parser.set_defaults(**namespace["GPU_DEFAULTS"])
    defaults = vars(parser.parse_args(["--output_dir", "unused"]))
    assert {k: defaults[k] for k in ("use_peft", "use_vllm", "vllm_mode", "bf16")} == {
        "use_peft": True,
        "use_vllm": True,
        "vllm_mode": "colocate",
        "bf16": True,
    }


def test_trains_lora_saves_and_resumes(monkeypatch, tmp_path, data_file):
    out = tmp_path / "run"
    common = ["--model_name_or_path", tiny_vllm_path(0), "--data_files", str(data_file), "--output_dir", str(out)]
    common += ["--use_vllm", "false"]
    run_script(monkeypatch, *common, "--max_steps", "2")
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists() and (checkpoint / "alp_state.json").exists()
    assert (out / "adapter_model.safetensors").exists()  # the final save_model: LoRA by default
    first = log_history(out / "checkpoint-2")
    assert [h["step"] for h in first if "loss" in h] == [1, 2] and "alp/sigma/mean" in first[-1]

    run_script(monkeypatch, *common, "--max_steps", "3", "--resume_from_checkpoint", "true")
    resumed = [h for h in log_history(out / "checkpoint-3") if "loss" in h]
    assert [h["step"] for h in resumed] == [1, 2, 3]
    assert resumed[:2] == [h for h in first if "loss" in h]  # steps 1-2 came from the checkpoint, not retrained


@pytest.mark.slow
@pytest.mark.vllm
def test_runs_on_the_colocated_vllm_engine(monkeypatch, tmp_path, data_file):
    out = tmp_path / "run"
    model = tiny_vllm_path(0)
    run_script(monkeypatch, "--model_name_or_path", model, "--data_files", str(data_file), "--output_dir", str(out))
    (step,) = [h for h in log_history(out / "checkpoint-1") if "loss" in h]
    assert step["alp/mismatch/k3_kl"] >= 0 and "alp/ratio/seq/q98" in step
