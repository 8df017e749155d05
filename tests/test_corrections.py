"""Each correction mode and ablation shows its defining behaviour on a tiny model; mismatch tools."""

import math

import pytest
import torch
from tiny_setup import last_logged

import trl_alp.perturbation as perturbation_module
from trl_alp import CORRECTIONS
from trl_alp.experiments.models import build_tiny_model
from trl_alp.perturbation import LayerPerturbation, add_seeded_noise, find_decoder_layers
from trl_alp.rollout import fake_quantize, quantized_weights, rollout_engine


@pytest.fixture
def noise_calls(monkeypatch):
    """Records the layer coordinate of every noise application."""
    calls = []
    original = perturbation_module.noise_seed

    def spy(seed, step, micro_step, layer, rank):
        calls.append(layer)
        return original(seed, step, micro_step, layer, rank)

    monkeypatch.setattr(perturbation_module, "noise_seed", spy)
    return calls


@pytest.mark.parametrize("correction", sorted(CORRECTIONS))
def test_every_correction_trains_and_logs_diagnostics(make_trainer, correction):
    trainer = make_trainer(max_steps=2, correction=correction, num_iterations=2)
    trainer.train()
    assert math.isfinite(last_logged(trainer, "loss"))
    for key in ("alp/ratio/seq/q98", "alp/ratio/token/chi2", "alp/ratio/seq/ess", "alp/mismatch/k1_kl"):
        assert math.isfinite(last_logged(trainer, key)), key
    family = CORRECTIONS[correction].family
    if family in ("tis", "mis"):
        assert 0.0 <= last_logged(trainer, f"alp/is/{'truncated' if family == 'tis' else 'masked'}_frac") <= 1.0


def test_bypass_leaves_the_forward_untouched(make_trainer, noise_calls):
    trainer = make_trainer(max_steps=1, correction="seq-bypass", alp_layers="all")
    trainer.train()
    assert noise_calls == [] and trainer.alp_perturbation.labels == []


def test_grpo_mode_runs_trls_loss(make_trainer, noise_calls, monkeypatch):
    from trl import GRPOTrainer

    trainer = make_trainer(max_steps=1, correction="grpo", epsilon=0.2, delta=3.0)  # TRL's own fields apply
    calls = []
    original = GRPOTrainer._compute_loss
    monkeypatch.setattr(GRPOTrainer, "_compute_loss", lambda self, m, i: calls.append(1) or original(self, m, i))
    trainer.train()
    assert calls and noise_calls == []
    assert "alp/ratio/seq/q50" in trainer.state.log_history[0]


def test_late_third_perturbs_only_those_layers(make_trainer, tokenizer, noise_calls):
    trainer = make_trainer(model=build_tiny_model(tokenizer, num_layers=6), max_steps=1, alp_layers="late")
    assert trainer.alp_perturbation.layer_indices == [4, 5]
    trainer.train()
    assert sorted(set(noise_calls)) == [4, 5]
    assert (
        "alp/sigma/layer_4" in trainer.state.log_history[0] and "alp/sigma/layer_0" not in trainer.state.log_history[0]
    )


def test_logits_only_touches_no_decoder_layer(make_trainer, noise_calls):
    trainer = make_trainer(max_steps=1, alp_layers="logits", alp_init_sigma=0.5, learning_rate=0.0)
    assert trainer.alp_perturbation.layer_indices == [] and trainer.alp_perturbation.labels == ["final"]
    trainer.train()
    assert noise_calls == [-1]  # one application per micro-step, on the final hidden state only
    assert last_logged(trainer, "alp/mismatch/abs_logp_diff") > 1e-3  # and it does change the numerator
    assert not torch.allclose(trainer.alp_perturbation.sigma, torch.tensor([0.5]))  # σ_final learns (lr is its own)


def test_logits_combined_with_layers_is_rejected(make_trainer):
    with pytest.raises(ValueError, match="cannot be combined"):
        make_trainer(alp_layers="logits,0")


