"""Rollout rejection (`trl_alp.rejection`): verl's divergence criteria, its token veto and the metrics-only mode.

Checked four ways: by hand on crafted log-probs; against verl's own functions, whose answers on fixed inputs
tests/verl_reference.py wrote into tests/verl_reference.json with verl 0.9.1 (``compute_rollout_rejection_mask``) and
verl 0.6.1 (the veto of ``compute_rollout_correction_and_rejection_mask``), verl not being a dependency; against
verl's formulas transcribed below on random inputs; and in the trainer, on a stand-in engine and on a real vLLM one.

Transcribed from verl/trainer/ppo/rollout_corr_helper.py of verl 0.9.1: the ±20 clamp and k1/k2/k3 (lines 262-265),
the masked sum / mean / max over a sequence with 0 for an empty one (lines 273-284; verl_F.masked_mean divides by
``mask.sum() + 1e-8``, verl/utils/torch_functional.py line 308), the keep rules (k1 inside ``[log lower, log upper]``,
k2/k3 ``<= upper``, lines 312-372), their logical AND (lines 379-380) and the k1 threshold ``u`` meaning
``[1/u, u]`` (lines 159-177); the veto from the same file of verl 0.6.1 (lines 648-669: unclamped log-ratio strictly
below ``log threshold`` on any valid token rejects the sequence).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from engines import StandInVLLM
from tiny_setup import alp_log, capture_loss_inputs, last_logged

import trl_alp.trainer as trainer_module
from trl_alp import ALPConfig
from trl_alp.loss import LOSS_TYPES, aggregate_loss
from trl_alp.rejection import (
    REJECTION_CRITERIA,
    RejectionBounds,
    parse_rejection_criteria,
    parse_rejection_thresholds,
    rejection_statistic,
    rollout_mask_weights,
    rollout_rejection,
    token_divergence,
)

BASE = dict(output_dir="unused", report_to="none", bf16=False, use_cpu=True)
REFERENCE = json.loads(Path(__file__).with_name("verl_reference.json").read_text())
LN2, LN10 = math.log(2.0), math.log(10.0)


def from_log_ratio(log_ratio, mask=None):
    """(old, rollout, mask) with log π_old − log μ = `log_ratio` (rollout 0), every token valid by default."""
    log_ratio = torch.as_tensor(log_ratio, dtype=torch.float64)
    mask = torch.ones_like(log_ratio) if mask is None else torch.as_tensor(mask, dtype=torch.float64)
    return log_ratio.clone(), torch.zeros_like(log_ratio), mask


def bounds(criteria: str, threshold) -> dict[str, RejectionBounds]:
    return parse_rejection_thresholds(parse_rejection_criteria(criteria), threshold)


# ------------------------------------------------------------------------------------------------ by hand
def test_token_divergences_by_hand():
    log_ratio = torch.tensor([LN2, -LN2, 0.0, LN10, 25.0], dtype=torch.float64)  # 25: beyond the ±20 clamp
    expected = {
        "k1": [-LN2, LN2, 0.0, -LN10, -20.0],
        "k2": [LN2**2 / 2, LN2**2 / 2, 0.0, LN10**2 / 2, 200.0],
        "k3": [1 - LN2, LN2 - 0.5, 0.0, 9 - LN10, math.exp(20) - 21],
    }
    for estimator, values in expected.items():
        torch.testing.assert_close(
            token_divergence(log_ratio, estimator), torch.tensor(values, dtype=torch.float64), rtol=1e-12, atol=1e-12
        )
    with pytest.raises(ValueError, match="estimator must be one of"):
        token_divergence(log_ratio, "k4")


def test_sequence_statistics_by_hand_exclude_padding_and_give_an_empty_completion_zero():
    # row 0: r = 2, 1/2, 4; row 1: r = 2 then padding that holds r = e^10; row 2: an empty completion
    old, rollout, mask = from_log_ratio(
        [[LN2, -LN2, 2 * LN2], [LN2, 10.0, 10.0], [10.0, 10.0, 10.0]], [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    )
    log_ratio = old - rollout
    k3 = [1 - LN2, LN2 - 0.5, 3 - 2 * LN2]
    expected = {
        "seq_sum_k1": [-2 * LN2, -LN2, 0.0],
        "seq_mean_k1": [-2 * LN2 / 3, -LN2, 0.0],
        "seq_sum_k3": [sum(k3), k3[0], 0.0],
        "seq_mean_k3": [sum(k3) / 3, k3[0], 0.0],
        "seq_max_k3": [k3[2], k3[0], 0.0],
        "seq_max_k2": [(2 * LN2) ** 2 / 2, LN2**2 / 2, 0.0],
    }
    for criterion, values in expected.items():
        torch.testing.assert_close(
            rejection_statistic(log_ratio, mask, criterion),
            torch.tensor(values, dtype=torch.float64),
            rtol=0,
            atol=1e-12,
        )
    assert rejection_statistic(log_ratio, mask, "token_k2").shape == (3, 3)  # token criteria stay per token
    with pytest.raises(ValueError, match="criterion must be one of"):
        rejection_statistic(log_ratio, mask, "seq_max_k1")  # not one of verl's


def test_k1_bands_are_on_mu_over_pi_old_as_verl_defines_them():
    """verl thresholds k1 = −log r, so a band "lower_upper" is on exp(k1) = μ/π_old; one number u is [1/u, u]."""
    old, rollout, mask = from_log_ratio([[math.log(r) for r in (3.0, 0.3, 0.2, 1.0)]])
    rejected = rollout_rejection(old, rollout, mask, bounds("token_k1", "0.5_4")).rejected["token_k1"]
    assert rejected.tolist() == [[True, False, True, False]]  # μ/π_old = 1/3, 3.3, 5, 1 against [0.5, 4]
    old, rollout, mask = from_log_ratio([[math.log(r) for r in (3.0, 1.9, 0.6, 0.4)]])
    rejected = rollout_rejection(old, rollout, mask, bounds("token_k1", 2.0)).rejected["token_k1"]
    assert rejected.tolist() == [[True, False, False, True]]  # [1/2, 2] either way round
    assert bounds("seq_mean_k1", 2.0)["seq_mean_k1"] == RejectionBounds(0.5, 2.0)


def test_bounds_are_inclusive():
    # k2 of log r = 1 is exactly 0.5; k1 of r = 1 is exactly log 1 = 0
    old, rollout, mask = from_log_ratio([[1.0, 0.0]])
    result = rollout_rejection(old, rollout, mask, bounds("token_k2,token_k1", "0.5,1_2"))
    assert result.rejected["token_k2"].tolist() == [[False, False]]
    assert result.rejected["token_k1"].tolist() == [[True, False]]  # r = e: μ/π_old = 1/e < 1
    assert result.keep.tolist() == [[0.0, 1.0]]


def test_the_veto_rejects_whole_sequences_on_the_unclamped_ratio():
    floor = 0.1
    old, rollout, mask = from_log_ratio(
        [
            [0.0, math.log(0.05), 0.0],  # one token under the floor: the whole sequence goes
            [math.log(floor), 0.0, 0.0],  # exactly at the floor: kept (strictly below rejects)
            [0.0, 0.0, -30.0],  # under the floor, but padding
            [0.0, -30.0, 0.0],  # e^-30: the ±20 clamp would hide it from a floor of e^-25
        ],
        [[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]],
    )
    result = rollout_rejection(old, rollout, mask, {}, floor)
    assert result.rejected["veto"].tolist() == [[True] * 3, [False] * 3, [False] * 3, [True] * 3]
    assert result.below_veto.sum().item() == 2
    deep = rollout_rejection(old, rollout, mask, {}, math.exp(-25)).rejected["veto"]
    assert deep.any(-1).tolist() == [False, False, False, True]


def test_criteria_combine_with_and_each_reporting_its_own():
    old, rollout, mask = from_log_ratio([[0.0, 0.0], [0.5, 0.0], [2.0, 0.0]])  # r per token, sequences of 2
    result = rollout_rejection(old, rollout, mask, bounds("token_k3,seq_mean_k1", "0.5,1.5"), veto_threshold=0.9)
    k3_rejected = [[False, False], [False, False], [True, False]]  # k3(2) = e² − 3 > 0.5
    mean_rejected = [[False, False], [False, False], [True, True]]  # mean log r = 1 > log 1.5
    assert result.rejected["token_k3"].tolist() == k3_rejected
    assert result.rejected["seq_mean_k1"].tolist() == mean_rejected
    assert not result.rejected["veto"].any()  # no ratio below 0.9
    assert result.keep.tolist() == [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]


@pytest.mark.parametrize(
    ("level", "criterion"), [("token", "token_k1"), ("sequence", "seq_sum_k1"), ("geometric", "seq_mean_k1")]
)
@pytest.mark.parametrize("seed", range(3))
def test_the_authors_ratio_band_is_a_k1_criterion_when_symmetric(level, criterion, seed):
    """alp_rollout_mask's band [1/u, u] on π_old/μ rejects what verl's k1 criterion with u rejects (off the boundary)."""
    g = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(16, 9, generator=g, dtype=torch.float64)
    rollout = old + 0.4 * torch.randn(16, 9, generator=g, dtype=torch.float64)
    mask = (torch.arange(9) < torch.randint(1, 10, (16, 1), generator=g)).to(torch.float64)
    _, band_rejected = rollout_mask_weights(old, rollout, mask, level, 1 / 1.3, 1.3, weighted=False)
    rejected = rollout_rejection(old, rollout, mask, bounds(criterion, 1.3)).rejected[criterion]
    assert torch.equal(band_rejected, rejected) and 0 < rejected.sum() < mask.sum()


def test_empty_completions_and_padding_are_never_rejected():
    old, rollout, mask = from_log_ratio([[5.0, 5.0], [5.0, -9.0], [-9.0, -9.0]], [[1, 1], [1, 0], [0, 0]])
    result = rollout_rejection(old, rollout, mask, bounds(",".join(REJECTION_CRITERIA), 1.01), veto_threshold=0.5)
    for name, rejected in result.rejected.items():
        assert not (rejected & ~mask.bool()).any(), name  # padding and the empty row stay unmarked
    assert result.rejected["seq_max_k3"].tolist() == [[True, True], [True, False], [False, False]]
    assert torch.equal(result.keep * mask, torch.zeros_like(mask))  # every valid token rejected...
    assert result.keep[1, 1] == 1.0 and result.keep[2].tolist() == [1.0, 1.0]  # ...and nothing else


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_an_all_rejected_batch_gives_a_finite_zero_loss(loss_type):
    logps = torch.full((2, 3), -1.0, requires_grad=True)
    old, rollout, mask = from_log_ratio([[3.0, 3.0, 3.0], [3.0, 3.0, 0.0]], [[1, 1, 1], [1, 1, 0]])
    keep = rollout_rejection(old, rollout, mask, bounds("seq_mean_k3", 0.01)).keep
    assert torch.equal(keep * mask, torch.zeros_like(mask))
    per_token_loss = -logps.exp() * torch.tensor([[1.0], [-1.0]])
    loss, _ = aggregate_loss(
        per_token_loss, mask.float() * keep.float(), loss_type, num_items_in_batch=5, max_completion_length=3
    )
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert torch.equal(logps.grad, torch.zeros_like(logps))


# ---------------------------------------------------------------------------------- against verl itself
@pytest.mark.parametrize("case", REFERENCE["rollout_rs"]["cases"], ids=lambda c: f"{c['criteria']}@{c['threshold']}")
def test_criteria_match_verls_own_compute_rollout_rejection_mask(case):
    inputs = {k: torch.tensor(v, dtype=torch.float64) for k, v in REFERENCE["inputs"].items()}
    old, rollout, mask = inputs["old_logps"], inputs["rollout_logps"], inputs["mask"]
    result = rollout_rejection(old, rollout, mask, bounds(case["criteria"], case["threshold"]))
    assert torch.equal(result.keep * mask, torch.tensor(case["kept"], dtype=torch.float64))
    valid = mask.sum(-1) > 0
    for name, theirs in case["metrics"].items():
        rejected = result.rejected[name]
        assert rejected.sum().item() / mask.sum().item() == pytest.approx(theirs["masked_fraction"], abs=1e-9)
        assert rejected.any(-1)[valid].double().mean().item() == pytest.approx(
            theirs["seq_masked_fraction"], abs=1e-12
        )
        statistic = result.statistics[name]
        per_token = statistic if statistic.dim() == 2 else statistic.unsqueeze(-1).expand_as(mask)
        assert (per_token * mask).sum().item() / mask.sum().item() == pytest.approx(theirs["mean"], rel=1e-6)


def test_verls_reference_cases_keep_and_reject():
    """The stored cases are informative: most keep some tokens and reject others, every criterion appears."""
    shares = [
        sum(map(sum, c["kept"])) / sum(map(sum, REFERENCE["inputs"]["mask"])) for c in REFERENCE["rollout_rs"]["cases"]
    ]
    assert sum(0 < share < 1 for share in shares) >= len(shares) - 4
    assert {name for c in REFERENCE["rollout_rs"]["cases"] for name in c["criteria"].split(",")} == set(
        REJECTION_CRITERIA
    )
    assert REFERENCE["rollout_rs"]["source"].startswith("verl 0.9.1") and REFERENCE["veto"]["source"].startswith(
        "verl 0.6.1"
    )


@pytest.mark.parametrize("case", REFERENCE["veto"]["cases"], ids=lambda c: f"veto@{c['threshold']}")
def test_the_veto_matches_verl_0_6s_own_function(case):
    inputs = {k: torch.tensor(v, dtype=torch.float64) for k, v in REFERENCE["inputs"].items()}
    old, rollout, mask = inputs["old_logps"], inputs["rollout_logps"], inputs["mask"]
    result = rollout_rejection(old, rollout, mask, {}, case["threshold"])
    assert torch.equal(result.keep * mask, torch.tensor(case["kept"], dtype=torch.float64))
    # verl's veto fraction is over every sequence (the empty one too), in float32
    assert result.rejected["veto"].any(-1).double().mean().item() == pytest.approx(case["veto_fraction"], abs=1e-7)
    below = result.below_veto.sum().item() / mask.sum().item()
    assert below == pytest.approx(case["catastrophic_token_fraction"], abs=1e-9)


# ------------------------------------------------------------------------------ against verl's formulas
def verl_keep(log_ratio, mask, criterion, lower, upper):
    """verl 0.9.1 rollout_corr_helper.py lines 262-372 for one criterion: a (B, T) 0/1 keep mask."""
    safe = torch.clamp(log_ratio, min=-20.0, max=20.0)
    token = {"k1": -safe, "k2": 0.5 * safe**2, "k3": torch.exp(safe) - 1.0 - safe}[criterion[-2:]]
    if criterion.startswith("token"):
        stat = token
    elif criterion.startswith("seq_sum"):
        stat = (token * mask).sum(-1)
    elif criterion.startswith("seq_mean"):
        stat = (token * mask).sum(-1) / (mask.sum(-1) + 1e-8)
    else:
        masked = token.masked_fill(~mask.bool(), float("-inf")).max(dim=-1).values
        stat = torch.where(masked == float("-inf"), torch.zeros_like(masked), masked)
    keep = (stat >= math.log(lower)) & (stat <= math.log(upper)) if criterion.endswith("k1") else stat <= upper
    return (keep if criterion.startswith("token") else keep.unsqueeze(-1).expand_as(mask)).to(mask.dtype)


@pytest.mark.parametrize("criterion", REJECTION_CRITERIA)
@pytest.mark.parametrize("seed", range(4))
def test_criteria_match_verls_formulas(criterion, seed):
    g = torch.Generator().manual_seed(seed)
    old = -4 * torch.rand(32, 16, generator=g, dtype=torch.float64)
    rollout = old + (0.05, 0.3, 1.0, 8.0)[seed] * torch.randn(32, 16, generator=g, dtype=torch.float64)
    mask = (torch.arange(16) < torch.randint(0, 17, (32, 1), generator=g)).to(torch.float64)
    threshold = "0.7_1.6" if criterion.endswith("k1") else 0.05
    lower, upper = (0.7, 1.6) if criterion.endswith("k1") else (None, 0.05)
    result = rollout_rejection(old, rollout, mask, bounds(criterion, threshold))
    assert torch.equal(result.keep * mask, verl_keep(old - rollout, mask, criterion, lower, upper) * mask)


# -------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    ("criteria", "threshold", "expected"),
    [
        ("seq_mean_k3", 0.01, {"seq_mean_k3": (None, 0.01)}),
        ("token_k1", "0.5_1.5", {"token_k1": (0.5, 1.5)}),
        ("token_k1", "4", {"token_k1": (0.25, 4.0)}),
        ("token_k1, seq_max_k3", "0.4_1.8,3.0", {"token_k1": (0.4, 1.8), "seq_max_k3": (None, 3.0)}),
        (["seq_sum_k2", "seq_mean_k1"], 2.0, {"seq_sum_k2": (None, 2.0), "seq_mean_k1": (0.5, 2.0)}),
        ("seq_max_k2,seq_max_k2", [0.3], {"seq_max_k2": (None, 0.3)}),  # duplicates dropped, as verl
    ],
)
def test_thresholds_parse_like_verls(criteria, threshold, expected):
    assert {k: tuple(v) for k, v in bounds(criteria, threshold).items()} == expected


@pytest.mark.parametrize(
    ("criteria", "threshold", "match"),
    [
        ("seq_mean_k4", 0.1, "alp_rollout_rejection must be None or one or more of"),
        (" , ", 0.1, "alp_rollout_rejection must be None or one or more of"),
        ("seq_mean_k3", None, "alp_rollout_rejection_threshold must be set"),
        ("seq_mean_k3,token_k1", "0.1,2,3", "one threshold for all criteria or one per criterion"),
        ("seq_mean_k3", "0.5_1.5", "one upper bound on the divergence"),
        ("token_k1", "2_0.5", "lower <= upper"),
        ("token_k1", "0_2", "must be finite and > 0"),
        ("seq_sum_k3", -1.0, "must be finite and > 0"),
        ("seq_sum_k3", "inf", "must be finite and > 0"),
        ("seq_sum_k3", "abc", "is not a number"),
        ("seq_sum_k3", True, "must be a number or a string"),
    ],
)
def test_bad_criteria_and_thresholds_name_the_field(criteria, threshold, match):
    with pytest.raises(ValueError, match=match):
        bounds(criteria, threshold)
    with pytest.raises(ValueError, match=match):
        ALPConfig(**BASE, alp_rollout_rejection=criteria, alp_rollout_rejection_threshold=threshold)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"alp_rollout_veto_threshold": 0.0}, "alp_rollout_veto_threshold must be a finite number > 0"),
        ({"alp_rollout_veto_threshold": float("nan")}, "alp_rollout_veto_threshold must be a finite number > 0"),
        ({"alp_rollout_veto_threshold": True}, "alp_rollout_veto_threshold must be a finite number > 0"),
        ({"alp_rollout_rejection_metrics_only": "yes"}, "alp_rollout_rejection_metrics_only must be True or False"),
        (
            {"correction": "grpo", "alp_rollout_veto_threshold": 1e-4},
            "apply on top of an ALP, Bypass, TIS or MIS correction; correction='grpo'",
        ),
        (
            {"correction": "grpo", "alp_rollout_rejection": "seq_mean_k3", "alp_rollout_rejection_threshold": 0.01},
            "apply on top of an ALP, Bypass, TIS or MIS correction",
        ),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        ALPConfig(**BASE, **overrides)


@pytest.mark.parametrize("correction", ["seq-alp", "token-bypass", "geo-alp", "token-tis", "seq-mis"])
def test_criteria_apply_to_alp_bypass_tis_and_mis(correction, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_alp"):
        args = ALPConfig(
            **BASE,
            correction=correction,
            alp_rollout_rejection="seq_mean_k3,token_k1",
            alp_rollout_rejection_threshold="0.01,2.0",
            alp_rollout_veto_threshold=1e-4,
            alp_rollout_rejection_metrics_only=True,
        )
    assert alp_log(caplog) == "" and args.rejects_rollouts
    assert args.rollout_rejection_bounds == {"seq_mean_k3": (None, 0.01), "token_k1": (0.5, 2.0)}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"alp_rollout_rejection_threshold": "0.01"}, "alp_rollout_rejection_threshold is ignored"),
        ({"alp_rollout_rejection_metrics_only": True}, "alp_rollout_rejection_metrics_only=True has nothing to log"),
    ],
)
def test_fields_without_a_criterion_say_so(overrides, message, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_alp"):
        args = ALPConfig(**BASE, **overrides)
    assert message in caplog.text and not args.rejects_rollouts


def test_the_model_card_names_the_criteria():
    from trl_alp.checkpoint import rejection_summary

    args = ALPConfig(
        **BASE,
        alp_rollout_mask="sequence",
        alp_rollout_rejection="seq_mean_k3,token_k1",
        alp_rollout_rejection_threshold="0.01,2",
        alp_rollout_veto_threshold=1e-4,
        alp_rollout_rejection_metrics_only=True,
    )
    assert rejection_summary(args) == (
        "`sequence` band [0, 5], `seq_mean_k3` ≤ 0.01, `token_k1` μ/π_old in [0.5, 2], veto below 0.0001 (logged "
        "only) on π_old/μ"
    )
    assert rejection_summary(ALPConfig(**BASE)) == "none"


# -------------------------------------------------------------------------------------------- trainer
@pytest.fixture
def stand_in_vllm(monkeypatch):
    """log μ = log π − 1 on every sampled token (π_old/μ = e), completions of random lengths."""
    import trl.trainer.grpo_trainer as grpo_module

    StandInVLLM.instances.clear()
    monkeypatch.setattr(grpo_module, "VLLMGeneration", StandInVLLM)
    monkeypatch.setattr(StandInVLLM, "shift", 1.0)
    monkeypatch.setattr(StandInVLLM, "ragged", True)
    return StandInVLLM


def record_loss_masks(monkeypatch):
    """The (batch, loss mask) pairs the trainer aggregates its loss over."""
    seen, aggregate = [], trainer_module.aggregate_loss

    def recording(per_token_loss, mask, *args, **kwargs):
        seen.append(mask.detach().clone())
        return aggregate(per_token_loss, mask, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "aggregate_loss", recording)
    return seen


@pytest.mark.parametrize("correction", ["seq-alp", "token-bypass", "token-mis"])
def test_a_sequence_criterion_takes_long_completions_out_of_the_loss(
    make_trainer, stand_in_vllm, monkeypatch, correction
):
    """seq_sum_k1 = −Σ log π_old/μ = −n for an n-token completion: the band [0.01, 100] keeps n <= 4 (log 100 = 4.6)."""
    masks = record_loss_masks(monkeypatch)
    trainer = make_trainer(
        max_steps=1,
        use_vllm=True,
        vllm_mode="colocate",
        correction=correction,
        alp_rollout_rejection="seq_sum_k1",
        alp_rollout_rejection_threshold="0.01_100",
    )
    batches = capture_loss_inputs(trainer)
    trainer.train()
    mask = torch.cat([b["completion_mask"] for b in batches]).double()
    lengths = mask.sum(-1)
    long = lengths > 4
    assert 0 < long.sum() < len(lengths)  # the ragged stand-in gives both
    assert torch.equal(torch.cat(masks).double(), mask * ~long.unsqueeze(-1))  # the loss sees the short ones only
    expected_tokens = (lengths * long).sum() / lengths.sum()
    assert last_logged(trainer, "alp/rollout_rejection/seq_sum_k1/masked_frac") == pytest.approx(
        expected_tokens.item()
    )
    assert last_logged(trainer, "alp/rollout_rejection/seq_sum_k1/seq_masked_frac") == pytest.approx(
        long.double().mean().item()
    )
    mean = -(lengths**2).sum() / lengths.sum()  # −n counted once per token, as verl's mean
    assert last_logged(trainer, "alp/rollout_rejection/seq_sum_k1/mean") == pytest.approx(mean.item(), abs=1e-4)
    shortest = lengths[lengths > 0].min().item()
    assert last_logged(trainer, "alp/rollout_rejection/seq_sum_k1/max") == pytest.approx(-shortest, abs=1e-4)
    assert last_logged(trainer, "alp/rollout_rejection/masked_frac") == pytest.approx(expected_tokens.item())


def test_an_all_rejected_step_is_finite_and_reported(make_trainer, stand_in_vllm, caplog):
    """k3 of log r = 1 is e − 2 ≈ 0.72 on every token: token_k3 <= 0.5 rejects them all."""
    trainer = make_trainer(
        max_steps=2,
        use_vllm=True,
        vllm_mode="colocate",
        correction="seq-alp",
        alp_rollout_rejection="token_k3",
        alp_rollout_rejection_threshold=0.5,
    )
    with caplog.at_level(logging.WARNING, logger="trl_alp"):
        trainer.train()
    history = [h for h in trainer.state.log_history if "alp/rollout_rejection/masked_frac" in h]
    assert len(history) == 2
    for record in history:
        assert (
            record["alp/rollout_rejection/masked_frac"] == 1.0
            and record["alp/rollout_rejection/seq_masked_frac"] == 1.0
        )
        assert record["alp/rollout_rejection/token_k3/mean"] == pytest.approx(math.e - 2, abs=1e-4)
        assert record["policy_loss"] == 0.0 and math.isfinite(record["loss"])
    assert caplog.text.count("rejected every completion token of a batch") == 1  # said once, not every step


def trained_state(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()] + [
        trainer.alp_perturbation.log_sigma.detach().clone()
    ]


def test_metrics_only_logs_every_criterion_and_leaves_the_loss_and_the_weights_unchanged(make_trainer, stand_in_vllm):
    """Same seed, same rollouts: the run that only logs the criteria trains bit for bit like the run without them."""
    every = dict(
        alp_rollout_mask="sequence",
        alp_rollout_rejection="token_k1,seq_sum_k1,seq_mean_k3,seq_max_k2",
        alp_rollout_rejection_threshold="2.0,0.01_100,1.0,0.4",
        alp_rollout_veto_threshold=3.0,  # π_old/μ = e < 3 on every token: every sequence vetoed
        alp_rollout_rejection_metrics_only=True,
    )
    runs = {}
    for name, extra in (("plain", {}), ("metrics-only", every)):
        trainer = make_trainer(max_steps=2, use_vllm=True, vllm_mode="colocate", correction="seq-alp", **extra)
        trainer.train()
        runs[name] = trainer
    plain, logged = runs["plain"], runs["metrics-only"]
    for key in ("loss", "policy_loss", "alp/ratio/seq/q50", "alp/sigma/mean"):
        assert [h[key] for h in plain.state.log_history if key in h] == [
            h[key] for h in logged.state.log_history if key in h
        ]
    for a, b in zip(trained_state(plain), trained_state(logged), strict=True):
        assert torch.equal(a, b)
    assert not any(key.startswith("alp/rollout_") for h in plain.state.log_history for key in h)
    for criterion in ("token_k1", "seq_sum_k1", "seq_mean_k3", "seq_max_k2", "veto"):
        values = [h[f"alp/rollout_rejection/{criterion}/masked_frac"] for h in logged.state.log_history if "loss" in h]
        assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values), criterion
    # per token log π_old/μ = 1: μ/π_old = 1/e is outside [1/2, 2], k3 = e − 2 <= 1, k2 = 1/2 > 0.4, e < 3
    assert last_logged(logged, "alp/rollout_rejection/token_k1/masked_frac") == 1.0
    assert last_logged(logged, "alp/rollout_rejection/seq_mean_k3/masked_frac") == 0.0
    assert last_logged(logged, "alp/rollout_rejection/seq_max_k2/masked_frac") == 1.0
    assert last_logged(logged, "alp/rollout_rejection/veto/masked_frac") == 1.0
    assert last_logged(logged, "alp/rollout_rejection/masked_frac") == 1.0  # what applying them would have done
    assert 0.0 <= last_logged(logged, "alp/rollout_mask/seq_masked_frac") <= 1.0


# ------------------------------------------------------------------------------------------- real vLLM
ALL_CRITERIA_THRESHOLDS = "1.002,1e-6,1e-6,1.01,1e-5,1e-5,1.001,1e-6,1e-6,5e-6,5e-6"  # tight: a bf16 engine trips them


@pytest.mark.vllm
@pytest.mark.parametrize("metrics_only", [False, True], ids=["applied", "metrics-only"])
def test_every_criterion_logs_its_share_on_a_real_vllm_engine(vllm_trainer, metrics_only):
    """Two steps of seq-alp on a bf16 vLLM engine with every criterion, the veto and the ratio band at once."""
    trainer = vllm_trainer(
        correction="seq-alp",
        alp_rollout_dtype="bfloat16",
        max_steps=2,
        alp_rollout_mask="token",
        alp_rollout_mask_min=0.999,
        alp_rollout_mask_max=1.001,
        alp_rollout_rejection=",".join(REJECTION_CRITERIA),
        alp_rollout_rejection_threshold=ALL_CRITERIA_THRESHOLDS,
        alp_rollout_veto_threshold=0.999,
        alp_rollout_rejection_metrics_only=metrics_only,
    )
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 2 and all(math.isfinite(h["loss"]) for h in steps)
    shares = {}
    for name in (*REJECTION_CRITERIA, "veto"):
        for kind in ("masked_frac", "seq_masked_frac"):
            key = f"alp/rollout_rejection/{name}/{kind}"
            shares[key] = [h[key] for h in steps]
    for key in ("alp/rollout_rejection/masked_frac", "alp/rollout_mask/masked_frac"):
        shares[key] = [h[key] for h in steps]
    assert all(0.0 <= v <= 1.0 for values in shares.values() for v in values), shares
    assert max(max(values) for values in shares.values()) > 0.0  # the bf16 engine's mismatch trips the tight ones
