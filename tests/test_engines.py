"""The engine section of trl_alp/trainer.py, one process: which engine owns the optimizer, σ's own optimizer (its
learning rate, its state in alp_state.json and on resume), the refused one-process-per-rank states and FSDP's CPU
promotion. tests/test_distributed.py runs the same code under the real engines."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

import trl_alp.backends as backends_module
from trl_alp.backends import backend_name, backend_owns_optimizer, check_backend_state, promote_cpu_fsdp
from trl_alp.checkpoint import json_state, tensor_state


def _accelerator(kind: DistributedType, processes: int = 2, fsdp_version: int = 2, zero_stage: int = 3):
    state = SimpleNamespace(
        distributed_type=kind,
        num_processes=processes,
        fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version),
        deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage),
        backend="gloo",
    )
    return SimpleNamespace(state=state, distributed_type=kind, num_processes=processes)


@pytest.mark.parametrize(
    ("kind", "processes", "name", "owns"),
    [
        (DistributedType.NO, 1, "single", False),
        (DistributedType.MULTI_CPU, 2, "ddp", False),
        (DistributedType.MULTI_GPU, 8, "ddp", False),
        (DistributedType.FSDP, 2, "fsdp2", True),
        (DistributedType.DEEPSPEED, 2, "zero3", True),
    ],
)
def test_backend_name_and_who_owns_the_optimizer(kind, processes, name, owns):
    accelerator = _accelerator(kind, processes)
    assert backend_name(accelerator) == name
    assert backend_owns_optimizer(accelerator) is owns


def test_states_where_each_rank_would_train_alone_are_refused(monkeypatch):
    check_backend_state(_accelerator(DistributedType.NO, 1))  # one process: nothing to check
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    check_backend_state(_accelerator(DistributedType.MULTI_CPU, 2))
    with pytest.raises(ValueError, match="use_cpu=True"):
        check_backend_state(_accelerator(DistributedType.NO, 2))  # use_cpu off, no accelerator device
    with pytest.raises(ValueError, match="ddp_backend='gloo'"):
        check_backend_state(_accelerator(DistributedType.DEEPSPEED, 1))  # DeepSpeed without a backend named


def test_fsdp_is_promoted_only_from_the_multi_cpu_state_and_only_when_asked(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    accelerator = _accelerator(DistributedType.MULTI_CPU)
    assert not promote_cpu_fsdp(accelerator) and accelerator.state.distributed_type == DistributedType.MULTI_CPU
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    ddp_on_gpus = _accelerator(DistributedType.MULTI_GPU)  # accelerate enables FSDP there itself
    assert not promote_cpu_fsdp(ddp_on_gpus) and ddp_on_gpus.state.distributed_type == DistributedType.MULTI_GPU


def test_optimizer_state_survives_json_exactly():
    sigma = torch.nn.Parameter(torch.tensor([math.log(0.02), math.log(0.03)]))
    optimizer = torch.optim.AdamW([sigma], lr=0.01, betas=(0.9, 0.99))
    sigma.grad = torch.tensor([1e-3, -2.5e-7])
    optimizer.step()
    state = optimizer.state_dict()
    back = tensor_state(json.loads(json.dumps(json_state(state))))
    assert back["param_groups"][0]["betas"] == (0.9, 0.99)
    for key, value in state["state"][0].items():
        assert torch.equal(back["state"][0][key], value) and back["state"][0][key].dtype == value.dtype


def test_sigma_own_optimizer_steps_saves_and_resumes(make_trainer, tmp_path, monkeypatch):
    # what FSDP2 and DeepSpeed get, here in one process: σ outside the main optimizer, stepped by the callback
    monkeypatch.setattr(backends_module, "backend_owns_optimizer", lambda accelerator: True)
    run = make_trainer(
        max_steps=3, save_strategy="steps", save_steps=2, output_dir=str(tmp_path / "a"), alp_sigma_learning_rate=0.05
    )
    run.train()
    log_sigma = run.alp_perturbation.log_sigma
    assert not any(p is log_sigma for g in run.optimizer.param_groups for p in g["params"])
    assert run.alp_sigma_optimizer.state[log_sigma]["step"].item() == 3
    assert not torch.allclose(run.alp_perturbation.sigma, torch.full((2,), 0.02))
    # the main scheduler's factor (linear decay, 3 steps): σ's lr at the last step is 0.05 · 1/3
    assert run.alp_sigma_optimizer.param_groups[0]["lr"] == pytest.approx(0.05 / 3)
    saved = json.loads((tmp_path / "a" / "checkpoint-2" / "alp_state.json").read_text())
    assert saved["sigma_optimizer"]["state"]["0"]["step"]["tensor"] == 2.0

    resumed = make_trainer(max_steps=3, output_dir=str(tmp_path / "b"), alp_sigma_learning_rate=0.05)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert resumed.alp_sigma_optimizer.state[resumed.alp_perturbation.log_sigma]["step"].item() == 3
    assert torch.equal(resumed.alp_perturbation.log_sigma, log_sigma)  # the uninterrupted run's σ, bit for bit


def test_sigma_own_optimizer_is_made_once_per_main_optimizer(make_trainer, monkeypatch):
    # DeepSpeed's setup asks for the optimizer twice: σ's optimizer (and its state) must not be replaced
    monkeypatch.setattr(backends_module, "backend_owns_optimizer", lambda accelerator: True)
    trainer = make_trainer(max_steps=1)
    main = trainer.create_optimizer()
    own = trainer.alp_sigma_optimizer
    assert trainer.create_optimizer() is main and trainer.alp_sigma_optimizer is own
