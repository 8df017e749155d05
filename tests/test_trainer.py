"""End-to-end behaviour of ALPGRPOTrainer on a tiny in-code model (CPU, a few steps each)."""

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file
from tiny_setup import last_logged
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

import trl_alp.perturbation as perturbation_module
from trl_alp import ALPGRPOTrainer
from trl_alp.experiments.models import build_tiny_model
from trl_alp.logps import LogpsCall


def _hooks(trainer):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m, _ in trainer.alp_perturbation._sites)


def test_train_updates_sigma_and_logs_alp_metrics(make_trainer):
    trainer = make_trainer(max_steps=3)
    assert torch.allclose(trainer.alp_perturbation.sigma, torch.full((2,), 0.02))
    trainer.train()
    sigma = trainer.alp_perturbation.sigma
    assert sigma.shape == (2,) and torch.isfinite(sigma).all()
    assert not torch.allclose(sigma, torch.full((2,), 0.02))  # σ received gradients and stepped
    for key in (
        "alp/ratio/seq/q50",
        "alp/ratio/token/q99",
        "alp/mismatch/k3_kl",
        "alp/clip/dual",
        "alp/sigma/layer_1",
    ):
        assert math.isfinite(last_logged(trainer, key))
    assert last_logged(trainer, "alp/sigma/layer_0") == pytest.approx(
        trainer.alp_perturbation.sigma[0].item(), rel=0.05
    )
    assert _hooks(trainer) == 0  # nothing left on the model after train()


def test_sigma_is_not_a_model_parameter_and_has_its_own_group(make_trainer):
    trainer = make_trainer(max_steps=1, alp_sigma_learning_rate=0.05)
    trainer.train()
    names = [name for name, _ in trainer.model.named_parameters()]  # what vLLM weight sync iterates
    assert not any("sigma" in name for name in names)
    groups = [
        g for g in trainer.optimizer.param_groups if any(p is trainer.alp_perturbation.log_sigma for p in g["params"])
    ]
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.01 and len(groups[0]["params"]) == 1


def test_noise_only_in_the_loss_forward_once_per_layer_per_micro_step(make_trainer, monkeypatch):
    calls = []
    original = perturbation_module.add_seeded_noise

    def spy(*args):
        calls.append((torch.is_grad_enabled(), trainer._in_loss))
        return original(*args)

    monkeypatch.setattr(perturbation_module, "add_seeded_noise", spy)
    trainer = make_trainer(max_steps=2, gradient_accumulation_steps=2, steps_per_generation=2)
    trainer._in_loss = False
    compute_loss = trainer._compute_loss

    def flagged(model, inputs):
        trainer._in_loss = True
        try:
            return compute_loss(model, inputs)
        finally:
            trainer._in_loss = False

    trainer._compute_loss = flagged
    trainer.train()
    # layers x micro-steps x optimizer steps in the loss forward; generation and no-grad passes never perturbed. Where
    # transformers re-runs the layers' hooks when checkpointing recomputes them in backward (5.17; 5.24 does not),
    # each layer is perturbed once more, with grad enabled and the same noise (test_perturbation.py checks that).
    assert sum(in_loss for _, in_loss in calls) == 2 * 2 * 2
    assert all(grad for grad, _ in calls)
    assert len(calls) in (2 * 2 * 2, 2 * 2 * 2 * 2)


def test_bypass_at_step_zero_has_unit_ratio(make_trainer):
    """No noise, fp32, no update yet: the training log-probs must equal the captured rollout log-probs."""
    trainer = make_trainer(max_steps=1, correction="seq-bypass", learning_rate=0.0)
    assert trainer.alp_perturbation.layer_indices == []
    trainer.train()
    assert last_logged(trainer, "alp/ratio/token/min") == pytest.approx(1.0, abs=1e-4)
    assert last_logged(trainer, "alp/ratio/token/max") == pytest.approx(1.0, abs=1e-4)
    assert last_logged(trainer, "alp/mismatch/k3_kl") == pytest.approx(0.0, abs=1e-6)


