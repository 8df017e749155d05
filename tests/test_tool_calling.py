"""Multi-turn tool calling under ALP, through TRL's own tool loop, on the generate path and the vLLM path.

The tiny model's first turn is scripted to emit a calculator call (a logits processor forces the tokens after the
log-prob recorder has seen the model's own scores); TRL parses it with the Qwen2.5 response parser, runs the tool,
appends the result and generates the next turn from the model.
"""

from importlib.resources import files

import pytest
import torch
from datasets import Dataset
from doc_blocks import doc_block
from engines import StandInVLLM, script_generation
from tiny_setup import PROMPT_ROWS, TRAINER_SETTINGS, last_logged

from trl_alp import ALPConfig, ALPGRPOTrainer
from trl_alp.cli.main import main
from trl_alp.experiments.models import build_tiny_model, build_tool_tokenizer
from trl_alp.tasks import calculator

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "3 + 4"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tool_tokenizer():
    return build_tool_tokenizer()


def content_reward(completions, **kwargs):
    """Spread inside each group from the text of every message (tool-call turns have no content)."""
    return [float(sum(len(m.get("content") or "") for m in c) % 5) for c in completions]


def make_tool_trainer(tokenizer, tmp_path, mode="first", tools=(calculator,), environment_factory=None, **overrides):
    model = build_tiny_model(tokenizer, max_position_embeddings=512)
    script = tokenizer(CALL, add_special_tokens=False)["input_ids"]
    script_generation(model, script, tokenizer.eos_token_id, mode)
    settings = dict(TRAINER_SETTINGS, output_dir=str(tmp_path / "run"), max_steps=1, learning_rate=0.0)
    settings.update(max_completion_length=96, correction="token-bypass")
    settings.update(overrides)
    trainer = ALPGRPOTrainer(
        model=model,
        reward_funcs=content_reward,
        args=ALPConfig(**settings),
        train_dataset=Dataset.from_list(PROMPT_ROWS[:8]),
        processing_class=tokenizer,
        tools=None if environment_factory else list(tools),
        environment_factory=environment_factory,
    )
    trainer.script_length = len(script) + 1  # the call and its EOS
    trainer.seen = []
    compute_loss = trainer._compute_loss

    def recording(model, inputs):
        trainer.seen.append(inputs)
        return compute_loss(model, inputs)

    trainer._compute_loss = recording
    return trainer


def segments(row_mask: list[int], row_tool_mask: list[int]) -> list[tuple[int, int]]:
    """``(is_model_tokens, length)`` runs of a completion's tool mask."""
    runs: list[tuple[int, int]] = []
    for valid, model_token in zip(row_mask, row_tool_mask, strict=True):
        if not valid:
            break
        if runs and runs[-1][0] == model_token:
            runs[-1] = (model_token, runs[-1][1] + 1)
        else:
            runs.append((model_token, 1))
    return runs


def assert_rollout_logps_are_the_models_on_every_turn(trainer):
    """Aligned token by token with completion_ids: the recorded log-probs equal a clean forward's on every
    model-generated token of every turn; tool-output tokens carry 0 (so they must stay out of any ratio)."""
    for batch in trainer.seen:
        with torch.no_grad():
            clean, _, _ = trainer._alp_completion_logps(trainer.model, batch)
        rollout, valid = batch["sampling_per_token_logps"], batch["completion_mask"].bool()
        generated, tool = valid & batch["tool_mask"].bool(), valid & ~batch["tool_mask"].bool()
        assert tool.any(), "no tool result in the completions"
        assert (rollout[generated] - clean[generated]).abs().max() < 1e-4
        assert (rollout[tool] == 0).all() and (clean[tool] < -1e-3).all()


def assert_ratio_is_one(trainer):
    for level in ("token", "seq"):
        assert last_logged(trainer, f"alp/ratio/{level}/min") == pytest.approx(1.0, abs=1e-4)
        assert last_logged(trainer, f"alp/ratio/{level}/max") == pytest.approx(1.0, abs=1e-4)


