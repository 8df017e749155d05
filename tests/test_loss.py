"""The ratio/clip/aggregation math against hand-computed values."""

import math

import pytest
import torch

from trl_alp.loss import aggregate_loss, alp_log_weights, clipped_surrogate, k3_kl, sequence_log_ratio

LOGPS = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, 0.0]])
ROLLOUT = torch.tensor([[-1.5, -1.0, -0.5], [-0.4, -0.1, -9.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_token_level_is_the_token_log_ratio():
    expected = torch.tensor([[0.5, -1.0, 0.0], [0.2, -0.2, 9.0]])
    torch.testing.assert_close(alp_log_weights(LOGPS, ROLLOUT, MASK, "token"), expected)


def test_token_level_clamps_at_20():
    out = alp_log_weights(torch.tensor([[0.0, -50.0]]), torch.tensor([[-50.0, 0.0]]), torch.ones(1, 2), "token")
    torch.testing.assert_close(out, torch.tensor([[20.0, -20.0]]))


def test_sequence_level_value_is_the_product_and_gradient_is_per_token():
    logps = LOGPS.clone().requires_grad_(True)
    out = alp_log_weights(logps, ROLLOUT, MASK, "sequence")
    # row 0: 0.5 - 1.0 + 0.0 = -0.5 ; row 1 (third token masked): 0.2 - 0.2 = 0.0
    torch.testing.assert_close(out.detach(), torch.tensor([[-0.5] * 3, [0.0] * 3]))
    torch.testing.assert_close(torch.exp(out.detach()[0, 0]), torch.tensor(math.exp(0.5) * math.exp(-1.0)))
    out.sum().backward()  # d log w_t / d log π_s = 1 if s == t else 0
    torch.testing.assert_close(logps.grad, torch.ones_like(logps))


def test_geometric_level_divides_by_length():
    out = alp_log_weights(LOGPS, ROLLOUT, MASK, "geometric")
    torch.testing.assert_close(out, torch.tensor([[-0.5 / 3] * 3, [0.0] * 3]))


def test_sequence_log_ratio_clamps_the_sum():
    out = sequence_log_ratio(torch.zeros(1, 4), torch.full((1, 4), -6.0), torch.ones(1, 4), "sequence")
    assert out.item() == 20.0  # 24 clamped


def test_unknown_level_raises():
    with pytest.raises(ValueError, match="token"):
        alp_log_weights(LOGPS, ROLLOUT, MASK, "segment")


def test_clipped_surrogate_hand_values():
    log_w = torch.log(torch.tensor([[0.3, 1.0, 5.0, 20.0]]))
    # positive advantage: -min(rA, clip(r)A) with clip [0.5, 4.0]
    loss, stats = clipped_surrogate(log_w, torch.tensor([2.0]), 0.5, 3.0, dual_clip=10.0)
    torch.testing.assert_close(loss, torch.tensor([[-0.6, -2.0, -8.0, -8.0]]))
    assert stats["high"].tolist() == [[False, False, True, True]]
    assert not stats["low"].any() and not stats["dual"].any()
    # negative advantage: |A|·max(r, clip(r)), capped at c·|A| by the dual clip
    loss, stats = clipped_surrogate(log_w, torch.tensor([-2.0]), 0.5, 3.0, dual_clip=10.0)
    torch.testing.assert_close(loss, torch.tensor([[1.0, 2.0, 10.0, 20.0]]))
    assert stats["low"].tolist() == [[True, False, False, False]]
    assert stats["dual"].tolist() == [[False, False, False, True]]
    loss, _ = clipped_surrogate(log_w, torch.tensor([-2.0]), 0.5, 3.0, dual_clip=None)
    assert loss[0, 3].item() == pytest.approx(40.0)


def test_dual_clip_zeroes_the_gradient_of_huge_negative_ratios():
    log_w = torch.log(torch.tensor([[2.0, 50.0]])).requires_grad_(True)
    loss, _ = clipped_surrogate(log_w, torch.tensor([-1.0]), 0.5, 3.0, dual_clip=10.0)
    loss.sum().backward()
    assert log_w.grad[0, 0].item() == pytest.approx(2.0)  # d(r)/d(log r) = r
    assert log_w.grad[0, 1].item() == 0.0


def test_k3_matches_formula():
    out = k3_kl(torch.tensor([-1.0]), torch.tensor([-1.5]))
    assert out.item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [
        ("grpo", ((1 + 2 + 3) / 3 + (4 + 5) / 2) / 2 / 2),  # mean of sequence means, / accumulation
        ("sapo", ((1 + 2 + 3) / 3 + (4 + 5) / 2) / 2 / 2),
        ("bnpo", 15 / 5 / 2),
        ("dr_grpo", 15 / (2 * 4) / 2),
        ("luspo", (6 + 9) / 2 / 2),
        ("dapo", 15 / (10 / 2 * 2 / 4)),  # num_items / processes * accumulation / steps_per_generation
        ("cispo", 15 / (10 / 2 * 2 / 4)),
        ("vespo", 15 / (10 / 2 * 2 / 4)),
    ],
)
def test_aggregate_loss_matches_trl_normalisers(loss_type, expected):
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, _ = aggregate_loss(
        per_token,
        mask,
        loss_type,
        accumulation_steps=2,
        num_items_in_batch=torch.tensor(10.0),
        num_processes=2,
        steps_per_generation=4,
        max_completion_length=4,
    )
    assert loss.item() == pytest.approx(expected)


def test_aggregate_loss_rejects_unknown_type():
    with pytest.raises(ValueError, match="grpo, bnpo"):
        aggregate_loss(torch.ones(1, 1), torch.ones(1, 1), "ppo")


def test_mis_zeroes_exactly_the_out_of_band_sequences():
    from trl_alp.loss import rollout_correction_weights

    old = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    rollout = torch.tensor([[-1.0, -1.0], [0.1, 0.2], [2.0, 0.0]])  # sequence weights e^2, e^-0.3, e^-2
    mask = torch.ones(3, 2)
    w, hit = rollout_correction_weights(old, rollout, mask, "sequence", "mask", 0.2, 5.0)
    torch.testing.assert_close(w, torch.tensor([[0.0], [math.exp(-0.3)], [0.0]]))
    assert hit.squeeze(1).tolist() == [True, False, True]
    w, hit = rollout_correction_weights(old, rollout, mask, "sequence", "truncate", 0.2, 5.0)
    torch.testing.assert_close(w, torch.tensor([[5.0], [math.exp(-0.3)], [0.2]]))


def test_tis_token_level_and_open_bounds():
    from trl_alp.loss import rollout_correction_weights

    old = torch.tensor([[0.0, 0.0, 0.0]])
    rollout = torch.tensor([[-2.0, 0.0, float("nan")]])
    w, hit = rollout_correction_weights(old, rollout, torch.ones(1, 3), "token", "truncate", None, 3.0)
    torch.testing.assert_close(w, torch.tensor([[3.0, 1.0, 1.0]]))  # NaN rollout → no correction
    assert hit.tolist() == [[True, False, False]]
    with pytest.raises(ValueError, match="truncate"):
        rollout_correction_weights(old, rollout, torch.ones(1, 3), "token", "clip", None, 3.0)


def test_one_k3_estimator_for_the_loss_the_logged_metric_and_calibration():
    """The loss's KL term, the logged alp/mismatch/k3_kl and σ₀ calibration measure the same thing, to float64."""
    from trl_alp.calibration import masked_k3_kl
    from trl_alp.metrics import mismatch_stats

    generator = torch.Generator().manual_seed(0)
    rollout = -3 * torch.rand(4, 6, generator=generator, dtype=torch.float64)
    train = rollout + 1e-3 * torch.randn(4, 6, generator=generator, dtype=torch.float64)  # a small mismatch
    mask = torch.ones(4, 6, dtype=torch.float64)
    mask[0, 4:] = 0
    log_r = train - rollout
    exact = sum(math.exp(x) - 1 - x for x in log_r[mask.bool()].tolist()) / mask.sum().item()  # r − 1 − log r
    from_loss = ((k3_kl(rollout, train) * mask).sum() / mask.sum()).item()
    from_metric = mismatch_stats(log_r[mask.bool()], torch.zeros(4))["k3_kl"]
    from_calibration = masked_k3_kl(log_r, mask)
    assert from_loss == pytest.approx(exact, rel=1e-9)
    assert from_calibration == pytest.approx(exact, rel=1e-9)
    assert from_metric == pytest.approx(exact, rel=1e-6)  # reported as a float32 value


def test_each_correction_divides_by_its_own_denominator():
    from trl_alp.corrections import CORRECTIONS
    from trl_alp.loss import correction_ratio

    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    rollout, old, mask = torch.tensor([[-1.5, -2.5]]), torch.tensor([[-1.2, -2.0]]), torch.ones(1, 2)
    alp = correction_ratio(CORRECTIONS["token-alp"], logps, rollout, old, mask, "token")
    torch.testing.assert_close(alp.log_weights, torch.tensor([[0.5, 0.5]]))  # over μ: π_old plays no part
    assert alp.is_weights is None and alp.denominator is rollout
    mis = correction_ratio(CORRECTIONS["token-mis"], logps, rollout, old, mask, "token", (0.5, 1.4))
    torch.testing.assert_close(mis.log_weights, torch.tensor([[0.2, 0.0]]))  # over π_old
    # the rollout weight π_old/μ: e^0.3 ≈ 1.35 inside [0.5, 1.4], e^0.5 ≈ 1.65 outside: masked
    torch.testing.assert_close(mis.is_weights, torch.tensor([[math.exp(0.3), 0.0]]))
    assert mis.is_hit.tolist() == [[False, True]]
    aligned = correction_ratio(CORRECTIONS["seq-tis"], logps, rollout, None, mask, "sequence", (None, 2.0))
    torch.testing.assert_close(aligned.log_weights, torch.zeros(1, 2))  # no π_old from TRL: the numerator itself
    torch.testing.assert_close(aligned.is_weights, torch.tensor([[2.0]]))  # e^1 truncated at 2
    aligned.log_weights.sum().backward()
    torch.testing.assert_close(logps.grad, torch.ones(1, 2))  # the gradient still flows through the numerator
