"""Parity with TRL: the same inputs through TRL's own `GRPOTrainer._compute_loss` and `ALPGRPOTrainer._compute_loss`
give the same loss and the same gradient of every trainable parameter (1e-6: TRL computes log-probs in fp32; the
model is fp64 so back-propagation adds no error of its own), wherever the ratio is TRL's.

The inputs come from TRL's real `_generate_and_score_completions` on its vLLM path (a stand-in engine reports the
sampled tokens' log-probs with seeded noise), so the TIS/MIS cases are checked against TRL's own importance-sampling
code. Where ALP differs on purpose (docs/corrections.md, "Differences from GRPOTrainer"), the test asserts the difference.
"""

import copy
import inspect
import math

import pytest
import torch
import trl.trainer.grpo_trainer as grpo_module
from engines import StandInVLLM
from tiny_setup import PROMPT_ROWS, TRAINER_SETTINGS, length_reward
from trl import GRPOConfig, GRPOTrainer
from trl.generation.vllm_generation import VLLMGeneration

from trl_alp import ALPConfig, ALPGRPOTrainer
from trl_alp.compat import GENERATE_LOGPROBS, GENERATE_OUTPUTS, GRPO_TRAINER_METHODS, VLLM_GENERATION_METHODS
from trl_alp.experiments.models import build_tiny_model
from trl_alp.loss import LOSS_TYPES

RTOL = 1e-6  # of the loss, and of each gradient relative to its largest entry
# Trainer attributes TRL copies from its config in __init__ (ALPGRPOTrainer inherits them).
MIRRORS = {
    "loss_type": "loss_type",
    "beta": "beta",
    "epsilon_low": "epsilon",
    "importance_sampling_level": "importance_sampling_level",
    "top_entropy_quantile": "top_entropy_quantile",
    "off_policy_mask_threshold": "off_policy_mask_threshold",
    "vllm_importance_sampling_correction": "vllm_importance_sampling_correction",
    "vllm_importance_sampling_mode": "vllm_importance_sampling_mode",
    "vllm_importance_sampling_clip_min": "vllm_importance_sampling_clip_min",
    "vllm_importance_sampling_clip_max": "vllm_importance_sampling_clip_max",
}


def configure(trainer, **fields):
    """Give a built trainer new config fields (TRL copies some of them at __init__: mirror those). The config object is
    copied, not rebuilt: rebuilding TrainingArguments resets the accelerator state the trainers share."""
    args = copy.copy(trainer.parity_base_args)
    for name, value in fields.items():
        assert hasattr(args, name), name
        setattr(args, name, value)
    if isinstance(args, ALPConfig):
        args._check_trl_options()  # the construction-time checks, as for a user's config
    trainer.args = args
    for attribute, name in MIRRORS.items():
        setattr(trainer, attribute, getattr(args, name))
    trainer.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    if isinstance(trainer, ALPGRPOTrainer):
        trainer.correction = args.parsed_correction
    return trainer


@pytest.fixture(scope="module")
def trainers(tokenizer, prompt_dataset, tmp_path_factory):
    """TRL's trainer on its vLLM path (stand-in engine) and ALP's trainer, on identical fp64 tiny models."""
    settings = dict(TRAINER_SETTINGS, per_device_train_batch_size=8, num_generations=4, max_completion_length=10)
    settings["output_dir"] = str(tmp_path_factory.mktemp("parity"))
    model = build_tiny_model(tokenizer, seed=3).double()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grpo_module, "VLLMGeneration", StandInVLLM)
        trl_trainer = GRPOTrainer(
            model=copy.deepcopy(model),
            reward_funcs=length_reward,
            args=GRPOConfig(**settings, use_vllm=True, vllm_mode="colocate"),
            train_dataset=prompt_dataset,
            processing_class=tokenizer,
        )
    alp_trainer = ALPGRPOTrainer(
        model=copy.deepcopy(model),
        reward_funcs=length_reward,
        args=ALPConfig(**settings),
        train_dataset=prompt_dataset,
        processing_class=tokenizer,
    )
    for trainer in (trl_trainer, alp_trainer):
        trainer.parity_base_args = copy.copy(trainer.args)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
    return trl_trainer, alp_trainer