def test_generate_path_ratio_is_one_on_every_turn_and_last_turn_truncated(tool_tokenizer, tmp_path):
    trainer = make_tool_trainer(tool_tokenizer, tmp_path)
    trainer.train()
    assert last_logged(trainer, "tools/call_frequency") == 1.0
    assert last_logged(trainer, "tools/failure_frequency") == 0.0
    for batch in trainer.seen:
        for mask, tool_mask in zip(batch["completion_mask"].tolist(), batch["tool_mask"].tolist(), strict=True):
            runs = segments(mask, tool_mask)
            assert [kind for kind, _ in runs] == [1, 0, 1]  # call, tool result, next turn
            assert runs[0][1] == trainer.script_length
            # TRL cuts the last turn at max_completion_length (the random model rarely ends it itself)
            assert sum(n for _, n in runs) <= 96
        assert (batch["completion_mask"].sum(-1) == 96).any()
    assert_rollout_logps_are_the_models_on_every_turn(trainer)
    assert_ratio_is_one(trainer)


def test_vllm_path_ratio_is_one_on_every_turn(tool_tokenizer, tmp_path, monkeypatch):
    import trl.trainer.grpo_trainer as grpo_module

    monkeypatch.setattr(grpo_module, "VLLMGeneration", StandInVLLM)
    monkeypatch.setattr(StandInVLLM, "shift", 0.0)
    trainer = make_tool_trainer(tool_tokenizer, tmp_path, use_vllm=True, vllm_mode="colocate")
    trainer.train()
    assert trainer.use_vllm and last_logged(trainer, "tools/call_frequency") == 1.0
    assert_rollout_logps_are_the_models_on_every_turn(trainer)
    assert_ratio_is_one(trainer)


def test_grpo_diagnostics_exclude_tool_tokens(tool_tokenizer, tmp_path):
    """TRL's own loss (correction="grpo"): the alp/* diagnostics still use completion_mask * tool_mask."""
    trainer = make_tool_trainer(tool_tokenizer, tmp_path, correction="grpo")
    trainer.train()
    assert_rollout_logps_are_the_models_on_every_turn(trainer)
    assert_ratio_is_one(trainer)


class CalculatorEnv:
    """An environment whose method is the tool."""

    def reset(self, **kwargs):
        self.calls = 0

    def calculator(self, expression: str) -> str:
        """Evaluate an arithmetic expression.

        Args:
            expression: The expression to evaluate, e.g. "3 + 4".
        """
        self.calls += 1
        return calculator(expression)


def test_environment_factory_ratio_is_one_on_every_turn(tool_tokenizer, tmp_path):
    trainer = make_tool_trainer(tool_tokenizer, tmp_path, environment_factory=CalculatorEnv)
    trainer.train()
    assert last_logged(trainer, "tools/call_frequency") == 1.0
    assert_rollout_logps_are_the_models_on_every_turn(trainer)
    assert_ratio_is_one(trainer)


def test_a_tool_that_raises_is_reported_to_the_model(tool_tokenizer, tmp_path):
    def calculator(expression: str) -> str:  # same name as the scripted call
        """Always fails.

        Args:
            expression: Ignored.
        """
        raise ZeroDivisionError("the calculator is broken")

    trainer = make_tool_trainer(tool_tokenizer, tmp_path, tools=(calculator,))
    trainer.train()
    assert last_logged(trainer, "tools/failure_frequency") == 1.0
    text = tool_tokenizer.decode(trainer.seen[0]["completion_ids"][0])
    assert "the calculator is broken" in text  # TRL returns {"error": ...} as the tool message
    assert_rollout_logps_are_the_models_on_every_turn(trainer)
    assert_ratio_is_one(trainer)


def test_turn_limit_stops_executing_tools(tool_tokenizer, tmp_path):
    """Every turn calls the tool; with max_tool_calling_iterations=1 the second call is generated but not run."""
    trainer = make_tool_trainer(
        tool_tokenizer, tmp_path, mode="always", max_tool_calling_iterations=1, max_completion_length=160
    )
    trainer.train()
    assert last_logged(trainer, "tools/call_frequency") == 1.0
    for batch in trainer.seen:
        for mask, tool_mask in zip(batch["completion_mask"].tolist(), batch["tool_mask"].tolist(), strict=True):
            runs = segments(mask, tool_mask)
            assert [kind for kind, _ in runs] == [1, 0, 1]
            assert runs[0][1] == runs[2][1] == trainer.script_length  # the second call, unexecuted, ends the rollout
    assert_rollout_logps_are_the_models_on_every_turn(trainer)
    assert_ratio_is_one(trainer)


