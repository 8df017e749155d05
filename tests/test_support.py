"""Sampling-support replay (top-k / top-p / min-p): the math against hand computations, the rollout side's
support, and the trainer on the generate path (the real-vLLM tests are in test_vllm_engine.py)."""

from __future__ import annotations

import logging
import math
import pickle

import pytest
import torch
from tiny_setup import PROMPT_ROWS, last_logged
from transformers import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

from trl_alp import ALPConfig, ALPGRPOTrainer
from trl_alp.support import (
    SupportedLogp,
    kept_support,
    pack_supports,
    replayed_log_probs,
    support_from_top_logprobs,
    support_stats,
    support_warpers,
)

VOCAB = 366  # the tiny tokenizer's: a support cap this large never truncates
TOL = 1e-5
TRUNCATIONS = [dict(top_p=0.8), dict(top_k=5), dict(min_p=0.1)]


# ------------------------------------------------------------------------------------------------- the math
def reference_replay(hidden, weight, bias, targets, supports, temperature):
    z = (hidden @ weight.T + bias) / temperature
    return torch.stack(
        [
            z[i, y] - torch.logsumexp(z[i, s], 0) if s else z.new_zeros(())
            for i, (y, s) in enumerate(zip(targets, supports))
        ]
    )


@pytest.mark.parametrize("chunk_ids", [1, 4, 10_000])
def test_replayed_log_probs_match_a_hand_computation_values_and_gradients(chunk_ids):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, generator=g, requires_grad=True)
    weight = torch.randn(11, 5, generator=g, requires_grad=True)
    bias = torch.randn(11, generator=g, requires_grad=True)
    supports = [[3, 1, 8], [4], [], list(range(11)), [0, 2, 9, 10], [5, 6], [7, 1, 2, 3, 4]]
    targets = [s[0] if s else 0 for s in supports]
    out = replayed_log_probs(
        hidden,
        weight,
        bias,
        torch.tensor(targets),
        torch.tensor([len(s) for s in supports]),
        torch.tensor(sum(supports, [])),
        temperature=0.7,
        chunk_ids=chunk_ids,
    )
    ref = reference_replay(hidden, weight, bias, targets, supports, 0.7)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out[2] == 0 and out[1] == 0  # no support: 0; a support of one token: log 1
    # the whole vocabulary as support is the plain log-softmax
    assert out[3].item() == pytest.approx(
        torch.log_softmax((hidden @ weight.T + bias) / 0.7, -1)[3, 0].item(), abs=1e-5
    )
    grads = torch.autograd.grad(out.sum(), (hidden, weight, bias))
    ref_grads = torch.autograd.grad(ref.sum(), (hidden, weight, bias))
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_logit_scale_and_softcap_follow_trls_transform():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(3, 4, generator=g), torch.randn(6, 4, generator=g)
    supports = [[0, 1, 2], [5, 3], [4, 0, 1, 2]]
    out = replayed_log_probs(
        hidden,
        weight,
        None,
        torch.tensor([1, 5, 2]),
        torch.tensor([3, 2, 4]),
        torch.tensor(sum(supports, [])),
        temperature=2.0,
        logit_scale=0.5,
        softcap=3.0,
    )
    z = 3.0 * torch.tanh(0.5 * (hidden @ weight.T) / 3.0) / 2.0
    expected = [z[i, y] - torch.logsumexp(z[i, s], 0) for i, (y, s) in enumerate(zip([1, 5, 2], supports))]
    torch.testing.assert_close(out, torch.stack(expected))


def test_kept_support_is_what_transformers_warpers_keep():
    scores = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0], [0.0, 0.0, 3.0, -2.0, 1.0]])
    warpers = support_warpers(top_k=3, top_p=1.0, min_p=None)
    assert [type(w) for w in warpers] == [TopKLogitsWarper]
    log_probs, log_mass, ids, size = kept_support(scores, warpers, max_tokens=4)
    assert ids[0].tolist() == [0, 1, 2, -1]
    assert ids[1, :2].tolist() == [2, 4] and set(ids[1, 2:].tolist()) == {0, 1}  # a tie at the third place: both kept
    assert size.tolist() == [3, 4]
    expected_row0 = torch.log_softmax(torch.tensor([2.0, 1.0, 0.5]), -1)
    torch.testing.assert_close(log_probs[0, :3], expected_row0)
    assert log_probs[0, 3:].eq(-math.inf).all()
    full = torch.log_softmax(scores[0], -1)
    assert log_mass[0].item() == pytest.approx(torch.logsumexp(full[:3], 0).item(), abs=1e-6)
    # top-p keeps the smallest prefix reaching the mass, as transformers' warper
    top_p = LogitsProcessorList([TopPLogitsWarper(top_p=0.5)])
    assert [type(w) for w in support_warpers(0, 0.5, None)] == [TopPLogitsWarper]
    _, _, ids, size = kept_support(scores, top_p, max_tokens=5)
    assert size.tolist() == [1, 1] and ids[:, 0].tolist() == [0, 2]