TRL_ALP_CLIP = dict(epsilon=0.5, epsilon_high=3.0)  # TRL's clip fields set to ALP's default [0.5, 4.0]
BAND = dict(vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=2.0)  # TIS/MIS band that bites


def generate(trl_trainer, mode: str = "token_truncate", noise: float = 0.7) -> dict:
    """A batch from TRL's real generation + scoring code on the vLLM path, with TRL's IS weights of `mode`."""
    configure(trl_trainer, vllm_importance_sampling_mode=mode, **BAND)
    torch.manual_seed(0)
    rows = [row for row in PROMPT_ROWS[:2] for _ in range(4)]
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(StandInVLLM, "shift", 0.0)
        patch.setattr(StandInVLLM, "noise", noise)
        patch.setattr(StandInVLLM, "ragged", True)
        batch = trl_trainer._generate_and_score_completions(rows)
    g = torch.Generator().manual_seed(1)
    shape = batch["completion_ids"].shape
    batch["advantages"] = torch.randn(shape[0], generator=g, dtype=torch.float64)  # both signs, no ties at zero
    batch["ref_per_token_logps"] = batch["sampling_per_token_logps"] + 0.3 * torch.randn(
        shape, generator=g, dtype=torch.float64
    )
    assert batch["completion_mask"].sum() > 10 and (batch["completion_mask"] == 0).any()  # padding is exercised
    return batch


@pytest.fixture(scope="module")
def batches(trainers):
    trl_trainer, _ = trainers
    return {
        mode: generate(trl_trainer, mode)
        for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
    }


def loss_and_grads(trainer, inputs, micro_batches: int = 1):
    """Loss (summed over micro-batches, as accumulation does) and the gradient of every trainable parameter."""
    trainer.model.zero_grad(set_to_none=True)
    total = 0.0
    size = inputs["completion_ids"].size(0) // micro_batches
    for i in range(micro_batches):
        part = {
            k: v[i * size : (i + 1) * size] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
            for k, v in inputs.items()
        }
        loss = trainer._compute_loss(trainer.model, part)
        loss.backward()
        total += loss.item()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any(g.abs().sum() > 0 for g in grads.values())
    return total, grads


def assert_same(trl_trainer, alp_trainer, trl_inputs, alp_inputs=None, micro_batches=1):
    trl_loss, trl_grads = loss_and_grads(trl_trainer, trl_inputs, micro_batches)
    alp_loss, alp_grads = loss_and_grads(alp_trainer, alp_inputs or trl_inputs, micro_batches)
    assert math.isfinite(trl_loss)
    assert alp_loss == pytest.approx(trl_loss, rel=RTOL, abs=RTOL * 1e-3)
    for name, grad in trl_grads.items():
        tol = dict(rtol=RTOL, atol=RTOL * grad.abs().max().item())
        torch.testing.assert_close(alp_grads[name], grad, **tol, msg=lambda m, n=name: f"gradient of {n}: {m}")
    return trl_loss, alp_loss


def without_vllm_is(batch: dict, old_is_rollout: bool = True) -> dict:
    """Inputs for TRL without its IS correction; with `old_is_rollout`, TRL's π_old is the rollout log-probs μ."""
    inputs = {k: v for k, v in batch.items() if k != "importance_sampling_ratio"}
    if old_is_rollout:
        inputs["old_per_token_logps"] = batch["sampling_per_token_logps"]
    return inputs


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_token_bypass_is_trl_token_level_with_old_equal_rollout(trainers, batches, loss_type):
    trl_trainer, alp_trainer = trainers
    # CISPO: TRL caps at epsilon_high, ALP's clip family at 1 + alp_epsilon_high (a documented difference)
    cap = dict(epsilon_high=4.0) if loss_type == "cispo" else {}
    configure(trl_trainer, loss_type=loss_type, vllm_importance_sampling_correction=False, **{**TRL_ALP_CLIP, **cap})
    configure(alp_trainer, loss_type=loss_type, correction="token-bypass", alp_dual_clip=None)
    assert_same(trl_trainer, alp_trainer, without_vllm_is(batches["token_truncate"]))