def test_alp_noise_moves_the_ratio_away_from_one(make_trainer):
    trainer = make_trainer(max_steps=1, alp_init_sigma=0.5, learning_rate=0.0)
    trainer.train()
    assert last_logged(trainer, "alp/mismatch/abs_logp_diff") > 1e-3


def test_layers_none_is_bypass(make_trainer):
    trainer = make_trainer(max_steps=1, alp_layers="none")
    assert trainer.alp_perturbation.layer_indices == []
    assert not trainer.alp_perturbation.log_sigma.requires_grad


def test_frozen_sigma_does_not_move(make_trainer):
    trainer = make_trainer(max_steps=2, alp_learn_sigma=False)
    trainer.train()
    torch.testing.assert_close(trainer.alp_perturbation.sigma, torch.full((2,), 0.02))


@pytest.mark.parametrize("gradient_checkpointing", [True, False])
def test_lora_with_and_without_gradient_checkpointing(make_trainer, gradient_checkpointing):
    from peft import LoraConfig

    trainer = make_trainer(
        max_steps=2,
        gradient_checkpointing=gradient_checkpointing,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the adapter trained
    assert not torch.allclose(trainer.alp_perturbation.sigma, torch.full((2,), 0.02))


def test_old_logprob_pass_is_skipped_with_num_iterations_and_staleness(make_trainer):
    """With num_iterations=2 TRL computes old log-probs (an extra no-grad forward); ALP does not need them."""
    trainer = make_trainer(max_steps=4, num_iterations=2, steps_per_generation=2, gradient_accumulation_steps=1)
    forwards = []
    original = ALPGRPOTrainer._get_per_token_logps_and_entropies

    def counting(self, model, *args, **kwargs):
        out = original(self, model, *args, **kwargs)
        if out[0] is not None:
            forwards.append(torch.is_grad_enabled())
        return out

    trainer._get_per_token_logps_and_entropies = counting.__get__(trainer)
    trainer.train()
    assert forwards == [True] * 4  # only the loss forwards, one per micro-step
    assert math.isfinite(last_logged(trainer, "alp/ratio/seq/max"))


def test_grpo_trainer_does_the_old_pass_in_the_same_setting(make_trainer):
    """Guards the previous test: TRL itself *does* run the extra pass there, so skipping it is a real saving."""
    trainer = make_trainer(
        trainer_cls=GRPOTrainer, config_cls=GRPOConfig, max_steps=2, num_iterations=2, steps_per_generation=2
    )
    calls = []
    original = GRPOTrainer._get_per_token_logps_and_entropies
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (
        calls.append(torch.is_grad_enabled()) or original(trainer, *a, **k)
    )
    trainer.train()
    assert calls.count(False) >= 1


def test_old_pass_skip_spares_the_reference_pass(make_trainer):
    """The skip targets TRL's old pass itself: a reference pass (PEFT adapter disabled) is never swallowed, whatever
    the order TRL runs them in."""
    from peft import LoraConfig
    from trl.trainer.utils import use_adapter

    trainer = make_trainer(max_steps=1, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.tensor([[5, 6, 7, 8]])
    args = (ids, torch.ones_like(ids), 2)
    with torch.no_grad(), trainer._alp_logps_call(LogpsCall(skip_old=True)) as call:
        with use_adapter(trainer.accelerator.unwrap_model(trainer.model), adapter_name=None):
            ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, *args)
        assert ref is not None and call.skip_old  # the reference ran and the skip is still armed
        old, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, *args)
        assert old is None and not call.skip_old  # the old pass is skipped, once
        again, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, *args)
    assert again is not None
    with trainer._alp_logps_call(LogpsCall(skip_old=True)):
        grad, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, *args)  # a loss forward (grad enabled)
    assert grad is not None
    assert trainer._alp_call == LogpsCall()  # each call site's state is gone with its context