def test_kept_support_caps_the_ids_and_reports_the_full_size():
    scores = torch.zeros(1, 10)  # uniform: top-p 0.5 keeps 5 tokens
    _, log_mass, ids, size = kept_support(scores, support_warpers(0, 0.5, None), max_tokens=3)
    assert size.item() == 5 and (ids >= 0).sum().item() == 3
    assert log_mass.item() == pytest.approx(math.log(0.5), abs=1e-6)


def test_supported_logp_is_a_float_that_keeps_its_support_through_pickle_and_torch():
    value = SupportedLogp(-1.5, (3, 4), truncated=True, log_mass=-0.2)
    assert value == -1.5 and isinstance(value, float)
    copy = pickle.loads(pickle.dumps(value))
    assert (copy.support, copy.truncated, copy.log_mass) == ((3, 4), True, -0.2)
    assert torch.tensor([value, 0.0]).tolist() == [-1.5, 0.0]
    row = [value, 0.0, SupportedLogp(-0.1, (1,))]
    assert (row + [0.0] * 2)[2].support == (1,)  # TRL's tool-loop concatenation keeps the objects


def test_pack_supports_keeps_rows_and_token_order():
    rows = [
        [SupportedLogp(-1.0, (5, 6)), 0.0, SupportedLogp(-2.0, (7,))],  # a tool token carries no support
        [SupportedLogp(-3.0, (1, 2, 3))],
    ]
    rows[1][0].log_cover = -0.25
    ids, counts, covers = pack_supports(rows, width=4)
    assert counts.tolist() == [[2, 0, 1, 0], [3, 0, 0, 0]]
    assert ids.tolist() == [[5, 6, 7], [1, 2, 3]]
    assert covers.tolist() == [[0.0] * 4, [-0.25, 0.0, 0.0, 0.0]]
    ids, counts, _ = pack_supports(rows, width=2)  # narrower than a row: the table follows the width
    assert counts.tolist() == [[2, 0], [3, 0]] and ids.tolist() == [[5, 6, -1], [1, 2, 3]]


def test_support_stats():
    rows = [[SupportedLogp(-1.0, (1, 2), False, math.log(0.5)), 0.0], [SupportedLogp(-1.0, (1, 2, 3, 4), True)]]
    stats = support_stats(rows)
    assert stats["size"] == 3.0 and stats["truncated_frac"] == 0.5
    assert stats["engine_kept_mass"] == pytest.approx(0.5)
    assert support_stats([[0.0, -1.0]]) == {}


def supported(tokens, bound=1000):
    return lambda values, ids, token: support_from_top_logprobs(values, ids, token, tokens, bound)


def test_vllm_top_n_entries_become_the_support():
    # top 4 by rank, two of them filtered out (-inf): the support is complete
    value = supported(4)([-0.1, -2.4, -math.inf, -math.inf], [7, 3, 9, 1], 3)
    assert value == -2.4 and value.support == (7, 3) and not value.truncated
    assert value.log_cover == 0.0
    # all 4 finite: the support may be larger; the 4 hold this share of μ_S (the cover)
    value = supported(4)([-1.0, -1.5, -2.0, -3.0], [7, 3, 9, 1], 7)
    assert value.support == (7, 3, 9, 1) and value.truncated
    assert value.log_cover == pytest.approx(math.log(sum(math.exp(v) for v in (-1.0, -1.5, -2.0, -3.0))))
    # ... unless top_k bounds it to what was returned
    assert not supported(4, bound=4)([-0.5, -1.0, -2.0, -3.0], [7, 3, 9, 1], 7).truncated
    # a sampled token below the top N comes last, with its rank; it is in the support
    value = supported(2)([-0.5, -1.0, -4.0], [7, 3, 5], 5)
    assert value == -4.0 and 5 in value.support and value.truncated
    assert supported(2)([None], [4], 4) is None  # vLLM's NaN: TRL's handling


