"""The vLLM path without a GPU: a stand-in engine feeds TRL's `sampling_per_token_logps`, and the real TRL weight-sync
iterator shows what a sync would send."""

import math
import os

import pytest
import torch
import trl.trainer.grpo_trainer as grpo_module
from engines import StandInVLLM
from tiny_setup import count_no_grad_logprob_passes, last_logged

from trl_alp.vllm_engine import claim_master_port

SHIFT = 1.0  # the engine reports log μ = log π − SHIFT, so the token ratio π/μ is exactly e


@pytest.fixture
def fake_vllm(monkeypatch):
    StandInVLLM.instances.clear()
    monkeypatch.setattr(grpo_module, "VLLMGeneration", StandInVLLM)
    monkeypatch.setattr(StandInVLLM, "shift", SHIFT)
    return StandInVLLM.instances


def test_vllm_logprobs_are_the_denominator_and_trls_correction_is_off(make_trainer, fake_vllm, caplog):
    trainer = make_trainer(
        max_steps=1, use_vllm=True, vllm_mode="colocate", correction="token-bypass", learning_rate=0.0
    )
    assert trainer.use_vllm and not trainer.vllm_importance_sampling_correction  # not applied twice
    old_passes = count_no_grad_logprob_passes(trainer)
    trainer.train()
    # Unperturbed, no update yet: π equals the sampler, so the ratio is exactly the engine's shift.
    assert last_logged(trainer, "alp/ratio/token/q50") == pytest.approx(math.e, rel=1e-3)
    assert last_logged(trainer, "alp/mismatch/k1_kl") == pytest.approx(-SHIFT, abs=1e-3)
    assert old_passes == []  # TRL would run an old-log-prob pass for its vLLM correction; ALP does not


def test_weight_sync_never_sends_sigma(make_trainer, fake_vllm, tokenizer):
    from peft import LoraConfig

    for peft_config in (None, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])):
        fake_vllm.clear()
        trainer = make_trainer(max_steps=2, use_vllm=True, vllm_mode="colocate", peft_config=peft_config)
        trainer.train()
        synced = fake_vllm[0].synced
        assert synced, "weights were never synced"
        base = set(trainer.accelerator.unwrap_model(trainer.model).state_dict()) if peft_config is None else None
        for names in synced:
            assert not any("sigma" in n or "lora_" in n for n in names)
            if base is not None:
                assert set(names) <= base
        assert torch.isfinite(trainer.alp_perturbation.log_sigma).all()


def test_vllm_with_emulated_quantisation_is_rejected_and_dtype_is_vllms():
    from trl_alp import ALPConfig

    common = dict(output_dir="x", use_vllm=True, bf16=False, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="vLLM is the engine"):
        ALPConfig(alp_rollout_weight_bits=4, **common)
    assert ALPConfig(alp_rollout_dtype="float32", **common).alp_rollout_dtype == "float32"  # vLLM's dtype
    with pytest.raises(ValueError, match=r"alp_rollout_dtype must be one of \['float32', 'bfloat16', 'float16'\]"):
        ALPConfig(alp_rollout_dtype="fp8", **common)


@pytest.mark.parametrize("processes", [1, 2])
def test_a_single_process_claims_its_own_rendezvous_port(monkeypatch, processes):
    """Unset, 0 or auto: TRL would take 29500 (or the next of its fixed list), the same in every run started at the
    same moment. One process takes an OS-assigned port instead; ranks of a multi-process run keep TRL's choice."""
    ports = set()
    for value in (None, "0", "auto"):
        if value is None:
            monkeypatch.delenv("MASTER_PORT", raising=False)
        else:
            monkeypatch.setenv("MASTER_PORT", value)
        claim_master_port(processes)
        ports.add(os.environ.get("MASTER_PORT"))
    if processes == 1:
        assert len(ports) == 3 and not {int(p) for p in ports} & {29500, 23456, 12355, 12345}
    else:
        assert ports == {None, "0", "auto"}  # untouched: TRL resolves it alike on every rank
    monkeypatch.setenv("MASTER_PORT", "29777")
    claim_master_port(processes)
    assert os.environ["MASTER_PORT"] == "29777"  # the user's port stays