def test_relative_sigma_scales_noise_with_hidden_rms(tokenizer):
    hidden = torch.randn(1, 3, 16)
    sigma = torch.tensor([0.1])
    small = add_seeded_noise(hidden, sigma, 7, perturbation_module.hidden_rms(hidden)) - hidden
    large = add_seeded_noise(10 * hidden, sigma, 7, perturbation_module.hidden_rms(10 * hidden)) - 10 * hidden
    torch.testing.assert_close(large, 10 * small)
    absolute = add_seeded_noise(10 * hidden, sigma, 7) - 10 * hidden
    torch.testing.assert_close(absolute, add_seeded_noise(hidden, sigma, 7) - hidden)

    model = build_tiny_model(tokenizer)
    _, layers = find_decoder_layers(model)
    relative = LayerPerturbation(layers, [0], relative=True)
    with relative.active(0, 0):
        model(torch.tensor([[5, 6, 7]])).logits.sum().backward()
    assert relative.log_sigma.grad is not None and relative.log_sigma.grad.abs().item() > 0


def test_unperturbed_ratio_is_logged_beside_the_perturbed_one(make_trainer):
    trainer = make_trainer(max_steps=1, alp_init_sigma=0.5, learning_rate=0.0, alp_log_unperturbed_ratio=True)
    trainer.train()
    # Before any update, the clean policy equals the rollout policy; the noise is all the difference.
    assert last_logged(trainer, "alp/unperturbed/ratio/token/max") == pytest.approx(1.0, abs=1e-4)
    assert last_logged(trainer, "alp/unperturbed/mismatch/k3_kl") == pytest.approx(0.0, abs=1e-6)
    assert last_logged(trainer, "alp/mismatch/k3_kl") > 1e-4


def test_fake_quantize_error_and_restore(tokenizer):
    w = torch.randn(8, 32)
    q8 = fake_quantize(w, 8)
    assert (q8 - w).abs().max() <= w.abs().amax(-1, keepdim=True).max() / 127 / 2 + 1e-6
    assert len(torch.unique(fake_quantize(w, 4)[0])) <= 15
    model = build_tiny_model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError), quantized_weights(model, 4) as count:
        assert count > 0
        assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"])
        raise RuntimeError("restored anyway")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_rollout_engine_changes_the_sampling_distribution(tokenizer):
    model = build_tiny_model(tokenizer)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        clean = model(ids).logits
        with rollout_engine(model, "bfloat16"):
            bf16 = model(ids).logits
        with rollout_engine(model, None, 4):
            int4 = model(ids).logits
    assert bf16.dtype == torch.bfloat16 and 0 < (bf16.float() - clean).abs().max() < 0.5
    assert (int4 - clean).abs().max() > 0
    with pytest.raises(ValueError, match="alp_rollout_dtype"), rollout_engine(model, "int8"):
        pass


@pytest.mark.parametrize("engine", [{"alp_rollout_dtype": "bfloat16"}, {"alp_rollout_weight_bits": 4}])
def test_induced_mismatch_reaches_the_ratio(make_trainer, engine):
    """Bypass, no update yet: without an engine change the ratio is exactly 1 (see test_trainer); with one it is not."""
    trainer = make_trainer(max_steps=1, correction="seq-bypass", learning_rate=0.0, **engine)
    trainer.train()
    assert last_logged(trainer, "alp/mismatch/abs_logp_diff") > 1e-4
    assert abs(last_logged(trainer, "alp/ratio/seq/max") - 1) > 1e-4


@pytest.mark.parametrize("correction", ["seq-alp", "grpo"])
def test_evaluation_is_unperturbed_and_logged(make_trainer, prompt_dataset, noise_calls, correction):
    trainer = make_trainer(max_steps=1, correction=correction, per_device_eval_batch_size=4)
    metrics = trainer.evaluate(prompt_dataset.select(range(4)))
    assert noise_calls == []  # no noise in evaluation
    assert math.isfinite(metrics["eval_alp/ratio/seq/q50"]) and math.isfinite(metrics["eval_loss"])
