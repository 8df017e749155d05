"""`trl_alp.advice.recommend`: every row of the decision table, its thresholds, and `trl-alp mismatch --recommend`."""

import json
import math
import re

import pytest
import torch

from trl_alp import ALPConfig
from trl_alp.advice import THRESHOLDS, Recommendation, Situation, recommend
from trl_alp.calibration import masked_k3_kl
from trl_alp.cli.main import main

BF16 = {"k3_kl": 1e-3, "sequence_std": 0.18, "completion_length": 16}  # vLLM bf16 at 16 tokens (results/vllm.md)


@pytest.mark.parametrize(
    "situation, correction, settings",
    [
        ({"k3_kl": 5e-9, "sequence_std": 0.0, "completion_length": 256}, "grpo", {}),
        ({"k3_kl": 5e-9, "sequence_std": 0.0, "completion_length": 256, "truncated": True}, "token-mis", {}),
        ({"k3_kl": 5e-9, "sequence_std": 0.0, "completion_length": 256, "staleness": 16}, "token-mis", {}),
        (BF16, "seq-alp", {"alp_init_sigma": "auto"}),
        ({**BF16, "sequence_std": 0.75, "completion_length": 256}, "token-alp", {"alp_init_sigma": "auto"}),
        ({**BF16, "staleness": 4}, "token-mis", {}),
        (
            {**BF16, "k3_kl": 0.05, "staleness": 4},
            "token-mis",
            {"alp_rollout_rejection": "seq_mean_k3", "alp_rollout_rejection_threshold": "0.2"},
        ),
        (
            {**BF16, "k3_kl": 0.05},
            "seq-alp",
            {
                "alp_init_sigma": "auto",
                "alp_rollout_rejection": "seq_mean_k3",
                "alp_rollout_rejection_threshold": "0.2",
            },
        ),
    ],
)
def test_each_row_of_the_table(situation, correction, settings):
    advice = recommend(Situation(**situation))
    assert (advice.correction, advice.settings) == (correction, settings)
    assert advice.reasons and all(isinstance(line, str) and line for line in advice.reasons)
    ALPConfig(
        output_dir="unused", use_cpu=True, bf16=False, correction=advice.correction, **advice.settings
    )  # a valid config, as printed


@pytest.mark.parametrize("field", ["exact_k3", "sequence_std", "rejection_k3"])
def test_the_thresholds_are_the_boundaries(field):
    """Just below a threshold and at it: the choice flips exactly there (the page quotes these numbers)."""
    limit = getattr(THRESHOLDS, field)
    key = "sequence_std" if field == "sequence_std" else "k3_kl"
    below, above = (recommend(Situation(**{**BF16, key: value})) for value in (limit * 0.99, limit * 1.01))
    if field == "exact_k3":  # on-policy: below the floor TRL's loss, above it the noise
        assert (below.correction, above.correction) == ("grpo", "seq-alp")
    elif field == "sequence_std":
        assert (below.correction, above.correction) == ("seq-alp", "token-alp")
    else:  # the same ratio, with verl's divergence rejection added above the threshold
        assert (
            "alp_rollout_rejection" not in below.settings and above.settings["alp_rollout_rejection"] == "seq_mean_k3"
        )


def test_truncated_sampling_never_gets_trls_unreplayed_loss():
    for k3 in (0.0, 1e-3):
        for staleness in (1, 8):
            advice = recommend(Situation(k3, 0.1, 64, staleness=staleness, truncated=True))
            assert advice.correction != "grpo"
            assert any("alp_replay_support" in line or "support replayed" in line for line in advice.reasons)


def test_the_printed_form_is_a_config_call_and_its_reasons():
    advice = Recommendation("token-alp", {"alp_init_sigma": "auto"}, ["one", "two"])
    assert str(advice) == "ALPConfig(correction='token-alp', alp_init_sigma='auto')\n  - one\n  - two"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"k3_kl": math.nan}, "k3_kl must be a finite number >= 0"),
        ({"sequence_std": -1.0}, "sequence_std must be a finite number >= 0"),
        ({"staleness": 0}, "completion_length and staleness must be >= 1"),
    ],
)
def test_bad_situations_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        Situation(**{**BF16, **fields})


def test_auto_sigma_matches_the_mismatch_kl():
    """The σ₀ the recommendation reports makes the noise's k3 KL equal the engine's, as the trainer's calibration."""
    from trl_alp.experiments.mismatch import auto_sigma, training_logps
    from trl_alp.experiments.models import load_offline_model

    model = load_offline_model("tiny", seed=0)[0]
    model.float().eval()
    prompts, completions = [[1, 2, 3], [4, 5]], [[6, 7, 8, 9], [10, 11, 12, 13]]
    calibration = auto_sigma(model, prompts, completions, mismatch_kl=1e-4, target=1.0)
    assert not calibration.fallback and calibration.target_kl == pytest.approx(1e-4)
    assert calibration.noise_kl == pytest.approx(1e-4, rel=0.05)
    # recomputed from scratch with the same noise draw at the chosen σ
    from trl_alp.perturbation import LayerPerturbation, find_decoder_layers

    _, layers = find_decoder_layers(model)
    perturbation = LayerPerturbation(layers, range(len(layers)), calibration.sigma, learnable=False)
    clean = training_logps(model, prompts, completions)[0]
    with perturbation.active(0, 0), perturbation.forced():
        noisy = training_logps(model, prompts, completions)[0]
    assert masked_k3_kl(noisy - clean, torch.ones_like(clean)) == pytest.approx(calibration.noise_kl, rel=1e-9)
    assert auto_sigma(model, prompts, completions, mismatch_kl=0.0, target=1.0).fallback  # nothing to calibrate


def test_mismatch_recommends_per_engine(tmp_path, capsys):
    out = tmp_path / "mismatch"
    argv = ["--model", "tiny", "--engines", "4bit", "--num_prompts", "3", "--max_tokens", "8", "--lengths", "8"]
    assert (
        main(["mismatch", *argv, "--recommend", "true", "--steps_per_generation", "4", "--output_dir", str(out)]) == 0
    )
    advice = json.loads((out / "results.json").read_text())["engines"]["4bit"]["recommendation"]
    measured = json.loads((out / "results.json").read_text())["engines"]["4bit"]
    assert advice["situation"]["k3_kl"] == measured["token"]["k3_kl"]
    assert advice["situation"]["sequence_std"] == measured["sequence"]["8"]["std"]
    assert advice["situation"]["staleness"] == 4 and advice["correction"] == "token-mis"  # stale: over π_old
    assert advice["calibration"]["sigma"] == advice["situation"]["auto_sigma"] > 0
    printed = capsys.readouterr().out
    assert "4bit: ALPConfig(correction='token-mis'" in printed
    assert "Recommendation" in (out / "results.md").read_text()


def test_the_choosing_page_quotes_the_thresholds():
    """docs/choosing.md's threshold table is `THRESHOLDS`, value for value, so the page cannot drift from the code."""
    from dataclasses import fields

    from doc_blocks import DOCS

    page = (DOCS / "choosing.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", page, flags=re.M))
    assert {f.name for f in fields(THRESHOLDS)} <= set(rows)
    for f in fields(THRESHOLDS):
        assert float(rows[f.name]) == getattr(THRESHOLDS, f.name), f.name
