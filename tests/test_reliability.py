"""Numerical faults, interruptions and property tests of the ratio math."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tiny_setup import last_logged

from trl_alp import ALPGRPOTrainer
from trl_alp.experiments.models import build_tiny_model
from trl_alp.loss import aggregate_loss, alp_log_weights, clipped_surrogate, sequence_log_ratio


def _all_finite(trainer):
    params = [p for p in trainer.model.parameters()] + [trainer.alp_perturbation.log_sigma]
    return all(torch.isfinite(p).all() for p in params)


def _inject(monkeypatch, target, positions):
    """Make the rollout ('rollout') or the training ('numerator') log-probs non-finite at `positions`."""
    original = ALPGRPOTrainer._get_per_token_logps_and_entropies

    def faulty(self, model, *args, **kwargs):
        logps, entropies, aux = original(self, model, *args, **kwargs)
        if target == "numerator" and torch.is_grad_enabled():
            poison = torch.zeros_like(logps)
            for row, col, value in positions:
                poison[row, col] = value
            logps = logps + poison  # differentiable: the fault sits in the graph like a real one
        return logps, entropies, aux

    monkeypatch.setattr(ALPGRPOTrainer, "_get_per_token_logps_and_entropies", faulty)
    if target == "rollout":
        original_gen = ALPGRPOTrainer._generate_single_turn

        def faulty_gen(self, *args, **kwargs):
            ids, logps = original_gen(self, *args, **kwargs)
            for row, col, value in positions:
                if col < len(logps[row]):
                    logps[row][col] = value
            return ids, logps

        monkeypatch.setattr(ALPGRPOTrainer, "_generate_single_turn", faulty_gen)


@pytest.mark.parametrize("target", ["rollout", "numerator"])
@pytest.mark.parametrize("correction", ["seq-alp", "token-alp"])
def test_nonfinite_logprobs_are_counted_masked_and_never_propagate(make_trainer, monkeypatch, target, correction):
    _inject(monkeypatch, target, [(0, 0, float("nan")), (1, 1, float("inf")), (2, 0, -float("inf"))])
    trainer = make_trainer(max_steps=2, correction=correction)
    trainer.train()
    assert _all_finite(trainer)
    assert math.isfinite(last_logged(trainer, "loss"))
    counted = last_logged(trainer, f"alp/faults/{target}_nonfinite")
    assert counted >= 1  # (rows with a shorter completion may drop an injected position)
    other = "numerator" if target == "rollout" else "rollout"
    assert last_logged(trainer, f"alp/faults/{other}_nonfinite") == 0
    assert not torch.allclose(trainer.alp_perturbation.sigma, torch.full((2,), 0.02))  # σ still learns


def test_nonfinite_sigma_gradient_is_dropped(make_trainer):
    trainer = make_trainer(max_steps=2)
    from trl_alp.backends import SigmaGradCallback

    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SigmaGradCallback))
    original = callback.on_pre_optimizer_step

    def poison(*args, **kwargs):
        trainer.alp_perturbation.log_sigma.grad = torch.full((2,), float("nan"))
        return original(*args, **kwargs)

    callback.on_pre_optimizer_step = poison
    trainer.train()
    assert torch.isfinite(trainer.alp_perturbation.log_sigma).all()
    assert last_logged(trainer, "alp/faults/sigma_grad_nonfinite") == 1.0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "sapo", "cispo", "vespo"])
def test_all_masked_batch_gives_zero_loss(loss_type):
    per_token = torch.full((2, 3), float("nan")).nan_to_num(5.0)
    loss, _ = aggregate_loss(
        per_token, torch.zeros(2, 3), loss_type, num_items_in_batch=torch.tensor(0.0), max_completion_length=3
    )
    assert loss.item() == 0.0


@pytest.mark.parametrize(("dtype", "flags"), [(torch.bfloat16, {"bf16": True}), (torch.float16, {})])
def test_half_precision_training_keeps_sigma_in_fp32(make_trainer, tokenizer, dtype, flags):
    # fp16 *mixed precision* needs a GPU; on CPU the fp16 case trains an fp16 model directly.
    trainer = make_trainer(model=build_tiny_model(tokenizer).to(dtype), max_steps=2, **flags)
    trainer.train()
    log_sigma = trainer.alp_perturbation.log_sigma
    assert log_sigma.dtype == torch.float32 and torch.isfinite(log_sigma).all()
    assert not torch.allclose(trainer.alp_perturbation.sigma, torch.full((2,), 0.02))


def test_keyboard_interrupt_leaves_a_clean_model(make_trainer, tokenizer):
    trainer = make_trainer(max_steps=2)
    reference = build_tiny_model(tokenizer).eval()  # same seed: the same initial weights
    original = trainer._compute_loss

    def interrupted(model, inputs):
        original(model, inputs)  # the noisy forward has run
        raise KeyboardInterrupt

    trainer._compute_loss = interrupted
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    sites = trainer.alp_perturbation._sites
    assert all(len(m._forward_pre_hooks) == 0 and len(m._forward_hooks) == 0 for m, _ in sites)
    ids = torch.tensor([[5, 6, 7, 8]])
    model = trainer.model.eval()
    with torch.enable_grad():  # grad-enabled on purpose: the only mode in which hooks would add noise
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_rollout_func_without_logprobs_fails_clearly(make_trainer, tokenizer):
    def rollout_func(prompts, trainer):
        ids = [[5, 6]] * len(prompts)
        return {"prompt_ids": ids, "completion_ids": [[7, 8, tokenizer.eos_token_id]] * len(prompts), "logprobs": None}

    trainer = make_trainer(max_steps=1)
    trainer.rollout_func = rollout_func
    with pytest.raises(RuntimeError, match="needs the log-probs the rollout engine reported"):
        trainer.train()


# ----------------------------------------------------------------------------------------------- properties
logprob = st.floats(min_value=-1e4, max_value=0.0, allow_nan=False)
advantage = st.floats(min_value=-50.0, max_value=50.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(logprob, logprob), min_size=1, max_size=12),
    advantage,
    st.sampled_from(["token", "sequence", "geometric"]),
)
@example([(-108.0912095722324, 0.0)], 0.0, "sequence")  # once gave -20.000002: the value must be exactly clamped
def test_extreme_logprobs_give_finite_bounded_losses(pairs, adv, level):
    logps = torch.tensor([[p for p, _ in pairs]], dtype=torch.float32, requires_grad=True)
    rollout = torch.tensor([[q for _, q in pairs]], dtype=torch.float32)
    mask = torch.ones_like(rollout)
    log_w = alp_log_weights(logps, rollout, mask, level)
    assert torch.isfinite(log_w).all() and log_w.abs().max() <= 20.0
    loss, _ = clipped_surrogate(log_w, torch.tensor([adv]), 0.5, 3.0, dual_clip=10.0)
    assert torch.isfinite(loss).all()
    if adv > 0:  # the objective never credits more than the upper clip
        assert (loss >= -(1 + 3.0) * adv - 1e-3 * abs(adv)).all()
    if adv < 0:  # dual clip: the loss never exceeds c·|A|
        assert (loss <= 10.0 * -adv + 1e-3 * abs(adv)).all()
    loss.sum().backward()
    assert torch.isfinite(logps.grad).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=-2.0, max_value=2.0), min_size=1, max_size=8))
def test_sequence_value_is_the_product_of_token_ratios(deltas):
    logps = torch.tensor([deltas], dtype=torch.float64)
    rollout = torch.zeros_like(logps)
    mask = torch.ones_like(logps)
    token_ratios = torch.exp(alp_log_weights(logps, rollout, mask, "token"))
    seq = torch.exp(alp_log_weights(logps, rollout, mask, "sequence"))
    torch.testing.assert_close(seq[0, 0], token_ratios.prod(), rtol=1e-9, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=-2.0, max_value=2.0), min_size=1, max_size=8), st.integers(2, 5))
def test_geometric_level_is_invariant_to_length_scaling(deltas, k):
    one = torch.tensor([deltas], dtype=torch.float64)
    repeated = one.repeat_interleave(k, dim=1)  # the same per-token log-ratios, k times as long
    a = sequence_log_ratio(one, torch.zeros_like(one), torch.ones_like(one), "geometric")
    b = sequence_log_ratio(repeated, torch.zeros_like(repeated), torch.ones_like(repeated), "geometric")
    torch.testing.assert_close(a, b)
