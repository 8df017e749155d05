"""ALP under FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 on two real CPU processes (gloo), through the shipped configs
examples/accelerate/*_cpu.yaml and `accelerate launch`: one launch per engine runs every phase of
tests/distributed_worker.py (full fine-tuning, resume, LoRA, the CLI's train, one Bypass step on fixed rollouts).

The Bypass comparison: correction="seq-bypass" perturbs nothing (σ is not trained there), so one optimizer step is a
function of the weights and the batch alone. The worker serves fixed rollouts (4 rows per rank) in place of sampling;
TRL's pipeline runs as usual from there (buffering, shuffling, loss, backward, the engine's all-reduce or
reduce-scatter, clipping, AdamW). The reference is one process stepping on all 8 rows; weights after the step must
agree to BYPASS_ATOL (float32 sums in another order), while the step itself moves them by ~1e-2.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.multiprocess  # `accelerate launch` of two ranks per engine

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
CONFIGS = {
    "fsdp2": "examples/accelerate/fsdp2_cpu.yaml",
    "zero2": "examples/accelerate/deepspeed_zero2_cpu.yaml",
    "zero3": "examples/accelerate/deepspeed_zero3_cpu.yaml",
}
BYPASS_ATOL = 1e-5
LAYERS = 2  # the tiny model's decoder layers: one σ and one noise seed per layer and step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(engine: str, out: Path, model_dir: Path) -> list[dict]:
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    command = accelerate + ["--config_file", str(ROOT / CONFIGS[engine]), "--main_process_port", str(_free_port())]
    command += [str(WORKER), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["DS_ACCELERATOR"] = "cpu"
    env["TRL_ALP_TEST_MODEL"] = str(model_dir)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def bypass_reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """One single-process optimizer step on the whole fixed-rollout batch (8 rows), and the initial weights."""
    sys.path.insert(0, str(WORKER.parent))
    import distributed_worker as worker

    from trl_alp.experiments.models import build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer()
    model_dir = tmp_path_factory.mktemp("tiny_model")
    build_tiny_model(tokenizer).save_pretrained(model_dir)
    os.environ["TRL_ALP_TEST_MODEL"] = str(model_dir)
    try:
        trainer, _ = worker.make_trainer(
            tokenizer,
            str(tmp_path_factory.mktemp("bypass_ref")),
            cls=worker.FixedRolloutTrainer,
            correction="seq-bypass",
            max_steps=1,
            per_device_train_batch_size=worker.GLOBAL_ROWS,
            num_generations=4,
        )
    finally:
        del os.environ["TRL_ALP_TEST_MODEL"]
    initial = {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}
    trainer.train()
    assert trainer.accelerator.num_processes == 1
    return {"after": worker.full_weights(trainer), "initial": initial, "model_dir": model_dir}


def _check_engine(engine: str, facts: dict) -> None:
    """The engine really runs: two ranks, and its own sharding and optimizer."""
    assert facts["engine"] == engine and facts["world"] == facts["dist_world"] == 2
    assert facts["sigma_optimizer"] == "AdamW" and not facts["sigma_in_main_optimizer"]
    if engine == "fsdp2":
        assert facts["dtensor_frac"] == 1.0 and facts["shard_mesh_sizes"] == [2]
        assert facts["placements"] == ["(Shard(dim=0),)"]
        assert facts["local_numel"] * 2 == facts["global_numel"]  # each rank holds half of every parameter
    else:
        expected = {"zero2": "DeepSpeedZeroOptimizer", "zero3": "DeepSpeedZeroOptimizer_Stage3"}[engine]
        assert facts["optimizer"] == facts["engine_optimizer"] == expected
    if engine == "zero3":
        assert facts["local_numel"] == 0  # parameters are partitioned placeholders between forwards
        assert facts["partitioned_frac"] == 0.5


def _check_sigma_and_noise(phases: list[dict], steps: int) -> None:
    assert phases[0]["sigma_per_step"] == phases[1]["sigma_per_step"]  # σ identical on both ranks after every step
    assert len(phases[0]["sigma_per_step"]) == steps
    assert phases[0]["sigma_per_step"][-1] != [math.log(0.02)] * LAYERS  # and σ learned
    seeds = [set(p["noise_seeds"]) for p in phases]
    assert len(phases[0]["noise_seeds"]) == len(seeds[0]) == steps * LAYERS  # one draw per layer and step
    assert not seeds[0] & seeds[1]  # independent noise per rank
    assert all(math.isfinite(x) for p in phases for x in p["losses"]) and len(phases[0]["losses"]) == steps


@pytest.mark.parametrize("engine", list(CONFIGS))
def test_engine_on_two_cpu_processes(engine, tmp_path, bypass_reference):
    ranks = _launch(engine, tmp_path, bypass_reference["model_dir"])

    full = [r["full"] for r in ranks]
    for facts in full:
        _check_engine(engine, facts)
    _check_sigma_and_noise(full, steps=3)

    # checkpoint-2 resumed for step 3 reproduces the uninterrupted run: σ, σ's Adam state, every weight
    resume = [r["resume"] for r in ranks]
    for before, after in zip(full, resume):
        assert after["global_step"] == 3
        assert after["begin_sigma"] == before["sigma_per_step"][1]
        assert after["sigma_per_step"][-1] == before["sigma_per_step"][-1]
        assert after["sigma_optimizer_step"] == before["sigma_optimizer_step"] == 3.0
    assert resume[0]["weights_checksum"] == pytest.approx(full[0]["weights_checksum"], abs=1e-6)
    saved = json.loads((tmp_path / "run" / "checkpoint-2" / "alp_state.json").read_text())
    assert saved["log_sigma"] == full[0]["sigma_per_step"][1]
    assert saved["sigma_optimizer"]["state"]["0"]["step"]["tensor"] == 2.0
    # alp_state.json is rank 0's alone: once per checkpoint and final save
    assert ranks[1]["alp_state_writes"] == []
    assert sorted(ranks[0]["alp_state_writes"]) == sorted(set(ranks[0]["alp_state_writes"]))
    assert "run/checkpoint-2" in ranks[0]["alp_state_writes"]

    lora = [r["lora"] for r in ranks]
    for facts in lora:
        _check_engine(engine, facts)
    _check_sigma_and_noise(lora, steps=2)
    assert lora[0]["lora_tensors"] > 0 and lora[0]["lora_checksum"] != 0.0
    if engine == "zero3":  # the replay needs the whole LM head outside its forward
        assert "zero3 keeps partitioned" in lora[0]["replay_refused"]
    else:  # top_k=5 replayed under the engine: 5 ids per token; at the first step the ratio is 1 but for ALP's
        # noise (a numerator or denominator left unreplayed would put it near the kept mass, π(S_t) ≈ 0.02 here)
        assert all(p["support_size"] == [5.0, 5.0] for p in lora)
        assert lora[0]["token_ratio_q50"][0] == pytest.approx(1.0, abs=0.05)

    # the CLI (`-m trl_alp train`'s main), LoRA, one step: the engine it reports, and a complete output folder
    for rank in ranks:
        assert rank["cli"]["status"] == 0
        assert f"{engine}: σ has its own AdamW" in rank["cli"]["messages"]
    cli_out = tmp_path / "cli"
    assert (cli_out / "alp_state.json").exists() and (cli_out / "adapter_model.safetensors").exists()

    # one Bypass step on fixed rollouts equals one single-process step on the same global batch
    weights = torch.load(tmp_path / "bypass_weights.pt")
    reference, initial = bypass_reference["after"], bypass_reference["initial"]
    assert set(weights) == set(reference)
    diff = max((weights[name] - reference[name]).abs().max().item() for name in reference)
    moved = max((reference[name] - initial[name]).abs().max().item() for name in reference)
    print(f"{engine}: bypass step max |Δw| vs one process {diff:.3g}, step size {moved:.3g}")  # shown with -s
    assert diff < BYPASS_ATOL < moved / 100, (diff, moved)