ALP_SIGMA = 0.3  # σ of the token-alp parity test: noise that moves the loss far beyond RTOL


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_token_alp_is_trl_token_level_on_the_same_perturbed_forward(trainers, batches, loss_type):
    """token-alp is TRL's token-level loss with π_old = μ on a perturbed policy forward: TRL's model, given the same
    noise (its own LayerPerturbation with ALP's σ, seed and noise coordinates), gives the same loss and gradients."""
    from trl_alp.perturbation import LayerPerturbation, find_decoder_layers

    trl_trainer, alp_trainer = trainers
    cap = dict(epsilon_high=4.0) if loss_type == "cispo" else {}
    configure(trl_trainer, loss_type=loss_type, vllm_importance_sampling_correction=False, **{**TRL_ALP_CLIP, **cap})
    configure(alp_trainer, loss_type=loss_type, correction="token-alp", alp_dual_clip=None)
    inputs = without_vllm_is(batches["token_truncate"])
    alp_noise = alp_trainer.alp_perturbation
    assert alp_noise.layer_indices == [0, 1] and alp_noise.log_sigma.requires_grad
    _, trl_layers = find_decoder_layers(trl_trainer.model)
    trl_noise = LayerPerturbation(trl_layers, alp_noise.layer_indices, init_sigma=ALP_SIGMA, seed=alp_noise.seed)
    saved = alp_noise.log_sigma.detach().clone()
    try:
        with torch.no_grad():
            alp_noise.log_sigma.fill_(math.log(ALP_SIGMA))
        clean, _ = loss_and_grads(alp_trainer, inputs)  # no hooks: the unperturbed forward
        with alp_noise.active(step=1, micro_step=0), trl_noise.active(step=1, micro_step=0):
            trl_loss, alp_loss = assert_same(trl_trainer, alp_trainer, inputs)
        assert alp_noise.applied == [1, 1] or alp_noise.applied == [2, 2]  # each layer perturbed (+ recomputation)
        assert alp_loss != pytest.approx(clean, rel=1e-3)  # the noise is in the loss, so the agreement is not trivial
        sigma_grad = alp_noise.log_sigma.grad
        assert sigma_grad is not None and torch.isfinite(sigma_grad).all() and (sigma_grad != 0).all()  # σ learns
    finally:
        with torch.no_grad():
            alp_noise.log_sigma.copy_(saved)
        alp_noise.log_sigma.grad = None


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_geo_bypass_is_trl_sequence_level(trainers, batches, loss_type):
    trl_trainer, alp_trainer = trainers
    cap = dict(epsilon_high=4.0) if loss_type == "cispo" else {}
    configure(
        trl_trainer,
        loss_type=loss_type,
        importance_sampling_level="sequence",
        vllm_importance_sampling_correction=False,
        **{**TRL_ALP_CLIP, **cap},
    )
    configure(alp_trainer, loss_type=loss_type, correction="geo-bypass", alp_dual_clip=None)
    assert_same(trl_trainer, alp_trainer, without_vllm_is(batches["token_truncate"]))


@pytest.mark.parametrize(
    "fields",
    [
        dict(loss_type="dapo", vllm_importance_sampling_mode="sequence_mask"),
        dict(loss_type="grpo", importance_sampling_level="sequence", delta=1.5, epsilon=0.1),
        dict(loss_type="bnpo", beta=0.05, vllm_importance_sampling_mode="token_truncate"),
    ],
)
def test_grpo_correction_is_trl_unchanged(trainers, batches, fields):
    trl_trainer, alp_trainer = trainers
    configure(trl_trainer, **BAND, **fields)
    configure(alp_trainer, correction="grpo", **BAND, **fields)
    inputs = batches[trl_trainer.vllm_importance_sampling_mode]
    alp_trainer.use_vllm = alp_trainer.vllm_importance_sampling_correction = True  # as TRL on its vLLM path
    try:
        assert_same(trl_trainer, alp_trainer, inputs)
    finally:
        alp_trainer.use_vllm = False


IS_CASES = [
    (mode, loss_type)
    for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
    for loss_type in LOSS_TYPES
    if not (loss_type == "vespo" and mode.startswith("sequence"))  # TRL rejects it; so does ALPConfig
]


