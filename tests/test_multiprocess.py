"""Two real processes (torch.distributed, gloo on CPU): σ and LoRA weights agree across ranks, noise differs."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess  # torchrun with two ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_training_keeps_sigma_in_sync(tmp_path):
    worker = Path(__file__).with_name("multiprocess_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(_free_port()), str(worker), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["log_sigma"] == ranks[1]["log_sigma"]  # gradients averaged, same steps
    assert ranks[0]["log_sigma"] != [math.log(0.02)] * 2  # and σ did learn
    assert ranks[0]["lora_checksums"] == ranks[1]["lora_checksums"]
    assert len(ranks[0]["noise_seeds"]) == len(ranks[1]["noise_seeds"]) > 0
    assert not set(ranks[0]["noise_seeds"]) & set(ranks[1]["noise_seeds"])  # independent noise per rank
    assert all(math.isfinite(x) for r in ranks for x in r["losses"])
