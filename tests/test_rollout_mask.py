"""The rollout rejection mask and the KL clamp against transcriptions of the ALP authors' code, and in the trainer.

The `authors_*` functions below are transcribed from amazon-science/adaptive-layerwise-perturbation (commit 96a96556):
`multi-turn/verl/trainer/ppo/rollout_is.py` (`compute_rollout_importance_weights`, mode "mask", veto off),
`multi-turn/verl/trainer/ppo/core_algos.py` (`compute_policy_loss_perturbed`, sequence mode; the rollout-IS weights
multiply `pg_losses` before `agg_loss` as in `compute_policy_loss_various_level`) and `single-turn/.../core_algos.py`
(`kl_penalty_forward`, "low_var_kl"). verl's `masked_mean` divides by ``mask.sum() + 1e-8``.
"""

import math

import pytest
import torch
from engines import StandInVLLM
from tiny_setup import capture_loss_inputs, last_logged

from trl_alp import ALPConfig
from trl_alp.config import KL_CLAMP
from trl_alp.loss import aggregate_loss, alp_log_weights, clipped_surrogate, k3_kl
from trl_alp.rejection import rollout_mask_weights


def authors_rollout_is_weights(old, rollout, eos_mask, level, upper, lower, geometric=False):
    log_ratio = old - rollout
    if level == "token":
        weights = torch.exp(torch.clamp(log_ratio, min=-20.0, max=20.0))
    else:  # "sequence"
        total = (log_ratio * eos_mask).sum(-1)
        if geometric:
            total = total / (eos_mask.sum(-1) + 1e-8)
        weights = torch.exp(torch.clamp(total.unsqueeze(-1), min=-20.0, max=20.0)).expand_as(old)
    clip_mask = ((weights >= lower) & (weights <= upper)).float()
    return (weights * clip_mask * eos_mask).detach()


def authors_alp_loss_with_rollout_is(log_prob, rollout_lp, old_lp, advantages, mask, low, high, c, is_kwargs):
    negative_approx_kl = log_prob - rollout_lp
    kl_values = torch.sum(negative_approx_kl * mask, dim=-1)
    log_ratio = kl_values.detach().unsqueeze(-1) + log_prob - log_prob.detach()
    log_ratio = torch.clamp(log_ratio, min=-20.0, max=20.0)
    ratios = torch.where(mask > 0, torch.exp(log_ratio), torch.zeros_like(log_ratio))
    pg_losses1 = -advantages * ratios
    pg_losses2 = -advantages * torch.clamp(ratios, 1 - low, 1 + high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_losses = pg_losses * authors_rollout_is_weights(old_lp, rollout_lp, mask, **is_kwargs)
    return (pg_losses * mask).sum() / (mask.sum() + 1e-8)


def authors_low_var_kl(logprob, ref_logprob):
    kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


def random_batch(seed, batch=8, length=12, spread=0.35):
    g = torch.Generator().manual_seed(seed)
    logps = -3 * torch.rand(batch, length, generator=g, dtype=torch.float64)
    rollout = logps + spread * torch.randn(batch, length, generator=g, dtype=torch.float64)
    old = logps + spread * torch.randn(batch, length, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = (torch.arange(length) < lengths.unsqueeze(1)).to(torch.float64)
    advantages = torch.randn(batch, generator=g, dtype=torch.float64)
    return logps, rollout, old, mask, advantages


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize(("low", "high"), [(0.0, 5.0), (0.6, 1.5)])
@pytest.mark.parametrize("seed", range(4))
def test_mask_matches_the_authors_rollout_is(level, low, high, seed):
    _, rollout, old, mask, _ = random_batch(seed)
    ours, rejected = rollout_mask_weights(old, rollout, mask, level, low, high)
    authors_level = "token" if level == "token" else "sequence"
    theirs = authors_rollout_is_weights(old, rollout, mask, authors_level, high, low, geometric=level == "geometric")
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    # `rejected` marks exactly the valid tokens the band zeroed
    assert torch.equal(rejected, (theirs == 0) & mask.bool())


def test_mask_band_is_inclusive_and_plain_mask_is_zero_one():
    old = torch.log(torch.tensor([[5.0, 0.5, 5.01, 1.0]]))
    rollout, mask = torch.zeros(1, 4), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    weights, rejected = rollout_mask_weights(old, rollout, mask, "token", 0.5, 5.0)
    torch.testing.assert_close(weights, torch.tensor([[5.0, 0.5, 0.0, 0.0]]))
    assert rejected.tolist() == [[False, False, True, False]]  # padding is never "rejected"
    plain, _ = rollout_mask_weights(old, rollout, mask, "token", 0.5, 5.0, weighted=False)
    assert plain.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="rollout mask level must be one of"):
        rollout_mask_weights(old, rollout, mask, "turn", 0.0, 5.0)


@pytest.mark.parametrize(("low", "high", "dual_clip"), [(0.5, 3.0, 3.0), (0.5, 3.0, 10.0)])
@pytest.mark.parametrize("seed", range(5))
def test_alp_plus_sequence_mask_loss_matches_the_authors(low, high, dual_clip, seed):
    logps, rollout, old, mask, advantages = random_batch(seed, batch=16, spread=0.8)
    is_kwargs = {"level": "sequence", "upper": 5.0, "lower": 0.0}
    leaf_theirs = logps.clone().requires_grad_(True)
    theirs = authors_alp_loss_with_rollout_is(
        leaf_theirs, rollout, old, advantages.unsqueeze(1).expand_as(mask), mask, low, high, dual_clip, is_kwargs
    )
    theirs.backward()

    leaf = logps.clone().requires_grad_(True)
    per_token_loss, _ = clipped_surrogate(
        alp_log_weights(leaf, rollout, mask, "sequence"), advantages, low, high, dual_clip
    )
    weights, rejected = rollout_mask_weights(old, rollout, mask, "sequence", 0.0, 5.0)
    ours, _ = aggregate_loss(per_token_loss * weights, mask, "bnpo")
    ours.backward()

    assert rejected.any() and not rejected.all()  # the band both keeps and rejects sequences here
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    torch.testing.assert_close(leaf.grad, leaf_theirs.grad, atol=1e-6, rtol=0)


def test_k3_clamp_matches_verl_low_var_kl():
    g = torch.Generator().manual_seed(0)
    logps = -4 * torch.rand(64, generator=g, dtype=torch.float64)
    ref = logps + 8 * torch.randn(64, generator=g, dtype=torch.float64)  # includes estimates beyond ±10
    ref[:2] = torch.tensor([-60.0, 40.0], dtype=torch.float64)  # log-ratios beyond ±20
    torch.testing.assert_close(k3_kl(logps, ref, clamp=KL_CLAMP), authors_low_var_kl(logps, ref), atol=1e-6, rtol=0)
    assert (k3_kl(logps, ref) > 10).any()  # unclamped by default, as TRL
    assert k3_kl(logps, ref, clamp=KL_CLAMP).max() == 10.0


@pytest.mark.parametrize("correction", ["grpo", "seq-tis", "token-mis"])
def test_mask_rejected_where_it_cannot_apply(correction):
    with pytest.raises(ValueError, match="alp_rollout_mask applies on top of an ALP or Bypass ratio"):
        ALPConfig(
            output_dir="x",
            report_to="none",
            bf16=False,
            use_cpu=True,
            correction=correction,
            alp_rollout_mask="sequence",
        )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"alp_rollout_mask": "turn"}, "alp_rollout_mask must be one of"),
        ({"alp_rollout_mask": "sequence", "alp_rollout_mask_min": 5.0}, r"alp_rollout_mask_min \(5.0\) must be <"),
        ({"alp_rollout_mask_max": 0.0}, "alp_rollout_mask_max must be > 0"),
        ({"correction": "grpo", "alp_kl_clamp": True, "beta": 0.01}, "alp_kl_clamp=True clamps the KL"),
    ],
)
def test_mask_and_clamp_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        ALPConfig(output_dir="x", report_to="none", bf16=False, use_cpu=True, **overrides)