@pytest.mark.parametrize(("mode", "loss_type"), IS_CASES)
def test_tis_and_mis_are_trls_vllm_importance_sampling(trainers, batches, mode, loss_type):
    trl_trainer, alp_trainer = trainers
    correction = {"token_truncate": "token-tis", "token_mask": "token-mis"}.get(mode) or (
        "seq-tis" if mode == "sequence_truncate" else "seq-mis"
    )
    fields = dict(loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, **BAND)
    configure(trl_trainer, vllm_importance_sampling_mode=mode, **fields)
    configure(alp_trainer, correction=correction, **fields)
    assert alp_trainer.correction.trl_is_mode == mode
    inputs = batches[mode]
    weights = inputs["importance_sampling_ratio"]
    assert ((weights == 0) | (weights == 0.5) | (weights == 2.0)).any()  # the band bites
    assert_same(trl_trainer, alp_trainer, inputs)


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize(
    ("correction", "trl_fields"),
    [
        ("token-bypass", dict(vllm_importance_sampling_correction=False, **TRL_ALP_CLIP)),
        (
            "geo-bypass",
            dict(vllm_importance_sampling_correction=False, importance_sampling_level="sequence", **TRL_ALP_CLIP),
        ),
        ("token-tis", dict(vllm_importance_sampling_mode="token_truncate", **BAND)),
    ],
)
def test_kl_with_and_without_bias_correction(trainers, batches, correction, trl_fields, bias_correction):
    trl_trainer, alp_trainer = trainers
    common = dict(loss_type="dapo", beta=0.1, use_bias_correction_kl=bias_correction)
    configure(trl_trainer, **common, **trl_fields)
    configure(alp_trainer, correction=correction, alp_dual_clip=None, **common, **BAND)
    batch = batches["token_truncate"]
    inputs = batch if correction == "token-tis" else without_vllm_is(batch)
    assert_same(trl_trainer, alp_trainer, inputs)
    trl_kl, alp_kl = (trainer._metrics["train"]["kl"][-1] for trainer in trainers)  # the logged KL, too
    assert alp_kl == pytest.approx(trl_kl, rel=RTOL) and alp_kl > 0


def opsm_threshold(trainer, inputs) -> float:
    """An off-policy-mask threshold that drops some negative-advantage sequences of `inputs` and keeps others."""
    with torch.no_grad():
        logps = trainer._alp_completion_logps(trainer.model, inputs)[0]
    mask = inputs["completion_mask"]
    seq_kl = ((inputs["sampling_per_token_logps"] - logps) * mask).sum(-1) / mask.sum(-1)
    negative = seq_kl[inputs["advantages"] < 0].sort().values
    assert len(negative) >= 2
    return ((negative[0] + negative[1]) / 2).item()


@pytest.mark.parametrize(
    "fields",
    [dict(top_entropy_quantile=0.5), dict(off_policy_mask_threshold=None), dict(top_entropy_quantile=0.3, beta=0.1)],
)
def test_entropy_and_off_policy_masks(trainers, batches, fields):
    trl_trainer, alp_trainer = trainers
    inputs = without_vllm_is(batches["token_truncate"])
    if "off_policy_mask_threshold" in fields:
        fields = dict(off_policy_mask_threshold=opsm_threshold(alp_trainer, inputs))
    configure(trl_trainer, loss_type="dapo", vllm_importance_sampling_correction=False, **TRL_ALP_CLIP, **fields)
    configure(alp_trainer, loss_type="dapo", correction="token-bypass", alp_dual_clip=None, **fields)
    assert_same(trl_trainer, alp_trainer, inputs)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_gradient_accumulation_over_micro_batches(trainers, batches, loss_type):
    """gradient_accumulation_steps=2, steps_per_generation=2: two micro-batches of one generation batch."""
    trl_trainer, alp_trainer = trainers
    common = dict(loss_type=loss_type, gradient_accumulation_steps=2, steps_per_generation=2)
    configure(trl_trainer, vllm_importance_sampling_correction=False, **TRL_ALP_CLIP, **common)
    configure(alp_trainer, correction="token-bypass", alp_dual_clip=None, **common)
    for trainer in trainers:
        trainer.current_gradient_accumulation_steps = 2
    try:
        assert_same(trl_trainer, alp_trainer, without_vllm_is(batches["token_truncate"]), micro_batches=2)
    finally:
        for trainer in trainers:
            trainer.current_gradient_accumulation_steps = 1


# --------------------------------------------------------------------------------- intentional differences