@pytest.mark.parametrize("staleness", [dict(num_iterations=2), dict(steps_per_generation=2)])
@pytest.mark.parametrize("lora", [False, True])
def test_beta_with_staleness_keeps_the_reference_and_skips_the_old_pass(
    make_trainer, tokenizer, tmp_path, staleness, lora
):
    from peft import LoraConfig

    model = build_tiny_model(tokenizer)
    model.save_pretrained(tmp_path / "base")  # TRL rebuilds the reference model from the config's path
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft = LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if lora else None
    trainer = make_trainer(model=model, peft_config=peft, max_steps=2, beta=0.1, **staleness)
    seen = []
    compute_loss = trainer._compute_loss

    def spy(model, inputs):
        seen.append(inputs)
        return compute_loss(model, inputs)

    trainer._compute_loss = spy
    trainer.train()
    assert len(seen) == 2
    for inputs in seen:
        assert "old_per_token_logps" not in inputs  # ALP does not need it
        ref = inputs["ref_per_token_logps"]
        assert ref.shape == inputs["completion_ids"].shape and torch.isfinite(ref).all()
    assert math.isfinite(last_logged(trainer, "kl")) and last_logged(trainer, "kl") >= 0


def test_checkpoint_resume_restores_sigma_and_matches_an_uninterrupted_run(make_trainer, tmp_path):
    full = make_trainer(max_steps=2, save_strategy="steps", save_steps=1, output_dir=str(tmp_path / "a"))
    full.train()
    saved = json.loads((tmp_path / "a" / "checkpoint-1" / "alp_state.json").read_text())
    assert saved["layer_indices"] == [0, 1]
    assert saved["sigma"] != [0.02, 0.02]

    resumed = make_trainer(max_steps=2, output_dir=str(tmp_path / "b"))
    loaded = []
    original = resumed._load_optimizer_and_scheduler

    def spy(checkpoint):
        original(checkpoint)
        loaded.append(resumed.alp_perturbation.log_sigma.detach().clone())

    resumed._load_optimizer_and_scheduler = spy
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    torch.testing.assert_close(loaded[0], torch.tensor(saved["log_sigma"]))

    # Same σ, same data, same noise coordinates: the resumed step is the uninterrupted one, to the last bit.
    def step2(trainer, key):
        return next(h[key] for h in trainer.state.log_history if h.get("step") == 2 and key in h)

    for key in ("loss", "alp/ratio/seq/q50", "alp/mismatch/k3_kl"):
        assert step2(resumed, key) == step2(full, key), key
    torch.testing.assert_close(resumed.alp_perturbation.log_sigma, full.alp_perturbation.log_sigma)


def test_alp_state_stores_the_whole_perturbation_setup(make_trainer, tmp_path):
    trainer = make_trainer(max_steps=1, alp_relative_sigma=True)
    trainer.save_model(str(tmp_path / "out"))
    state = json.loads((tmp_path / "out" / "alp_state.json").read_text())
    assert {k: state[k] for k in ("format_version", "layers_path", "layer_indices", "labels", "relative")} == {
        "format_version": 2,
        "layers_path": "model.layers",
        "layer_indices": [0, 1],
        "labels": ["0", "1"],
        "relative": True,
    }


def test_model_card_cites_alp_and_describes_the_run(make_trainer, tmp_path):
    trainer = make_trainer(max_steps=1, alp_init_sigma=0.05)
    trainer.save_model(str(tmp_path / "out"))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Adaptive Layerwise Perturbation: Unifying Off-Policy Corrections for LLM RL" in card
    assert "2603.19470" in card and "DeepSeekMath" not in card  # not GRPOTrainer's citation
    # the authors, as the authors' repository (amazon-science/adaptive-layerwise-perturbation) and arXiv list them
    assert "author       = {Chenlu Ye and Xuanchang Zhang and Yifan Hao and Zhou Yu and Ziji Zhang and " in card
    assert "Abhinav Gullapalli and Hao Chen and Jing Huang and Tong Zhang}" in card
    assert "## ALP settings" in card and "`seq-alp`" in card and "| initial σ₀ | `0.05` |" in card
    assert "`alp_state.json`" in card and "`log_sigma`" in card