# ----------------------------------------------------------------------------------------------- the config
def test_config_says_when_the_replay_applies(caplog):
    base = dict(output_dir="/tmp/unused", report_to="none", use_cpu=True, bf16=False)
    assert ALPConfig(**base, top_p=0.9).replays_support
    assert ALPConfig(**base, top_k=5, correction="token-tis").replays_support
    assert not ALPConfig(**base, top_p=0.9, alp_replay_support=False).replays_support
    assert not ALPConfig(**base).replays_support
    with caplog.at_level(logging.WARNING, logger="trl_alp.config"):
        assert not ALPConfig(**base, top_p=0.9, correction="grpo").replays_support
    assert "TRL issue #6789" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trl_alp.config"):
        ALPConfig(**base, alp_support_max_tokens=64)
    assert "no effect: sampling is not truncated" in caplog.text
    with pytest.raises(ValueError, match=r"generation_kwargs \['typical_p'\]"):
        ALPConfig(**base, top_p=0.9, generation_kwargs={"typical_p": 0.9})
    with pytest.raises(ValueError, match="alp_support_max_tokens must be an integer >= 1"):
        ALPConfig(**base, top_p=0.9, alp_support_max_tokens=0)


# ------------------------------------------------------------------------------- the trainer, generate path
def train_one_step(make_trainer, **overrides):
    settings = dict(max_steps=1, learning_rate=1e-6, alp_support_max_tokens=VOCAB)
    settings.update(overrides)
    trainer = make_trainer(**settings)
    trainer.train()
    return trainer


def assert_token_ratio_is_one(trainer, prefix="alp"):
    assert last_logged(trainer, f"{prefix}/ratio/token/min") == pytest.approx(1.0, abs=TOL)
    assert last_logged(trainer, f"{prefix}/ratio/token/max") == pytest.approx(1.0, abs=TOL)


@pytest.mark.parametrize("truncation", TRUNCATIONS, ids=lambda t: next(iter(t)))
def test_bypass_is_on_policy_under_truncated_sampling(make_trainer, truncation):
    trainer = train_one_step(make_trainer, correction="token-bypass", **truncation)
    assert_token_ratio_is_one(trainer)
    assert last_logged(trainer, "alp/support/truncated_frac") == 0.0
    engine, policy = (
        last_logged(trainer, "alp/support/engine_kept_mass"),
        last_logged(trainer, "alp/support/policy_kept_mass"),
    )
    assert policy == pytest.approx(engine, abs=1e-4)
    if "min_p" not in truncation:  # the random model's flat distribution: min_p 0.1 keeps every token
        assert engine < 0.9


def test_tis_and_mis_weights_are_one_on_policy(make_trainer):
    band = dict(vllm_importance_sampling_clip_min=1 - TOL, vllm_importance_sampling_clip_max=1 + TOL)
    tis = train_one_step(make_trainer, correction="token-tis", top_p=0.8, **band)
    assert last_logged(tis, "alp/is/truncated_frac") == 0.0
    mis = train_one_step(make_trainer, correction="seq-mis", top_k=5, steps_per_generation=2, max_steps=2, **band)
    assert last_logged(mis, "alp/is/masked_frac") == 0.0  # the second step replays TRL's (old-pass) π_old too


def test_alp_ratio_differs_from_one_only_by_its_noise(make_trainer):
    trainer = train_one_step(make_trainer, correction="token-alp", top_p=0.8, alp_log_unperturbed_ratio=True)
    assert_token_ratio_is_one(trainer, "alp/unperturbed")
    assert last_logged(trainer, "alp/ratio/token/max") > 1 + 1e-3  # the noise


def test_rollout_mask_uses_the_replayed_old_policy(make_trainer):
    trainer = train_one_step(
        make_trainer,
        correction="token-bypass",
        top_k=5,
        alp_rollout_mask="token",
        alp_rollout_mask_min=1 - TOL,
        alp_rollout_mask_max=1 + TOL,
    )
    assert last_logged(trainer, "alp/rollout_mask/masked_frac") == 0.0


