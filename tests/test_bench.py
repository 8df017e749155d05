"""`trl-alp bench`: the JSON report is the only thing on stdout (logs and progress go to stderr)."""

import json

import pytest

from trl_alp.tools.cli import main


def test_bench_json_is_all_of_stdout(tmp_path, capfd):
    argv = ["bench", "--model", "tiny", "--cycles", "1", "--warmup", "0", "--repeats", "1", "--json"]
    assert main([*argv, "--max_completion_length", "8", "--output_dir", str(tmp_path)]) == 0
    out = capfd.readouterr().out  # file-descriptor level: also what C/Rust extensions write
    results = json.loads(out)
    assert out == json.dumps(results, indent=2) + "\n"  # no blank line or anything else around it
    for scenario in ("no-correction", "old-logprobs"):
        row = results[scenario]
        assert row["grpo_s"] > 0 and row["alp_s"] > 0
        assert row["time_ratio"] == pytest.approx(row["alp_s"] / row["grpo_s"])
        assert row["n_cycles"] == 1
    assert results["device"] == "cpu"
