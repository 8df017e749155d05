"""Every python block of the README and the docs pages runs, in a quick variant.

Blocks after an ``<!-- example: NAME -->`` marker are run as written by the tests that name them (test_recipes.py,
test_tool_calling.py, test_doc_commands.py); every other block runs here. The quick variant: a Hub model id becomes a
tiny model saved to a local folder, `ALPConfig` gets CPU settings and at most one step of 4 completions, the
README's `my_data.jsonl` holds 8 arithmetic rows, and the names a snippet leaves to the reader (`my_reward`,
`dataset`, `lora_config`) are defined.
"""

import json

import pytest
from doc_blocks import code_blocks, doc_files, marked_blocks
from peft import LoraConfig

import trl_alp
from trl_alp.experiments.models import build_tiny_model, build_tokenizer
from trl_alp.tasks import arithmetic_dataset, correctness_reward

QUICK = dict(bf16=False, use_cpu=True, report_to="none", save_strategy="no", per_device_train_batch_size=4)
QUICK |= dict(num_generations=4, max_completion_length=8)

CASES = [
    pytest.param(block, id=f"{path.relative_to(doc_files()[0].parent).as_posix()}[{i}]")
    for path in doc_files()
    for i, block in enumerate(code_blocks(path, "python"))
    if block not in marked_blocks()
]


def test_the_docs_have_unmarked_examples():
    assert any("ALPGRPOTrainer(" in case.values[0] for case in CASES)  # the one-line swap


@pytest.fixture
def quick(tmp_path, monkeypatch):
    """Patch `trl_alp`'s names for the quick variant; returns the globals a snippet runs with."""
    folder = tmp_path / "tiny-model"
    tokenizer = build_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config_cls, trainer_cls = trl_alp.ALPConfig, trl_alp.ALPGRPOTrainer

    def quick_config(**kwargs):
        kwargs = {**QUICK, **kwargs, "output_dir": str(tmp_path / kwargs.get("output_dir", "out"))}
        kwargs["max_steps"] = min(kwargs.get("max_steps", 1), 1)
        return config_cls(**kwargs)

    def quick_trainer(model, *args, **kwargs):
        return trainer_cls(str(folder) if isinstance(model, str) else model, *args, **kwargs)

    monkeypatch.setattr(trl_alp, "ALPConfig", quick_config)
    monkeypatch.setattr(trl_alp, "ALPGRPOTrainer", quick_trainer)
    monkeypatch.chdir(tmp_path)
    rows = arithmetic_dataset(8)  # the README's my_data.jsonl: chat prompts and answers
    (tmp_path / "my_data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    return {"my_reward": correctness_reward, "dataset": arithmetic_dataset(8), "lora_config": lora}


@pytest.mark.parametrize("block", CASES)
def test_doc_example_runs(block, quick):
    exec(block, dict(quick, __name__="__doc_example__"))
