"""The sharp grid: the running-sums task, the sharp policy's pretraining and cache, the pre-registered analysis (hand
computations), and the tiny variant end to end on a real vLLM engine."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from trl_alp.experiments import analysis, sharp
from trl_alp.experiments.models import load_tokenizer
from trl_alp.experiments.stress import GRIDS, Cell, StressArguments, run_config_kwargs, summarize_history
from trl_alp.tasks import running_sums_dataset, running_sums_example, running_sums_reward


def _reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def test_running_sums_examples_and_reward_by_hand():
    import random

    prompt, answer = running_sums_example(random.Random(0), 4)
    digits = [int(d) for d in prompt.removeprefix("Running sums: ").split()]
    sums = [sum(digits[: i + 1]) % 10 for i in range(4)]
    assert answer == " ".join(map(str, sums))
    given = ["3 8 1 9"]  # running sums mod 10: 3 1 2 1
    cases = {"3 1 2 1": 1.0, "3 1 2 1 5": 0.75, "3 1 7 1": 0.5, "4 1 2 1": 0.0, "": 0.0, "3 1 2": 0.75}
    for text, reward in cases.items():
        assert running_sums_reward([_reply(text)], given) == [reward], text
    rows = running_sums_dataset(3, seed=1, digits=5)
    assert rows.column_names == ["prompt", "answer", "digits"]
    assert running_sums_reward([_reply(a) for a in rows["answer"]], rows["digits"]) == [1.0, 1.0, 1.0]


def test_sharp_policy_is_deterministic_cached_and_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_ALP_CACHE", str(tmp_path))
    spec = sharp.SPECS["running-sums-tiny"]
    first, _, log = sharp.pretrain(spec, seed=0, progress=False)
    second, _, _ = sharp.pretrain(spec, seed=0, progress=False)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert log[-1]["step"] == spec.max_steps or log[-1]["token_accuracy"] >= spec.target_accuracy
    assert log[0]["token_accuracy"] < log[-1]["token_accuracy"]  # it learns the task

    path = sharp.sharp_model_path("running-sums-tiny", progress=False)
    record = sharp.read_sharpness(path)
    stats = record["sharpness"]
    assert set(stats) == {"median_entropy", "low_prob_share", "reward", "pass@1", "pass@8", "completion_tokens"}
    assert 0.0 <= stats["low_prob_share"] <= 1.0 and 0.0 <= stats["pass@1"] <= stats["pass@8"] <= 1.0
    assert record["spec"]["digits"] == spec.digits and record["pretraining"][-1] == log[-1] | {
        "seconds": record["pretraining"][-1]["seconds"]
    }
    text = "Running sums: 3 8 1 9"  # the saved folder reads text as the pretraining did (AutoTokenizer would not)
    assert load_tokenizer(path)(text)["input_ids"] == sharp.sharp_tokenizer(spec)(text)["input_ids"]
    built = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert sharp.sharp_model_path("running-sums-tiny", progress=False) == path  # cached: not built again
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == built
    with pytest.raises(ValueError, match="sharp policy 'nope': choose from"):
        sharp.sharp_model_path("nope")


def test_sharp_grid_settings():
    args = StressArguments(grid="sharp")
    assert args.cell_list == ["vllm-bf16-s16", "vllm-fp32-s16", "vllm-bf16-s1", "vllm-fp32-s1"]
    assert args.correction_list == list(GRIDS["sharp"].corrections) and "grpo" in args.correction_list
    runs = dict(args.runs())  # the layer ablation runs in the first (primary) cell only
    assert runs["vllm-bf16-s16"] == args.correction_list + [
        f"seq-alp@{g}" for g in ("early", "middle", "late", "logits")
    ]
    assert runs["vllm-fp32-s1"] == args.correction_list
    assert dict(StressArguments(grid="sharp", corrections="seq-alp").runs())["vllm-bf16-s16"] == ["seq-alp"]
    late = run_config_kwargs(args, Cell.parse("vllm-bf16-s16"), "seq-alp@late", 3, "out")
    assert late["alp_layers"] == "late" and late["alp_log_unperturbed_ratio"] is True and late["seed"] == 3
    assert late["use_vllm"] and late["alp_rollout_dtype"] == "bfloat16" and late["steps_per_generation"] == 16
    grpo = run_config_kwargs(args, Cell.parse("vllm-fp32-s1"), "grpo", 0, "out")
    assert "alp_log_unperturbed_ratio" not in grpo and grpo["correction"] == "grpo"  # TRL's own IS on vLLM


def test_clean_ratio_metrics_prefer_the_unperturbed_log():
    history = [
        {"loss": 0.1, "reward": 0.5, "alp/ratio/seq/q02": 0.5, "alp/ratio/seq/q98": 2.0, "alp/mismatch/k3_kl": 0.2}
        | {"alp/unperturbed/ratio/seq/q02": 0.9, "alp/unperturbed/ratio/seq/q98": 1.1}
        | {"alp/unperturbed/mismatch/k3_kl": k3, "entropy": entropy, "step": step}
        for step, (k3, entropy) in enumerate(((1e-3, 0.9), (1e-2, 0.6), (2e-2, 0.3)), start=1)
    ]
    out = summarize_history(history, 0.2, 0.4, GRIDS["sharp"])
    assert out["log_ratio_width"] == pytest.approx(math.log(4.0))
    assert out["clean_log_ratio_width"] == pytest.approx(math.log(1.1 / 0.9))
    assert out["clean_k3_kl_max"] == 2e-2 and out["clean_kl_spikes"] == 2  # above 5e-3
    assert out["kl_spikes"] == 3 and out["entropy_first_third"] == 0.9 and out["entropy_last_third"] == 0.3
    assert math.isnan(out["clean_entropy_last_third"])  # an ALP run that did not log the clean entropy has none
    for h, clean_entropy in zip(history, (0.5, 0.4, 0.2), strict=True):
        h["alp/unperturbed/entropy"] = clean_entropy
    out = summarize_history(history, 0.2, 0.4, GRIDS["sharp"])
    assert out["clean_entropy_last_third"] == 0.2 and out["history"]["clean_entropy"] == [0.5, 0.4, 0.2]
    assert out["entropy_last_third"] == 0.3  # TRL's (perturbed) entropy stays beside it
    noise_free = [{k: v for k, v in h.items() if not k.startswith("alp/unperturbed")} for h in history]
    assert summarize_history(noise_free, 0.2, 0.4, GRIDS["sharp"])["clean_entropy_last_third"] == 0.3


def test_exploration_uses_the_clean_entropy_and_reads_older_noise_free_records():
    entropy = analysis.METRICS["entropy"]
    old_bypass = {"correction": "seq-bypass", "entropy_last_third": 0.3}
    old_alp = {"correction": "seq-alp@middle", "entropy_last_third": 0.4}  # perturbed: not the clean policy's
    assert analysis.metric_value(old_bypass, entropy) == 0.3
    assert math.isnan(analysis.metric_value(old_alp, entropy))
    assert analysis.metric_value(dict(old_alp, clean_entropy_last_third=0.35), entropy) == 0.35
    # the figure's curves follow the same rule
    assert analysis.clean_entropy_curve(dict(old_bypass, history={"entropy": [0.3]})) == [0.3]
    assert analysis.clean_entropy_curve(dict(old_alp, history={"entropy": [0.4]})) is None
    assert analysis.clean_entropy_curve(dict(old_alp, history={"entropy": [0.4], "clean_entropy": [0.35]})) == [0.35]


def test_exploration_figure_is_written_for_every_cell_with_results(tmp_path):
    from trl_alp.experiments.plots import plot_exploration

    results = [
        {
            "cell": cell,
            "correction": correction,
            "history": {"entropy": [0.2, 0.1], "clean_entropy": [0.2, 0.15]},
            "eval_final": {"pass@8": 0.1 * seed},
        }
        for cell in ("vllm-bf16-s16", "vllm-fp32-s1")
        for correction in ("seq-bypass", "seq-alp")
        for seed in range(2)
    ]
    path = tmp_path / "figures" / "exploration.png"
    plot_exploration(results, ["vllm-bf16-s16", "vllm-bf16-s1", "vllm-fp32-s1"], str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"
    plot_exploration(results, ["vllm-fp32-s16"], str(tmp_path / "none.png"))  # no cell with results: no figure
    assert not (tmp_path / "none.png").exists()


def test_sign_flip_holm_and_bootstrap_by_hand():
    assert analysis.sign_flip_p([1.0, 1.0, 1.0]) == 2 / 8  # only all-plus and all-minus reach |sum| 3
    assert analysis.sign_flip_p([1.0, -1.0]) == 1.0
    assert analysis.sign_flip_p([3.0, 1.0]) == 2 / 4  # |±3±1| ≥ 4 twice of four
    assert math.isnan(analysis.sign_flip_p([]))
    assert analysis.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adjusted = analysis.holm([0.2, math.nan, 0.01])
    assert adjusted[0] == pytest.approx(0.2) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.02)
    assert analysis.bootstrap_ci([2.0] * 5) == (2.0, 2.0)
    low, high = analysis.bootstrap_ci([0.0, 1.0, 2.0, 3.0])
    assert 0.0 <= low < 1.5 < high <= 3.0
    assert analysis.paired_differences({0: 1.0, 1: 5.0, 2: math.nan}, {0: 0.5, 2: 1.0, 3: 1.0}) == [0.5]


def _run(cell, correction, seed, reward, width):
    return {
        "cell": cell,
        "correction": correction,
        "seed": seed,
        "reward_final": reward,
        "clean_log_ratio_width": width,
    }


def test_analysis_pairs_by_seed_and_gives_verdicts():
    cell = analysis.PRIMARY_CELL
    results = []
    for seed in range(10):  # seq-alp: +0.1 reward and a tighter envelope on every seed; token pair: no difference
        results += [
            _run(cell, "seq-bypass", seed, 0.5 + seed / 100, 1.0),
            _run(cell, "seq-alp", seed, 0.6 + seed / 100, 0.5),
        ]
        results += [
            _run(cell, "token-bypass", seed, 0.5, 1.0),
            _run(cell, "token-alp", seed, 0.5 + (-1) ** seed / 100, 1.0),
        ]
        results += [_run(cell, f"seq-alp@{g}", seed, 0.55, 0.4) for g in ("early", "middle", "late", "logits")]
    report = analysis.analyse(results)
    performance = report["comparisons"][cell]["performance"]
    primary = performance[0]
    assert (primary["alp"], primary["baseline"], primary["pairs"]) == ("seq-alp", "seq-bypass", 10)
    assert primary["difference"] == pytest.approx(0.1) and primary["ci_low"] == pytest.approx(0.1)
    assert primary["p"] == 2 / 1024 and primary["favours"] == "alp"
    token = next(r for r in performance if r["alp"] == "token-alp")
    assert token["difference"] == pytest.approx(0.0, abs=1e-12) and token["p"] == 1.0
    # 2 of the 5 performance pairs have runs: Holm multiplies the smallest p by 2
    assert primary["p_holm"] == pytest.approx(2 * 2 / 1024) and primary["significant"]
    assert report["verdicts"]["performance"] == "shown" and report["verdicts"]["tails"] == "shown"
    # +0.05 reward over each partial selection on every seed: significant after Holm over the claim's 8 comparisons
    assert report["verdicts"]["layers"] == "shown"
    assert report["verdicts"]["exploration"] == "not measured"
    reversed_results = [dict(r, reward_final=-r["reward_final"]) for r in results]
    assert analysis.analyse(reversed_results)["verdicts"]["performance"] == "contrary"
    table = analysis.comparison_table(performance)
    assert "| final held-out reward | seq-alp − seq-bypass | 10 |" in table and "*" in table


@pytest.mark.vllm
@pytest.mark.slow
def test_tiny_sharp_grid_on_vllm_writes_the_analysis(tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    from trl_alp.cli.main import main

    monkeypatch.setenv("TRL_ALP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sharp"
    argv = ["stress", "--grid", "sharp-tiny", "--cells", "vllm-bf16-s1", "--corrections", "seq-bypass,seq-alp"]
    assert main([*argv, "--seeds", "2", "--output_dir", str(out)]) == 0
    report = json.loads((out / "analysis.json").read_text())
    assert report["sharpness"]["spec"]["digits"] == sharp.SPECS["running-sums-tiny"].digits
    mismatch = report["engine_mismatch"]["vllm-bf16-s1"]
    assert mismatch["seeds"] == 2 and mismatch["k3_kl"] > 0  # a bf16 engine: a real mismatch at step 1
    rows = report["comparisons"]["vllm-bf16-s1"]["tails"]
    assert rows[0]["pairs"] == 2 and rows[0]["alp"] == "seq-alp"
    run = json.loads((out / "results" / "vllm-bf16-s1" / "seq-alp" / "seed0.json").read_text())
    assert set(run["eval_final"]) == {"reward", "pass@1", "pass@8"} and run["steps"] == 2
    assert run["clean_log_ratio_width"] != run["log_ratio_width"]  # the clean ratio was logged beside the noisy one
    assert len(run["history"]["clean_entropy"]) == 2 and run["history"]["clean_entropy"] != run["history"]["entropy"]
    assert (out / "exploration.png").stat().st_size > 10_000
    text = (out / "analysis.md").read_text()
    assert "| tails |" in text and "## vllm-bf16-s1: tails" in text
    assert "## vllm-bf16-s1: layers" not in text  # no ablation run in this cell: no empty section


def test_gpu_scale_sharp_grid_is_a_valid_config_and_needs_cuda(tmp_path, capsys):
    from trl_alp import ALPConfig
    from trl_alp.cli.main import main

    args = StressArguments(grid="sharp-gpu", output_dir=str(tmp_path))
    spec = sharp.SPECS[GRIDS["sharp-gpu"].model.split(":", 1)[1]]
    assert spec.device == "cuda" and spec.digits == 256 and GRIDS["sharp-gpu"].max_completion_length > spec.digits
    for cell, corrections in args.runs():
        for correction in corrections:
            kwargs = run_config_kwargs(args, Cell.parse(cell), correction, 0, str(tmp_path / "run"))
            assert kwargs["use_cpu"] is False and kwargs["learning_rate"] == GRIDS["sharp"].learning_rate
            ALPConfig(**{**kwargs, "use_cpu": True})  # the same fields validate (CUDA aside)
    if not torch.cuda.is_available():
        assert main(["stress", "--grid", "sharp-gpu", "--output_dir", str(tmp_path / "out")]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