@pytest.mark.parametrize(
    ("saved", "resumed", "differs"),
    [
        ({"alp_layers": "logits"}, {"alp_layers": "none"}, "labels: checkpoint ['final'], this run []"),
        ({"alp_layers": "logits"}, {"alp_layers": "all"}, "layer_indices: checkpoint [], this run [0, 1]"),
        ({"alp_relative_sigma": True}, {}, "relative: checkpoint True, this run False"),
        ({}, {"correction": "seq-bypass"}, "layers_path: checkpoint 'model.layers', this run None"),
    ],
)
def test_resume_refuses_another_perturbation_setup(make_trainer, tmp_path, saved, resumed, differs):
    first = make_trainer(max_steps=1, save_strategy="steps", save_steps=1, output_dir=str(tmp_path / "a"), **saved)
    first.train()
    second = make_trainer(max_steps=2, output_dir=str(tmp_path / "b"), **resumed)
    with pytest.raises(ValueError, match="another ALP perturbation setup") as error:
        second.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-1"))
    assert differs in str(error.value)


def test_version_1_state_loads_when_the_layers_match(make_trainer):
    trainer = make_trainer(max_steps=1)
    trainer.load_alp_state({"layer_indices": [0, 1], "log_sigma": [-3.0, -4.0], "sigma": [0.05, 0.02]})
    torch.testing.assert_close(trainer.alp_perturbation.log_sigma.detach(), torch.tensor([-3.0, -4.0]))
    with pytest.raises(ValueError, match="layer_indices: checkpoint \\[1\\], this run \\[0, 1\\]"):
        trainer.load_alp_state({"layer_indices": [1], "log_sigma": [-3.0]})
    with pytest.raises(ValueError, match="format_version 3"):
        trainer.load_alp_state({"format_version": 3, "log_sigma": [-3.0, -4.0]})