def test_noise_is_in_the_loss_forward_of_every_turn_never_in_generation(tool_tokenizer, tmp_path):
    trainer = make_tool_trainer(
        tool_tokenizer, tmp_path, correction="token-alp", alp_init_sigma=0.5, alp_log_unperturbed_ratio=True
    )
    trainer.train()
    assert_rollout_logps_are_the_models_on_every_turn(trainer)  # generated without noise, turn after turn
    assert last_logged(trainer, "alp/unperturbed/ratio/token/min") == pytest.approx(1.0, abs=1e-4)
    assert last_logged(trainer, "alp/unperturbed/ratio/token/max") == pytest.approx(1.0, abs=1e-4)
    perturbed = last_logged(trainer, "alp/ratio/token/min"), last_logged(trainer, "alp/ratio/token/max")
    assert perturbed[0] < 0.99 or perturbed[1] > 1.01


def test_masked_truncated_completions_give_a_finite_zero_loss(tool_tokenizer, tmp_path):
    """TRL's mask_truncated_completions drops every rollout whose last turn hit the budget (here all of them)."""
    trainer = make_tool_trainer(tool_tokenizer, tmp_path, mask_truncated_completions=True, max_completion_length=64)
    trainer.train()
    for batch in trainer.seen:
        truncated = batch["completion_mask"].sum(-1) == 0
        assert truncated.all()
    assert last_logged(trainer, "policy_loss") == 0.0
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))


def test_docs_tools_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(doc_block("tools"), {})
    assert (tmp_path / "runs" / "tools").is_dir()


def test_cli_tool_recipe_trains_with_the_calculator(tmp_path, monkeypatch):
    """The docs' `trl-alp train --config trl_alp/configs/tiny_tool_use.yaml`, one step."""
    from trl_alp.trainer import ALPGRPOTrainer

    seen, train = {}, ALPGRPOTrainer.train

    def recording(self, *args, **kwargs):
        seen["tools"], seen["args"] = self.tools, self.args
        return train(self, *args, **kwargs)

    monkeypatch.setattr(ALPGRPOTrainer, "train", recording)
    recipe = str(files("trl_alp") / "configs" / "tiny_tool_use.yaml")
    assert main(["train", "--config", recipe, "--max_steps", "1", "--output_dir", str(tmp_path / "o")]) == 0
    assert seen["tools"] == [calculator]
    assert seen["args"].alp_recipe == "paper-multi-turn" and seen["args"].alp_init_sigma == 1e-6
    assert seen["args"].learning_rate == 1e-3  # the YAML's value beats the preset's
    assert (tmp_path / "o" / "alp_state.json").exists()


def test_cli_tools_split_on_commas_and_bad_tools_fail_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--model_name_or_path", "tiny", "--bf16", "false", "--use_cpu", "true", "--report_to", "none"]
    assert main([*argv, "--tools", "trl_alp.tasks:calculator,no.such.module:tool"]) == 2
    assert "cannot import tool 'no.such.module:tool': no module named 'no'" in capsys.readouterr().err
    assert main([*argv, "--tools", "trl_alp.tasks:no_such_tool"]) == 2
    error = capsys.readouterr().err
    assert "cannot import tool 'trl_alp.tasks:no_such_tool': module 'trl_alp.tasks' has no function" in error
    assert main([*argv, "--tools", "calculator"]) == 2
    assert "tool 'calculator': use 'package.module:function'" in capsys.readouterr().err


def test_truncated_sampling_replays_the_support_on_every_model_turn(tool_tokenizer, tmp_path):
    """top_p: every model-generated token of every turn carries its support, tool output none; the rollout log-probs
    are the replayed clean forward's and the ratio is 1."""
    vocab = len(tool_tokenizer)
    trainer = make_tool_trainer(tool_tokenizer, tmp_path, top_p=0.95, alp_support_max_tokens=vocab)
    trainer.train()
    assert last_logged(trainer, "tools/call_frequency") == 1.0
    assert last_logged(trainer, "alp/support/truncated_frac") == 0.0
    for batch in trainer.seen:
        valid, counts = batch["completion_mask"].bool(), batch["alp_support_counts"]
        generated, tool = valid & batch["tool_mask"].bool(), valid & ~batch["tool_mask"].bool()
        assert tool.any() and (counts[tool] == 0).all() and (counts[generated] > 0).all()
        with torch.no_grad():
            replayed, _, _ = trainer._alp_completion_logps(trainer.model, batch)
        rollout = batch["sampling_per_token_logps"]
        sampled = generated & torch.isfinite(rollout)  # a scripted token outside top-p has no rollout log-prob
        assert sampled.sum() > generated.sum() // 2
        assert (rollout[sampled] - replayed[sampled]).abs().max() < 1e-4
    assert_ratio_is_one(trainer)