def test_seq_ratio_is_the_product_not_trls_mean(trainers, batches):
    trl_trainer, alp_trainer = trainers
    configure(
        trl_trainer,
        loss_type="grpo",
        importance_sampling_level="sequence",
        vllm_importance_sampling_correction=False,
        **TRL_ALP_CLIP,
    )
    configure(alp_trainer, loss_type="grpo", correction="seq-bypass", alp_dual_clip=None)
    inputs = without_vllm_is(batches["token_truncate"])
    trl_loss, _ = loss_and_grads(trl_trainer, inputs)
    alp_loss, _ = loss_and_grads(alp_trainer, inputs)
    # by hand: grpo aggregation of −min(w·A, clip(w)·A) with w the product of the token ratios of each sequence
    with torch.no_grad():
        logps = alp_trainer._alp_completion_logps(alp_trainer.model, inputs)[0]
    mask = inputs["completion_mask"].double()
    log_w = ((logps - inputs["sampling_per_token_logps"]) * mask).sum(-1).clamp(-20, 20)
    w, adv = log_w.exp(), inputs["advantages"]
    expected = (-torch.minimum(w * adv, w.clamp(0.5, 4.0) * adv)).mean()
    assert alp_loss == pytest.approx(expected.item(), rel=RTOL)
    assert alp_loss != pytest.approx(trl_loss, rel=1e-3)


def test_dual_clip_caps_negative_advantage_losses(trainers, batches):
    trl_trainer, alp_trainer = trainers
    configure(trl_trainer, loss_type="bnpo", vllm_importance_sampling_correction=False, **TRL_ALP_CLIP)
    inputs = without_vllm_is(batches["token_truncate"])
    inputs["advantages"] = -inputs["advantages"].abs()  # every token negative
    inputs["sampling_per_token_logps"] = inputs["sampling_per_token_logps"] - 3.0  # ratios ≈ e³ > c = 10
    inputs["old_per_token_logps"] = inputs["sampling_per_token_logps"]
    configure(alp_trainer, loss_type="bnpo", correction="token-bypass", alp_dual_clip=10.0)
    capped, _ = loss_and_grads(alp_trainer, inputs)
    configure(alp_trainer, loss_type="bnpo", correction="token-bypass", alp_dual_clip=None)
    uncapped, _ = loss_and_grads(alp_trainer, inputs)
    trl_loss, _ = loss_and_grads(trl_trainer, inputs)
    assert uncapped == pytest.approx(trl_loss, rel=RTOL)  # without the dual clip: TRL's loss
    mask = inputs["completion_mask"].double()
    bound = (10.0 * inputs["advantages"].abs().unsqueeze(1) * mask).sum() / mask.sum()
    assert capped < uncapped and capped <= bound.item() + 1e-9  # each token's loss ≤ c·|A|


def test_log_ratios_are_clamped_at_20(trainers, batches):
    trl_trainer, alp_trainer = trainers
    configure(trl_trainer, loss_type="bnpo", vllm_importance_sampling_correction=False, epsilon=0.5, epsilon_high=1e15)
    configure(alp_trainer, loss_type="bnpo", correction="token-bypass", alp_dual_clip=None, alp_epsilon_high=1e15)
    inputs = without_vllm_is(batches["token_truncate"])
    inputs["advantages"] = inputs["advantages"].abs()
    shifted = inputs["sampling_per_token_logps"].clone()
    shifted[0, 0] -= 30.0  # one token with log ratio ≈ 30
    inputs["sampling_per_token_logps"] = inputs["old_per_token_logps"] = shifted
    alp_loss, _ = loss_and_grads(alp_trainer, inputs)
    trl_loss, _ = loss_and_grads(trl_trainer, inputs)
    mask = inputs["completion_mask"].double()
    token = inputs["advantages"][0].item() / mask.sum().item()  # that token's share of the bnpo mean per unit ratio
    with torch.no_grad():
        log_r = alp_trainer._alp_completion_logps(alp_trainer.model, inputs)[0][0, 0] - shifted[0, 0]
    assert log_r > 20
    # the other tokens agree; that one enters ALP's loss with e^20 and TRL's with e^log_r (no clip: ε_high = 1e15)
    assert alp_loss == pytest.approx(-token * math.exp(20.0), rel=1e-3)
    assert alp_loss - trl_loss == pytest.approx(token * (log_r.exp() - math.exp(20.0)).item(), rel=1e-5)