def test_saved_model_has_exactly_the_base_keys(make_trainer, tokenizer, tmp_path):
    base_keys = set(build_tiny_model(tokenizer).state_dict())
    trainer = make_trainer(max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    saved_keys = set(load_file(str(tmp_path / "final" / "model.safetensors")))
    tied = {k for k in base_keys - saved_keys if k == "lm_head.weight"}  # tied embeddings are stored once
    assert saved_keys == base_keys - tied
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final"))
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(reloaded(ids).logits, trainer.model.cpu()(ids).logits)
    state = json.loads((tmp_path / "final" / "alp_state.json").read_text())
    assert len(state["sigma"]) == 2


def test_hooks_removed_when_training_raises(make_trainer):
    trainer = make_trainer(max_steps=2)

    def boom(*args, **kwargs):
        assert _hooks(trainer) == 2  # hooks are live inside the step
        raise RuntimeError("boom")

    trainer._compute_loss = boom
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert _hooks(trainer) == 0


# Every loss type under token-alp: test_trl_parity.py's test_token_alp_is_trl_token_level_on_the_same_perturbed_forward
# (the loss and the gradients equal TRL's own `_compute_loss` on the same batch and the same noise).


def _completion_logps_by_hand(model, inputs, temperature):
    """log π of each completion token: one plain forward over prompt + completion, logits divided by temperature."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    width = inputs["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -width - 1 : -1].float() / temperature
    return logits.log_softmax(-1).gather(-1, inputs["completion_ids"].unsqueeze(-1)).squeeze(-1)


def test_beta_kl_is_logged(make_trainer, tmp_path, tokenizer):
    """beta > 0: the logged `kl` of each step is the masked mean of k3 = e^(ref − π) − (ref − π) − 1 over its loss
    batch, with π and the reference log-probs computed here by hand (the reference from its own copy of the initial
    weights). seq-bypass perturbs nothing, so the loss forward is the plain one."""
    model = build_tiny_model(tokenizer)
    model.save_pretrained(tmp_path / "base")  # TRL rebuilds the reference model from the config's path
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    trainer = make_trainer(model=model, max_steps=3, beta=0.1, correction="seq-bypass")
    expected = []
    compute_loss = trainer._compute_loss

    def spy(model, inputs):
        with torch.no_grad():
            policy = _completion_logps_by_hand(model, inputs, trainer.args.temperature)
            ref = _completion_logps_by_hand(reference, inputs, trainer.args.temperature)
        mask = inputs["completion_mask"].float()
        k3 = torch.exp(ref - policy) - (ref - policy) - 1
        expected.append(((k3 * mask).sum() / mask.sum()).item())
        return compute_loss(model, inputs)

    trainer._compute_loss = spy
    trainer.train()
    logged = [h["kl"] for h in trainer.state.log_history if "kl" in h]  # one loss batch per step
    assert len(expected) == 3 and logged == pytest.approx(expected, rel=1e-4, abs=1e-9)
    assert expected[0] == pytest.approx(0.0, abs=1e-9)  # step 1: the policy is still the reference
    assert min(expected[1:]) > 1e-6  # then the policy moves away: the agreement is not 0 == 0


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"alp_layers": "0-5"}, r"selects layers \[2, 3, 4, 5\]"),
        ({"alp_layers_path": "model.blocks"}, "alp_layers_path='model.blocks'"),
    ],
)
def test_trainer_rejects_what_the_model_cannot_honour(make_trainer, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(**overrides)


def test_relative_sigma_on_a_model_without_known_layers(make_trainer, tokenizer):
    model = build_tiny_model(tokenizer)
    model.model.blocks = model.model.layers  # an unknown layout: no container at any known path
    del model.model.layers
    with pytest.raises(ValueError, match="Could not find the decoder layers.*alp_layers_path"):
        make_trainer(model=model, alp_relative_sigma=True)


def test_layer_list_selection(make_trainer, tokenizer):
    trainer = make_trainer(model=build_tiny_model(tokenizer, num_layers=4), alp_layers=[3, 1])
    assert trainer.alp_perturbation.layer_indices == [1, 3]


def test_truncated_sampling_warns_only_without_the_support_replay(make_trainer, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_alp"):
        make_trainer(max_steps=1, top_p=0.9)
    assert "top_p" not in caplog.text  # replayed: exact, nothing to warn about (see test_support.py)
    with caplog.at_level(logging.WARNING, logger="trl_alp"):
        make_trainer(max_steps=1, top_p=0.9, alp_replay_support=False)
    assert "alp_replay_support=False with top_k/top_p/min_p" in caplog.text


def test_ratio_metrics_of_long_divergent_sequences(make_trainer):
    """The per-sequence mean log-ratio (log-ppl difference) is taken before the ±20 clamp of the sequence sum."""
    trainer = make_trainer(max_steps=1)
    logps, rollout, mask = torch.zeros(2, 30), torch.full((2, 30), -1.0), torch.ones(2, 30)
    trainer.alp_metrics.log_ratio("train", "probe", logps, rollout, mask)
    metrics = trainer._metrics["train"]
    assert metrics["probe/mismatch/log_ppl_diff"] == [pytest.approx(-1.0)]  # not -20/30
    assert metrics["probe/ratio/seq/max"] == [pytest.approx(math.exp(20.0), rel=1e-5)]  # the sum is clamped
    assert metrics["probe/ratio/token/q50"] == [pytest.approx(math.e, rel=1e-5)]
