"""Ratio-envelope plots (`trl_alp.experiments.plots`, `trl-alp plot`): the logged values are drawn, and a run with nothing
to draw is refused with the reason instead of an empty PNG."""

import pytest
from tiny_setup import TRAINER_SETTINGS, length_reward

from trl_alp import ALPConfig, ALPGRPOTrainer
from trl_alp.cli.main import main
from trl_alp.experiments.models import build_tiny_model
from trl_alp.experiments.plots import envelope_data, plot_envelopes
from trl_alp.experiments.runner import load_log_history

PNG = b"\x89PNG\r\n\x1a\n"


def _train(tokenizer, dataset, output_dir, save_state=True, **overrides):
    args = ALPConfig(**{**TRAINER_SETTINGS, "output_dir": str(output_dir), **overrides})
    trainer = ALPGRPOTrainer(
        model=build_tiny_model(tokenizer),
        reward_funcs=length_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    if save_state:
        trainer.save_state()
    return str(output_dir)


@pytest.fixture(scope="module")
def runs(tokenizer, prompt_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("plot-runs")
    return {
        "alp": _train(tokenizer, prompt_dataset, root / "alp", max_steps=3, correction="seq-alp"),
        "bypass": _train(tokenizer, prompt_dataset, root / "bypass", max_steps=3, correction="seq-bypass"),
        # TRL's logging_steps of 10 on a 2-step run that left only its checkpoints: they hold no logged metric
        "unlogged": _train(
            tokenizer,
            prompt_dataset,
            root / "unlogged",
            save_state=False,
            max_steps=2,
            logging_steps=10,
            save_strategy="steps",
            save_steps=1,
        ),
    }


def test_envelope_plot_writes_png_of_the_logged_values(runs, tmp_path):
    out = tmp_path / "plots" / "envelopes.png"
    plotted = plot_envelopes([runs["alp"], runs["bypass"]], str(out))
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000
    history = load_log_history(runs["alp"])
    expected = [h["alp/ratio/seq/q98"] for h in history if "alp/ratio/seq/q98" in h]
    assert plotted["alp"]["q98"][1] == expected and plotted["alp"]["q98"][0] == [1, 2, 3]
    assert envelope_data(history)["reward"][1] == [h["reward"] for h in history if "reward" in h]


def test_plot_command(runs, tmp_path, capsys):
    out = tmp_path / "env.png"
    argv = ["plot", runs["alp"], runs["bypass"], "--labels", "ALP", "Bypass", "--level", "token", "--output", str(out)]
    assert main(argv) == 0
    assert out.read_bytes()[:8] == PNG and capsys.readouterr().out.strip() == f"wrote {out}"


def test_plot_refuses_a_run_without_ratio_metrics_and_says_why(runs, tmp_path, capsys):
    out = tmp_path / "env.png"
    assert main(["plot", runs["alp"], runs["unlogged"], "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trl-alp plot: error: nothing to plot: ")
    state = f"{runs['unlogged']}/checkpoint-2/trainer_state.json"
    assert f"{state} records 2 steps but metrics are logged every 10 steps (logging_steps)" in err[0]
    assert "--logging_steps 1" in err[0]
    assert not out.exists()  # no empty PNG
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_envelopes([runs["unlogged"]], str(out))


def test_plot_reports_missing_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        load_log_history(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_log_history(str(tmp_path / "nope"))
