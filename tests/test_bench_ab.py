"""``trl-alp bench --mode ab``: the in-process A/B of the training micro-step on the tiny model (no timing asserted)."""

import contextlib
import io
import json
import math

import pytest
import torch

from trl_alp.cli.main import main
from trl_alp.experiments.ab import ABArguments, build, schedule

QUICK = ["--model", "tiny", "--completions", "4", "--num_generations", "2", "--max_completion_length", "4"]
QUICK += ["--warmup", "1", "--threads", "1"]
ARMS = ("grpo", "alp", "alp-quiet", "grpo-noise")


@pytest.fixture(scope="module")
def ab(tmp_path_factory):
    out = tmp_path_factory.mktemp("ab")
    argv = ["bench", "--mode", "ab", *QUICK, "--pairs", "3", "--output_dir", str(out), "--json"]
    argv += ["--comparisons", "alp/grpo,grpo/grpo,grpo-noise/grpo,alp-quiet/grpo"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return json.loads(stdout.getvalue()), out


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


@pytest.mark.slow
def test_every_comparison_has_its_pairs_and_finite_positive_ratios(ab):
    results, _ = ab
    assert list(results["comparisons"]) == ["alp/grpo", "grpo/grpo", "grpo-noise/grpo", "alp-quiet/grpo"]
    for name, row in results["comparisons"].items():
        assert row["pairs"] == 3 and len(row["runs"]) == 3, name
        assert all(len(pair) == 2 and _positive(run["wall_s"]) for pair in row["runs"] for run in pair), name
        for key in ("wall_ratio", "cpu_ratio"):
            assert row[key]["n"] == 3 and all(_positive(row[key][s]) for s in ("median", "q1", "q3", "min", "max"))
        assert _positive(row["peak_tensor_memory_ratio"])
    aa = results["comparisons"]["grpo/grpo"]  # the A/A arm: both sides are GRPO runs
    assert all(run["noise_applications"] == 0 for pair in aa["runs"] for run in pair)


@pytest.mark.slow
def test_only_the_noisy_arms_draw_noise_and_give_sigma_a_gradient(ab):
    results, _ = ab
    assert set(results["arms"]) == set(ARMS)
    layers = 4  # the tiny model's decoder layers, all perturbed
    for arm in ARMS:
        row = results["arms"][arm]
        # GRPO is one side of four comparisons and both sides of the A/A one; each arm runs once per pair
        assert row["wall_s"]["n"] == (5 * 3 if arm == "grpo" else 3)
        assert _positive(row["peak_tensor_bytes"]["median"])
        if arm in ("alp", "grpo-noise"):
            # once per layer in the forward, again where checkpointing re-runs the hooks in backward
            assert row["noise_applications"] in (layers, 2 * layers), arm
            assert row["noise_applications_timed"] == [row["noise_applications"]]
            assert row["sigma_grad_abs_sum"] is not None, arm  # σ is in the graph (its value: the batch's advantages)
        else:
            assert row["noise_applications"] == 0 and row["noise_applications_timed"] == [0], arm
            assert row["sigma_grad_abs_sum"] is None, arm


@pytest.mark.slow
def test_json_and_markdown_written(ab):
    results, out = ab
    assert json.loads((out / "ab.json").read_text())["comparisons"].keys() == results["comparisons"].keys()
    table = (out / "ab.md").read_text()
    assert "| grpo/grpo (A/A: resolution) | 3 |" in table and "| alp/grpo | 3 |" in table
    assert results["batch"]["completions"] == 4 and results["finetune"] == "full" and results["threads"] == 1


def test_abba_order_also_for_the_a_a_comparison():
    order = schedule([("alp", "grpo"), ("grpo", "grpo")], 2)
    assert order == [
        (0, 0, 0, "alp"),
        (0, 0, 1, "grpo"),
        (1, 0, 0, "grpo"),
        (1, 0, 1, "grpo"),
        (0, 1, 1, "grpo"),
        (0, 1, 0, "alp"),
        (1, 1, 1, "grpo"),
        (1, 1, 0, "grpo"),
    ]


def test_optimizer_step_runs_are_undone(tmp_path):
    """Every run starts from the same weights, optimizer state and σ, whatever the arm did."""
    # a batch whose rewards differ within a group (seed 0): the loss has a gradient and the step moves the weights
    args = ABArguments(model="tiny", completions=8, num_generations=4, max_completion_length=8, optimizer_step=True)
    args.output_dir = str(tmp_path)
    step = build(args)
    sigma = step.perturbation.log_sigma.detach().clone()
    weights = [p.detach().clone() for p in step.model.parameters()]
    moments = [s["exp_avg"].clone() for s in step.alp.optimizer.optimizer.state.values()]
    for arm in ARMS:
        noise = step.run(arm, check=True)
        assert (noise["sigma_grad_abs_sum"] is not None) == (arm in ("alp", "grpo-noise")), arm  # before the step
        assert any(not torch.equal(w, p) for w, p in zip(weights, step.model.parameters())), arm  # it stepped
        step.reset()
        assert all(torch.equal(w, p) for w, p in zip(weights, step.model.parameters())), arm
        assert torch.equal(step.perturbation.log_sigma, sigma) and step.perturbation.log_sigma.grad is None
        assert all(torch.equal(m, s["exp_avg"]) for m, s in zip(moments, step.alp.optimizer.optimizer.state.values()))


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("comparisons", "alp/nothing", "--comparisons"),
        ("warmup", "0", "--warmup"),
        ("pairs", "0", "--pairs"),
        ("comparisons", "alp/alp-unreplayed", "needs truncated sampling"),
    ],
)
def test_bad_arguments_are_one_line_errors(flag, value, message, capsys):
    assert main(["bench", "--mode", "ab", f"--{flag}", value]) == 2
    assert message in capsys.readouterr().err


def test_the_unreplayed_arm_runs_the_same_batch_without_its_support_table(tmp_path):
    """With top_k the batch carries the support table; alp-unreplayed drops it, so its ratio is off by the kept mass."""
    args = ABArguments(model="tiny", completions=4, num_generations=2, max_completion_length=4, top_k=5)
    args.output_dir = str(tmp_path)
    step = build(args)
    assert "alp_support_ids" in step.batch and "alp_support_ids" not in step.unreplayed
    ratio_q50 = {}
    for arm in ("alp", "alp-unreplayed"):
        step.run(arm)
        ratio_q50[arm] = step.alp._metrics["train"]["alp/ratio/token/q50"][-1]
        step.reset()
    assert ratio_q50["alp"] == pytest.approx(1.0, abs=0.05) and ratio_q50["alp-unreplayed"] < 0.5