def test_nonfinite_rollout_tokens_are_dropped_where_trl_gives_nan(trainers, batches):
    trl_trainer, alp_trainer = trainers
    configure(trl_trainer, loss_type="bnpo", vllm_importance_sampling_correction=False, **TRL_ALP_CLIP)
    configure(alp_trainer, loss_type="bnpo", correction="token-bypass", alp_dual_clip=None)
    inputs = without_vllm_is(batches["token_truncate"])
    broken = dict(inputs, sampling_per_token_logps=inputs["sampling_per_token_logps"].clone())
    broken["sampling_per_token_logps"][1, 0] = float("nan")
    broken["old_per_token_logps"] = broken["sampling_per_token_logps"]
    assert math.isnan(trl_trainer._compute_loss(trl_trainer.model, broken).item())
    dropped = dict(inputs, tool_mask=torch.ones_like(inputs["completion_mask"]))
    dropped["tool_mask"][1, 0] = 0  # what ALP does with that token: TRL's loss without it (same forward)
    alp_loss, _ = loss_and_grads(alp_trainer, broken)
    trl_loss, _ = loss_and_grads(trl_trainer, dropped)
    assert alp_loss == pytest.approx(trl_loss, rel=RTOL)


def test_kl_weight_of_the_product_ratio_is_the_token_ratio(trainers, batches):
    """seq-alp/seq-bypass weight the KL by the token ratio (bounded per token), never by the product ratio."""
    _, alp_trainer = trainers
    inputs = without_vllm_is(batches["token_truncate"])

    def kl_part(correction):
        configure(alp_trainer, loss_type="dapo", correction=correction, alp_dual_clip=None, beta=0.1)
        with_kl, grads_kl = loss_and_grads(alp_trainer, inputs)
        configure(alp_trainer, loss_type="dapo", correction=correction, alp_dual_clip=None, beta=0.0)
        without, grads = loss_and_grads(alp_trainer, inputs)
        return with_kl - without, {n: grads_kl[n] - grads[n] for n in grads}

    seq_value, seq_grads = kl_part("seq-bypass")
    token_value, token_grads = kl_part("token-bypass")
    assert seq_value == pytest.approx(token_value, rel=RTOL)
    for name, grad in token_grads.items():  # differences of large policy gradients: tolerance of their scale
        scale = max(grad.abs().max().item(), seq_grads[name].abs().max().item())
        torch.testing.assert_close(seq_grads[name], grad, rtol=1e-4, atol=1e-4 * scale)


# ------------------------------------------------------------------------------------------ TRL's methods


TRL_SURFACE = {
    **{f"GRPOTrainer.{name}": (GRPOTrainer, name, params) for name, params in GRPO_TRAINER_METHODS.items()},
    **{f"VLLMGeneration.{name}": (VLLMGeneration, name, params) for name, params in VLLM_GENERATION_METHODS.items()},
}


@pytest.mark.parametrize("name", sorted(TRL_SURFACE))
def test_trl_methods_have_the_signatures_this_release_was_built_against(name):
    cls, attribute, expected = TRL_SURFACE[name]
    method = getattr(cls, attribute, None)
    assert method is not None, f"TRL has no {name}: trl-alp was built against TRL 1.16"
    params = tuple(inspect.signature(method).parameters)
    assert params == expected, (
        f"{name}{params} differs from TRL 1.16's {expected}: trl-alp overrides or calls "
        "it, so this TRL version is not supported (see pyproject.toml's trl range)."
    )


def test_trl_generate_returns_the_tuple_this_release_reads(trainers):
    """`ALPGRPOTrainer._generate` reads the rollout log-prob rows at a fixed place of TRL's `_generate` tuple."""
    trl_trainer, _ = trainers
    prompts = [row["prompt"] for row in PROMPT_ROWS[:2]]
    with torch.no_grad():
        output = trl_trainer._generate(prompts)
    assert len(output) == GENERATE_OUTPUTS
    completion_ids, logprobs = output[1], output[GENERATE_LOGPROBS]
    assert [len(row) for row in logprobs] == [len(ids) for ids in completion_ids]
    assert all(isinstance(value, float) and value <= 0.0 for row in logprobs for value in row)
