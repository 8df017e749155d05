"""The experiment commands' shared helpers, on hand-written inputs: flags, log-history summaries, tables, JSON."""

import json
import math

import pytest

from trl_alp.experiments.demo import summarize
from trl_alp.experiments.runner import (
    LogHistory,
    comma_list,
    int_list,
    json_safe,
    markdown_table,
    number,
    to_json,
    write_json,
)


def test_comma_list_strips_and_drops_blanks():
    assert comma_list(" grpo, seq-alp,,token-alp ", "corrections") == ["grpo", "seq-alp", "token-alp"]
    assert comma_list("a,b", "scenarios", choices=("a", "b", "c")) == ["a", "b"]


@pytest.mark.parametrize(
    ("value", "choices", "message"),
    [
        ("", None, "--cells is empty"),
        (" , ,", None, "--cells is empty"),
        ("a,fast,slow", ("a", "b"), "--cells: unknown ['fast', 'slow']; choose from ['a', 'b']"),
    ],
)
def test_comma_list_errors_name_the_flag(value, choices, message):
    with pytest.raises(ValueError) as error:
        comma_list(value, "cells", choices)
    assert str(error.value) == message


def test_int_list_sorts_and_deduplicates():
    assert int_list("32, 8,16,8", "lengths") == [8, 16, 32]
    with pytest.raises(ValueError) as error:
        int_list("8,x", "lengths")
    assert str(error.value) == "--lengths must be comma-separated integers, got '8,x'"
    with pytest.raises(ValueError, match="^--lengths is empty$"):
        int_list(",", "lengths")


# TRL logs the reward only on generation steps and σ only for ALP runs; a NaN is a value that was not measured.
HISTORY = [
    {"step": 1, "reward": 0.1, "alp/mismatch/k3_kl": 0.02},
    {"step": 2, "alp/mismatch/k3_kl": 0.05},
    {"step": 3, "reward": 0.4, "alp/mismatch/k3_kl": math.nan},
    {"step": 4, "reward": 0.7, "alp/mismatch/k3_kl": 0.01},
    {"step": 5, "reward": 1.0},
]


def test_log_history_reads_a_metric_across_entries():
    history = LogHistory(HISTORY)
    assert history.series("alp/mismatch/k3_kl") == ([1, 2, 4], [0.02, 0.05, 0.01])  # the NaN step is skipped
    assert history.first("reward") == 0.1 and history.last("reward") == 1.0
    assert history.first("reward", 3) == pytest.approx(0.4)  # (0.1 + 0.4 + 0.7) / 3
    assert history.last("reward", 2) == pytest.approx(0.85)  # (0.7 + 1.0) / 2
    assert history.max("alp/mismatch/k3_kl") == 0.05 and history.min("alp/mismatch/k3_kl") == 0.01
    for reduce in (history.first, history.last, history.max, history.min):
        assert math.isnan(reduce("alp/sigma/mean"))  # never logged: NaN, not an error


def test_demo_summary_of_a_hand_written_history(tmp_path):
    history = [
        {"step": s, "reward": r, "rewards/correctness_reward/mean": a, "alp/ratio/seq/q01": lo}
        | {"alp/ratio/seq/q99": hi, "alp/ratio/seq/max": top, "alp/mismatch/k3_kl": kl}
        for s, r, a, lo, hi, top, kl in [
            (1, 0.2, 0.0, 0.90, 1.10, 1.5, 0.001),
            (2, 0.4, 0.5, 0.80, 1.30, 2.5, 0.004),
            (3, 0.6, 0.5, 0.85, 1.20, 1.8, 0.002),
            (4, 0.8, 1.0, 0.95, 1.05, 1.2, 0.003),
        ]
    ]
    history += [{"step": 4, "train_loss": 0.0, "train_runtime": 1.0}]  # the Trainer's closing entry
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert summarize(str(tmp_path)) == pytest.approx(
        {
            "reward_first": 0.4,  # (0.2 + 0.4 + 0.6) / 3
            "reward_last": 0.6,  # (0.4 + 0.6 + 0.8) / 3
            "accuracy_first": 1 / 3,
            "accuracy_last": 2 / 3,
            "seq_ratio_q01_min": 0.80,
            "seq_ratio_q99_max": 1.30,
            "seq_ratio_max": 2.5,
            "k3_kl_max": 0.004,
            "sigma_final": math.nan,  # a run without noise logs no σ
        },
        nan_ok=True,
    )


def test_markdown_table_and_missing_numbers():
    table = markdown_table(("run", "reward", "σ"), [["grpo", number(0.25), number(None)], ["seq-alp", "1", "0.02"]])
    assert table == "| run | reward | σ |\n|---|---|---|\n| grpo | 0.250 | n/a |\n| seq-alp | 1 | 0.02 |"
    assert number(math.nan, missing="–") == "–" and number(math.inf) == "n/a" and number(-0.5, "+.1f") == "-0.5"
    assert number(3, ".2e") == "3.00e+00"


def test_json_is_strict_nan_and_inf_become_null():
    data = {"sigma": math.nan, "ratios": [math.inf, -math.inf, 1.5], "pair": (2, None), "name": "seq-alp"}
    assert json_safe(data) == {"sigma": None, "ratios": [None, None, 1.5], "pair": [2, None], "name": "seq-alp"}
    assert json.loads(to_json(data)) == json_safe(data)
    assert "NaN" not in to_json(data) and "Infinity" not in to_json(data)


def test_write_json_makes_the_folder_and_leaves_no_partial_file(tmp_path):
    path = tmp_path / "results" / "cell" / "seed0.json"
    write_json(str(path), {"reward_final": math.nan, "steps": 2})

    def reject(constant):
        raise ValueError(f"not JSON: {constant}")

    assert json.loads(path.read_text(), parse_constant=reject) == {"reward_final": None, "steps": 2}
    assert [p.name for p in path.parent.iterdir()] == ["seed0.json"]