def test_off_policy_replay_equals_full_logits_restricted_to_the_support(make_trainer):
    trainer = make_trainer(correction="token-bypass", top_p=0.8, alp_support_max_tokens=VOCAB, temperature=0.9)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([row for row in PROMPT_ROWS[:2] for _ in range(4)])
    with torch.no_grad():
        for p in trainer.model.parameters():  # the policy moves after sampling
            p.add_(0.05 * torch.randn_like(p))
        replayed, _, _ = trainer._alp_completion_logps(trainer.model, batch)
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        width = batch["completion_ids"].size(1)
        logits = trainer.model(input_ids=ids, attention_mask=mask).logits[:, -width - 1 : -1].float() / 0.9
    counts, table = batch["alp_support_counts"], batch["alp_support_ids"]
    assert counts.shape == batch["completion_ids"].shape
    assert ((counts > 0) == batch["completion_mask"].bool()).all()  # every sampled token, no padding
    checked = 0
    for b in range(counts.size(0)):
        offset = 0
        for t in range(width):
            n = int(counts[b, t])
            if n == 0:
                continue
            support = table[b, offset : offset + n]
            offset += n
            y = batch["completion_ids"][b, t]
            assert y in support
            expected = logits[b, t, y] - torch.logsumexp(logits[b, t, support], 0)
            assert replayed[b, t].item() == pytest.approx(expected.item(), abs=TOL)
            checked += 1
    assert checked == int(batch["completion_mask"].sum()) > 10
    full, _, _ = super(type(trainer), trainer)._get_per_token_logps_and_entropies(trainer.model, ids, mask, width)
    assert ((full - replayed)[batch["completion_mask"].bool()] < -1e-3).all()  # the replay moved every token


def test_without_truncation_nothing_changes(make_trainer, monkeypatch):
    calls = []
    replay = ALPGRPOTrainer._alp_replayed_logps_and_entropies
    monkeypatch.setattr(
        ALPGRPOTrainer, "_alp_replayed_logps_and_entropies", lambda *a, **k: calls.append(1) or replay(*a, **k)
    )
    trainer = train_one_step(make_trainer, correction="token-bypass", learning_rate=1e-2)
    assert calls == []
    assert not any(k.startswith("alp/support/") for h in trainer.state.log_history for k in h)
    batch = trainer._generate_and_score_completions(PROMPT_ROWS[:4])
    assert "alp_support_ids" not in batch


def test_a_cut_support_is_exact_on_policy_through_its_cover(make_trainer):
    """Supports of the flat random model hold ~290 tokens at top_p 0.8; kept to 8 ids, the engine's cover of them
    restores log π(S_t) exactly on-policy, so Bypass stays at ratio 1 (without it: ~1.3, see the next test)."""
    trainer = train_one_step(make_trainer, correction="token-bypass", top_p=0.8, alp_support_max_tokens=8)
    assert last_logged(trainer, "alp/support/truncated_frac") == 1.0
    assert last_logged(trainer, "alp/support/size") <= 9
    assert_token_ratio_is_one(trainer)


def test_the_cover_is_what_makes_a_cut_support_exact():
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(1, 4, generator=g), torch.randn(20, 4, generator=g)
    z = hidden @ weight.T
    support = z[0].topk(12).indices  # S_t, cut to its 5 most probable ids
    head, y = support[:5], support[0]
    cover = torch.logsumexp(torch.log_softmax(z[0, support], 0)[:5], 0)  # μ_S(head) with μ = π
    args = (hidden, weight, None, y[None], torch.tensor([5]), head)
    exact = z[0, y] - torch.logsumexp(z[0, support], 0)
    assert replayed_log_probs(*args, log_cover=cover[None]).item() == pytest.approx(exact.item(), abs=1e-5)
    assert replayed_log_probs(*args).item() > exact.item() + 0.05  # the head alone overstates π_S(y)


def test_the_reference_pass_is_replayed_too(make_trainer):
    """beta > 0 at step 1 with LoRA (the reference is the adapter switched off; the fresh adapter changes nothing):
    the KL of the replayed policy to it is 0 only if the reference log-probs are replayed on the same support."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = train_one_step(make_trainer, correction="token-bypass", top_k=5, beta=0.1, peft_config=lora)
    assert last_logged(trainer, "kl") == pytest.approx(0.0, abs=1e-6)


def test_a_custom_rollout_func_without_supports_is_said_not_replayed(make_trainer, tokenizer, caplog):
    def rollout_func(prompts, trainer):
        ids, completion = [[5, 6]] * len(prompts), [[7, 8, tokenizer.eos_token_id]] * len(prompts)
        return {"prompt_ids": ids, "completion_ids": completion, "logprobs": [[-1.0, -2.0, -0.5]] * len(prompts)}

    trainer = make_trainer(max_steps=1, correction="token-bypass", top_p=0.9)
    trainer.rollout_func = rollout_func
    with caplog.at_level(logging.WARNING, logger="trl_alp.trainer"):
        trainer.train()
    assert "carry no sampling support" in caplog.text
    assert not any(k.startswith("alp/support/") for h in trainer.state.log_history for k in h)
