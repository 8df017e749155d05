"""The command line end to end: demo on the tiny model, train from a YAML recipe, plot, and one-line errors."""

import json
import re
from importlib.resources import files

import pytest

from trl_alp.tools.cli import main


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    assert main(["demo", "--model", "tiny", "--max_steps", "3", "--output_dir", str(out)]) == 0
    return out


def test_demo_tiny_writes_report_table_and_png(demo_dir):
    table = (demo_dir / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert [row.split("|")[1].strip() for row in rows] == ["grpo", "seq-bypass", "seq-alp"]
    results = json.loads((demo_dir / "results.json").read_text())["results"]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[2:-1]]
        name = row.split("|")[1].strip()
        q99 = float(cells[3])
        assert q99 == pytest.approx(results[name]["seq_ratio_q99_max"], abs=1e-3)
        assert re.fullmatch(r"[\d.]+ → [\d.]+", cells[0])  # reward first → last
    assert results["seq-alp"]["sigma_final"] > 0
    assert (demo_dir / "envelopes.png").read_bytes()[:4] == b"\x89PNG"
    assert (demo_dir / "seq-alp" / "trainer_state.json").exists()


def test_plot_command(demo_dir, tmp_path, capsys):
    out = tmp_path / "env.png"
    assert main(["plot", str(demo_dir / "seq-alp"), str(demo_dir / "grpo"), "--output", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_train_from_yaml_recipe(tmp_path):
    recipe = files("trl_alp") / "recipes" / "tiny_arithmetic.yaml"
    out = tmp_path / "run"
    assert main(["train", "--config", str(recipe), "--output_dir", str(out), "--max_steps", "2"]) == 0
    assert (out / "model.safetensors").exists() and (out / "alp_state.json").exists()


def test_train_from_local_jsonl(tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1)} for i in range(8)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    args = ["train", "--model_name_or_path", "tiny", "--dataset_name", str(data), "--output_dir", str(tmp_path / "o")]
    args += ["--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations", "4"]
    args += ["--max_completion_length", "8", "--bf16", "false", "--use_cpu", "true", "--report_to", "none"]
    assert main(args) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--model_name_or_path", "./no/such/model"], "model path './no/such/model' does not exist"),
        (["train", "--model_name_or_path", "tiny", "--dataset_name", "./missing.jsonl"], "not found"),
        (["train", "--model_name_or_path", "tiny", "--correction", "alpha"], "invalid choice"),
        (["demo", "--model", "gpt5"], "--model must be one of"),
        (["demo", "--model", "tiny", "--corrections", "seq-alp,nope"], "unknown ['nope']"),
        (["frobnicate"], "unknown command 'frobnicate'"),
    ],
)
def test_bad_input_gives_one_line_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "train":
        argv = [*argv, "--bf16", "false", "--use_cpu", "true", "--report_to", "none"]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert not any(line.startswith("usage:") for line in err)  # one line, not the whole usage


def test_missing_dataset_column(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    argv = [
        "train",
        "--model_name_or_path",
        "tiny",
        "--dataset_name",
        str(data),
        "--bf16",
        "false",
        "--use_cpu",
        "true",
    ]
    assert main(argv + ["--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert last.startswith("trl-alp train: error: ") and "Traceback" not in err
    assert "needs ['prompt']" in last and "--dataset_format gsm8k" in last


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "trl_alp", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage: trl-alp {train,demo,plot,bench}" in done.stdout