@pytest.fixture
def stand_in_vllm(monkeypatch):
    import trl.trainer.grpo_trainer as grpo_module

    StandInVLLM.instances.clear()
    monkeypatch.setattr(grpo_module, "VLLMGeneration", StandInVLLM)
    monkeypatch.setattr(StandInVLLM, "shift", 1.0)  # log μ = log π − 1 on every sampled token
    return StandInVLLM


def test_sequence_mask_uses_pi_old_over_mu(make_trainer, stand_in_vllm):
    """π_old/μ = e^n for an n-token completion: kept only when e^n ≤ 5, i.e. n = 1."""
    trainer = make_trainer(
        max_steps=1, use_vllm=True, vllm_mode="colocate", correction="seq-bypass", alp_rollout_mask="sequence"
    )
    seen = capture_loss_inputs(trainer)
    trainer.train()
    lengths = torch.cat([(b["completion_mask"] * b.get("tool_mask", 1)).sum(-1) for b in seen])
    expected = (torch.exp(lengths.double()) > 5.0).double().mean().item()
    assert last_logged(trainer, "alp/rollout_mask/seq_masked_frac") == pytest.approx(expected)
    if expected == 1.0:
        assert last_logged(trainer, "policy_loss") == 0.0


def test_token_mask_weights_the_loss_by_pi_old_over_mu(make_trainer, stand_in_vllm):
    """Per token π_old/μ = e lies inside [0, 5]: nothing is masked and the loss is e times the unmasked one."""
    losses = {}
    for mask in (None, "token"):
        trainer = make_trainer(
            max_steps=1, use_vllm=True, vllm_mode="colocate", correction="token-bypass", alp_rollout_mask=mask
        )
        trainer.train()
        losses[mask] = last_logged(trainer, "policy_loss")
    assert last_logged(trainer, "alp/rollout_mask/masked_frac") == 0.0
    assert losses["token"] == pytest.approx(math.e * losses[None], rel=1e-4)


def test_mask_is_on_pi_old_not_on_the_perturbed_ratio(make_trainer):
    """Large noise moves the ALP ratio far outside the band; π_old/μ (no noise, same weights) stays 1."""
    trainer = make_trainer(
        max_steps=1,
        correction="seq-alp",
        alp_init_sigma=1.0,
        alp_rollout_mask="sequence",
        alp_rollout_mask_min=0.9,
        alp_rollout_mask_max=1.1,
    )
    trainer.train()
    assert last_logged(trainer, "alp/rollout_mask/seq_masked_frac") == 0.0
    assert not 0.9 <= last_logged(trainer, "alp/ratio/seq/min") <= last_logged(trainer, "alp/ratio/seq/max") <= 1.1


def test_misaligned_steps_keep_trls_old_pass_for_the_mask(make_trainer):
    for mask, has_old in ((None, False), ("sequence", True)):
        trainer = make_trainer(max_steps=1, steps_per_generation=2, correction="seq-alp", alp_rollout_mask=mask)
        seen = capture_loss_inputs(trainer)
        trainer.train()
        assert all(("old_per_token_logps" in b and b["old_per_token_logps"] is not None) == has_old for b in seen)
